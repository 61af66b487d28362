"""Fixed-point coupling in plain PyTorch: the single source of truth for the arithmetic, the CPU path of the
``revsnn`` coupling ops and the oracle of the Triton kernels' tests (the stream and its flags:
:mod:`revsnn_triton.ops.coupling.spec`).

- ``encode(x) = rint(x * 2**R)`` (round half to even) for a float ``x``; non-finite values and values whose
  rounded result lies outside the int32 range are errors (or, with ``saturate=True``, finite out-of-range values
  clamp to the int32 range).
- ``decode(q) = float32(q) * 2**-R`` cast to the requested dtype (``float64``: ``float64(q) * 2**-R``, exact). The
  conversion int32 -> float32 rounds to nearest even; scaling by a power of two is exact.
- The branch quantizer ``quantize(f)`` is defined for *every* float input, so that the coupling is a bijection
  whatever the branch computes: ``v = rint(f * 2**R)`` computed exactly (in float32 for float16/bfloat16/float32
  inputs, in float64 for float64 inputs; a scale by a power of two is exact), NaN -> 0, and ``v`` clamped to
  ``[-2**31, 2**31 - 1]`` (so ``+-inf`` and huge values saturate).
- ``couple(x_q, f) = x_q + quantize(f)`` and ``uncouple(y_q, f) = y_q - quantize(f)`` wrap around modulo ``2**32``;
  hence ``uncouple(couple(x_q, f), f) == x_q`` bitwise for every int32 ``x_q`` and every ``f``.

The in-place stream ops (:func:`stream_couple_`, :func:`stream_uncouple_`, :func:`stream_encode_`) work on any
view of a stream in int32 or exact-float storage, chunk by chunk along the view's outermost dim, so their work
space is bounded like a kernel's block instead of growing with the tensor.
"""
from __future__ import annotations

import math

import torch

from .spec import (FLOAT32_EXACT, INT32_MAX, INT32_MIN, compute_dtype,
                   representable_range)

# Elements per chunk of the in-place stream ops.
CHUNK = 1 << 18
# The largest value of each compute dtype that is <= INT32_MAX (float32 has no 2**31 - 1).
_BELOW_2_31 = {torch.float32: 2.0 ** 31 - 128, torch.float64: 2.0 ** 31 - 1}


def check_encodable(x: torch.Tensor, frac_bits: int, saturate: bool, what: str = "x") -> None:
    """Raise ``ValueError`` if ``x`` holds a non-finite value, or (unless ``saturate``) a value whose rounded
    fixed-point image lies outside int32. One ``aminmax`` pass without temporaries (NaN propagates into it) and one
    synchronization; the bounds are checked exactly in Python floats."""
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x))
    if math.isfinite(lo) and math.isfinite(hi):
        # x * 2**R is exact in a Python float for every float16/bfloat16/float32/float64 x in range, and round()
        # rounds half to even like the quantizer.
        if saturate or (round(lo * 2.0 ** frac_bits) >= INT32_MIN and round(hi * 2.0 ** frac_bits) <= INT32_MAX):
            return
    raise_not_encodable(x, frac_bits, saturate, what)


def raise_not_encodable(x: torch.Tensor, frac_bits: int, saturate: bool, what: str) -> None:
    """The error path: find and describe the offending elements (allocates, but only on failure)."""
    scaled = x.detach().to(torch.float64) * 2.0 ** frac_bits
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


