"""Where a custom op runs: Triton kernels or the plain-PyTorch reference.

- CUDA tensors always run the Triton kernels.
- CPU tensors run the plain-PyTorch reference implementation (the test oracle), unless Triton's
  interpreter is enabled (``TRITON_INTERPRET=1`` in the environment *before* ``triton`` is imported)
  **and** CPU kernels were requested, either with ``REVSNN_CPU_KERNELS=triton`` or inside
  ``with cpu_kernels("triton"):``. That is how the Triton kernels are tested on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_VALID = ("torch", "triton")
_cpu_choice: str = os.environ.get("REVSNN_CPU_KERNELS", "torch")
if _cpu_choice not in _VALID:
    raise ValueError(f"REVSNN_CPU_KERNELS must be one of {_VALID}, got {_cpu_choice!r}")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def cpu_kernels(choice: str) -> Iterator[None]:
    """Choose what CPU tensors run inside the block: ``"torch"`` (reference) or ``"triton"`` (interpreter)."""
    global _cpu_choice
    if choice not in _VALID:
        raise ValueError(f"cpu_kernels: choice must be one of {_VALID}, got {choice!r}")
    if choice == "triton" and not interpreter_enabled():
        raise RuntimeError(
            "cpu_kernels('triton') needs Triton's interpreter: set TRITON_INTERPRET=1 in the environment "
            "before triton is imported")
    previous, _cpu_choice = _cpu_choice, choice
    try:
        yield
    finally:
        _cpu_choice = previous


def use_triton(device: torch.device) -> bool:
    """Whether an op on ``device`` should launch its Triton kernel."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return _cpu_choice == "triton" and interpreter_enabled()
    return False
