"""Fixed-point coupling ops (``torch.library`` custom ops in namespace ``revsnn``).

The arithmetic is defined in :mod:`revsnn_triton.ops.coupling_reference` (also the CPU path and the
tests' oracle); CUDA tensors, and CPU tensors under ``runtime.cpu_kernels("triton")`` with Triton's
interpreter, run the kernel of :mod:`revsnn_triton.kernels.coupling` instead, bit-identical.

Ops (all with a fake implementation, so they trace under ``torch.compile``):

- ``revsnn::fixed_encode(x, frac_bits, saturate) -> q``: float -> int32; the input check (non-finite or
  out-of-range values raise ``ValueError``) runs inside the op, so it costs no graph break.
- ``revsnn::fixed_decode(q, frac_bits, dtype) -> x``: int32 -> float.
- ``revsnn::fixed_couple(x_q, f, frac_bits) -> y_q`` and ``revsnn::fixed_uncouple(y_q, f, frac_bits) -> x_q``.
- ``revsnn::fixed_couple_decode(x_q, f, frac_bits, dtype) -> (y_q, decode(y_q))``: the fused forward step.
- ``revsnn::fixed_encode_ste(x, frac_bits, saturate) -> (decode(q), q)``: differentiable, straight-through
  (``grad_x = grad_out``). Saves nothing for backward.
- ``revsnn::fixed_couple_ste(x_q, x, f, frac_bits) -> (y, y_q)``: ``y_q = couple(x_q, f)``,
  ``y = decode(y_q)`` in ``x``'s dtype, where ``x`` is the float carrier of ``x_q`` (``decode(x_q)``; its
  values are not read). Differentiable, straight-through: ``grad_x = grad_y``, ``grad_f = grad_y`` (cast to
  ``f``'s dtype). Saves nothing for backward.
  (The two differentiable ops list their float output first, which ``torch.library.opcheck``'s
  forward-backward harness needs; the Python wrappers return the stream first, like the others.)
- ``revsnn::fixed_uncouple_step(y_q, f, grad_a, grad_b, frac_bits, dtype) -> (x_q, x, grad)``: the fused
  backward step of a coupling (rebuild ``x_q = uncouple(y_q, f)``, ``x = decode(x_q)``, and
  ``grad = grad_a + grad_b`` in one pass).
"""
from __future__ import annotations

import torch
from torch import Tensor

from revsnn_triton.ops import coupling_reference as ref
from revsnn_triton.runtime import use_triton
from revsnn_triton.launch import launch_config

__all__ = ["encode", "decode", "couple", "uncouple", "couple_decode", "encode_ste", "couple_ste", "uncouple_step",
           "check_frac_bits", "representable_range"]

check_frac_bits = ref.check_frac_bits
representable_range = ref.representable_range


def _launch(*, n_ref: Tensor, **kwargs) -> None:
    from revsnn_triton.kernels import coupling as kernels  # imports triton only when a kernel runs
    cfg = launch_config("coupling", max(n_ref.numel(), 1), 1, torch.float32, n_ref.device)
    kernels.coupling(block_size=cfg.block_size, num_warps=cfg.num_warps, **kwargs)


# ------------------------------------------------------------------------------------------ raw ops

@torch.library.custom_op("revsnn::fixed_encode", mutates_args=())
def _encode_op(x: Tensor, frac_bits: int, saturate: bool) -> Tensor:
    ref.check_encodable(x, frac_bits, saturate)
    if not use_triton(x.device):
        return ref.quantize(x, frac_bits)
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    _launch(n_ref=x, f=x, out_q=q, frac_bits=frac_bits)
    return q


@_encode_op.register_fake
def _(x, frac_bits, saturate):
    return torch.empty(x.shape, dtype=torch.int32, device=x.device)


@torch.library.custom_op("revsnn::fixed_decode", mutates_args=())
def _decode_op(q: Tensor, frac_bits: int, dtype: torch.dtype) -> Tensor:
    if not use_triton(q.device):
        return ref.decode(q, frac_bits, dtype)
    q = q.contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    _launch(n_ref=q, q=q, out_f=out, frac_bits=frac_bits)
    return out


@_decode_op.register_fake
def _(q, frac_bits, dtype):
    return torch.empty(q.shape, dtype=dtype, device=q.device)


def _couple_impl(x_q: Tensor, f: Tensor, frac_bits: int, subtract: bool) -> Tensor:
    if not use_triton(x_q.device):
        return (ref.uncouple if subtract else ref.couple)(x_q, f, frac_bits)
    x_q, f = x_q.contiguous(), f.contiguous()
    y_q = torch.empty_like(x_q)
    _launch(n_ref=x_q, q=x_q, f=f, out_q=y_q, frac_bits=frac_bits, subtract=subtract)
    return y_q


