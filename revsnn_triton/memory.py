"""Honest memory measurement: real allocations, never estimates from shapes.

- CUDA: ``torch.cuda.reset_peak_memory_stats`` + ``torch.cuda.max_memory_allocated`` (the caching
  allocator's count of bytes handed to tensors).
- CPU: every allocation and free of the CPU allocator recorded by ``torch.profiler`` with
  ``profile_memory=True``, accumulated in time order to a running total whose maximum is the peak.

:func:`measure_peak_bytes` returns the peak *above what was allocated when ``fn`` started* (on both
devices, so the numbers are comparable); :func:`memory_per_image` is the slope of that peak against the
batch size, in which parameters, gradients and optimizer state cancel out.

Resident memory (RSS) on the CPU is a second, coarser view: :func:`measure_peak_rss` is the peak RSS of the process
while ``fn`` ran, above its RSS when ``fn`` started. glibc's malloc keeps freed large blocks for reuse (its mmap
threshold grows with the blocks freed), so RSS reads 2-3x the real allocations of a training step unless the
threshold is fixed first: :func:`set_malloc_mmap_threshold` (e.g. 128 KiB, at the start of the process; blocks
at least that large are then returned to the system when freed). A large request can still be served from free
memory inside the heap (left there by many small blocks, e.g. a profiler run's records), whose pages stay resident:
:func:`measure_peak_rss` first returns the heap's free memory to the system (glibc's ``malloc_trim``), so that
every page the step touches counts.
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import sys
import tempfile
import warnings
from typing import Callable, NamedTuple, Sequence

import torch

__all__ = ["MemoryUse", "measure_memory", "measure_peak_bytes", "memory_per_image", "peak_breakdown",
           "set_malloc_mmap_threshold", "malloc_mmap_threshold", "measure_peak_rss", "peak_rss_unavailable"]


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


def _cpu_allocation_events(prof) -> list[tuple[int, int, int, tuple[str, ...]]]:
    """(time in ns, bytes: + allocation, - free, pointer, names of the operators around it, outermost first) of
    the CPU allocator's events in time order, keeping only frees of blocks allocated inside the profiled
    region (the profiler reports frees of older blocks only when it happened to see their allocation in an
    earlier session; ignoring all of them keeps the count independent of what was profiled before)."""
    from torch._C._profiler import _EventType

    raw: list[tuple[int, int, int, tuple[str, ...]]] = []
    stack = [(node, ()) for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, path = stack.pop()
        if node.tag == _EventType.Allocation:
            if node.extra_fields.device.type == "cpu":
                raw.append((node.start_time_ns, int(node.extra_fields.alloc_size), int(node.extra_fields.ptr), path))
            continue
        stack.extend((child, path + (node.name,)) for child in node.children)
    raw.sort(key=lambda e: e[0])
    live: dict[int, int] = {}
    events = []
    for t, nbytes, ptr, path in raw:
        if nbytes > 0:
            live[ptr] = nbytes
        elif live.pop(ptr, None) is None:
            continue
        events.append((t, nbytes, ptr, path))
    return events


_PROFILER_STARTED = False
# What the profiler's device query logs, once per process, on a machine without a usable GPU (torch built with
# CUDA): a harmless line that looks like an error.
_NO_GPU_LOG_LINE = "gpuGetDeviceCount failed"


def _start_profiler_quietly() -> None:
    """Run the profiler's one-time initialization with file descriptor 2 captured, and pass on everything it
    wrote except the no-GPU device-query line (a CPU-only machine has no GPU to find)."""
    global _PROFILER_STARTED
    if _PROFILER_STARTED:
        return
    _PROFILER_STARTED = True
    if torch.cuda.is_available():
        return
    from torch.profiler import ProfilerActivity, profile

    try:
        sys.stderr.flush()
        saved_fd = os.dup(2)
    except (OSError, ValueError):  # no usable stderr to filter: start it plainly
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
                with profile(activities=[ProfilerActivity.CPU]):
                    pass
        finally:
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
        capture.seek(0)
        text = capture.read().decode(errors="replace")
    kept = [line for line in text.splitlines(keepends=True) if _NO_GPU_LOG_LINE not in line]
    if kept:
        sys.stderr.write("".join(kept))


def _profile_cpu(fn: Callable[[], object]):
    from torch.profiler import ProfilerActivity, profile

    _start_profiler_quietly()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
            fn()
    return _cpu_allocation_events(prof)


class MemoryUse(NamedTuple):
    """Bytes allocated while a function ran, relative to what was allocated when it started:
    ``peak_bytes`` at the highest point, ``retained_bytes`` when it returned (what it left allocated,
    e.g. a forward's saved activations and outputs)."""
    peak_bytes: int
    retained_bytes: int


def measure_memory(fn: Callable[[], object], device: torch.device | str) -> MemoryUse:
    """Run ``fn()`` once and measure the bytes it allocated on ``device`` (real allocator accounting, see
    the module docstring): the peak above the bytes allocated when it started, and what it left allocated.
    On CUDA, frees of memory allocated before ``fn`` count negative. On CPU (the profiler's allocation
    events of every thread of this process) they are ignored, because the profiler does not know the
    size of blocks allocated before it started: a function that frees older memory and then allocates
    reads higher on CPU than on CUDA. Measure steps that keep their pre-existing state (e.g.
    ``zero_grad(set_to_none=False)``), or use slopes (:func:`memory_per_image`), where such offsets cancel."""
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
        return MemoryUse(int(torch.cuda.max_memory_allocated(device) - start),
                         int(torch.cuda.memory_allocated(device) - start))
    total = peak = 0
    for _, nbytes, _, _ in _profile_cpu(fn):
        total += nbytes
        peak = max(peak, total)
    return MemoryUse(int(peak), int(total))


def peak_breakdown(fn: Callable[[], object], depth: int = 3) -> tuple[int, list[tuple[str, int]]]:
    """CPU only: run ``fn()`` once and say what was allocated at its peak (as :func:`measure_memory` counts it).

    Returns ``(peak_bytes, rows)``; ``rows`` are ``(operators, bytes)`` for the blocks alive at the peak, grouped
    by the innermost ``depth`` operator names around their allocation (``"a > b > c"``, outermost first; e.g.
    ``"_ReversibleFunctionBackward > revsnn::fixed_uncouple_step > aten::add"``), largest first. For CUDA,
    PyTorch's own ``torch.cuda.memory._record_memory_history`` / ``_snapshot`` give the same picture."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    gc.collect()
    live: dict[int, tuple[int, tuple[str, ...]]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, tuple[str, ...]]] = {}
    for _, nbytes, ptr, path in _profile_cpu(fn):
        if nbytes > 0:
            live[ptr] = (nbytes, path)
        else:
            live.pop(ptr)
        total += nbytes
        if total > peak:
            peak, at_peak = total, dict(live)
    groups: dict[str, int] = {}
    for nbytes, path in at_peak.values():
        key = " > ".join(path[-depth:]) or "(outside any operator)"
        groups[key] = groups.get(key, 0) + nbytes
    return int(peak), sorted(groups.items(), key=lambda kv: -kv[1])


def measure_peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak bytes allocated on ``device`` while ``fn()`` ran, above what was allocated when it started
    (``measure_memory(fn, device).peak_bytes``)."""
    return measure_memory(fn, device).peak_bytes


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


# ------------------------------------------------------------------------------------------ resident memory
_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
# glibc's largest accepted threshold: HEAP_MAX_SIZE / 2 (32 MiB with 64-bit longs)
_MAX_MMAP_THRESHOLD = 4 * 1024 * 1024 * ctypes.sizeof(ctypes.c_long)
_fixed_mmap_threshold: int | None = None


def set_malloc_mmap_threshold(nbytes: int = 128 * 1024) -> bool:
    """Fix glibc's malloc mmap threshold at ``nbytes`` for this process (``mallopt(M_MMAP_THRESHOLD, nbytes)``).

    Blocks of at least ``nbytes`` are then mapped on their own and returned to the system when freed, so the
    resident memory follows the allocations; glibc's default threshold instead grows with the largest block
    freed (up to 32 MiB) and keeps freed activations in the heap. Call it at the start of the process: blocks
    already freed into the heap stay there. Same effect as the environment variable
    ``MALLOC_MMAP_THRESHOLD_=nbytes``. Returns True when applied; False (nothing done) where the C library is not
    glibc (macOS, Windows, musl). ``nbytes``: an int in [1, 32 MiB]."""
    global _fixed_mmap_threshold
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"set_malloc_mmap_threshold: nbytes must be an int, got {type(nbytes).__name__}")
    if not 1 <= nbytes <= _MAX_MMAP_THRESHOLD:
        raise ValueError(f"set_malloc_mmap_threshold: nbytes must be in [1, {_MAX_MMAP_THRESHOLD}] (glibc's limit), "
                         f"got {nbytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, nbytes) != 1:
        return False
    _fixed_mmap_threshold = nbytes
    return True


def malloc_mmap_threshold() -> int | None:
    """The fixed glibc mmap threshold of this process in bytes: what :func:`set_malloc_mmap_threshold` set, else
    ``MALLOC_MMAP_THRESHOLD_`` from the environment (glibc reads it at start-up); None when glibc's dynamic
    threshold is in effect (or the C library is not glibc)."""
    if _fixed_mmap_threshold is not None:
        return _fixed_mmap_threshold
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return int(value) if value.isdigit() and platform.libc_ver()[0] == "glibc" else None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"/proc/self/status has no {field} line")
    return int(match.group(1))


