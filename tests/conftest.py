"""Test-session set-up.

Triton's interpreter must be switched on before ``triton`` is first imported, so this happens at
the very top, before torch: on a machine with no NVIDIA device the kernels run through the
interpreter on CPU tensors; on the GPU machine the same tests run compiled kernels.
"""
import os
import shutil


def _has_nvidia_device() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


if "TRITON_INTERPRET" not in os.environ and not _has_nvidia_device():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# "ci": derandomized and bounded, so a submission never fails by chance and the suite stays fast.
# "long": for local or GPU runs (HYPOTHESIS_PROFILE=long).
settings.register_profile(
    "ci", derandomize=True, max_examples=20, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "long", max_examples=300, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Devices the kernel tests run on: the GPU when there is one; on CPU the interpreter.
HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def kernel_device() -> str:
    return KERNEL_DEVICE


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """One intra-op thread per test process: the tests run many tiny ops, for which extra OpenMP threads
    only add synchronization (on a busy 2-core machine they made model and engine tests 10-20x slower).
    ``REVSNN_TEST_THREADS`` overrides it; the previous setting is restored after each test."""
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("REVSNN_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)
