"""Honest memory measurement: real allocations, never estimates from shapes.

- CUDA: ``torch.cuda.reset_peak_memory_stats`` + ``torch.cuda.max_memory_allocated`` (the caching
  allocator's count of bytes handed to tensors).
- CPU: every allocation and free of the CPU allocator recorded by ``torch.profiler`` with
  ``profile_memory=True``, accumulated in time order to a running total whose maximum is the peak.

:func:`measure_peak_bytes` returns the peak *above what was allocated when ``fn`` started* (on both
devices, so the numbers are comparable); :func:`memory_per_image` is the slope of that peak against the
batch size (DESIGN.md §5), in which parameters, gradients and optimizer state cancel out.
"""
from __future__ import annotations

import gc
from typing import Callable, Sequence

import torch

__all__ = ["measure_peak_bytes", "memory_per_image"]


def _device(device: torch.device | str) -> torch.device:
    try:
        device = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise TypeError(f"device must be a torch.device or a device string, got {device!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available")
    return device


def _cpu_allocation_events(prof) -> list[tuple[int, int]]:
    """(time in ns, bytes: + allocation, - free) of every CPU allocator event, in time order."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    return events


def measure_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Run ``fn()`` once and return the peak number of bytes allocated on ``device`` while it ran, minus
    the bytes allocated when it started (memory allocated before ``fn`` is not counted; memory ``fn``
    leaves allocated counts toward the peak). Real allocator accounting, see the module docstring.

    On CPU the profiler records allocations of every thread of this process; allocations whose
    lifetime spans the profiled region count only for their part inside it.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device = _device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - start)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    total = peak = 0
    for _, nbytes in _cpu_allocation_events(prof):
        total += nbytes
        peak = max(peak, total)
    return int(peak)


def memory_per_image(step_fn: Callable[[int], object], batch_sizes: Sequence[int],
                     device: torch.device | str, warmup: bool = True) -> float:
    """Bytes per image: the slope of :func:`measure_peak_bytes` of ``step_fn(batch_size)`` between the
    smallest and the largest of ``batch_sizes`` (``(peak_big - peak_small) / (big - small)``).

    ``step_fn(b)`` runs one training step (or whatever is measured) at batch size ``b``. With ``warmup``
    (default) it is first run once, unmeasured, at the smallest batch size, so that lazily allocated
    state (optimizer moments, gradients, caches) exists before either measurement and cancels out.
    """
    if not callable(step_fn):
        raise TypeError(f"step_fn must be callable, got {type(step_fn).__name__}")
    sizes = list(batch_sizes)
    if len(sizes) < 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must hold at least two positive ints, got {batch_sizes!r}")
    small, big = min(sizes), max(sizes)
    if small == big:
        raise ValueError(f"batch_sizes must hold two different sizes, got {batch_sizes!r}")
    device = _device(device)
    if warmup:
        step_fn(small)
    peak_small = measure_peak_bytes(lambda: step_fn(small), device)
    peak_big = measure_peak_bytes(lambda: step_fn(big), device)
    return (peak_big - peak_small) / (big - small)