def _trim_heap() -> None:
    """glibc: give the heap's free memory back to the system (``malloc_trim(0)``); elsewhere nothing."""
    if platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    # "5" resets the process's peak RSS (VmHWM) to its current RSS (Linux 4.0+; see proc(5), clear_refs).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


_peak_rss_reason: str | None = None
_peak_rss_checked = False


def peak_rss_unavailable() -> str | None:
    """None when :func:`measure_peak_rss` works in this process; otherwise why not (one line)."""
    global _peak_rss_reason, _peak_rss_checked
    if not _peak_rss_checked:
        _peak_rss_checked = True
        if platform.system() != "Linux":
            _peak_rss_reason = f"peak RSS needs Linux's /proc (this is {platform.system()})"
        else:
            try:
                _reset_peak_rss()
                _status_kib("VmHWM")
            except OSError as error:
                _peak_rss_reason = f"cannot reset the peak RSS through /proc/self/clear_refs ({error})"
    return _peak_rss_reason


def measure_peak_rss(fn: Callable[[], object]) -> int | None:
    """Run ``fn()`` once and return the peak resident memory of this process while it ran, above the resident
    memory when it started, in bytes (Linux: the heap's free memory is returned to the system, then the peak
    ``VmHWM`` is reset through ``/proc/self/clear_refs`` before ``fn`` and read after it). Returns None,
    without running ``fn``, where that is not possible (:func:`peak_rss_unavailable` says why). Counts every
    thread's memory, the allocator's retained heap included: fix the malloc mmap threshold first
    (:func:`set_malloc_mmap_threshold`) for figures that follow the allocations."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if peak_rss_unavailable() is not None:
        return None
    gc.collect()
    _trim_heap()  # free heap memory still resident would serve the step's blocks without a page being counted
    _reset_peak_rss()
    start = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - start) * 1024
