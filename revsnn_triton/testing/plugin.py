"""pytest plugin: Triton kernels on a machine without a GPU, device fixtures, and Hypothesis profiles.

Installing revsnn_triton registers it (entry point ``pytest11`` named ``revsnn_triton.testing.plugin``), so a test
module needs no conftest. Where plugin autoloading is off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), enable it with
``pytest -p revsnn_triton.testing.plugin``; ``-p no:revsnn_triton.testing.plugin`` disables it.

- **Triton's interpreter.** On a machine without a GPU (no NVIDIA or AMD device node, no ``nvidia-smi``), the
  plugin sets ``TRITON_INTERPRET=1`` before any conftest or test module is imported (so before triton is), unless
  the variable is set already. Kernels can then run on CPU tensors. The ini option
  ``revsnn_interpreter = false`` leaves the environment alone.
- **Fixtures.** ``kernel_device``: ``"cuda"`` when torch sees a CUDA device, else ``"cpu"``. ``triton_kernels``:
  the same device, and on the CPU every op of this library runs its Triton kernel through the interpreter for the
  duration of the test (``revsnn_triton.runtime.cpu_kernels("triton")``; without the fixture CPU tensors take the
  plain-PyTorch path); skips with the reason when the interpreter is off.
- **Hypothesis profiles** ``revsnn-ci`` (derandomized, 20 examples, no deadline: a CI run never fails by chance,
  and interpreted kernels are slow) and ``revsnn-long`` (300 random examples, for local or GPU runs). Load one with
  ``--hypothesis-profile=revsnn-ci``, or for a whole project with the ini option ``revsnn_hypothesis_profile = ci``
  (the environment variable ``HYPOTHESIS_PROFILE``, e.g. ``long``, overrides that option).

Nothing here imports torch or hypothesis before a test session needs them, and no fixture is autouse.
"""
from __future__ import annotations

import os
import shutil

import pytest

PROFILES = ("revsnn-ci", "revsnn-long")


def has_gpu_device() -> bool:
    """Whether this machine has a GPU Triton could compile for (checked without importing torch)."""
    return (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")
            or shutil.which("nvidia-smi") is not None)


def use_interpreter_without_gpu() -> bool:
    """Set ``TRITON_INTERPRET=1`` on a machine without a GPU unless the variable is set; returns whether it is on."""
    if "TRITON_INTERPRET" not in os.environ and not has_gpu_device():
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def register_hypothesis_profiles() -> None:
    """Register ``revsnn-ci`` and ``revsnn-long`` (if hypothesis is installed)."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:
        return
    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("revsnn-ci", derandomize=True, max_examples=20, deadline=None, print_blob=True,
                              suppress_health_check=quiet)
    # Every setting that matters is explicit: under CI=true hypothesis loads its own "ci" profile (derandomized),
    # and a profile inherits what it does not set from the profile loaded when it is registered.
    settings.register_profile("revsnn-long", derandomize=False, max_examples=300, deadline=None, print_blob=True,
                              suppress_health_check=quiet)


def profile_name(name: str) -> str:
    """``"ci"`` / ``"long"`` -> ``"revsnn-ci"`` / ``"revsnn-long"``; any other name unchanged."""
    return f"revsnn-{name}" if f"revsnn-{name}" in PROFILES else name


def pytest_addoption(parser) -> None:
    parser.addini("revsnn_interpreter", type="bool", default=True,
                  help="revsnn_triton: set TRITON_INTERPRET=1 on a machine without a GPU (default: true)")
    parser.addini("revsnn_hypothesis_profile", default="",
                  help="revsnn_triton: Hypothesis profile to load (ci or long; HYPOTHESIS_PROFILE overrides it)")


def _interpreter_wanted(config) -> bool:
    try:
        return bool(config.getini("revsnn_interpreter"))
    except ValueError:  # the option is not registered yet
        return True


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args) -> None:
    if _interpreter_wanted(early_config):
        use_interpreter_without_gpu()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    # A plugin registered by a conftest's pytest_plugins misses pytest_load_initial_conftests; this is early enough
    # for it still (test modules are imported later).
    if _interpreter_wanted(config):
        use_interpreter_without_gpu()
    register_hypothesis_profiles()
    name = config.getini("revsnn_hypothesis_profile")
    if name:
        name = profile_name(os.environ.get("HYPOTHESIS_PROFILE") or name)
        from hypothesis import settings
        from hypothesis.errors import InvalidArgument
        try:
            settings.load_profile(name)
        except InvalidArgument:
            raise pytest.UsageError(f"revsnn_hypothesis_profile / HYPOTHESIS_PROFILE: unknown Hypothesis profile "
                                    f"{name!r}; revsnn_triton registers {', '.join(PROFILES)} (or ci, long)") from None


def pytest_report_header(config) -> str:
    state = os.environ.get("TRITON_INTERPRET", "unset")
    return f"revsnn_triton: TRITON_INTERPRET={state}"


@pytest.fixture
def kernel_device() -> str:
    """``"cuda"`` when torch sees a CUDA device, else ``"cpu"``."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_kernels(kernel_device: str):
    """The device this test's Triton kernels run on: ``"cuda"``; or ``"cpu"``, with every op of revsnn_triton on
    CPU tensors running its Triton kernel through Triton's interpreter until the test ends."""
    if kernel_device != "cpu":
        yield kernel_device
        return
    from revsnn_triton import runtime
    if not runtime.interpreter_enabled():
        pytest.skip("Triton kernels on the CPU need TRITON_INTERPRET=1 before triton is imported (the "
                    "revsnn_triton plugin sets it on a machine without a GPU unless revsnn_interpreter = false)")
    with runtime.cpu_kernels("triton"):
        yield kernel_device
