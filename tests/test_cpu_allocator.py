"""CPU training fixes glibc's malloc mmap threshold, so its resident memory follows its allocations."""
import platform

import pytest

from revsnn_triton import memory
from revsnn_triton.config import make_config
from revsnn_triton.training import CPU_MMAP_THRESHOLD, _setup_distributed


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_training_on_the_cpu_fixes_the_mmap_threshold(monkeypatch):
    monkeypatch.setattr(memory, "_fixed_mmap_threshold", None)  # as in a fresh process
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert memory.malloc_mmap_threshold() is None
    _, device = _setup_distributed(make_config(None, device="cpu"))
    assert device.type == "cpu"
    assert memory.malloc_mmap_threshold() == CPU_MMAP_THRESHOLD
