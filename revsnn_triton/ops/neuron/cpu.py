"""The neuron op's CPU backend: the reference's arithmetic, chunk by chunk, with the kernel launchers' signatures.

:func:`neuron_forward` and :func:`neuron_backward` take and return what ``kernels/neurons.py``'s launchers do
(tensors in the neuron layout of ``x``, per-neuron partial sums), so the op calls either backend the same way.
They work through the neurons in chunks of about :data:`CPU_CHUNK` along the outermost dim of the neuron layout
and step by step through time, writing into the outputs: their work space (the recomputed H of ``"input"``, the
affine input ``y``, per-step temporaries) is bounded by the chunk, as a kernel's is by its block, instead of
growing with the tensor. The results do not depend on the chunk size: the arithmetic is elementwise over
neurons.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from revsnn_triton.ops.neuron import reference as ref
from revsnn_triton.ops.neuron.spec import SAVE_PLANS, NeuronConfig, empty_neuron_layout, neuron_perm

# Neurons per chunk (at least one slice of the outermost dim of the neuron layout).
CPU_CHUNK = 1 << 16


def _chunks(x: Tensor) -> list[Callable[..., Tensor]]:
    """Slicers ``chunk(t, with_time=True)`` cutting ``[T, *shape]`` (or, ``with_time=False``, ``[*shape]``) tensors
    into views of about :data:`CPU_CHUNK` neurons (at least one slice) along the outermost dim of ``x``'s neuron
    layout."""
    perm = neuron_perm(x)
    if not perm or x.numel() == 0:
        return [lambda t, with_time=True: t]
    d = perm[0]
    size = x.shape[1 + d]
    step = max(1, CPU_CHUNK // max(1, math.prod(x.shape[1:]) // size))

    def slicer(start: int, length: int) -> Callable[..., Tensor]:
        return lambda t, with_time=True: t.narrow(d + int(with_time), start, length)
    return [slicer(start, min(step, size - start)) for start in range(0, size, step)]


def _affine(x: Tensor, scale: Tensor | None, shift: Tensor | None, cfg: NeuronConfig):
    """``(scale, shift)`` as stride-0 views of x's per-step shape (chunks slice them like any ``[*shape]``
    tensor), or None."""
    if scale is None:
        return None
    return (ref.channel_view(scale, cfg.channel_dim, x.shape[1:]),
            ref.channel_view(shift, cfg.channel_dim, x.shape[1:]))


def _chunk_affine(chunk, affine):
    return None if affine is None else (chunk(affine[0], False), chunk(affine[1], False))


def _q0(q: Tensor | None) -> Tensor | None:
    return None if q is None else q.reshape(())


def neuron_forward(x: Tensor, v_init: Tensor | None, q: Tensor | None, cfg: NeuronConfig, save: str,
                   scale: Tensor | None = None, shift: Tensor | None = None, *, store_v_final: bool = True):
    """As ``kernels.neurons.neuron_forward``: ``(spikes, v_final or None, saved or None)``."""
    plan = SAVE_PLANS[save]
    spikes = empty_neuron_layout(x, x.dtype)
    saved = None if plan.saved_dtype is None else empty_neuron_layout(x, plan.saved_dtype)
    v_final = empty_neuron_layout(x, torch.float32, with_time=False) if store_v_final else None
    affine = _affine(x, scale, shift, cfg)
    for chunk in _chunks(x):
        xc = chunk(x)
        v0 = ref.initial_membrane(xc, cfg.v_reset) if v_init is None else chunk(v_init, False)
        _, vc, _ = ref.neuron_forward_reference(xc, v0, _q0(q), cfg, spikes_out=chunk(spikes),
                                                saved_out=None if saved is None else chunk(saved), save=save,
                                                affine=_chunk_affine(chunk, affine))
        if v_final is not None:
            chunk(v_final, False).copy_(vc)
    return spikes, v_final, saved


def neuron_backward(grad_spikes: Tensor, grad_v_final: Tensor | None, saved: Tensor | None, x: Tensor | None,
                    v_init: Tensor | None, q: Tensor | None, cfg: NeuronConfig, save: str,
                    scale: Tensor | None = None, shift: Tensor | None = None, *, need_grad_v_init: bool = True,
                    need_grad_affine: bool = True):
    """As ``kernels.neurons.neuron_backward``: ``(grad_x, grad_v_init, w_partial, scale_partial, shift_partial)``
    with None for what is not computed."""
    plan = SAVE_PLANS[save]
    template = x if plan.recomputes else saved
    affine_grad = cfg.affine and need_grad_affine
    grad_x = empty_neuron_layout(template, grad_spikes.dtype)
    per_neuron = lambda want: empty_neuron_layout(template, torch.float32, with_time=False) if want else None  # noqa: E731
    grad_v_init, w_partial = per_neuron(need_grad_v_init), per_neuron(cfg.kind == "plif")
    scale_partial, shift_partial = per_neuron(affine_grad), per_neuron(affine_grad)
    affine = _affine(template, scale, shift, cfg)
    for chunk in _chunks(template):
        xc = None if x is None else chunk(x)
        vc = None if v_init is None else chunk(v_init, False)
        if vc is None and plan.backward_reads_v_init(cfg):
            vc = ref.initial_membrane(chunk(template), cfg.v_reset)
        gvc = (torch.zeros(chunk(template).shape[1:], dtype=torch.float32, device=template.device)
               if grad_v_final is None else chunk(grad_v_final, False))
        affine_c = _chunk_affine(chunk, affine)
        if plan.recomputes:
            # H recomputed into a buffer of the chunk (the kernel keeps it in registers); the spikes are taken
            # from it step by step.
            h, spikes = torch.empty(chunk(template).shape, dtype=torch.float32, device=template.device), None
            ref.neuron_forward_reference(xc, vc, _q0(q), cfg, saved_out=h, affine=affine_c)
        else:
            h, spikes = ref.decode_saved(chunk(saved), save, cfg.v_threshold)
        results = ref.neuron_backward_reference(chunk(grad_spikes), gvc, h, spikes, xc, vc, _q0(q), cfg,
                                                grad_x_out=chunk(grad_x), affine=affine_c, affine_grad=affine_grad)
        for whole, part in zip((grad_v_init, w_partial, scale_partial, shift_partial), results[1:]):
            if whole is not None:
                chunk(whole, False).copy_(part)
    return grad_x, grad_v_init, w_partial, scale_partial, shift_partial
