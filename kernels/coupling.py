"""Triton kernels for the fixed-point coupling of reversible blocks, and their launchers.

The arithmetic is defined once, in plain PyTorch, in ``revsnn_triton/ops/coupling_reference.py``
(read its docstring); these kernels must equal it bit for bit. One elementwise kernel covers every
step with constexpr switches:

- quantize:  ``q = quantize(f)``                              (encode; validation happens before launch)
- decode:    ``out = decode(q)``
- couple:    ``y = x + quantize(f)`` (or ``x - quantize(f)``), optionally also ``decode(y)``
- backward step: uncouple, decode, and ``grad = grad_a + grad_b`` in the same pass.

Round half to even: ``libdevice.rint`` does not run under Triton's interpreter (triton 3.6 returns
None), so rint uses the magic-number trick: for ``|v| < M`` with ``M = 2**23`` (float32) or ``2**52``
(float64), ``(v + copysign(M, v)) - copysign(M, v)`` lands on the grid of unit spacing and rounds
half to even under the default rounding mode; ``|v| >= M`` is already an integer. (Compiled for sm_90
the compiler contracts ``f * 2**R + c`` into one fma: harmless, as ``f * 2**R`` is exact. The test
suite checks that the magic constants survive in the PTX.) Float -> int
conversion out of range is undefined in Triton, so out-of-range and NaN lanes are replaced before the
conversion and patched after it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_TWO_POW_31 = 2147483648.0  # exact in float32 and float64


@triton.jit
def _rint(v, MAGIC: tl.constexpr):
    c = tl.where(v < 0, -MAGIC, MAGIC)
    return tl.where(tl.abs(v) < MAGIC, (v + c) - c, v)


@triton.jit
def _quantize(f, SCALE: tl.constexpr, F64: tl.constexpr):
    """float -> int32 ``clamp(rint(f * SCALE))`` with NaN -> 0 (see coupling_reference.quantize)."""
    if F64:
        v = _rint(f.to(tl.float64) * SCALE, 4503599627370496.0)
    else:
        v = _rint(f.to(tl.float32) * SCALE, 8388608.0)
    big = v >= 2147483648.0
    small = v <= -2147483648.0
    safe = tl.where(big | small | (v != v), 0.0, v)
    q = safe.to(tl.int32)
    q = tl.where(big, 2147483647, q)
    q = tl.where(small, -2147483648, q)
    return q


@triton.jit
def _store_float(ptr, v, mask, BF16: tl.constexpr):
    """Store float32/float64 ``v`` in ``ptr``'s dtype, rounding to nearest even. For bfloat16 the
    rounding is done by hand on the bits (Triton's interpreter truncates float32 -> bfloat16)."""
    if BF16:
        u = v.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
        r = tl.where(v != v, v.to(tl.float32), u.to(tl.float32, bitcast=True))
        tl.store(ptr, r.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode(q, INV_SCALE: tl.constexpr, OUT_F64: tl.constexpr):
    if OUT_F64:
        return q.to(tl.float64) * INV_SCALE
    else:
        return q.to(tl.float32) * INV_SCALE


@triton.jit
def coupling_kernel(
    q_ptr, f_ptr, out_q_ptr, out_f_ptr, grad_a_ptr, grad_b_ptr, grad_ptr, n,
    SCALE: tl.constexpr, INV_SCALE: tl.constexpr,
    HAS_Q: tl.constexpr, HAS_F: tl.constexpr, SUBTRACT: tl.constexpr,
    WRITE_Q: tl.constexpr, WRITE_F: tl.constexpr, ACCUMULATE: tl.constexpr,
    F_F64: tl.constexpr, OUT_F64: tl.constexpr, GRAD_F64: tl.constexpr,
    OUT_BF16: tl.constexpr, GRAD_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One pass over ``n`` elements of contiguous tensors.

    ``HAS_Q and HAS_F``: stream ``x = q +- quantize(f)`` (``SUBTRACT``); ``HAS_F`` only: ``x = quantize(f)``;
    ``HAS_Q`` only: ``x = q``. ``WRITE_Q`` stores ``x`` (int32) to ``out_q``, ``WRITE_F`` stores
    ``decode(x)`` to ``out_f`` (its dtype). ``ACCUMULATE`` stores ``grad_a + grad_b`` (summed in float32,
    float64 if ``GRAD_F64``) to ``grad`` (its dtype).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    if HAS_F:
        qf = _quantize(tl.load(f_ptr + offs, mask=mask, other=0.0), SCALE, F_F64)
        if HAS_Q:
            q = tl.load(q_ptr + offs, mask=mask, other=0)
            if SUBTRACT:
                x = q - qf  # int32 arithmetic wraps modulo 2**32
            else:
                x = q + qf
        else:
            x = qf
    else:
        x = tl.load(q_ptr + offs, mask=mask, other=0)
    if WRITE_Q:
        tl.store(out_q_ptr + offs, x, mask=mask)
    if WRITE_F:
        _store_float(out_f_ptr + offs, _decode(x, INV_SCALE, OUT_F64), mask, OUT_BF16)
    if ACCUMULATE:
        ga = tl.load(grad_a_ptr + offs, mask=mask, other=0.0)
        gb = tl.load(grad_b_ptr + offs, mask=mask, other=0.0)
        if GRAD_F64:
            g = ga.to(tl.float64) + gb.to(tl.float64)
        else:
            g = ga.to(tl.float32) + gb.to(tl.float32)
        _store_float(grad_ptr + offs, g, mask, GRAD_BF16)


def _check_contiguous(**tensors: torch.Tensor | None) -> int:
    n = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"coupling launcher: {name} must be contiguous")
        if n is None:
            n = t.numel()
        elif t.numel() != n:
            raise ValueError(f"coupling launcher: {name} has {t.numel()} elements, expected {n}")
    if n is None:
        raise ValueError("coupling launcher: no tensors given")
    return n


def coupling(*, q: torch.Tensor | None = None, f: torch.Tensor | None = None,
             out_q: torch.Tensor | None = None, out_f: torch.Tensor | None = None,
             grad_a: torch.Tensor | None = None, grad_b: torch.Tensor | None = None,
             grad: torch.Tensor | None = None, frac_bits: int, subtract: bool = False,
             block_size: int, num_warps: int) -> None:
    """Launch :func:`coupling_kernel`; every tensor contiguous with the same number of elements,
    ``q``/``out_q`` int32, ``f``/``out_f``/``grad*`` floating. Outputs are written in place."""
    n = _check_contiguous(q=q, f=f, out_q=out_q, out_f=out_f, grad_a=grad_a, grad_b=grad_b, grad=grad)
    if q is None and f is None:
        raise ValueError("coupling launcher: need q or f")
    accumulate = grad is not None
    if accumulate and (grad_a is None or grad_b is None):
        raise ValueError("coupling launcher: accumulating needs grad_a and grad_b")
    if n == 0:
        return
    dummy = q if q is not None else f
    grid = (triton.cdiv(n, block_size),)
    coupling_kernel[grid](
        q if q is not None else dummy, f if f is not None else dummy,
        out_q if out_q is not None else dummy, out_f if out_f is not None else dummy,
        grad_a if accumulate else dummy, grad_b if accumulate else dummy, grad if accumulate else dummy, n,
        SCALE=float(2.0 ** frac_bits), INV_SCALE=float(2.0 ** -frac_bits),
        HAS_Q=q is not None, HAS_F=f is not None, SUBTRACT=bool(subtract),
        WRITE_Q=out_q is not None, WRITE_F=out_f is not None, ACCUMULATE=accumulate,
        F_F64=f is not None and f.dtype == torch.float64,
        OUT_F64=out_f is not None and out_f.dtype == torch.float64,
        GRAD_F64=accumulate and grad_a.dtype == torch.float64,
        OUT_BF16=out_f is not None and out_f.dtype == torch.bfloat16,
        GRAD_BF16=accumulate and grad.dtype == torch.bfloat16,
        BLOCK_SIZE=block_size, num_warps=num_warps,
    )
