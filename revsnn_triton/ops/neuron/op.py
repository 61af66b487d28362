"""Multi-step IF / LIF / PLIF neurons as ``torch.library`` custom ops, and their Python entry point.

Ops (namespace ``revsnn``), each with a fake (meta) implementation, so they trace under ``torch.compile``:

- ``revsnn::neuron_forward(x, v_init, w, kind, tau, decay_input, v_threshold, hard_reset, v_reset,
  detach_reset, surrogate, alpha, save, scale=None, shift=None, channel_dim=0, need_v_final=True)
  -> (spikes, v_final, saved)``, differentiable (w.r.t. x, v_init, w, scale, shift) through
  ``register_autograd`` whose backward calls
- ``revsnn::neuron_backward(grad_spikes, grad_v_final, saved, x, v_init, w, <same scalars>, need_grad_v_init,
  scale, shift, channel_dim, need_grad_affine) -> (grad_x, grad_v_init, grad_w, grad_scale, grad_shift)``.

``v_reset`` is encoded schema-friendly as ``hard_reset: bool`` + ``v_reset: float`` (0.0 for soft reset, which is
also what the soft-reset charge uses); ``w`` is None except for PLIF; an absent output is an empty tensor. Where
they run (``runtime.use_triton``): CUDA tensors -> the Triton launchers of ``revsnn_triton.kernels.neurons``
(imported on first use); CPU tensors -> the chunked plain-PyTorch backend :mod:`revsnn_triton.ops.neuron.cpu`,
or the Triton kernels under the interpreter inside ``runtime.cpu_kernels("triton")``. Both backends have the
same signatures and return tensors in the same layout (the neuron layout of ``x``), and the op reduces their
per-neuron partial sums the same way (one ``torch.sum`` each: deterministic).

What autograd keeps (``spec.SAVE_PLANS``): ``save="h"`` 4 bytes per neuron-step (fp32 H), ``"h_bf16"`` 2 bytes
(approximate gradients), ``"input"`` nothing beyond ``x`` itself (forward recomputed in backward, in registers
for T <= 32; gradients bit-identical to ``"h"``'s). ``x`` is also kept for PLIF with ``decay_input`` and with an
affine input (the grad of ``scale`` sums ``dL/dy * x``); the transformed input ``y`` is never stored. PLIF and
``"input"`` keep a given ``v_init`` (``v_init=None``, the constant initial state, is never materialized). Unused
outputs cost nothing in backward: autograd passes None for an unused ``v_final`` (its zero gradient is not
read), and no grad of ``v_init`` is written unless it requires one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from revsnn_triton.ops.neuron import cpu
from revsnn_triton.ops.neuron.reference import channel_sum, plif_grad_w
from revsnn_triton.ops.neuron.spec import (DEFAULT_SAVE, SAVE_PLANS, NeuronConfig, check_neuron_args,
                                           empty_neuron_layout)
from revsnn_triton.runtime import use_triton

__all__ = ["multistep_neuron", "neuron_forward", "neuron_backward", "DEFAULT_SAVE"]


def _backend(device: torch.device):
    """The launchers for ``device``: the Triton kernels (imported, with triton, on first use) or the CPU backend."""
    if use_triton(device):
        from revsnn_triton.kernels import neurons
        return neurons
    return cpu


def _q(w: Optional[Tensor]) -> Optional[Tensor]:
    """PLIF's ``1/tau = sigmoid(w)``, computed in fp32 as spikingjelly does; 1 element."""
    return None if w is None else torch.sigmoid(w.float()).reshape(1)


