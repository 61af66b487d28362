"""Plain-PyTorch multi-step IF / LIF / PLIF neurons: the one statement of the formulas, the test oracle and the
arithmetic of the CPU backend.

Semantics are spikingjelly 2.0's (``step_mode='m'``), computed in fp32 whatever the input dtype, with the same
operations in the same order, so spikes and membranes are bit-equal to spikingjelly's in fp32. For each t
(``V[-1] = v_init``; ``vr = v_reset``, or 0 in the charge for soft reset):

- input: ``X`` itself, or with a per-channel affine transform ``Y = X * scale[c] + shift[c]`` (fp32: a multiply,
  then an add) for the channel ``c`` of each neuron; the charge below then reads ``Y`` for ``X``
- charge: IF ``H = V + X``; LIF ``H = V + (X - (V - vr)) / tau`` (``decay_input=False``:
  ``H = V - (V - vr) / tau + X``); PLIF the same with ``* q`` for ``/ tau``, ``q = sigmoid(w)`` in fp32
- fire: ``S = (H >= v_threshold)``, returned in the input dtype
- reset: hard ``V = S * vr + (1 - S) * H``, soft ``V = H - S * v_threshold``

Backward through time, from ``t = T-1`` down to 0, carrying ``dL/dV[t]`` (the surrogate ``sg = g'(H - v_th)``):
``dV/dH`` is ``1 - S`` (+ ``(vr - H) sg`` unless ``detach_reset``) for hard reset, ``1`` or ``1 - v_th sg`` for
soft; ``dL/dH = dL/dS sg + dL/dV dV/dH``; ``dL/dY`` is ``dL/dH`` scaled by the charge's input coefficient
(``1/tau``, ``q`` or 1) and ``dL/dV[t-1] = dL/dH - dL/dH / tau`` (``* q``; IF: ``dL/dH``).

Entry points:

- :func:`multistep_autograd`: a Python loop whose gradients come from autograd (the independent oracle).
- :func:`neuron_forward_reference` / :func:`neuron_backward_reference`: the explicit forward and hand-written
  backward that the CPU backend runs chunk by chunk; the Triton kernels implement the same formulas.
"""
from __future__ import annotations

from typing import Sequence

import torch

from revsnn_triton.ops.neuron.spec import NeuronConfig, check_neuron_args
from revsnn_triton.surrogate import SURROGATES, surrogate_derivative


def channel_view(t: torch.Tensor, channel_dim: int, shape: Sequence[int]) -> torch.Tensor:
    """A ``[C]`` vector as a view broadcast over the per-step ``shape`` along ``channel_dim`` (stride 0
    elsewhere, no copy)."""
    view = [1] * len(shape)
    view[channel_dim] = t.shape[0]
    return t.view(view).expand(tuple(shape))


