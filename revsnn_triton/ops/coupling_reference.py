"""Fixed-point coupling in plain PyTorch: the single source of truth for the arithmetic, the CPU
path of the ``revsnn`` coupling ops and the oracle of the Triton kernels' tests.

A coupling stream is an int32 tensor ``q`` that stands for the real value ``q * 2**-frac_bits``.

- ``encode(x) = rint(x * 2**R)`` (round half to even) for a float ``x``; non-finite values and values
  whose rounded result lies outside the int32 range are errors (or, with ``saturate=True``, finite
  out-of-range values clamp to the int32 range).
- ``decode(q) = float32(q) * 2**-R`` cast to the requested dtype (``float64``: ``float64(q) * 2**-R``,
  exact). The conversion int32 -> float32 rounds to nearest even; scaling by a power of two is exact.
- The branch quantizer ``quantize(f)`` is defined for *every* float input so that the coupling is a
  bijection whatever the branch computes: ``v = rint(f * 2**R)`` computed exactly (in float32 for
  float16/bfloat16/float32 inputs, in float64 for float64 inputs; a scale by a power of two is exact),
  NaN -> 0, and ``v`` clamped to ``[-2**31, 2**31 - 1]`` (so ``+-inf`` and huge values saturate).
- ``couple(x_q, f) = x_q + quantize(f)`` and ``uncouple(y_q, f) = y_q - quantize(f)`` wrap around
  modulo ``2**32``; hence ``uncouple(couple(x_q, f), f) == x_q`` bitwise for every int32 ``x_q``
  and every ``f``.
"""
from __future__ import annotations

import math

import torch

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1
# frac_bits: 0 would leave no fractional bits (not a fixed-point grid), 31 no integer bits.
MIN_FRAC_BITS = 1
MAX_FRAC_BITS = 30
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_encodable(x: torch.Tensor, frac_bits: int, saturate: bool, what: str = "x") -> None:
    """Raise ``ValueError`` if ``x`` holds a non-finite value, or (unless ``saturate``) a value whose
    rounded fixed-point image lies outside int32. One ``aminmax`` pass without temporaries (NaN
    propagates into it) and one synchronization; the bounds are checked exactly in Python floats."""
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x))
    if math.isfinite(lo) and math.isfinite(hi):
        # x * 2**R is exact in a Python float for every float16/bfloat16/float32/float64 x in range, and
        # round() rounds half to even like the quantizer.
        if saturate or (round(lo * 2.0 ** frac_bits) >= INT32_MIN and round(hi * 2.0 ** frac_bits) <= INT32_MAX):
            return
    _raise_not_encodable(x, frac_bits, saturate, what)


def _raise_not_encodable(x: torch.Tensor, frac_bits: int, saturate: bool, what: str) -> None:
    """The error path: find and describe the offending elements (allocates, but only on failure)."""
    scaled = x.to(torch.float64) * 2.0 ** frac_bits
    if saturate:
        bad = ~torch.isfinite(scaled)
    else:
        rounded = torch.round(scaled)
        bad = ~((rounded >= INT32_MIN) & (rounded <= INT32_MAX))  # NaN/inf fail both comparisons
    first = tuple(bad.nonzero()[0].tolist())
    value = x[first].item()
    lo, hi = representable_range(frac_bits)
    if not math.isfinite(value):
        problem = "non-finite value"
    else:
        problem = (f"value outside the fixed-point range [{lo:g}, {hi:g}] of frac_bits={frac_bits} "
                   "(pass saturate=True to clamp)")
    raise ValueError(f"{what}: {int(bad.sum())} element(s) cannot be encoded: {problem} {value!r} at index {first}")


def encode(x: torch.Tensor, frac_bits: int, saturate: bool = False) -> torch.Tensor:
    """float ``x`` (any shape, float16/bfloat16/float32/float64) -> int32 ``rint(x * 2**frac_bits)``."""
    check_encodable(x, frac_bits, saturate)
    return quantize(x, frac_bits)


# The largest value of each compute dtype that is <= INT32_MAX (float32 has no 2**31 - 1).
_BELOW_2_31 = {torch.float32: 2.0 ** 31 - 128, torch.float64: 2.0 ** 31 - 1}


def quantize(f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """The branch quantizer (defined for every float, see the module docstring) -> int32."""
    cd = _compute_dtype(f.dtype)
    v = torch.round(f.to(cd) * 2.0 ** frac_bits)  # exact scale, then round half to even
    big = v >= 2.0 ** 31  # saturates to INT32_MAX (also +inf)
    v = torch.nan_to_num(v, nan=0.0).clamp_(INT32_MIN, _BELOW_2_31[cd])  # every bound exact in cd
    return v.to(torch.int32).masked_fill_(big, INT32_MAX)


def decode(q: torch.Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int32 ``q`` -> ``q * 2**-frac_bits`` in ``dtype`` (via float32, or float64 for float64)."""
    return (q.to(_compute_dtype(dtype)) * 2.0 ** -frac_bits).to(dtype)


# int32 addition and subtraction in PyTorch wrap modulo 2**32 (two's complement), as the Triton kernel's
# do; tests/test_coupling.py checks this oracle against independent numpy modular arithmetic over the
# whole int32 range. (A detour through int64 made the CPU path ~10x slower.)

def couple(x_q: torch.Tensor, f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``x_q + quantize(f)`` modulo 2**32 (int32)."""
    return x_q + quantize(f, frac_bits)


def uncouple(y_q: torch.Tensor, f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``y_q - quantize(f)`` modulo 2**32 (int32): the exact inverse of :func:`couple`."""
    return y_q - quantize(f, frac_bits)


def couple_decode(x_q: torch.Tensor, f: torch.Tensor, frac_bits: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward step of a coupling: ``(y_q, decode(y_q, dtype))`` with ``y_q = couple(x_q, f)``."""
    y_q = couple(x_q, f, frac_bits)
    return y_q, decode(y_q, frac_bits, dtype)


def uncouple_step(y_q: torch.Tensor, f: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                  frac_bits: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward step of a coupling: rebuild the input and accumulate a gradient.

    Returns ``(x_q, decode(x_q, dtype), grad_a + grad_b)`` with ``x_q = uncouple(y_q, f)``; the sum is
    computed in float32 (float64 if ``grad_a`` is float64) and returned in ``grad_a``'s dtype.
    """
    x_q = uncouple(y_q, f, frac_bits)
    acc = _compute_dtype(grad_a.dtype)
    grad = (grad_a.to(acc) + grad_b.to(acc)).to(grad_a.dtype)
    return x_q, decode(x_q, frac_bits, dtype), grad
