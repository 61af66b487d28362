"""``revsnn check MODEL_OR_FACTORY``: passes on the zoo's RevSResNet21 and prints a table per sequence; fails
(exit status 1) on a broken factory, naming the sequence and block; user errors are one line and exit status 2."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from revsnn_triton.cli import main

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

FACTORIES = textwrap.dedent('''
    """Factories for ``revsnn check``: a sound model and one with a nondeterministic block."""
    import numpy as np
    import torch
    import torch.nn as nn

    from revsnn_triton import IFNode, RevBlock, RevSequence


    class Branch(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.neuron = IFNode(step_mode="m")
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.bn = nn.BatchNorm2d(c)

        def forward(self, x):
            return self.bn(self.conv(self.neuron(x).flatten(0, 1))).unflatten(0, x.shape[:2])


    class Noisy(Branch):
        """Adds noise from numpy's generator, which the engine cannot replay."""

        def forward(self, x):
            return super().forward(x) + 0.1 * torch.from_numpy(np.random.standard_normal(x.shape)).float()


    class Net(nn.Module):
        def __init__(self, noisy=False):
            super().__init__()
            torch.manual_seed(0)
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.body = RevSequence([RevBlock(Branch(2), Branch(2)),
                                     RevBlock(Noisy(2) if noisy else Branch(2), Branch(2))])
            self.head = nn.Linear(4, 5)

        def forward(self, images):  # [B, 3, H, W], repeated over T = 2
            x = self.stem(images).unsqueeze(0).expand(2, -1, -1, -1, -1)
            return self.head(self.body(x).mean((0, 3, 4)))


    def sound():
        return Net(), torch.rand(2, 3, 6, 6)


    def broken():
        return Net(noisy=True), torch.rand(2, 3, 6, 6)


    def model_only():
        return Net()


    def not_a_model():
        return "Net"
''')


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "check_factories.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("check_factories", None)


def test_check_revsresnet21_passes_and_prints_a_table_per_sequence(capsys):
    assert main(["check", "RevSResNet21", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("revsnn check RevSResNet21: input [2, 3, 32, 32] on cpu, training mode")
    for i, (channels, size) in enumerate([(128, 32), (256, 16), (512, 8), (896, 4)]):
        assert f"stages.{i}: RevSequence of 1 block, input [4, 2, {channels}, {size}, {size}] float32, frac_bits 16" \
            in out
    # the last stage trains with ordinary autograd (keep_graph_stages) and is still checked as reversible
    assert out.count("(trains with reversible=False") == 1
    assert "frac_bits 16 (trains with reversible=False, keeping its graph; checked as a reversible sequence)" in \
        out.split("stages.3:")[1].splitlines()[0]
    header = "block  exact  max grad dev  BN once  deterministic  headroom (bits)"
    assert out.count(header) == 4
    rows = [line.split() for line in out.splitlines() if line.startswith("0 ")]
    assert len(rows) == 4
    for row in rows:
        # exact, gradients bit-identical on the CPU, BN once, deterministic, some bits of headroom
        assert row[:2] == ["0", "yes"] and float(row[2]) == 0.0 and row[3:5] == ["yes", "yes"], row
        assert 1.0 < float(row[5]) < 31.0, row
    assert out.rstrip().endswith("revsnn check: all checks passed (4 sequences, 4 blocks)")
    # the README shows this output (its first stage) as the command prints it; figures may differ in their last
    # digits on another CPU (its BLAS), the rest may not
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = re.search(r"^```\n(revsnn check RevSResNet21: .*?)^```", readme, flags=re.M | re.S).group(1)

    def figures_masked(text: str) -> str:
        return re.sub(r"\d+\.\d+(e-?\d+)?", "<figure>", text)
    assert figures_masked(shown) in figures_masked(out)


def test_check_a_factory_and_its_example_input(factories, capsys):
    assert main(["check", "check_factories:sound", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "body: RevSequence of 2 blocks, input [2, 2, 4, 6, 6] float32" in out
    assert "all checks passed (1 sequence, 2 blocks)" in out
    # a factory that returns only the model takes --input-shape
    assert main(["check", "check_factories:model_only", "--input-shape", "3,3,4,4", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "check_factories:model_only: input [3, 3, 4, 4]" in out and "input [2, 3, 4, 4, 4] float32" in out


def test_check_a_broken_factory_fails_naming_the_block(tmp_path):
    (tmp_path / "check_factories.py").write_text(FACTORIES)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-m", "revsnn_triton", "check", "check_factories:broken", "--device",
                             DEVICE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "FAILED body: deterministic: block 1: branch F (Noisy) is not deterministic" in result.stdout
    assert "FAILED body: invertible: block 1: inverse_fixed does not give back" in result.stdout
    row = next(line.split() for line in result.stdout.splitlines() if line.startswith("1 "))
    assert row[1] == "NO" and row[4] == "NO", result.stdout
    assert "revsnn check: " in result.stderr and "problem" in result.stderr


@pytest.mark.parametrize("argv, message", [
    (["RevSResNet2"], "unknown model 'RevSResNet2' (did you mean"),
    (["no_such_module:make"], "cannot import 'no_such_module': ModuleNotFoundError"),
    (["check_factories:missing"], "'check_factories' has no attribute 'missing'"),
    (["check_factories:not_a_model"], "must return a torch.nn.Module or (module, example_input), got str"),
    (["check_factories:model_only"], "returned no example input: return (model, example_input) or give "
                                     "--input-shape"),
    (["check_factories:sound", "--input-shape", "2,x"], "--input-shape: expected positive integers"),
    (["MS-ResNet-digits"], "MSResNet has no RevSequence to check"),
    (["RevSResNet-digits", "--runs", "1"], "--runs must be >= 2"),
    (["check_factories:"], "expected package.module:factory"),
    (["check_factories:sound", "--T", "4"], "--T applies only to registered models"),
])
def test_user_errors_are_one_line_and_status_2(factories, capsys, argv, message):
    assert main(["check", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only machine has no CUDA device to refuse")
def test_check_on_a_missing_device_is_a_user_error(capsys):
    assert main(["check", "RevSResNet-digits", "--device", "cuda"]) == 2
    assert "revsnn check: error: --device cuda" in capsys.readouterr().err


def test_check_is_listed_and_has_help(capsys):
    assert main(["--help"]) == 0
    assert "check MODEL" in capsys.readouterr().out
    assert main(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "package.module:factory" in out and "Exit status: 0 all checks passed, 1 a check" in out
