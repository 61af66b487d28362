"""Triton kernels for the fixed-point coupling of reversible blocks, and their launchers.

The arithmetic is defined once, in plain PyTorch, in ``revsnn_triton/ops/coupling/reference.py`` (read its
docstring); these kernels equal it bit for bit. One elementwise kernel covers every step with a constexpr ``OP``:

- ``ENCODE``:   ``s = quantize(f)``                          (the stream from a float tensor)
- ``DECODE``:   ``out = decode(s)``
- ``COUPLE``:   ``s = s + quantize(f)``, in place            (forward step of a block)
- ``UNCOUPLE``: ``s = s - quantize(f)``, in place            (backward / inverse step)
- ``TO_FLOAT``: ``out = decode(s)`` into float32 storage (also in place: ``out`` may alias ``s``)

The stream ``s`` is int32 or a float tensor holding ``q * 2**-R`` exactly (float storage); every tensor is a view
``[n0, n1, n2]`` with strides ``(st0, st1, 1)`` (a channel half of ``[T, B, C, H, W]``, or a micro-batch of one).
``ENCODE`` and ``COUPLE`` OR their flags (overflow, non-finite branch output, ``|q| >= 2**24``) into one row of an
int32 flag tensor; see ``revsnn_triton/ops/coupling/spec.py``.

Round half to even: compiled, ``libdevice.rint`` (one instruction). It does not run under Triton's interpreter
(triton 3.6 returns None), so there (``COMPILED=False``) rint is the magic-number trick: for ``|v| < M`` with
``M = 2**23`` (float32) or ``2**52`` (float64), ``(v + copysign(M, v)) - copysign(M, v)`` lands on the grid of unit
spacing and rounds half to even under the default rounding mode; ``|v| >= M`` is already an integer. Float -> int
conversion out of range is undefined in Triton, so out-of-range and NaN lanes are replaced before the conversion
and patched after it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from revsnn_triton.ops.coupling.spec import view3

ENCODE, DECODE, COUPLE, UNCOUPLE, TO_FLOAT = 0, 1, 2, 3, 4
_OPS = {"encode": ENCODE, "decode": DECODE, "couple": COUPLE, "uncouple": UNCOUPLE, "to_float": TO_FLOAT}


@triton.jit
def _rint(v, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    if COMPILED:
        return libdevice.rint(v)  # one instruction (cvt.rni); round half to even
    else:
        c = tl.where(v < 0, -MAGIC, MAGIC)
        return tl.where(tl.abs(v) < MAGIC, (v + c) - c, v)


@triton.jit
def _scaled(f, SCALE: tl.constexpr, F64: tl.constexpr, COMPILED: tl.constexpr):
    """``rint(f * 2**R)`` in float32, or float64 for float64 inputs (exact scale, then round half to even)."""
    if F64:
        return _rint(f.to(tl.float64) * SCALE, 4503599627370496.0, COMPILED)
    else:
        return _rint(f.to(tl.float32) * SCALE, 8388608.0, COMPILED)


@triton.jit
def _saturate(v):
    """A rounded float -> int32, clamped to the int32 range, NaN -> 0 (see reference.quantize)."""
    big = v >= 2147483648.0
    small = v <= -2147483648.0
    q = tl.where(big | small | (v != v), 0.0, v).to(tl.int32)
    q = tl.where(big, 2147483647, q)
    return tl.where(small, -2147483648, q)


@triton.jit
def _store_float(ptr, v, mask, BF16: tl.constexpr):
    """Store float32/float64 ``v`` in ``ptr``'s dtype, rounding to nearest even. For bfloat16 the rounding is done
    by hand on the bits (Triton's interpreter truncates float32 -> bfloat16)."""
    if BF16:
        u = v.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        r = tl.where(v != v, v.to(tl.float32), u.to(tl.float32, bitcast=True))
        tl.store(ptr, r.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode(q, INV_SCALE: tl.constexpr, F64: tl.constexpr):
    if F64:
        return q.to(tl.float64) * INV_SCALE
    else:
        return q.to(tl.float32) * INV_SCALE


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _flag(flags_ptr, overflow, nonfinite, inexact, mask):
    """OR the block's three facts into the flag row: one bitwise-OR reduction over the block, then one atomic per
    column and program."""
    bits = tl.where(mask, overflow.to(tl.int32) | (nonfinite.to(tl.int32) << 1) | (inexact.to(tl.int32) << 2), 0)
    any_bits = tl.reduce(bits, 0, _bit_or)
    tl.atomic_or(flags_ptr, any_bits & 1)
    tl.atomic_or(flags_ptr + 1, (any_bits >> 1) & 1)
    tl.atomic_or(flags_ptr + 2, (any_bits >> 2) & 1)


@triton.jit
def coupling_kernel(
    s_ptr, f_ptr, out_ptr, flags_ptr, n1, n2, n_blocks,
    s_st0, s_st1, f_st0, f_st1, o_st0, o_st1,
    SCALE: tl.constexpr, INV_SCALE: tl.constexpr, OP: tl.constexpr,
    S_INT: tl.constexpr, S_F64: tl.constexpr, F_F64: tl.constexpr, OUT_F64: tl.constexpr,
    OUT_BF16: tl.constexpr, FLAGS: tl.constexpr, COMPILED: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One block of ``BLOCK_SIZE`` elements of one row ``(i0, i1)`` of the ``[n0, n1, n2]`` views."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // n_blocks
    i0 = row // n1
    i1 = row % n1
    offs = (pid % n_blocks) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n2
    s_off = i0 * s_st0 + i1 * s_st1 + offs
    if OP == 0:  # ENCODE
        f = tl.load(f_ptr + i0 * f_st0 + i1 * f_st1 + offs, mask=mask, other=0.0)
        v = _scaled(f, SCALE, F_F64, COMPILED)
        q = _saturate(v)
        if FLAGS:
            finite = (f - f) == 0  # false for NaN and +-inf
            _flag(flags_ptr, finite & ((v >= 2147483648.0) | (v < -2147483648.0)), ~finite,
                  (q >= 16777216) | (q <= -16777216), mask)
        if S_INT:
            tl.store(s_ptr + s_off, q, mask=mask)
        else:
            tl.store(s_ptr + s_off, _decode(q, INV_SCALE, S_F64), mask=mask)
    else:
        if S_INT:
            q = tl.load(s_ptr + s_off, mask=mask, other=0)
        else:
            # float storage holds integral multiples of 2**-R exactly: the scale and conversion are exact
            q = (tl.load(s_ptr + s_off, mask=mask, other=0.0) * SCALE).to(tl.int32)
        if OP == 1 or OP == 4:  # DECODE, TO_FLOAT
            _store_float(out_ptr + i0 * o_st0 + i1 * o_st1 + offs, _decode(q, INV_SCALE, OUT_F64), mask, OUT_BF16)
        else:  # COUPLE, UNCOUPLE
            f = tl.load(f_ptr + i0 * f_st0 + i1 * f_st1 + offs, mask=mask, other=0.0)
            v = _scaled(f, SCALE, F_F64, COMPILED)
            qf = _saturate(v)
            if OP == 2:
                y = q + qf  # int32 arithmetic wraps modulo 2**32
                if FLAGS:
                    finite = (f - f) == 0  # false for NaN and +-inf
                    wrapped = ((q ^ y) & (qf ^ y)) < 0
                    saturated = (v >= 2147483648.0) | (v < -2147483648.0)
                    _flag(flags_ptr, (wrapped | saturated) & finite, ~finite, (y >= 16777216) | (y <= -16777216),
                          mask)
            else:
                y = q - qf
            if S_INT:
                tl.store(s_ptr + s_off, y, mask=mask)
            else:
                tl.store(s_ptr + s_off, _decode(y, INV_SCALE, S_F64), mask=mask)


def coupling(op: str, *, s: torch.Tensor, f: torch.Tensor | None = None, out: torch.Tensor | None = None,
             flags: torch.Tensor | None = None, frac_bits: int, block_size: int, num_warps: int) -> None:
    """Launch :func:`coupling_kernel` for ``op`` (see the module docstring) on the stream view ``s``; ``f`` and
    ``out`` have ``s``'s shape, and together with ``s`` must be 3-level views (``spec.view3``); ``flags`` is one
    ``[3]`` int32 row (a view of the flag tensor). Outputs are written in place."""
    if op not in _OPS:
        raise ValueError(f"coupling launcher: op must be one of {sorted(_OPS)}, got {op!r}")
    present = [t for t in (s, f, out) if t is not None]
    if any(t.shape != s.shape for t in present):
        raise ValueError("coupling launcher: s, f and out must have the same shape")
    layout = view3(*present)
    if layout is None:
        raise ValueError("coupling launcher: s, f and out must be views of at most 3 levels with a contiguous "
                         "innermost dim")
    (n0, n1, n2), strides = layout
    if s.numel() == 0:
        return
    st = iter(strides)
    s0, s1 = next(st)
    f0, f1 = next(st) if f is not None else (0, 0)
    o0, o1 = next(st) if out is not None else (0, 0)
    n_blocks = triton.cdiv(n2, block_size)
    coupling_kernel[(n0 * n1 * n_blocks,)](
        s, f if f is not None else s, out if out is not None else s, flags if flags is not None else s,
        n1, n2, n_blocks, s0, s1, f0, f1, o0, o1,
        SCALE=float(2.0 ** frac_bits), INV_SCALE=float(2.0 ** -frac_bits), OP=_OPS[op],
        S_INT=s.dtype == torch.int32, S_F64=s.dtype == torch.float64,
        F_F64=f is not None and f.dtype == torch.float64,
        OUT_F64=out is not None and out.dtype == torch.float64,
        OUT_BF16=out is not None and out.dtype == torch.bfloat16, FLAGS=flags is not None,
        COMPILED=not triton.knobs.runtime.interpret, BLOCK_SIZE=block_size, num_warps=num_warps,
    )