def _cfg(kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha, scale,
         channel_dim) -> NeuronConfig:
    return NeuronConfig(kind=kind, tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                        hard_reset=hard_reset, v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate,
                        alpha=alpha, channel_dim=None if scale is None else channel_dim)


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("revsnn::neuron_forward", mutates_args=())
def neuron_forward(x: Tensor, v_init: Optional[Tensor], w: Optional[Tensor], kind: str, tau: float, decay_input: bool,
                   v_threshold: float, hard_reset: bool, v_reset: float, detach_reset: bool, surrogate: str,
                   alpha: float, save: str, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   channel_dim: int = 0, need_v_final: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: ``(spikes [T, *shape] x.dtype, v_final [*shape] fp32, saved)``; ``saved`` is fp32 H
    (``save="h"``), bf16 ``H - v_threshold`` (``"h_bf16"``) or an empty fp32 tensor (``"input"``);
    ``v_final`` is empty (not computed out to memory) without ``need_v_final``.
    ``v_init=None``: the default initial state ``v_reset`` (0.0 for soft reset), never materialized.
    ``scale``/``shift`` (fp32 ``[C]``, ``C = x.shape[1 + channel_dim]``, or None): the neuron's input is
    ``x * scale[c] + shift[c]``, computed step by step (no input-sized temporary)."""
    cfg = _cfg(kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha, scale,
               channel_dim)
    spikes, v_final, saved = _backend(x.device).neuron_forward(
        x, v_init, _q(w), cfg, save, _vector(scale), _vector(shift), store_v_final=need_v_final)
    return spikes, _empty(x) if v_final is None else v_final, _empty(x) if saved is None else saved


@neuron_forward.register_fake
def _(x, v_init, w, kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha,
      save, scale=None, shift=None, channel_dim=0, need_v_final=True):
    saved_dtype = SAVE_PLANS[save].saved_dtype
    return (empty_neuron_layout(x, x.dtype),
            empty_neuron_layout(x, torch.float32, with_time=False) if need_v_final else _empty(x),
            _empty(x) if saved_dtype is None else empty_neuron_layout(x, saved_dtype))


@torch.library.custom_op("revsnn::neuron_backward", mutates_args=())
def neuron_backward(grad_spikes: Tensor, grad_v_final: Optional[Tensor], saved: Tensor, x: Optional[Tensor],
                    v_init: Optional[Tensor], w: Optional[Tensor], kind: str, tau: float, decay_input: bool,
                    v_threshold: float, hard_reset: bool, v_reset: float, detach_reset: bool, surrogate: str,
                    alpha: float, save: str, need_grad_v_init: bool = True, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, channel_dim: int = 0, need_grad_affine: bool = True
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(grad_x [T, *shape] grad_spikes' dtype, grad_v_init, grad_w, grad_scale, grad_shift)``;
    ``grad_v_init`` is ``[*shape]`` fp32, or an empty fp32 tensor when ``need_grad_v_init`` is false (then it
    is not computed out to memory); ``grad_w`` has ``w``'s shape and dtype for PLIF, else it is an empty fp32
    tensor; ``grad_scale``, ``grad_shift`` are fp32 ``[C]`` with ``scale`` and ``need_grad_affine``, else empty.
    ``grad_v_final=None`` means zero (nothing read). ``x`` is required for ``save="input"``, PLIF with
    ``decay_input`` and ``scale``; ``v_init`` matters for PLIF and ``"input"`` (None: the default initial state
    ``v_reset``)."""
    cfg = _cfg(kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha, scale,
               channel_dim)
    q = _q(w)
    grad_x, grad_v_init, w_partial, scale_partial, shift_partial = _backend(grad_spikes.device).neuron_backward(
        grad_spikes, grad_v_final, None if SAVE_PLANS[save].recomputes else saved, x, v_init, q, cfg, save,
        _vector(scale), _vector(shift), need_grad_v_init=need_grad_v_init, need_grad_affine=need_grad_affine)
    # Absent outputs are distinct empty tensors (a custom op may not return one tensor twice).
    grad_v_init = _empty(grad_x) if grad_v_init is None else grad_v_init
    grad_w = _empty(grad_x) if w is None else plif_grad_w(w_partial, q.reshape(()), w)
    if scale_partial is None:
        return grad_x, grad_v_init, grad_w, _empty(grad_x), _empty(grad_x)
    return grad_x, grad_v_init, grad_w, channel_sum(scale_partial, channel_dim), channel_sum(shift_partial, channel_dim)


@neuron_backward.register_fake
def _(grad_spikes, grad_v_final, saved, x, v_init, w, kind, tau, decay_input, v_threshold, hard_reset, v_reset,
      detach_reset, surrogate, alpha, save, need_grad_v_init=True, scale=None, shift=None, channel_dim=0,
      need_grad_affine=True):
    template = x if SAVE_PLANS[save].recomputes else saved
    grad_x = empty_neuron_layout(template, grad_spikes.dtype)
    grad_v_init = (empty_neuron_layout(template, torch.float32, with_time=False) if need_grad_v_init
                   else _empty(grad_x))
    grad_w = _empty(grad_x) if w is None else torch.empty_like(w, memory_format=torch.contiguous_format)
    if scale is None or not need_grad_affine:
        return grad_x, grad_v_init, grad_w, _empty(grad_x), _empty(grad_x)
    return grad_x, grad_v_init, grad_w, torch.empty_like(scale), torch.empty_like(shift)


_SCALARS = ("kind", "tau", "decay_input", "v_threshold", "hard_reset", "v_reset", "detach_reset", "surrogate",
            "alpha", "save")
_SCALE_INPUT = 3 + len(_SCALARS)  # index of `scale` among the forward op's inputs (then shift)


def _setup_context(ctx, inputs, output) -> None:
    x, v_init, w, *rest = inputs
    params = dict(zip(_SCALARS, rest[:len(_SCALARS)]))
    scale, shift, channel_dim, _need_v_final = rest[len(_SCALARS):]
    cfg = _cfg(*(params[k] for k in _SCALARS[:-1]), scale, channel_dim)
    plan = SAVE_PLANS[params["save"]]
    ctx.params = params
    ctx.channel_dim = channel_dim
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(output[2], x if plan.keeps_x(cfg) else None,
                          v_init if plan.backward_reads_v_init(cfg) else None, w, scale, shift)
    ctx.mark_non_differentiable(output[2])
    # Unused outputs get None instead of zero tensors: a None grad of v_final is not read by the kernel.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_spikes, grad_v_final, _grad_saved):
    saved, x, v_init, w, scale, shift = ctx.saved_tensors
    p = ctx.params
    if grad_spikes is None:  # only v_final is used downstream
        template = x if SAVE_PLANS[p["save"]].recomputes else saved
        grad_spikes = empty_neuron_layout(template, ctx.x_dtype).zero_()
    need_grad_v_init = bool(ctx.needs_input_grad[1])
    need_grad_affine = scale is not None and any(ctx.needs_input_grad[_SCALE_INPUT:_SCALE_INPUT + 2])
    grad_x, grad_v_init, grad_w, grad_scale, grad_shift = neuron_backward(
        grad_spikes.to(ctx.x_dtype), grad_v_final, saved, x, v_init, w, *(p[k] for k in _SCALARS),
        need_grad_v_init, scale, shift, ctx.channel_dim, need_grad_affine)
    return ((grad_x, grad_v_init if need_grad_v_init else None, grad_w if w is not None else None)
            + (None,) * len(_SCALARS)
            + ((grad_scale, grad_shift) if need_grad_affine else (None, None)) + (None, None))


neuron_forward.register_autograd(_backward, setup_context=_setup_context)


def multistep_neuron(x_seq, v_init=None, *, tau=None, w=None, decay_input=True, v_threshold=1.0, v_reset=0.0,
                     detach_reset=False, surrogate="sigmoid", alpha=4.0, save=DEFAULT_SAVE, scale=None, shift=None,
                     channel_dim=None, need_v_final=True):
    """Multi-step IF / LIF / PLIF neuron over ``x_seq [T, *shape]`` (spikingjelly 2.0 semantics, ``step_mode='m'``).

    - ``x_seq``: ``[T, *shape]`` with T >= 1 and at least 2 dims; float32, float16 or bfloat16 (no float64,
      integer or complex); any strides, including a time stride of 0 (``expand``), read in place.
    - ``v_init``: ``[*shape]`` float32 on ``x_seq``'s device, or None (= ``v_reset``; 0 for soft reset).
    - kind: ``w`` given -> PLIF (``1/tau = sigmoid(w)``, ``w`` a 1-element float tensor, gradient returned);
      else ``tau`` given -> LIF (finite, > 1); else IF.
    - ``v_reset=None`` -> soft reset (subtract ``v_threshold``); ``v_threshold`` and ``v_reset`` finite.
    - ``surrogate``: one of ``revsnn_triton.surrogate.SURROGATES`` (the fused ones), ``alpha`` its parameter (> 0).
    - ``save``: ``"input"`` (default: nothing beyond ``x``, forward recomputed in backward, in registers for
      T <= 32; exact, least memory and traffic), ``"h"`` (4 bytes/neuron-step fp32 H, exact), ``"h_bf16"``
      (2 bytes, approximate gradients).
    - ``scale``, ``shift``, ``channel_dim``: an optional per-channel affine transform of the input (e.g. a
      BatchNorm's apply step fused into the neuron): ``scale`` and ``shift`` float32 ``[C]`` on ``x_seq``'s
      device, both or neither, with ``C = x_seq.shape[1 + channel_dim]``; ``channel_dim`` indexes the
      per-step shape ``x_seq.shape[1:]`` (1 for ``[T, B, C, H, W]`` and ``[T, B, C, N]``). The neuron's input
      at each step is then ``y = x * scale[c] + shift[c]`` in fp32 (a multiply, then an add), never stored:
      spikes and ``v_final`` are bit-identical to running the neuron on that ``y``. Gradients:
      ``grad_x = dL/dy * scale[c]``, ``grad_scale[c] = sum(dL/dy * x)`` and ``grad_shift[c] = sum(dL/dy)``
      over time and the other dims (per-neuron partial sums, then one ``torch.sum``: deterministic). What is
      kept for backward: ``x`` (in every save mode: the grad of ``scale`` reads it) and the two vectors.
    - ``need_v_final=False``: the final membrane is not written out (it costs 4 bytes per neuron of traffic)
      and ``None`` is returned in its place.

    Returns ``(spikes [T, *shape] in x_seq's dtype, v_final [*shape] float32 or None)``, differentiable w.r.t.
    ``x_seq``, ``v_init``, ``w``, ``scale`` and ``shift``. When no gradient can flow (grad mode off, or none of
    them requires grad) nothing is saved whatever ``save`` says. Raises ``TypeError``/``ValueError`` naming the
    bad argument.
    """
    cfg = check_neuron_args(x_seq, v_init, tau=tau, w=w, decay_input=decay_input, v_threshold=v_threshold,
                            v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, save=save,
                            scale=scale, shift=shift, channel_dim=channel_dim)
    if not isinstance(need_v_final, bool):
        raise TypeError(f"multistep_neuron: need_v_final must be a bool, got {type(need_v_final).__name__}")
    w = w if cfg.kind == "plif" else None
    inputs = (x_seq, v_init, w, scale, shift)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        save = "input"  # no backward will run: do not write H at all
    spikes, v_final, _ = neuron_forward(x_seq, v_init, w, cfg.kind, cfg.tau, cfg.decay_input, cfg.v_threshold,
                                        cfg.hard_reset, cfg.v_reset, cfg.detach_reset, cfg.surrogate, cfg.alpha,
                                        save, scale, shift, 0 if cfg.channel_dim is None else cfg.channel_dim,
                                        need_v_final)
    return spikes, v_final if need_v_final else None
