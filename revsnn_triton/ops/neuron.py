"""Multi-step IF / LIF / PLIF neurons as ``torch.library`` custom ops, and their Python entry point.

Ops (namespace ``revsnn``), each with a fake (meta) implementation, so they trace under ``torch.compile``:

- ``revsnn::neuron_forward(x, v_init, w, kind, tau, decay_input, v_threshold, hard_reset, v_reset,
  detach_reset, surrogate, alpha, save, scale=None, shift=None, channel_dim=0) -> (spikes, v_final, saved)``,
  differentiable (w.r.t. x, v_init, w, scale, shift) through ``register_autograd`` whose backward calls
- ``revsnn::neuron_backward(grad_spikes, grad_v_final, saved, x, v_init, w, <same scalars>, need_grad_v_init,
  scale, shift, channel_dim, need_grad_affine) -> (grad_x, grad_v_init, grad_w, grad_scale, grad_shift)``.

``v_reset`` is encoded schema-friendly as ``hard_reset: bool`` + ``v_reset: float`` (0.0 for soft reset, which is
also what the soft-reset charge uses); ``w`` is None except for PLIF. Where they run (``runtime.use_triton``):
CUDA tensors -> the Triton kernels of ``revsnn_triton.kernels.neurons``; CPU tensors -> the plain-PyTorch
reference of :mod:`revsnn_triton.ops.neuron_reference`, or the Triton kernels under the interpreter inside
``runtime.cpu_kernels("triton")``. Both paths return tensors in the same layout (the neuron layout of ``x``:
time outermost, inner dims in ``x``'s stride order).

Memory kept for backward per neuron-step: ``save="h"`` 4 bytes (fp32 H), ``"h_bf16"`` 2 bytes (bf16
``H - v_threshold``; approximate gradients), ``"input"`` nothing beyond ``x`` itself (forward recomputed in
backward, in registers for T <= 32; gradients bit-identical to ``"h"``'s). PLIF with ``decay_input`` also keeps
``x`` (its grad of ``w`` needs it), and so does a per-channel affine input (``scale``/``shift``: the grad of
``scale`` sums ``dL/dy * x``; the transformed input ``y`` is never stored); PLIF and ``"input"`` keep a given
``v_init`` [*shape] (``v_init=None``, the constant initial state, is never materialized). Unused outputs cost nothing in backward: autograd passes None
for an unused ``v_final`` (its zero gradient is not read), and no grad of ``v_init`` is written unless it
requires one.

Default ``save="input"`` (:data:`DEFAULT_SAVE`): of the exact modes it keeps the least (``x``, at most the
4 bytes of ``"h"`` and nothing when ``x`` is alive anyway) and moves the fewest bytes (5 passes over the
sequence: fp32 20 bytes per neuron-step instead of 24, bf16 10 instead of 16). See
``revsnn_triton.kernels.neurons`` for the traffic table.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from revsnn_triton.kernels import neurons as K
from revsnn_triton.ops.neuron_reference import (NeuronConfig, channel_sum, channel_view, check_neuron_args,
                                                decode_saved, initial_membrane, neuron_backward_reference,
                                                neuron_forward_reference, plif_grad_w)
from revsnn_triton.runtime import use_triton

__all__ = ["multistep_neuron", "neuron_forward", "neuron_backward", "DEFAULT_SAVE"]

DEFAULT_SAVE = "input"


def _q(w: Optional[Tensor]) -> Optional[Tensor]:
    """PLIF's ``1/tau = sigmoid(w)``, computed in fp32 as spikingjelly does; 1 element."""
    return None if w is None else torch.sigmoid(w.float()).reshape(1)


def _cfg(kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha) -> NeuronConfig:
    return NeuronConfig(kind=kind, tau=tau, decay_input=decay_input, v_threshold=v_threshold,
                        hard_reset=hard_reset, v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate,
                        alpha=alpha)


def _saved_dtype(save: str) -> torch.dtype:
    return torch.bfloat16 if save == "h_bf16" else torch.float32


# Neurons per chunk of the CPU path: its work space (the recomputed H, per-step temporaries) is bounded by the
# chunk, as a kernel's is by its block, instead of growing with the tensor. Results do not depend on it.
CPU_CHUNK = 1 << 16