def _scaled(f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``rint(f * 2**R)`` in the compute dtype (exact scale, then round half to even)."""
    return torch.round(f.to(compute_dtype(f.dtype)) * 2.0 ** frac_bits)


def _saturate(v: torch.Tensor) -> torch.Tensor:
    big = v >= 2.0 ** 31  # saturates to INT32_MAX (also +inf)
    v = torch.nan_to_num(v, nan=0.0).clamp_(INT32_MIN, _BELOW_2_31[v.dtype])  # every bound exact in v's dtype
    return v.to(torch.int32).masked_fill_(big, INT32_MAX)


def quantize(f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """The branch quantizer (defined for every float, see the module docstring) -> int32."""
    return _saturate(_scaled(f, frac_bits))


def decode(q: torch.Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int32 ``q`` -> ``q * 2**-frac_bits`` in ``dtype`` (via float32, or float64 for float64)."""
    return (q.to(compute_dtype(dtype)) * 2.0 ** -frac_bits).to(dtype)


# int32 addition and subtraction in PyTorch wrap modulo 2**32 (two's complement), as the Triton kernel's do;
# tests/test_coupling.py checks this oracle against independent numpy modular arithmetic over the whole range.

def couple(x_q: torch.Tensor, f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``x_q + quantize(f)`` modulo 2**32 (int32)."""
    return x_q + quantize(f, frac_bits)


def uncouple(y_q: torch.Tensor, f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """``y_q - quantize(f)`` modulo 2**32 (int32): the exact inverse of :func:`couple`."""
    return y_q - quantize(f, frac_bits)


def coupling_flags(x_q: torch.Tensor, f: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """The flags (``[3]`` int32, see the spec) of ``couple(x_q, f)``, without writing anything."""
    v = _scaled(f, frac_bits)
    qf = _saturate(v)
    y = x_q + qf
    return _flag_row(x_q, qf, y, v, f)


def _flag_row(q: torch.Tensor, qf: torch.Tensor, y: torch.Tensor, v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    wrapped = ((q ^ y) & (qf ^ y)) < 0  # both operands of one sign, the result of the other
    saturated = (v >= 2.0 ** 31) | (v < -(2.0 ** 31))
    finite = torch.isfinite(f)
    row = torch.stack([((wrapped | saturated) & finite).any(), (~finite).any(), _inexact(y).any()])
    return row.to(torch.int32)


def _inexact(q: torch.Tensor) -> torch.Tensor:
    return (q >= FLOAT32_EXACT) | (q <= -FLOAT32_EXACT)


# --------------------------------------------------------------------------------------- in-place stream ops

def _chunks(*tensors: torch.Tensor):
    """Matching views of ``tensors`` (same shape), about CHUNK elements each, along their outermost dim."""
    t0 = tensors[0]
    if t0.dim() == 0 or t0.numel() == 0:
        yield tensors
        return
    n = t0.shape[0]
    step = max(1, CHUNK // max(1, t0.numel() // n))
    for i in range(0, n, step):
        yield tuple(t[i:i + step] for t in tensors)


def _load(s: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """The integers of a stream view: int32 storage as is, float storage ``s * 2**R`` (exact: integral values)."""
    if s.dtype == torch.int32:
        return s
    return (s * 2.0 ** frac_bits).to(torch.int32)


def _store(s: torch.Tensor, q: torch.Tensor, frac_bits: int) -> None:
    if s.dtype == torch.int32:
        s.copy_(q)
    else:
        s.copy_(q.to(s.dtype).mul_(2.0 ** -frac_bits))


def stream_encode_(s: torch.Tensor, x: torch.Tensor, frac_bits: int, flags: torch.Tensor | None = None) -> None:
    """Write ``quantize(x)`` into the stream view ``s`` (int32, or float storage holding its decode); ORs into the
    flag row ``flags`` (``[3]`` int32): out of range or non-finite values of ``x`` as OVERFLOW / NONFINITE, ``|q| >= 2**24`` as INEXACT."""
    for sc, xc in _chunks(s, x):
        v = _scaled(xc, frac_bits)
        q = _saturate(v)
        if flags is not None:
            finite = torch.isfinite(xc)
            saturated = ((v >= 2.0 ** 31) | (v < -(2.0 ** 31))) & finite
            flags.bitwise_or_(torch.stack([saturated.any(), (~finite).any(), _inexact(q).any()]).to(torch.int32))
        _store(sc, q, frac_bits)


def stream_couple_(s: torch.Tensor, f: torch.Tensor, frac_bits: int, flags: torch.Tensor | None = None) -> None:
    """``s += quantize(f)`` in place (modulo 2**32) on a stream view ``s``; ORs the result's flags into
    the flag row ``flags`` (``[3]`` int32)."""
    for sc, fc in _chunks(s, f):
        q = _load(sc, frac_bits)
        v = _scaled(fc, frac_bits)
        qf = _saturate(v)
        y = q + qf
        if flags is not None:
            flags.bitwise_or_(_flag_row(q, qf, y, v, fc))
        _store(sc, y, frac_bits)


def stream_uncouple_(s: torch.Tensor, f: torch.Tensor, frac_bits: int) -> None:
    """``s -= quantize(f)`` in place (modulo 2**32): undoes :func:`stream_couple_` bit for bit."""
    for sc, fc in _chunks(s, f):
        _store(sc, _load(sc, frac_bits) - quantize(fc, frac_bits), frac_bits)


def stream_decode(s: torch.Tensor, frac_bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The real values of a stream view in ``dtype`` (a new dense tensor)."""
    out = torch.empty(s.shape, dtype=dtype, device=s.device)
    for oc, sc in _chunks(out, s):
        oc.copy_(decode(_load(sc, frac_bits), frac_bits, dtype))
    return out


def stream_int_to_float_(s: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """Turn an int32 stream into float32 storage in place (same bytes; every ``|q| < 2**24``) and return the float32
    view of its memory."""
    out = s.view(torch.float32)
    for sc, oc in _chunks(s, out):
        oc.copy_(sc.to(torch.float32).mul_(2.0 ** -frac_bits))
    return out