@torch.library.custom_op("revsnn::fixed_couple", mutates_args=())
def _couple_op(x_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    return _couple_impl(x_q, f, frac_bits, subtract=False)


@torch.library.custom_op("revsnn::fixed_uncouple", mutates_args=())
def _uncouple_op(y_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    return _couple_impl(y_q, f, frac_bits, subtract=True)


@_couple_op.register_fake
def _(x_q, f, frac_bits):
    return torch.empty_like(x_q)


@_uncouple_op.register_fake
def _(y_q, f, frac_bits):
    return torch.empty_like(y_q)


# ----------------------------------------------------------------------- straight-through (autograd)

@torch.library.custom_op("revsnn::fixed_encode_ste", mutates_args=())
def _encode_ste_op(x: Tensor, frac_bits: int, saturate: bool) -> tuple[Tensor, Tensor]:
    ref.check_encodable(x, frac_bits, saturate)
    if not use_triton(x.device):
        q = ref.quantize(x, frac_bits)
        return ref.decode(q, frac_bits, x.dtype), q
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    out = torch.empty_like(x)
    _launch(n_ref=x, f=x, out_q=q, out_f=out, frac_bits=frac_bits)
    return out, q


@_encode_ste_op.register_fake
def _(x, frac_bits, saturate):
    return torch.empty_like(x), torch.empty(x.shape, dtype=torch.int32, device=x.device)


def _encode_ste_backward(ctx, grad_x, grad_q):
    return grad_x, None, None


_encode_ste_op.register_autograd(_encode_ste_backward)


@torch.library.custom_op("revsnn::fixed_couple_decode", mutates_args=())
def _couple_decode_op(x_q: Tensor, f: Tensor, frac_bits: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if not use_triton(x_q.device):
        return ref.couple_decode(x_q, f, frac_bits, dtype)
    x_q, f = x_q.contiguous(), f.contiguous()
    y_q = torch.empty_like(x_q)
    y = torch.empty(x_q.shape, dtype=dtype, device=x_q.device)
    _launch(n_ref=x_q, q=x_q, f=f, out_q=y_q, out_f=y, frac_bits=frac_bits)
    return y_q, y


@_couple_decode_op.register_fake
def _(x_q, f, frac_bits, dtype):
    return torch.empty_like(x_q), torch.empty(x_q.shape, dtype=dtype, device=x_q.device)


@torch.library.custom_op("revsnn::fixed_couple_ste", mutates_args=())
def _couple_ste_op(x_q: Tensor, x: Tensor, f: Tensor, frac_bits: int) -> tuple[Tensor, Tensor]:
    y_q, y = _couple_decode_op(x_q, f, frac_bits, x.dtype)
    return y, y_q


@_couple_ste_op.register_fake
def _(x_q, x, f, frac_bits):
    return torch.empty(x_q.shape, dtype=x.dtype, device=x.device), torch.empty_like(x_q)


def _couple_ste_setup(ctx, inputs, output):
    ctx.f_dtype = inputs[2].dtype


def _couple_ste_backward(ctx, grad_y, grad_y_q):
    # Contiguous, as the reversible engine hands its halves' gradients to the branches: some backward
    # kernels (CPU BatchNorm) reduce in a layout-dependent order.
    grad_y = grad_y.contiguous()
    return None, grad_y, grad_y.to(ctx.f_dtype), None


_couple_ste_op.register_autograd(_couple_ste_backward, setup_context=_couple_ste_setup)


# ------------------------------------------------------------------------------ fused backward step

@torch.library.custom_op("revsnn::fixed_uncouple_step", mutates_args=())
def _uncouple_step_op(y_q: Tensor, f: Tensor, grad_a: Tensor, grad_b: Tensor, frac_bits: int,
                      dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    if not use_triton(y_q.device):
        return ref.uncouple_step(y_q, f, grad_a, grad_b, frac_bits, dtype)
    y_q, f, grad_a, grad_b = y_q.contiguous(), f.contiguous(), grad_a.contiguous(), grad_b.contiguous()
    x_q = torch.empty_like(y_q)
    x = torch.empty(y_q.shape, dtype=dtype, device=y_q.device)
    grad = torch.empty_like(grad_a)
    _launch(n_ref=y_q, q=y_q, f=f, out_q=x_q, out_f=x, grad_a=grad_a, grad_b=grad_b, grad=grad,
            frac_bits=frac_bits, subtract=True)
    return x_q, x, grad


@_uncouple_step_op.register_fake
def _(y_q, f, grad_a, grad_b, frac_bits, dtype):
    return (torch.empty_like(y_q), torch.empty(y_q.shape, dtype=dtype, device=y_q.device),
            torch.empty_like(grad_a))


# ----------------------------------------------------------------------------- validated Python API

def _check_tensor(name: str, t: object, *, dtypes: tuple[torch.dtype, ...], shape=None,
                  device=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def _check_float_dtype(dtype: object) -> torch.dtype:
    if dtype not in ref.FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in ref.FLOAT_DTYPES]}, got {dtype!r}")
    return dtype  # type: ignore[return-value]


def _check_saturate(saturate: object) -> bool:
    if not isinstance(saturate, bool):
        raise TypeError(f"saturate must be a bool, got {type(saturate).__name__}")
    return saturate


def encode(x: Tensor, frac_bits: int, saturate: bool = False) -> Tensor:
    """float ``x`` (any shape; float16/bfloat16/float32/float64) -> int32 ``rint(x * 2**frac_bits)``
    (round half to even). Non-finite values raise ``ValueError``; so do values outside the int32 grid
    (``representable_range(frac_bits)``) unless ``saturate=True``, which clamps them."""
    _check_tensor("x", x, dtypes=ref.FLOAT_DTYPES)
    return _encode_op(x, check_frac_bits(frac_bits), _check_saturate(saturate))


def decode(q: Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int32 ``q`` -> ``q * 2**-frac_bits`` in ``dtype`` (rounded once to float32, exact in float64)."""
    _check_tensor("q", q, dtypes=(torch.int32,))
    return _decode_op(q, check_frac_bits(frac_bits), _check_float_dtype(dtype))


def couple(x_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    """int32 ``x_q + quantize(f)`` modulo 2**32; ``f`` float of ``x_q``'s shape. Not differentiable."""
    _check_tensor("x_q", x_q, dtypes=(torch.int32,))
    _check_tensor("f", f, dtypes=ref.FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    return _couple_op(x_q, f, check_frac_bits(frac_bits))


def uncouple(y_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    """int32 ``y_q - quantize(f)`` modulo 2**32: ``uncouple(couple(x_q, f), f) == x_q`` for all inputs."""
    _check_tensor("y_q", y_q, dtypes=(torch.int32,))
    _check_tensor("f", f, dtypes=ref.FLOAT_DTYPES, shape=y_q.shape, device=y_q.device)
    return _uncouple_op(y_q, f, check_frac_bits(frac_bits))


def couple_decode(x_q: Tensor, f: Tensor, frac_bits: int,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Fused forward step ``(y_q, decode(y_q, dtype))`` with ``y_q = couple(x_q, f)``. Not differentiable."""
    _check_tensor("x_q", x_q, dtypes=(torch.int32,))
    _check_tensor("f", f, dtypes=ref.FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    return _couple_decode_op(x_q, f, check_frac_bits(frac_bits), _check_float_dtype(dtype))


def encode_ste(x: Tensor, frac_bits: int, saturate: bool = False) -> tuple[Tensor, Tensor]:
    """``(q, decode(q, x.dtype))`` with ``q = encode(x)``; the float output is differentiable w.r.t. ``x``
    with the straight-through gradient (identity)."""
    _check_tensor("x", x, dtypes=ref.FLOAT_DTYPES)
    x_r, q = _encode_ste_op(x, check_frac_bits(frac_bits), _check_saturate(saturate))
    return q, x_r


def couple_ste(x_q: Tensor, x: Tensor, f: Tensor, frac_bits: int) -> tuple[Tensor, Tensor]:
    """``(y_q, decode(y_q, x.dtype))`` with ``y_q = couple(x_q, f)``. ``x`` is the float carrier of
    ``x_q`` (its values are not read); the float output is differentiable w.r.t. ``x`` and ``f`` with
    straight-through gradients (``grad_x = grad_f = grad_y``)."""
    _check_tensor("x_q", x_q, dtypes=(torch.int32,))
    _check_tensor("x", x, dtypes=ref.FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    _check_tensor("f", f, dtypes=ref.FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    y, y_q = _couple_ste_op(x_q, x, f, check_frac_bits(frac_bits))
    return y_q, y


def uncouple_step(y_q: Tensor, f: Tensor, grad_a: Tensor, grad_b: Tensor, frac_bits: int,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """Fused backward step: ``(x_q, decode(x_q, dtype), grad_a + grad_b)`` with ``x_q = uncouple(y_q, f)``;
    the sum is taken in float32 (float64 for float64 ``grad_a``) and returned in ``grad_a``'s dtype."""
    _check_tensor("y_q", y_q, dtypes=(torch.int32,))
    _check_tensor("f", f, dtypes=ref.FLOAT_DTYPES, shape=y_q.shape, device=y_q.device)
    _check_tensor("grad_a", grad_a, dtypes=ref.FLOAT_DTYPES, shape=y_q.shape, device=y_q.device)
    _check_tensor("grad_b", grad_b, dtypes=ref.FLOAT_DTYPES, shape=y_q.shape, device=y_q.device)
    return _uncouple_step_op(y_q, f, grad_a, grad_b, check_frac_bits(frac_bits), _check_float_dtype(dtype))