def channel_sum(partial: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``[C]`` sums of per-neuron partials ``[*shape]`` over every dim but ``channel_dim``: one ``torch.sum``
    (a fixed order for a given tensor), so the result does not depend on how the partials were computed. Summed in
    float64 (BatchNorm's gradient sums cancel heavily) and returned in the partials' dtype."""
    others = [d for d in range(partial.dim()) if d != channel_dim]
    if not others:
        return partial.clone(memory_format=torch.contiguous_format)
    # float32 over the inner dims, float64 over the outermost one: no float64 copy of the partials
    inner = [d for d in others if d != others[0]]
    rows = partial.sum(dim=inner, keepdim=True) if inner else partial
    return rows.sum(dim=others, dtype=torch.float64).to(partial.dtype).reshape(partial.shape[channel_dim])


def initial_membrane(x_seq: torch.Tensor, v_reset: float | None) -> torch.Tensor:
    """The default ``v_init``: ``v_reset`` everywhere (0 for soft reset), fp32, shape ``x_seq.shape[1:]``."""
    return torch.full(x_seq.shape[1:], 0.0 if v_reset is None else float(v_reset), dtype=torch.float32,
                      device=x_seq.device)


def _charge(x: torch.Tensor, v: torch.Tensor, cfg: NeuronConfig, q: torch.Tensor | None) -> torch.Tensor:
    if cfg.kind == "if":
        return v + x
    if cfg.kind == "lif":
        if cfg.decay_input:
            return v + (x - (v - cfg.v_reset)) / cfg.tau
        return v - (v - cfg.v_reset) / cfg.tau + x
    if cfg.decay_input:
        return v + (x - (v - cfg.v_reset)) * q
    return v - (v - cfg.v_reset) * q + x


def _reset(h: torch.Tensor, spike: torch.Tensor, cfg: NeuronConfig) -> torch.Tensor:
    if cfg.hard_reset:
        return spike * cfg.v_reset + (1.0 - spike) * h
    return h - spike * cfg.v_threshold


def multistep_autograd(x_seq, v_init=None, *, tau=None, w=None, decay_input=True, v_threshold=1.0,
                       v_reset=0.0, detach_reset=False, surrogate="sigmoid", alpha=4.0, scale=None, shift=None,
                       channel_dim=None):
    """Multi-step neuron as a plain Python loop over T; gradients by autograd (no hand-written backward).

    Arguments as :func:`revsnn_triton.ops.neuron.multistep_neuron` (without ``save``). Returns ``(spikes [T, *shape] in x's
    dtype, v_final [*shape] float32)``. Autograd keeps every step's intermediates (about 5 fp32 tensors per
    neuron-step): this is the oracle and the ``backend="torch"`` path, not the memory-efficient one.
    """
    cfg = check_neuron_args(x_seq, v_init, tau=tau, w=w, decay_input=decay_input, v_threshold=v_threshold,
                            v_reset=v_reset, detach_reset=detach_reset, surrogate=surrogate, alpha=alpha,
                            scale=scale, shift=shift, channel_dim=channel_dim, where="multistep_autograd")
    sg = SURROGATES[cfg.surrogate](cfg.alpha)
    v = initial_membrane(x_seq, v_reset) if v_init is None else v_init
    q = torch.sigmoid(w.float()).reshape(()) if cfg.kind == "plif" else None
    spikes = []
    for x in x_seq.float():
        if cfg.channel_dim is not None:
            x = x * channel_view(scale, cfg.channel_dim, x.shape) + channel_view(shift, cfg.channel_dim, x.shape)
        h = _charge(x, v, cfg, q)
        spike = sg(h - cfg.v_threshold)
        v = _reset(h, spike.detach() if cfg.detach_reset else spike, cfg)
        spikes.append(spike.to(x_seq.dtype))
    return torch.stack(spikes), v


# ----------------------------------------------------------------------------------------------------------
# Explicit forward / backward (what the ops run on CPU tensors).


def encode_saved(h_seq: torch.Tensor, save: str, v_threshold: float) -> torch.Tensor:
    """What the forward keeps for backward: ``"h"``: fp32 H; ``"h_bf16"``: ``(H - v_threshold)`` rounded to
    bf16 (its sign bit is the spike, so rounding never flips a spike); ``"input"``: an empty tensor."""
    if save == "h":
        return h_seq
    if save == "h_bf16":
        return (h_seq - v_threshold).to(torch.bfloat16)
    return h_seq.new_empty(0)


def decode_saved(saved: torch.Tensor, save: str, v_threshold: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(H fp32, S as fp32 0/1)`` from :func:`encode_saved`'s output (``save`` in ``"h"``, ``"h_bf16"``);
    ``S`` is None where it is ``H >= v_threshold`` (``"h"``: taken step by step by the backward)."""
    if save == "h":
        return saved, None
    sign = saved.view(torch.int16) < 0  # sign bit of bf16 (H - v_threshold); -0.0 counts as below threshold
    return saved.float() + v_threshold, (~sign).float()


def neuron_input(x: torch.Tensor, affine: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """One step's neuron input in fp32: ``x``, or ``x * scale + shift`` for ``affine = (scale, shift)`` of
    ``x``'s shape (e.g. views from :func:`channel_view`)."""
    x = x.float()
    return x if affine is None else x * affine[0] + affine[1]


def neuron_forward_reference(x_seq: torch.Tensor, v_init: torch.Tensor, q: torch.Tensor | None,
                             cfg: NeuronConfig, *, spikes_out: torch.Tensor | None = None,
                             saved_out: torch.Tensor | None = None, save: str = "h",
                             affine: tuple[torch.Tensor, torch.Tensor] | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward. ``x_seq [T, *shape]`` (fp32/fp16/bf16, any strides), ``v_init [*shape]`` fp32, ``q`` the 0-dim
    fp32 ``sigmoid(w)`` for PLIF else None; ``affine``: None or fp32 ``(scale, shift)`` of the per-step shape
    (see :func:`neuron_input`), computed step by step. Returns ``(spikes [T, *shape] x's dtype, v_final fp32,
    H fp32)``.

    With ``spikes_out`` or ``saved_out`` (``[T, *shape]`` tensors) the steps are written into them instead of
    being stacked: ``spikes_out`` (x's dtype) receives the spikes, ``saved_out`` ``encode_saved(H, save)``;
    what is not given is not kept (returned as None). The op's CPU path uses this to allocate no more than
    its outputs."""
    stacked = spikes_out is None and saved_out is None
    spikes, charged = [], []
    v = v_init
    for t in range(x_seq.shape[0]):
        h = _charge(neuron_input(x_seq[t], affine), v, cfg, q)
        spike = (h >= cfg.v_threshold).to(torch.float32)
        v = _reset(h, spike, cfg)
        if stacked:
            spikes.append(spike.to(x_seq.dtype))
            charged.append(h)
        else:
            if spikes_out is not None:
                spikes_out[t].copy_(spike)
            if saved_out is not None:
                saved_out[t].copy_(encode_saved(h, save, cfg.v_threshold))
    if stacked:
        return torch.stack(spikes), v, torch.stack(charged)
    return spikes_out, v, saved_out


def neuron_backward_reference(grad_spikes: torch.Tensor, grad_v_final: torch.Tensor, h_seq: torch.Tensor,
                              spike_seq: torch.Tensor | None, x_seq: torch.Tensor | None, v_init: torch.Tensor | None,
                              q: torch.Tensor | None, cfg: NeuronConfig, grad_x_out: torch.Tensor | None = None,
                              affine: tuple[torch.Tensor, torch.Tensor] | None = None, affine_grad: bool = True):
    """Hand-written backward through time.

    ``grad_spikes [T, *shape]``, ``grad_v_final [*shape]``, ``h_seq`` fp32 ``[T, *shape]``, ``spike_seq`` fp32
    ``[T, *shape]`` or None (then ``S[t] = (H[t] >= v_threshold)``, taken step by step, as the forward fired);
    ``x_seq`` is read for PLIF with ``decay_input`` and for the affine partials, ``v_init`` for PLIF (the grad
    of ``w`` needs ``V[t-1]`` and the neuron's input ``Y[t]``); ``affine`` as in
    :func:`neuron_forward_reference`. Returns ``(grad_x, grad_v_init fp32, w_partial, scale_partial,
    shift_partial)``: ``grad_x = dL/dY * scale`` (or ``dL/dY``) is fp32, or ``grad_x_out`` (any dtype,
    ``[T, *shape]``) into which each step was written; the partials are ``[*shape]`` fp32 sums over time
    (t = T-1 down to 0), per neuron: ``w_partial = sum_t dL/dH[t] * dH[t]/dq`` (PLIF, else None; the grad of
    ``w`` is :func:`plif_grad_w`), ``scale_partial = sum_t dL/dY[t] * X[t]`` and ``shift_partial =
    sum_t dL/dY[t]`` (with ``affine`` and ``affine_grad``, else None; the grads are :func:`channel_sum`).
    """
    T = h_seq.shape[0]

    def spike_at(t: int) -> torch.Tensor:
        return (h_seq[t] >= cfg.v_threshold).float() if spike_seq is None else spike_seq[t]

    grad_x = torch.empty_like(h_seq) if grad_x_out is None else grad_x_out
    carry = grad_v_final.float()
    w_partial = torch.zeros_like(carry) if cfg.kind == "plif" else None
    affine_grad = affine is not None and affine_grad
    scale_partial = torch.zeros_like(carry) if affine_grad else None
    shift_partial = torch.zeros_like(carry) if affine_grad else None
    for t in range(T - 1, -1, -1):
        h, spike = h_seq[t], spike_at(t)
        sg = surrogate_derivative(cfg.surrogate, h - cfg.v_threshold, cfg.alpha)
        if cfg.hard_reset:
            dv_dh = 1.0 - spike
            if not cfg.detach_reset:
                dv_dh = dv_dh + (cfg.v_reset - h) * sg
        else:
            dv_dh = torch.ones_like(h) if cfg.detach_reset else 1.0 - cfg.v_threshold * sg
        # a zero carry (no gradient reaches the membrane, e.g. from an unused v_final) contributes nothing, also where
        # dv_dh is not finite (an input of -inf makes (v_reset - H) * sg = inf * 0): autograd would not form it
        grad_h = grad_spikes[t].float() * sg + torch.where(carry == 0, 0.0, carry * dv_dh)
        if cfg.kind == "if":
            grad_y = grad_h
            carry = grad_h
        elif cfg.kind == "lif":
            grad_y = grad_h / cfg.tau if cfg.decay_input else grad_h
            carry = grad_h - grad_h / cfg.tau
        else:
            grad_y = grad_h * q if cfg.decay_input else grad_h
            carry = grad_h - grad_h * q
            if t > 0:
                v_prev = _reset(h_seq[t - 1], spike_at(t - 1), cfg)
            else:
                v_prev = v_init
            if cfg.decay_input:
                dh_dq = neuron_input(x_seq[t], affine) - (v_prev - cfg.v_reset)
            else:
                dh_dq = -(v_prev - cfg.v_reset)
            w_partial = w_partial + grad_h * dh_dq
        grad_x[t] = grad_y if affine is None else grad_y * affine[0]
        if affine_grad:
            scale_partial = scale_partial + grad_y * x_seq[t].float()
            shift_partial = shift_partial + grad_y
    return grad_x, carry, w_partial, scale_partial, shift_partial


def plif_grad_w(w_partial: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The grad of PLIF's ``w`` from the per-neuron partials: one ``torch.sum`` (a fixed order), times
    ``dq/dw = q (1 - q)``; shape and dtype of ``w``."""
    return (w_partial.sum() * q * (1 - q)).to(w.dtype).reshape(w.shape)