def _cpu_chunks(x: Tensor) -> list[Callable[..., Tensor]]:
    """Slicers ``chunk(t, with_time=True)`` cutting ``[T, *shape]`` (or, ``with_time=False``, ``[*shape]``) tensors
    into views of about :data:`CPU_CHUNK` neurons (at least one slice) along the outermost dim of ``x``'s neuron
    layout. Elementwise over neurons, the reference gives the same bits chunk by chunk."""
    perm = K.neuron_perm(x)
    if not perm or x.numel() == 0:
        return [lambda t, with_time=True: t]
    d = perm[0]
    size = x.shape[1 + d]
    step = max(1, CPU_CHUNK // max(1, math.prod(x.shape[1:]) // size))

    def slicer(start: int, length: int) -> Callable[..., Tensor]:
        return lambda t, with_time=True: t.narrow(d + int(with_time), start, length)
    return [slicer(start, min(step, size - start)) for start in range(0, size, step)]


def _cpu_affine(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], channel_dim: int):
    """``(scale, shift)`` as stride-0 views of x's per-step shape (chunks slice them like any ``[*shape]``
    tensor), or None."""
    if scale is None:
        return None
    return channel_view(scale, channel_dim, x.shape[1:]), channel_view(shift, channel_dim, x.shape[1:])


def _chunk_affine(chunk, affine):
    return None if affine is None else (chunk(affine[0], False), chunk(affine[1], False))


