"""The spike convolution as ``torch.library`` custom ops (namespace ``revsnn``), with fake and autograd
registrations, so that it traces under ``torch.compile`` and ``torch.library.opcheck`` passes.

- ``revsnn::spike_conv(spikes, weight, bias, stride, padding, pool, dtype) -> (out, mask)``:
  ``out = conv(pool3x3(spikes, pool), weight, bias)`` computed in ``dtype`` (inputs cast to it, autocast off
  inside), and ``mask = spikes != 0`` (``torch.bool``, ``spikes``' shape), the copy of the input that backward
  reads. Differentiable in ``spikes``, ``weight`` and ``bias`` through ``register_autograd``; saved for backward:
  ``mask`` (1 byte per element instead of 4 for fp32 spikes) and ``weight``. Nothing else: neither the float
  spikes, nor the pooled map, nor MaxPool's int64 argmax indices.
- ``revsnn::spike_conv_backward(grad_out, mask, weight, stride, padding, pool, dtype, input_dtype, has_bias,
  need_input, need_weight, need_bias) -> (grad_spikes, grad_weight, grad_bias)``: rebuilds the pooled map (and
  MaxPool's indices, a deterministic function of the input) from ``mask`` and runs the same convolution and
  pooling backward calls as autograd of ``conv(pool(x))`` would, so the gradients are bit-identical to it. A
  gradient that is not needed is an empty tensor and costs nothing.

Work space of the backward, in order: the rebuilt spikes live only until they are pooled (MaxPool keeps its
indices), the pooled map only until the weight gradient is taken, and the input gradients are allocated after
both are gone; the backward calls that read only an input's shape get a stride-0 stand-in (one element of
memory). So no two input-sized float tensors coexist.

The ops are made of ATen calls only, so their fake implementations are the same functions run on fake tensors:
shapes, dtypes and strides agree with the real ones by construction.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from revsnn_triton.ops.spike_conv.reference import POOL_KERNEL, POOL_PADDING, POOL_STRIDE, pool3x3, pooled_shape

__all__ = ["spike_conv_forward", "spike_conv_backward"]

_K, _S, _P = [POOL_KERNEL] * 2, [POOL_STRIDE] * 2, [POOL_PADDING] * 2


def _conv_args(stride: list[int], padding: list[int]) -> tuple:
    """``(stride, padding, dilation, transposed, output_padding, groups)`` of ``aten.convolution``."""
    nd = len(stride)
    return stride, padding, [1] * nd, False, [0] * nd, 1


def _shape_only(shape, like: Tensor) -> Tensor:
    """A stride-0 tensor of ``shape`` (one element of memory): the input argument of a backward call that reads
    only its shape."""
    return like.new_empty((1,) * len(shape)).expand(shape)


def _forward(spikes: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int], padding: list[int],
             pool: Optional[str], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    with torch.autocast(spikes.device.type, enabled=False):
        x = pool3x3(spikes.to(dtype), pool)
        out = torch.ops.aten.convolution(x, weight.to(dtype), None if bias is None else bias.to(dtype),
                                         *_conv_args(stride, padding))
    return out, spikes != 0


@torch.library.custom_op("revsnn::spike_conv", mutates_args=())
def spike_conv_forward(spikes: Tensor, weight: Tensor, bias: Optional[Tensor], stride: list[int],
                       padding: list[int], pool: Optional[str], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(out [N, C_out, ...] in dtype, mask = spikes != 0)``; see the module docstring."""
    return _forward(spikes, weight, bias, stride, padding, pool, dtype)


spike_conv_forward.register_fake(_forward)


def _backward_impl(grad_out: Tensor, mask: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                   pool: Optional[str], dtype: torch.dtype, input_dtype: torch.dtype, has_bias: bool,
                   need_input: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    need_bias = need_bias and has_bias
    args = _conv_args(stride, padding)
    g_in = g_w = g_b = indices = None
    with torch.autocast(grad_out.device.type, enabled=False):
        grad_out, w = grad_out.to(dtype), weight.to(dtype)
        if need_weight or need_bias or (need_input and pool == "max"):
            pooled = mask.to(dtype)
            if pool == "max":
                pooled, indices = torch.ops.aten.max_pool2d_with_indices(pooled, _K, _S, _P)
            else:
                pooled = pool3x3(pooled, pool)
            if need_weight or need_bias:
                _, g_w, g_b = torch.ops.aten.convolution_backward(
                    grad_out, pooled, w, [weight.shape[0]] if has_bias else None, *args,
                    [False, need_weight, need_bias])
            del pooled
        if need_input:
            g_in, _, _ = torch.ops.aten.convolution_backward(
                grad_out, _shape_only(pooled_shape(mask.shape, pool), grad_out), w, None, *args,
                [True, False, False])
            if pool == "avg":
                g_in = torch.ops.aten.avg_pool2d_backward(g_in, _shape_only(mask.shape, g_in), _K, _S, _P,
                                                          False, True, None)
            elif pool == "max":
                g_in = torch.ops.aten.max_pool2d_with_indices_backward(
                    g_in, _shape_only(mask.shape, g_in), _K, _S, _P, [1, 1], False, indices)
    return (grad_out.new_empty(0, dtype=input_dtype) if g_in is None else g_in.to(input_dtype),
            weight.new_empty(0) if g_w is None else g_w.to(weight.dtype),
            weight.new_empty(0) if g_b is None else g_b.to(weight.dtype))


@torch.library.custom_op("revsnn::spike_conv_backward", mutates_args=())
def spike_conv_backward(grad_out: Tensor, mask: Tensor, weight: Tensor, stride: list[int], padding: list[int],
                        pool: Optional[str], dtype: torch.dtype, input_dtype: torch.dtype, has_bias: bool,
                        need_input: bool, need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_spikes in input_dtype, grad_weight, grad_bias in weight's dtype)``, each an empty tensor when not
    needed; see the module docstring."""
    return _backward_impl(grad_out, mask, weight, stride, padding, pool, dtype, input_dtype, has_bias,
                          need_input, need_weight, need_bias)


spike_conv_backward.register_fake(_backward_impl)


def _setup_context(ctx, inputs, output) -> None:
    spikes, weight, bias, stride, padding, pool, dtype = inputs
    mask = output[1]
    ctx.save_for_backward(mask, weight)
    ctx.mark_non_differentiable(mask)
    ctx.set_materialize_grads(False)  # no zero gradient is built for the unused mask
    ctx.conf = (stride, padding, pool, dtype, spikes.dtype, bias is not None)


def _backward(ctx, grad_out, _grad_mask):
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    if grad_out is None or not (need_input or need_weight or need_bias):
        return (None,) * 7
    mask, weight = ctx.saved_tensors
    stride, padding, pool, dtype, input_dtype, has_bias = ctx.conf
    g_in, g_w, g_b = spike_conv_backward(grad_out, mask, weight, stride, padding, pool, dtype, input_dtype,
                                         has_bias, need_input, need_weight, need_bias)
    return (g_in if need_input else None, g_w if need_weight else None, g_b if need_bias else None,
            None, None, None, None)


spike_conv_forward.register_autograd(_backward, setup_context=_setup_context)
