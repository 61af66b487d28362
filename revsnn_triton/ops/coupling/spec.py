"""The fixed-point coupling stream: what its values mean, and the limits every implementation checks.

A coupling stream holds real values on the grid of multiples of ``2**-frac_bits``. Its storage is either
``int32`` (the integer ``q`` stands for ``q * 2**-frac_bits``) or a float tensor holding ``q * 2**-frac_bits``
exactly: float64 always can, float32 whenever ``|q| < 2**24`` (:data:`FLOAT32_EXACT`). Integer arithmetic on
``q`` wraps modulo ``2**32``, so coupling ``y = x + quantize(f)`` and uncoupling ``x = y - quantize(f)`` are exact
inverses for every input; the value range of the grid is :func:`representable_range`.

Flags. The in-place coupling ops OR three facts about their results into one row of an int32 flag tensor
``[rows, 3]`` (columns :data:`OVERFLOW`, :data:`NONFINITE`, :data:`INEXACT`), so that a whole forward can be
checked with one host synchronization at its end:

- ``OVERFLOW``: a value left the grid's range: the integer sum wrapped around, or the branch output was beyond
  the range (the quantizer saturated). The stream then no longer holds the network's values.
- ``NONFINITE``: the branch output held NaN or inf (quantized to 0 / saturated).
- ``INEXACT``: a result has ``|q| >= 2**24``, so float32 storage could not hold it exactly.
"""
from __future__ import annotations

import torch

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
# frac_bits: 0 would leave no fractional bits (not a fixed-point grid), 31 no integer bits.
MIN_FRAC_BITS = 1
MAX_FRAC_BITS = 30
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
STREAM_DTYPES = (torch.int32, torch.float32, torch.float64)
# float32 holds every integer of magnitude below 2**24 exactly.
FLOAT32_EXACT = 2 ** 24
OVERFLOW, NONFINITE, INEXACT = 0, 1, 2
FLAG_COLUMNS = 3


def check_frac_bits(frac_bits: object) -> int:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int):
        raise TypeError(f"frac_bits must be an int, got {type(frac_bits).__name__}")
    if not MIN_FRAC_BITS <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(
            f"frac_bits must be in [{MIN_FRAC_BITS}, {MAX_FRAC_BITS}] (fractional bits of an int32 "
            f"fixed-point value: at least one fractional and one integer bit), got {frac_bits}")
    return frac_bits


def representable_range(frac_bits: int) -> tuple[float, float]:
    """Smallest and largest real value of the int32 grid with ``frac_bits`` fractional bits."""
    check_frac_bits(frac_bits)
    return INT32_MIN * 2.0 ** -frac_bits, INT32_MAX * 2.0 ** -frac_bits


def float32_exact_range(frac_bits: int) -> float:
    """Values of magnitude below this are held exactly by a float32 stream (``2**(24 - frac_bits)``)."""
    check_frac_bits(frac_bits)
    return FLOAT32_EXACT * 2.0 ** -frac_bits


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The float type the quantizer computes in: float64 for float64 inputs, else float32 (exact for both:
    scaling by a power of two loses nothing)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def new_flags(rows: int, device: torch.device | str) -> torch.Tensor:
    """A zeroed flag tensor ``[rows, 3]`` (int32) for the in-place coupling ops."""
    return torch.zeros(rows, FLAG_COLUMNS, dtype=torch.int32, device=device)


def view3(*tensors: torch.Tensor) -> tuple[tuple[int, int, int], list[tuple[int, int]]] | None:
    """The tensors (all of one shape) as 3-level views ``[n0, n1, n2]``: the common grouping of dims, merging
    adjacent dims where every tensor's strides allow, and each tensor's strides ``(st0, st1)`` of the outer two
    levels (the innermost level is contiguous in all of them). None when more than 3 levels are needed or an
    innermost dim is not contiguous. A half of a ``[T, B, C, H, W]`` stream split on C is ``[1, T*B, C/2*H*W]``; a
    micro-batch of it ``[T, b, C/2*H*W]``; a tensor repeated over T by ``expand`` has stride 0 in its time level."""
    shape = tensors[0].shape
    keep = [i for i, n in enumerate(shape) if n != 1]
    groups: list[list[int]] = []  # each: [size, dim indices...]
    for i in keep:
        if groups and all(t.stride(groups[-1][-1]) == shape[i] * t.stride(i) for t in tensors):
            groups[-1][0] *= shape[i]
            groups[-1].append(i)
        else:
            groups.append([shape[i], i])
    if len(groups) > 3 or (groups and any(t.stride(groups[-1][-1]) != 1 for t in tensors)):
        return None
    while len(groups) < 3:
        groups.insert(0, [1, None])
    sizes = tuple(g[0] for g in groups)
    strides = [tuple(0 if g[1] is None else t.stride(g[-1]) for g in groups[:2]) for t in tensors]
    return sizes, strides  # type: ignore[return-value]
