"""Gradient checkpointing for the non-reversible parts of a spiking network.

:class:`Recompute` (and the function :func:`recompute`) runs a module without keeping its autograd graph and
recomputes it during backward. A non-reversible part such as a transformer's convolutional tokenizer otherwise
holds its whole graph (BatchNorm inputs, neuron inputs, spikes) from the forward until the very end of
backward, on top of the reversible blocks' backward peak; recomputed, the peak becomes the larger of the two
instead of their sum.

The recomputation follows the same rules as the reversible engine (:mod:`revsnn_triton.reversible`): neuron
state is reset before and after every call, BatchNorm running statistics are updated once per step (by the
forward), the recomputation sees the forward's RNG state (equal dropout masks) and autocast state, and the
vector-Jacobian product is taken with ``torch.autograd.grad`` (never ``.backward()``), with the parameters as
inputs of the autograd function so that their gradients reach ``.grad`` (and DDP's hooks) the ordinary way. Tensors from outside the module that it reads and that require grad (a parent's parameter, a
conditioning tensor) are found during the forward and get their gradients too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from revsnn_triton import replay

__all__ = ["Recompute", "recompute"]


def _check_module(module: object, where: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module must be a torch.nn.Module, got {type(module).__name__}")
    return module


def recompute(module: nn.Module, x: Tensor, recompute_batch: Optional[int] = None, *,
              binary_input: bool = False) -> Tensor:
    """``module(x)`` without keeping its graph when gradients are needed; recomputed in backward.

    Args:
        module: any ``nn.Module`` whose forward takes one Tensor and returns one Tensor (TypeError otherwise).
            Its neuron state is reset before and after every call (so it must process whole sequences), and it
            must be a deterministic function of its input, its parameters and the RNG state.
        x: the input Tensor, any shape and dtype the module accepts.
        recompute_batch: None (default): one call on the whole input. N: forward and recomputation run on
            micro-batches of N samples along dim 1 of ``x`` (``[T, B, ...]``), so the recomputation's graph is that
            of N samples; BatchNorm layers must then be :class:`~revsnn_triton.batchnorm.SeqBatchNorm`.
        binary_input: ``x`` holds only 0 and 1 (a neuron's spikes): it is kept for backward as ``torch.bool`` (1 byte
            per element) instead of its dtype; checked (one comparison and one synchronization per forward).

    Returns ``module(x)`` (same shape and dtype as the module's own output).

    When gradients are needed (grad mode on and ``x`` or a parameter of ``module`` requires grad), the forward
    runs under ``torch.no_grad`` and keeps for backward only ``x`` itself (the tensor as given, e.g. a stride-0
    ``expand`` view: no copy) and a :class:`~revsnn_triton.replay.CallRecord` (RNG state if the call drew random
    numbers, autocast state, train/eval flags, BatchNorm statistics). Backward runs the module once more with
    gradients under that state (BatchNorm normalizes with the forward's statistics; running statistics are updated
    once, by the forward) and takes the vector-Jacobian product for ``x`` and every parameter that requires grad.
    Modifying ``x`` in place before backward is an error (autograd's version check); forward hooks inside
    ``module`` run twice; double backward is not supported. Otherwise (inference, no grad) it is a plain
    ``module(x)`` call from reset neuron state. ``torch.compile`` runs the recomputed call eagerly (one graph
    break).
    """
    _check_module(module, "recompute")
    if not isinstance(x, Tensor):
        raise TypeError(f"recompute: x must be a torch.Tensor, got {type(x).__name__}")
    if recompute_batch is not None and (isinstance(recompute_batch, bool) or not isinstance(recompute_batch, int)
                                        or recompute_batch < 1):
        raise ValueError(f"recompute: recompute_batch must be None or an int >= 1, got {recompute_batch!r}")
    if not isinstance(binary_input, bool):
        raise TypeError(f"recompute: binary_input must be a bool, got {type(binary_input).__name__}")
    params = [p for p in module.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or bool(params)):
        return _recompute_apply(module, x, recompute_batch, binary_input)
    return replay.run_fresh(module, x, "Recompute: the wrapped module")


class Recompute(nn.Module):
    """An ``nn.Module`` wrapper that applies :func:`recompute` to ``module``: ``Recompute(m)(x)`` equals ``m(x)``
    with the wrapped module's graph dropped in forward and rebuilt in backward (see :func:`recompute` for what is
    kept and what it costs: one extra forward of ``module`` per backward). ``module`` must return a single
    Tensor. The wrapped module is the submodule ``module`` (state_dict keys get the prefix ``module.``); to keep
    a model's keys unchanged, call :func:`recompute` in its forward instead.
    """

    def __init__(self, module: nn.Module, recompute_batch: Optional[int] = None) -> None:
        _check_module(module, "Recompute")
        super().__init__()
        self.module = module
        self.recompute_batch = recompute_batch

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"Recompute: input must be a torch.Tensor, got {type(x).__name__}")
        return recompute(self.module, x, self.recompute_batch)


@torch.compiler.disable
def _recompute_apply(module: nn.Module, x: Tensor, recompute_batch: Optional[int], binary: bool) -> Tensor:
    # Backward drives a Python-level recomputation (neuron resets, RNG/autocast restore, autograd.grad) that
    # Dynamo cannot trace: it runs eagerly, one graph break. The wrapped module may itself be compiled.
    chunks = replay.micro_batches(x.shape[1] if x.dim() > 1 else 1, recompute_batch if x.dim() > 1 else None)
    call = _RecomputeCall(replay.Segment(module, f"Recompute ({type(module).__name__})", chunks), binary)
    call.out = call.forward(x)
    return _RecomputeFunction.apply(x, call, *call.segment.params, *call.record.externals)


def _batched(x: Tensor, chunk: slice) -> Tensor:
    return x if chunk == slice(None) else x[:, chunk]


class _RecomputeCall:
    """One forward of a recomputed module and what its backward needs: the record and the saved input (as a 0/1
    mask when ``binary``)."""

    def __init__(self, segment: replay.Segment, binary: bool) -> None:
        self.segment, self.binary = segment, binary

    def forward(self, x: Tensor) -> Tensor:
        outputs: list[Tensor] = []
        x = x.detach()  # (what the module reads besides its input is what the forward watches for)
        self.record = self.segment.forward(lambda chunk: _batched(x, chunk), lambda chunk, out: outputs.append(out))
        if len(outputs) == 1:
            return outputs[0]
        if x.shape[0] > 1 and all(o.dim() > 1 and o.stride(0) == 0 for o in outputs):
            # an output repeated over T (a stem run once per image): keep it repeated
            return torch.cat([o[:1] for o in outputs], 1).expand(x.shape[0], *([-1] * (outputs[0].dim() - 1)))
        return torch.cat(outputs, 1)


class _RecomputeFunction(torch.autograd.Function):
    """The autograd node of a recomputed module: its forward already ran (:class:`_RecomputeCall`); it saves the
    input (or its 0/1 mask), and backward recomputes the module and returns the gradients of the input, the
    parameters and the tensors from outside the module that it read."""

    @staticmethod
    def forward(ctx, x: Tensor, call: _RecomputeCall, *inputs: Tensor) -> Tensor:
        ctx.call, ctx.x_dtype = call, x.dtype
        if call.binary:
            mask = x != 0
            if not torch.equal(mask.to(x.dtype), x):
                raise ValueError(f"recompute(..., binary_input=True): the input of {type(call.segment.module).__name__}"
                                 " holds values other than 0 and 1")
            ctx.save_for_backward(mask)
        else:
            ctx.save_for_backward(x)
        out, call.out = call.out, None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (saved,) = ctx.saved_tensors
        call: _RecomputeCall = ctx.call
        x = saved
        want_x = ctx.needs_input_grad[0]
        inputs = call.segment.params + call.record.externals
        wanted = [t for t, want in zip(inputs, ctx.needs_input_grad[2:]) if want]
        if not want_x and not wanted:
            return (None, None, *[None] * len(inputs))
        grad_x = (torch.zeros(x.shape, dtype=ctx.x_dtype, device=x.device) if want_x and call.segment.split
                  else None)
        holder: list[Tensor] = []

        def add_grad(chunk, g):
            if grad_x is None:
                holder.append(g)
            else:
                grad_x[:, chunk] += g

        def read(chunk):  # a 0/1 mask is turned back into the input micro-batch by micro-batch
            part = _batched(x, chunk)
            return part.to(ctx.x_dtype) if call.binary else part

        grads = call.segment.backward(call.record, read=read, write=lambda c, out: None,
                                      grad_of=lambda chunk: _batched(grad_out, chunk),
                                      add_grad=add_grad if want_x else None, inputs=wanted)
        by_id = {id(t): g for t, g in zip(wanted, grads)}
        grad_x = grad_x if grad_x is not None else (holder[0] if holder else None)
        return (grad_x, None, *[by_id.get(id(t)) for t in inputs])
