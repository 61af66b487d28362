"""The coupling ops as ``torch.library`` custom ops (namespace ``revsnn``), each with a fake implementation.

CPU tensors run the plain-PyTorch reference (:mod:`.reference`); CUDA tensors, and CPU tensors under
``runtime.cpu_kernels("triton")`` with Triton's interpreter, run the kernel of ``revsnn_triton.kernels.coupling``
(imported on first use), bit-identical.

Functional ops:

- ``fixed_encode(x, frac_bits, saturate) -> q``: float -> int32; the input check (non-finite or out-of-range values
  raise ``ValueError``) runs inside the op.
- ``fixed_decode(q, frac_bits, dtype) -> x``: int32 -> float.
- ``fixed_couple(x_q, f, frac_bits) -> y_q`` and ``fixed_uncouple(y_q, f, frac_bits) -> x_q``.
- ``fixed_coupling_flags(x_q, f, frac_bits) -> flags [3]``: the flags of ``fixed_couple`` (see the spec).
- ``fixed_encode_ste(x, frac_bits, saturate) -> (decode(q), q)`` and ``fixed_couple_ste(x_q, x, f, frac_bits) ->
  (y, y_q)``: differentiable with straight-through gradients (``grad_x = grad_out``; ``grad_x = grad_f = grad_y``);
  they save nothing for backward. ``x`` is the float carrier of ``x_q``; its values are not read. (They list their
  float output first, which ``torch.library.opcheck``'s forward-backward harness needs.)

In-place stream ops (mutate their first argument, and the flag row where given): ``stream_encode_(s, x, ...)``,
``stream_couple_(s, f, ...)``, ``stream_uncouple_(s, f, ...)``, ``stream_to_float_(s, ...)`` (int32 storage ->
float32 storage in the same memory) and the functional ``stream_decode(s, ...)``. ``s`` may be any view of a
stream (int32 or exact float storage); see :mod:`.spec`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from revsnn_triton.runtime import use_triton

from . import reference as ref
from . import spec


def _launch(op: str, *, s: Tensor, f: Optional[Tensor] = None, out: Optional[Tensor] = None,
            flags: Optional[Tensor] = None, frac_bits: int) -> None:
    """Run the kernel; tensors that are not 3-level views are made contiguous first (an in-place target through a
    contiguous copy written back)."""
    from revsnn_triton.kernels import coupling as kernels  # imports triton only when a kernel runs
    def representable() -> bool:
        return spec.view3(*[t for t in (s, f, out) if t is not None]) is not None

    if f is not None and not representable():
        f = f.contiguous()
    if not representable():  # s or out is a view of more than 3 levels: work on a dense copy
        if out is not None:
            tmp = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            _launch(op, s=s.contiguous(), out=tmp, frac_bits=frac_bits)
            out.copy_(tmp)
        else:
            tmp = s.contiguous()
            _launch(op, s=tmp, f=f, flags=flags, frac_bits=frac_bits)
            s.copy_(tmp)
        return
    cfg = launch_settings(s.numel(), s.device)
    kernels.coupling(op, s=s, f=f, out=out, flags=flags, frac_bits=frac_bits, block_size=cfg.block_size,
                     num_warps=cfg.num_warps)


# Elements per thread of the coupling kernel on a GPU: four 16-byte accesses per tensor, so that the block-wide
# reduction of the flags is spread over 16 elements per thread.
ELEMENTS_PER_THREAD = 16


def coupling_heuristic(n: int):
    """The GPU default for ``n`` elements: ``ELEMENTS_PER_THREAD`` elements per thread, up to 8 warps, fewer while
    fewer than 512 programs would run."""
    from revsnn_triton.launch import LaunchConfig

    warps = 8
    while warps > 1 and n < 512 * 32 * warps * ELEMENTS_PER_THREAD:
        warps //= 2
    return LaunchConfig(32 * warps * ELEMENTS_PER_THREAD, warps)


def launch_settings(n: int, device: torch.device):
    """The coupling kernel's launch configuration for ``n`` elements: the tuning cache's entry for this GPU when
    there is one, else :func:`coupling_heuristic`; under the interpreter the shared small block."""
    from revsnn_triton.launch import lookup_config

    cfg, source = lookup_config("coupling", max(n, 1), 1, torch.float32, device)
    return cfg if source != "heuristic" else coupling_heuristic(n)


# ------------------------------------------------------------------------------------------ functional ops

@torch.library.custom_op("revsnn::fixed_encode", mutates_args=())
def _encode_op(x: Tensor, frac_bits: int, saturate: bool) -> Tensor:
    ref.check_encodable(x, frac_bits, saturate)
    q = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    if use_triton(x.device):
        _launch("encode", s=q, f=x, frac_bits=frac_bits)
    else:
        ref.stream_encode_(q, x, frac_bits)
    return q


@_encode_op.register_fake
def _(x, frac_bits, saturate):
    return torch.empty(x.shape, dtype=torch.int32, device=x.device)


@torch.library.custom_op("revsnn::fixed_decode", mutates_args=())
def _decode_op(q: Tensor, frac_bits: int, dtype: torch.dtype) -> Tensor:
    return _stream_decode_op(q, frac_bits, dtype)


@_decode_op.register_fake
def _(q, frac_bits, dtype):
    return torch.empty(q.shape, dtype=dtype, device=q.device)


def _couple_impl(x_q: Tensor, f: Tensor, frac_bits: int, subtract: bool) -> Tensor:
    y_q = x_q.clone(memory_format=torch.contiguous_format)
    (_uncouple_inplace if subtract else _couple_inplace)(y_q, f, frac_bits, None)
    return y_q


def _couple_inplace(s: Tensor, f: Tensor, frac_bits: int, flags: Optional[Tensor]) -> None:
    if use_triton(s.device):
        _launch("couple", s=s, f=f, flags=flags, frac_bits=frac_bits)
    else:
        ref.stream_couple_(s, f, frac_bits, flags)


def _uncouple_inplace(s: Tensor, f: Tensor, frac_bits: int, flags: Optional[Tensor] = None) -> None:
    if use_triton(s.device):
        _launch("uncouple", s=s, f=f, frac_bits=frac_bits)
    else:
        ref.stream_uncouple_(s, f, frac_bits)


@torch.library.custom_op("revsnn::fixed_couple", mutates_args=())
def _couple_op(x_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    return _couple_impl(x_q, f, frac_bits, subtract=False)


@torch.library.custom_op("revsnn::fixed_uncouple", mutates_args=())
def _uncouple_op(y_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    return _couple_impl(y_q, f, frac_bits, subtract=True)


@_couple_op.register_fake
def _(x_q, f, frac_bits):
    return torch.empty_like(x_q, memory_format=torch.contiguous_format)


@_uncouple_op.register_fake
def _(y_q, f, frac_bits):
    return torch.empty_like(y_q, memory_format=torch.contiguous_format)


@torch.library.custom_op("revsnn::fixed_coupling_flags", mutates_args=())
def _coupling_flags_op(x_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    if use_triton(x_q.device):
        flags = spec.new_flags(1, x_q.device)
        scratch = x_q.clone(memory_format=torch.contiguous_format)
        _launch("couple", s=scratch, f=f, flags=flags[0], frac_bits=frac_bits)
        return flags[0]
    return ref.coupling_flags(x_q, f, frac_bits)


@_coupling_flags_op.register_fake
def _(x_q, f, frac_bits):
    return x_q.new_empty(spec.FLAG_COLUMNS, dtype=torch.int32)


# ----------------------------------------------------------------------- straight-through (autograd)

@torch.library.custom_op("revsnn::fixed_encode_ste", mutates_args=())
def _encode_ste_op(x: Tensor, frac_bits: int, saturate: bool) -> tuple[Tensor, Tensor]:
    q = _encode_op(x, frac_bits, saturate)
    return _stream_decode_op(q, frac_bits, x.dtype), q


@_encode_ste_op.register_fake
def _(x, frac_bits, saturate):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty(
        x.shape, dtype=torch.int32, device=x.device)


def _encode_ste_backward(ctx, grad_x, grad_q):
    return grad_x, None, None


_encode_ste_op.register_autograd(_encode_ste_backward)


@torch.library.custom_op("revsnn::fixed_couple_ste", mutates_args=())
def _couple_ste_op(x_q: Tensor, x: Tensor, f: Tensor, frac_bits: int) -> tuple[Tensor, Tensor]:
    y_q = _couple_impl(x_q, f, frac_bits, subtract=False)
    return _stream_decode_op(y_q, frac_bits, x.dtype), y_q


@_couple_ste_op.register_fake
def _(x_q, x, f, frac_bits):
    return (torch.empty(x_q.shape, dtype=x.dtype, device=x.device),
            torch.empty_like(x_q, memory_format=torch.contiguous_format))


def _couple_ste_setup(ctx, inputs, output):
    ctx.f_dtype = inputs[2].dtype


def _couple_ste_backward(ctx, grad_y, grad_y_q):
    # Dense, as the reversible engine hands gradients to branches whose backward may reduce in a layout-dependent
    # order (torch's CPU BatchNorm), so that both modes compute the same bits.
    grad_y = grad_y.contiguous()
    return None, grad_y, grad_y.to(ctx.f_dtype), None


_couple_ste_op.register_autograd(_couple_ste_backward, setup_context=_couple_ste_setup)


# ------------------------------------------------------------------------------------ in-place stream ops

@torch.library.custom_op("revsnn::stream_encode_", mutates_args=("s", "flags"))
def _stream_encode_op(s: Tensor, x: Tensor, frac_bits: int, flags: Optional[Tensor]) -> None:
    if use_triton(s.device):
        _launch("encode", s=s, f=x, flags=flags, frac_bits=frac_bits)
    else:
        ref.stream_encode_(s, x, frac_bits, flags)


@torch.library.custom_op("revsnn::stream_couple_", mutates_args=("s", "flags"))
def _stream_couple_op(s: Tensor, f: Tensor, frac_bits: int, flags: Optional[Tensor]) -> None:
    _couple_inplace(s, f, frac_bits, flags)


@torch.library.custom_op("revsnn::stream_uncouple_", mutates_args=("s",))
def _stream_uncouple_op(s: Tensor, f: Tensor, frac_bits: int) -> None:
    _uncouple_inplace(s, f, frac_bits)


@torch.library.custom_op("revsnn::stream_to_float_", mutates_args=("s",))
def _stream_to_float_op(s: Tensor, frac_bits: int) -> None:
    """int32 storage -> float32 storage in the same memory (the float32 bits are written into ``s``)."""
    if use_triton(s.device):
        _launch("to_float", s=s, out=s.view(torch.float32), frac_bits=frac_bits)
    else:
        ref.stream_int_to_float_(s, frac_bits)


@torch.library.custom_op("revsnn::stream_decode", mutates_args=())
def _stream_decode_op(s: Tensor, frac_bits: int, dtype: torch.dtype) -> Tensor:
    if not use_triton(s.device):
        return ref.stream_decode(s, frac_bits, dtype)
    out = torch.empty(s.shape, dtype=dtype, device=s.device)
    _launch("decode", s=s, out=out, frac_bits=frac_bits)
    return out


@_stream_decode_op.register_fake
def _(s, frac_bits, dtype):
    return torch.empty(s.shape, dtype=dtype, device=s.device)
