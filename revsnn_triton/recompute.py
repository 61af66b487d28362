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
inputs of the autograd function so that their gradients reach ``.grad`` (and DDP's hooks) the ordinary way.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable

from revsnn_triton.functional import reset_net
from revsnn_triton.reversible import _AutocastState, _RngState, _vjp_of_recomputation

__all__ = ["Recompute", "recompute"]


def _check_module(module: object, where: str) -> nn.Module:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{where}: module must be a torch.nn.Module, got {type(module).__name__}")
    return module


def _run(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` from reset neuron state, reset again afterwards (a final membrane state is not needed and
    would otherwise stay allocated); the output must be one Tensor."""
    reset_net(module)
    try:
        out = module(x)
    finally:
        reset_net(module)
    if not isinstance(out, Tensor):
        raise TypeError(f"Recompute: the wrapped module ({type(module).__name__}) must return a single "
                        f"torch.Tensor, got {type(out).__name__}")
    return out


def recompute(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` without keeping its graph when gradients are needed; recomputed in backward.

    Args:
        module: any ``nn.Module`` whose forward takes one Tensor and returns one Tensor (TypeError otherwise).
            Its neuron state is reset before and after every call (so it must process whole sequences), and it
            must be a deterministic function of its input, its parameters and the RNG state.
        x: the input Tensor, any shape and dtype the module accepts.

    Returns ``module(x)`` (same shape and dtype as the module's own output).

    When gradients are needed (grad mode on and ``x`` or a parameter of ``module`` requires grad), the forward
    runs under ``torch.no_grad`` and keeps for backward only ``x`` itself (the tensor as given, e.g. a stride-0
    ``expand`` view: no copy), the RNG state (CPU, plus the CUDA device of ``x``) if the call drew random numbers,
    and the autocast state. Backward runs the module once more with gradients (one extra forward of the module,
    under the same RNG and autocast state, BatchNorm running statistics left as the forward set them) and takes
    the vector-Jacobian product for ``x`` and every parameter that requires grad. Modifying ``x`` in place
    before backward is an error (autograd's version check); forward hooks inside ``module`` run twice; double
    backward is not supported. Otherwise (inference, no grad) it is a plain ``module(x)`` call from reset neuron
    state. ``torch.compile`` runs the recomputed call eagerly (one graph break).
    """
    _check_module(module, "recompute")
    if not isinstance(x, Tensor):
        raise TypeError(f"recompute: x must be a torch.Tensor, got {type(x).__name__}")
    params = [p for p in module.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or bool(params)):
        return _recompute_apply(module, x, params)
    return _run(module, x)


class Recompute(nn.Module):
    """An ``nn.Module`` wrapper that applies :func:`recompute` to ``module``: ``Recompute(m)(x)`` equals ``m(x)``
    with the wrapped module's graph dropped in forward and rebuilt in backward (see :func:`recompute` for what is
    kept and what it costs: one extra forward of ``module`` per backward). ``module`` must return a single
    Tensor. The wrapped module is the submodule ``module`` (state_dict keys get the prefix ``module.``); to keep
    a model's keys unchanged, call :func:`recompute` in its forward instead.
    """

    def __init__(self, module: nn.Module) -> None:
        _check_module(module, "Recompute")
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"Recompute: input must be a torch.Tensor, got {type(x).__name__}")
        return recompute(self.module, x)


@torch.compiler.disable
def _recompute_apply(module: nn.Module, x: Tensor, params: list[nn.Parameter]) -> Tensor:
    # Backward drives a Python-level recomputation (neuron resets, RNG/autocast restore, autograd.grad) that
    # Dynamo cannot trace: it runs eagerly, one graph break. The wrapped module may itself be compiled.
    return _RecomputeFunction.apply(x, module, *params)


class _RecomputeFunction(torch.autograd.Function):
    """Forward without a graph; backward by recomputation. Saves the input tensor only."""

    @staticmethod
    def forward(ctx, x: Tensor, module: nn.Module, *params: nn.Parameter) -> Tensor:
        ctx.module, ctx.params = module, params
        ctx.autocast = _AutocastState(x.device.type)
        rng = _RngState(x.device)
        with torch.no_grad():
            out = _run(module, x)
        ctx.rng = None if rng.unchanged() else rng
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        module: nn.Module = ctx.module
        want_x = ctx.needs_input_grad[0]
        slots = [k for k, want in enumerate(ctx.needs_input_grad[2:]) if want]
        param_grads: list[Tensor | None] = [None] * len(ctx.params)
        if not want_x and not slots:
            return (None, None, *param_grads)
        out, grads = _vjp_of_recomputation(lambda t: _run(module, t), module, x, want_x,
                                           [ctx.params[k] for k in slots], grad_out, ctx.rng, ctx.autocast)
        if grads is None:  # the output does not depend on x or any parameter
            return (None, None, *param_grads)
        grad_x = grads[0] if want_x else None
        for k, g in zip(slots, grads[1:] if want_x else grads):
            param_grads[k] = g
        return (grad_x, None, *param_grads)
