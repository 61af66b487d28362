"""The pytest plugin (``revsnn_triton.testing.plugin``) and the README's example test file: a user's test module
runs the Triton kernels on the CPU with the plugin and no conftest, in a fresh pytest process outside this suite."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from revsnn_triton.testing import plugin

README = Path(__file__).resolve().parents[1] / "README.md"
HAS_CUDA = torch.cuda.is_available()

# a user's test module: the Triton neuron kernel on the plugin's device, against the plain-PyTorch path
KERNEL_MODULE = textwrap.dedent('''
    import os
    import sys

    import torch

    from revsnn_triton import LIFNode
    from revsnn_triton.runtime import cpu_kernels


    def test_kernels_run(triton_kernels):
        if triton_kernels == "cpu":
            assert os.environ["TRITON_INTERPRET"] == "1"
        x = torch.randn(4, 3, 50, device=triton_kernels) * 2
        spikes = LIFNode(step_mode="m")(x)
        assert "revsnn_triton.kernels.neurons" in sys.modules  # the Triton launcher ran
        with cpu_kernels("torch"):
            reference = LIFNode(step_mode="m")(x.cpu())
        assert torch.equal(spikes.cpu(), reference) and 0 < int(spikes.sum()) < x.numel()
''')


def _pytest(folder: Path, *args: str, **env_changes) -> subprocess.CompletedProcess:
    """A fresh ``python -m pytest`` in ``folder`` (no conftest, no ini file), with TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "HYPOTHESIS_PROFILE", "PYTEST_ADDOPTS", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", **env_changes)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=900)


def _example() -> str:
    blocks = re.findall(r"^```python\n(# test_my_block\.py.*?)^```", README.read_text(), flags=re.M | re.S)
    assert len(blocks) == 1, "the README's section 'Testing your own reversible block' has lost its example"
    return blocks[0]


def test_readme_example_test_file_passes_without_conftest(tmp_path):
    (tmp_path / "test_my_block.py").write_text(_example())
    command = "pytest test_my_block.py --hypothesis-profile=revsnn-ci"
    assert command in README.read_text()  # as the README runs it
    result = _pytest(tmp_path, *command.split()[1:], "-rs")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"\b5 passed\b", result.stdout) and "skipped" not in result.stdout, result.stdout[-2000:]
    assert not (tmp_path / "conftest.py").exists()


def test_plugin_opt_in_and_opt_out(tmp_path):
    (tmp_path / "test_user_kernels.py").write_text(KERNEL_MODULE)
    # loaded automatically (the installed entry point)
    result = _pytest(tmp_path, "-rs")
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
    assert "skipped" not in result.stdout
    # plugin autoloading off: -p revsnn_triton.testing.plugin enables it
    result = _pytest(tmp_path, "-p", "revsnn_triton.testing.plugin", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
    # without the plugin nothing provides the fixture (there is no conftest)
    result = _pytest(tmp_path, "-p", "no:revsnn_triton.testing.plugin")
    assert result.returncode != 0 and "fixture 'triton_kernels' not found" in result.stdout, result.stdout


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU machine the plugin leaves TRITON_INTERPRET alone anyway")
def test_plugin_leaves_the_environment_alone_when_told(tmp_path):
    (tmp_path / "test_env.py").write_text(textwrap.dedent('''
        import os


        def test_env(kernel_device):
            assert kernel_device == "cpu"
            assert "TRITON_INTERPRET" not in os.environ
    '''))
    (tmp_path / "pytest.ini").write_text("[pytest]\nrevsnn_interpreter = false\n")
    result = _pytest(tmp_path)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr


def test_interpreter_only_without_a_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(plugin, "has_gpu_device", lambda: True)
    assert not plugin.use_interpreter_without_gpu() and "TRITON_INTERPRET" not in os.environ
    monkeypatch.setattr(plugin, "has_gpu_device", lambda: False)
    assert plugin.use_interpreter_without_gpu() and os.environ["TRITON_INTERPRET"] == "1"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a user's choice is kept
    assert not plugin.use_interpreter_without_gpu() and os.environ["TRITON_INTERPRET"] == "0"


def test_hypothesis_profiles():
    from hypothesis import settings

    ci, long = settings.get_profile("revsnn-ci"), settings.get_profile("revsnn-long")
    assert ci.derandomize and ci.max_examples == 20 and ci.deadline is None
    assert not long.derandomize and long.max_examples == 300 and long.deadline is None
    assert settings.get_current_profile_name() == plugin.profile_name(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
    assert [plugin.profile_name(n) for n in ("ci", "long", "revsnn-ci", "dev")] == [
        "revsnn-ci", "revsnn-long", "revsnn-ci", "dev"]
