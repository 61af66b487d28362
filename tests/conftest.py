"""Test-session set-up.

The ``revsnn_triton.testing.plugin`` pytest plugin (installed with the package; listed below for runs with plugin
autoloading off) switches Triton's interpreter on before triton is first imported when there is no GPU, so the
kernels run through the interpreter on CPU tensors; on the GPU machine the same tests run compiled kernels. It
provides the ``kernel_device`` fixture and the Hypothesis profiles; pyproject.toml loads ``revsnn-ci``
(``HYPOTHESIS_PROFILE=long`` for the long one). What follows is this suite's own: seeds and one CPU thread.
"""
import os

import pytest
import torch

pytest_plugins = ["revsnn_triton.testing.plugin"]

# Devices the kernel tests run on: the GPU when there is one; on CPU the interpreter.
HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"


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