@torch.library.custom_op("revsnn::neuron_forward", mutates_args=())
def neuron_forward(x: Tensor, v_init: Optional[Tensor], w: Optional[Tensor], kind: str, tau: float, decay_input: bool,
                   v_threshold: float, hard_reset: bool, v_reset: float, detach_reset: bool, surrogate: str,
                   alpha: float, save: str, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                   channel_dim: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: ``(spikes [T, *shape] x.dtype, v_final [*shape] fp32, saved)``; ``saved`` is fp32 H
    (``save="h"``), bf16 ``H - v_threshold`` (``"h_bf16"``) or an empty fp32 tensor (``"input"``).
    ``v_init=None``: the default initial state ``v_reset`` (0.0 for soft reset), never materialized.
    ``scale``/``shift`` (fp32 ``[C]``, ``C = x.shape[1 + channel_dim]``, or None): the neuron's input is
    ``x * scale[c] + shift[c]``, computed step by step (no input-sized temporary)."""
    q = _q(w)
    if use_triton(x.device):
        return K.neuron_forward(x, v_init, q, kind=kind, tau=tau, decay_input=decay_input,
                                v_threshold=v_threshold, hard_reset=hard_reset, v_reset=v_reset, save=save,
                                scale=_vector(scale), shift=_vector(shift), channel_dim=channel_dim)
    cfg = _cfg(kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha)
    q0 = None if q is None else q.reshape(())
    out_s = K.empty_neuron_layout(x, x.dtype)
    out_h = None if save == "input" else K.empty_neuron_layout(x, _saved_dtype(save))
    out_v = K.empty_neuron_layout(x, torch.float32, with_time=False)
    affine = _cpu_affine(x, scale, shift, channel_dim)
    for chunk in _cpu_chunks(x):  # step by step into the outputs, chunk by chunk: no copies beyond the outputs
        xc = chunk(x)
        v0 = initial_membrane(xc, v_reset) if v_init is None else chunk(v_init, False)
        _, v_final, _ = neuron_forward_reference(xc, v0, q0, cfg, spikes_out=chunk(out_s),
                                                 saved_out=None if out_h is None else chunk(out_h), save=save,
                                                 affine=_chunk_affine(chunk, affine))
        chunk(out_v, False).copy_(v_final)
    return out_s, out_v, x.new_empty(0, dtype=torch.float32) if out_h is None else out_h


def _vector(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@neuron_forward.register_fake
def _(x, v_init, w, kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha,
      save, scale=None, shift=None, channel_dim=0):
    spikes = K.empty_neuron_layout(x, x.dtype)
    v_final = K.empty_neuron_layout(x, torch.float32, with_time=False)
    saved = x.new_empty(0, dtype=torch.float32) if save == "input" else K.empty_neuron_layout(x, _saved_dtype(save))
    return spikes, v_final, saved


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
    q = _q(w)
    template = x if save == "input" else saved
    scale, shift = _vector(scale), _vector(shift)
    affine_grad = scale is not None and need_grad_affine
    if use_triton(grad_spikes.device):
        grad_x, grad_v_init, w_partial, scale_partial, shift_partial = K.neuron_backward(
            grad_spikes, grad_v_final, saved, x, v_init, q, kind=kind, tau=tau, decay_input=decay_input,
            v_threshold=v_threshold, hard_reset=hard_reset, v_reset=v_reset, detach_reset=detach_reset,
            surrogate=surrogate, alpha=alpha, save=save, need_grad_v_init=need_grad_v_init, scale=scale,
            shift=shift, channel_dim=channel_dim, need_grad_affine=need_grad_affine)
    else:
        cfg = _cfg(kind, tau, decay_input, v_threshold, hard_reset, v_reset, detach_reset, surrogate, alpha)
        q0 = None if q is None else q.reshape(())
        grad_x = K.empty_neuron_layout(template, grad_spikes.dtype)
        per_neuron = lambda want: K.empty_neuron_layout(template, torch.float32, with_time=False) if want else None  # noqa: E731
        grad_v_init, w_partial = per_neuron(True), per_neuron(kind == "plif")
        scale_partial, shift_partial = per_neuron(affine_grad), per_neuron(affine_grad)
        affine = _cpu_affine(template, scale, shift, channel_dim)
        for chunk in _cpu_chunks(template):
            xc = None if x is None else chunk(x)
            vc = None if v_init is None else chunk(v_init, False)
            if vc is None and (kind == "plif" or save == "input"):
                vc = initial_membrane(chunk(template), v_reset)
            gvc = (torch.zeros(chunk(template).shape[1:], dtype=torch.float32, device=template.device)
                   if grad_v_final is None else chunk(grad_v_final, False))
            affine_c = _chunk_affine(chunk, affine)
            if save == "input":
                # H recomputed into a buffer of the chunk (the kernel keeps it in registers); the spikes are
                # taken from it step by step.
                h = torch.empty(chunk(template).shape, dtype=torch.float32, device=template.device)
                neuron_forward_reference(xc, vc, q0, cfg, saved_out=h, affine=affine_c)
                spikes = None
            elif save == "h":
                h, spikes = chunk(saved), None  # S = (H >= v_threshold), step by step
            else:
                h, spikes = decode_saved(chunk(saved), save, v_threshold)
            _, gv, wp, sp, bp = neuron_backward_reference(chunk(grad_spikes), gvc, h, spikes, xc, vc, q0, cfg,
                                                          grad_x_out=chunk(grad_x), affine=affine_c,
                                                          affine_grad=affine_grad)
            for whole, part in ((grad_v_init, gv), (w_partial, wp), (scale_partial, sp), (shift_partial, bp)):
                if part is not None:
                    chunk(whole, False).copy_(part)
    empty = grad_x.new_empty(0, dtype=torch.float32)
    if grad_v_init is None or not need_grad_v_init:
        grad_v_init = empty
    grad_w = empty.new_empty(0) if w is None else plif_grad_w(w_partial, q.reshape(()), w)
    if not affine_grad:
        return grad_x, grad_v_init, grad_w, empty.new_empty(0), empty.new_empty(0)
    return (grad_x, grad_v_init, grad_w, channel_sum(scale_partial, channel_dim),
            channel_sum(shift_partial, channel_dim))


@neuron_backward.register_fake
def _(grad_spikes, grad_v_final, saved, x, v_init, w, kind, tau, decay_input, v_threshold, hard_reset, v_reset,
      detach_reset, surrogate, alpha, save, need_grad_v_init=True, scale=None, shift=None, channel_dim=0,
      need_grad_affine=True):
    template = x if save == "input" else saved
    grad_x = K.empty_neuron_layout(template, grad_spikes.dtype)
    empty = grad_x.new_empty(0, dtype=torch.float32)
    grad_v_init = K.empty_neuron_layout(template, torch.float32, with_time=False) if need_grad_v_init else empty
    grad_w = empty.new_empty(0) if w is None else torch.empty_like(w, memory_format=torch.contiguous_format)
    if scale is None or not need_grad_affine:
        return grad_x, grad_v_init, grad_w, empty.new_empty(0), empty.new_empty(0)
    return grad_x, grad_v_init, grad_w, torch.empty_like(scale), torch.empty_like(shift)


_SCALARS = ("kind", "tau", "decay_input", "v_threshold", "hard_reset", "v_reset", "detach_reset", "surrogate",
            "alpha", "save")


def _setup_context(ctx, inputs, output) -> None:
    x, v_init, w, *rest = inputs
    params = dict(zip(_SCALARS, rest[:len(_SCALARS)]))
    scale, shift, channel_dim = rest[len(_SCALARS):]
    ctx.params = params
    ctx.channel_dim = channel_dim
    ctx.x_dtype = x.dtype
    recompute = params["save"] == "input"
    # x for: the recomputation, PLIF's dH/dq = Y - (V - v_reset), and the grad of scale (sum of dL/dY * x)
    needs_x = recompute or (params["kind"] == "plif" and params["decay_input"]) or scale is not None
    needs_v_init = recompute or params["kind"] == "plif"
    ctx.save_for_backward(output[2], x if needs_x else None, v_init if needs_v_init else None, w, scale, shift)
    ctx.mark_non_differentiable(output[2])
    # Unused outputs get None instead of zero tensors: a None grad of v_final is not read by the kernel.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_spikes, grad_v_final, _grad_saved):
    saved, x, v_init, w, scale, shift = ctx.saved_tensors
    p = ctx.params
    if grad_spikes is None:  # only v_final is used downstream
        template = x if p["save"] == "input" else saved
        grad_spikes = K.empty_neuron_layout(template, ctx.x_dtype).zero_()
    need_grad_v_init = bool(ctx.needs_input_grad[1])
    n_in = 3 + len(_SCALARS)
    need_grad_affine = scale is not None and bool(ctx.needs_input_grad[n_in] or ctx.needs_input_grad[n_in + 1])
    grad_x, grad_v_init, grad_w, grad_scale, grad_shift = neuron_backward(
        grad_spikes.to(ctx.x_dtype), grad_v_final, saved, x, v_init, w, p["kind"], p["tau"], p["decay_input"],
        p["v_threshold"], p["hard_reset"], p["v_reset"], p["detach_reset"], p["surrogate"], p["alpha"], p["save"],
        need_grad_v_init, scale, shift, ctx.channel_dim, need_grad_affine)
    return ((grad_x, grad_v_init if need_grad_v_init else None, grad_w if w is not None else None)
            + (None,) * len(_SCALARS)
            + ((grad_scale, grad_shift) if need_grad_affine else (None, None)) + (None,))


neuron_forward.register_autograd(_backward, setup_context=_setup_context)


def multistep_neuron(x_seq, v_init=None, *, tau=None, w=None, decay_input=True, v_threshold=1.0, v_reset=0.0,
                     detach_reset=False, surrogate="sigmoid", alpha=4.0, save=DEFAULT_SAVE, scale=None, shift=None,
                     channel_dim=None):
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

    Returns ``(spikes [T, *shape] in x_seq's dtype, v_final [*shape] float32)``, differentiable w.r.t.
    ``x_seq``, ``v_init``, ``w``, ``scale`` and ``shift``. When no gradient can flow (grad mode off, or none of
    them requires grad) nothing is saved whatever ``save`` says. Raises ``TypeError``/``ValueError`` naming the
    bad argument.
    """
    cfg = check_neuron_args(x_seq, v_init, tau=tau, w=w, decay_input=decay_input, v_threshold=v_threshold,
                            v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha, save=save,
                            scale=scale, shift=shift, channel_dim=channel_dim)
    w = w if cfg.kind == "plif" else None
    inputs = (x_seq, v_init, w, scale, shift)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)):
        save = "input"  # no backward will run: do not write H at all
    spikes, v_final, _ = neuron_forward(x_seq, v_init, w, cfg.kind, cfg.tau, cfg.decay_input, cfg.v_threshold,
                                        cfg.hard_reset, cfg.v_reset, cfg.detach_reset, cfg.surrogate, cfg.alpha,
                                        save, scale, shift, 0 if cfg.channel_dim is None else cfg.channel_dim)
    return spikes, v_final
