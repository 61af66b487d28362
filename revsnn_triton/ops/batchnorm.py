"""BatchNorm as two small ops, so that a recomputation can normalize with the forward's own statistics.

BatchNorm in training mode is ``y = (x - mean) * rsqrt(var + eps) * weight + bias`` with per-channel batch
statistics ``mean``, ``var`` (biased) of ``x``. Here it is split into

- ``revsnn::batch_mean_var(x) -> (mean, var)``: the statistics, float32 ``[C]``; backward
  ``dx = dmean / n + dvar * 2 (x - mean) / n`` (an elementwise per-channel affine function of ``x``);
- ``revsnn::channel_affine(x, scale, shift) -> y = x * scale[c] + shift[c]``, computed in float32 (a multiply,
  then an add: two roundings) and returned in ``x``'s dtype; backward ``dx = dy * scale[c]``,
  ``dscale[c] = sum(dy * x)``, ``dshift[c] = sum(dy)``,

with ``scale = weight * rsqrt(var + eps)`` and ``shift = bias - mean * scale`` in between (``[C]``-sized ops that
autograd differentiates). Mathematically this is BatchNorm and its exact gradient. The split buys three things:

- what a training graph keeps is ``x`` alone (both ops read the same tensor), plus a few ``[C]`` vectors;
- ``revsnn::batch_mean_var_replay(x, mean, var)`` returns statistics the forward already computed, with the
  same backward, so a recomputation is bit-identical to the forward by construction and skips the reduction;
- ``revsnn::batch_mean_var_given(x, mean, var, dmean, dvar)`` returns saved statistics and, in backward, uses the
  *given* gradients of the statistics instead of the incoming ones: a recomputation run in micro-batches applies
  the whole batch's statistics gradient to each micro-batch (see :mod:`revsnn_triton.replay`).

The affine can also be fused into the next spiking neuron (the neuron op's ``scale``/``shift`` inputs), so that
the normalized tensor is never materialized.

Layout: ``x`` is ``[N, C, *]`` (channels at dim 1), float32/float16/bfloat16, any strides. Work is done in chunks of
about :data:`CHUNK` elements along dim 0, so no temporary grows with the tensor, and every reduction reads a
contiguous chunk: results do not depend on ``x``'s or ``dy``'s strides (a reversible engine hands gradients over as
strided views of the stream). Sums are taken per chunk in float32 and accumulated over chunks in float64.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_mean_var", "batch_mean_var_replay", "batch_mean_var_given", "channel_affine",
           "reduce_dims", "CHUNK"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements per chunk of the dim-0 loops (4 MiB of float32).
CHUNK = 1 << 20


def reduce_dims(x: Tensor) -> list[int]:
    """Every dim of ``[N, C, *]`` except the channel dim 1."""
    return [0, *range(2, x.dim())]


def _rows(x: Tensor) -> list[slice]:
    """Slices of dim 0 holding about :data:`CHUNK` elements each (at least one row)."""
    n = x.shape[0]
    per_row = max(1, x.numel() // max(n, 1))
    step = max(1, CHUNK // per_row)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _channel(v: Tensor, x: Tensor) -> Tensor:
    """``[C]`` -> broadcastable against ``[N, C, *]``."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def _count(x: Tensor) -> int:
    return x.numel() // x.shape[1] if x.dim() > 1 and x.shape[1] else 0


# ------------------------------------------------------------------------------------------------ statistics

def _mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = reduce_dims(x)
    total = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for rows in _rows(x):
        total += x[rows].float().contiguous().sum(dims, dtype=torch.float32)
    n = _count(x)
    mean = (total / max(n, 1)).float()
    sq = torch.zeros_like(total)
    m = _channel(mean, x)
    for rows in _rows(x):
        d = x[rows].float() - m
        sq += d.mul_(d).sum(dims)
    return mean, (sq / max(n, 1)).float()


@torch.library.custom_op("revsnn::batch_mean_var", mutates_args=())
def _batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    return _mean_var(x)


@_batch_mean_var.register_fake
def _(x):
    c = x.shape[1]
    return x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)


@torch.library.custom_op("revsnn::batch_mean_var_backward", mutates_args=())
def _mean_var_backward(x: Tensor, mean: Tensor, grad_mean: Tensor, grad_var: Tensor, count: int) -> Tensor:
    """``dx = grad_mean / n + grad_var * 2 (x - mean) / n`` = ``x * beta + alpha`` per channel, for statistics over
    ``n = count`` values per channel (``x``'s own count, or that of the larger batch ``x`` is part of)."""
    n = max(count, 1)
    beta = grad_var * (2.0 / n)
    alpha = grad_mean / n - beta * mean
    return _affine(x, beta, alpha)


@_mean_var_backward.register_fake
def _(x, mean, grad_mean, grad_var, count):
    return torch.empty_like(x)


def _stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.float()
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var.float()
    return (_mean_var_backward(x, mean, grad_mean, grad_var, _count(x)),) + (None,) * (ctx.n_inputs - 1)


def _save_x_and_mean(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])
    ctx.n_inputs = len(inputs)
    ctx.set_materialize_grads(False)


_batch_mean_var.register_autograd(_stats_backward, setup_context=_save_x_and_mean)


@torch.library.custom_op("revsnn::batch_mean_var_replay", mutates_args=())
def _batch_mean_var_replay(x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    return mean.clone(), var.clone()


@_batch_mean_var_replay.register_fake
def _(x, mean, var):
    return torch.empty_like(mean), torch.empty_like(var)


_batch_mean_var_replay.register_autograd(_stats_backward, setup_context=_save_x_and_mean)


@torch.library.custom_op("revsnn::batch_mean_var_given", mutates_args=())
def _batch_mean_var_given(x: Tensor, mean: Tensor, var: Tensor, grad_mean: Tensor, grad_var: Tensor,
                          count: int) -> tuple[Tensor, Tensor]:
    return mean.clone(), var.clone()


@_batch_mean_var_given.register_fake
def _(x, mean, var, grad_mean, grad_var, count):
    return torch.empty_like(mean), torch.empty_like(var)


def _given_setup(ctx, inputs, output):
    x, _, _, grad_mean, grad_var, count = inputs
    ctx.save_for_backward(x, output[0], grad_mean, grad_var)
    ctx.count = count


def _given_backward(ctx, _grad_mean, _grad_var):
    x, mean, grad_mean, grad_var = ctx.saved_tensors
    return _mean_var_backward(x, mean, grad_mean, grad_var, ctx.count), None, None, None, None, None


_batch_mean_var_given.register_autograd(_given_backward, setup_context=_given_setup)


# -------------------------------------------------------------------------------------------------- affine

def _affine(x: Tensor, scale: Tensor, shift: Tensor | None) -> Tensor:
    """``x * scale[c] (+ shift[c])`` in float32 (a multiply, then an add), returned in x's dtype, dense."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = _channel(scale.float(), x)
    b = None if shift is None else _channel(shift.float(), x)
    for rows in _rows(x):
        if x.dtype == torch.float32:
            y = torch.mul(x[rows], s, out=out[rows])
        else:
            y = x[rows].float().mul_(s)
        if b is not None:
            y.add_(b)
        if x.dtype != torch.float32:
            out[rows] = y
    return out


@torch.library.custom_op("revsnn::channel_affine", mutates_args=())
def _channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    return _affine(x, scale, shift)


@_channel_affine.register_fake
def _(x, scale, shift):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("revsnn::channel_affine_backward", mutates_args=())
def _channel_affine_backward(grad_y: Tensor, x: Tensor, scale: Tensor, need_x: bool,
                             need_params: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dscale, dshift)``; ``dx`` is empty unless ``need_x``, ``dscale``/``dshift`` unless ``need_params``."""
    c = x.shape[1]
    grad_x = _affine(grad_y, scale, None).to(x.dtype) if need_x else x.new_empty(0)
    if not need_params:
        empty = x.new_empty(0, dtype=torch.float32)
        return grad_x, empty, empty.clone()
    dims = reduce_dims(x)
    g_scale = torch.zeros(c, dtype=torch.float64, device=x.device)
    g_shift = torch.zeros_like(g_scale)
    for rows in _rows(x):
        gy = grad_y[rows].float()
        g_shift += gy.contiguous().sum(dims)
        g_scale += (gy * x[rows].float()).contiguous().sum(dims)
    return grad_x, g_scale.float(), g_shift.float()


@_channel_affine_backward.register_fake
def _(grad_y, x, scale, need_x, need_params):
    c = x.shape[1]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    if need_params:
        return grad_x, x.new_empty(c, dtype=torch.float32), x.new_empty(c, dtype=torch.float32)
    return grad_x, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)


def _affine_setup(ctx, inputs, output):
    x, scale, _ = inputs
    ctx.save_for_backward(x, scale)
    ctx.set_materialize_grads(False)


def _affine_backward(ctx, grad_y):
    if grad_y is None:
        return None, None, None
    x, scale = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_params = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    gx, gs, gb = _channel_affine_backward(grad_y, x, scale, need_x, need_params)
    return (gx if need_x else None, gs if need_params else None, gb if need_params else None)


_channel_affine.register_autograd(_affine_backward, setup_context=_affine_setup)


# --------------------------------------------------------------------------------------- validated Python API

def _check_x(x: object, where: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{where}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{where}: x must be [N, C, *] with at least 2 dims, got shape {tuple(x.shape)}")
    return x


def _check_channel_vector(name: str, v: object, x: Tensor, where: str) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(v).__name__}")
    if v.dtype != torch.float32:
        raise TypeError(f"{where}: {name} must be float32, got {v.dtype}")
    if v.shape != (x.shape[1],):
        raise ValueError(f"{where}: {name} must have shape ({x.shape[1]},) (one value per channel of x), "
                         f"got {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{where}: {name} is on {v.device} but x is on {x.device}")
    return v


def batch_mean_var(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel batch mean and biased variance of ``x [N, C, *]`` as float32 ``[C]``, differentiable."""
    _check_x(x, "batch_mean_var")
    return _batch_mean_var(x)


def batch_mean_var_replay(x: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` as computed from ``x`` by an earlier :func:`batch_mean_var`, with its gradient w.r.t. ``x``."""
    _check_x(x, "batch_mean_var_replay")
    _check_channel_vector("mean", mean, x, "batch_mean_var_replay")
    _check_channel_vector("var", var, x, "batch_mean_var_replay")
    return _batch_mean_var_replay(x, mean, var)


def batch_mean_var_given(x: Tensor, mean: Tensor, var: Tensor, grad_mean: Tensor, grad_var: Tensor,
                         count: int) -> tuple[Tensor, Tensor]:
    """``(mean, var)`` of a larger batch of ``count`` values per channel that ``x`` is part of; backward ignores the
    incoming gradients of the statistics and applies ``grad_mean``, ``grad_var`` (those of the whole batch) to
    ``x``."""
    where = "batch_mean_var_given"
    _check_x(x, where)
    for name, v in (("mean", mean), ("var", var), ("grad_mean", grad_mean), ("grad_var", grad_var)):
        _check_channel_vector(name, v, x, where)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}: count must be a positive int, got {count!r}")
    return _batch_mean_var_given(x, mean, var, grad_mean, grad_var, count)


def channel_affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale[c] + shift[c]`` for ``x [N, C, *]``, computed in float32, returned in ``x``'s dtype;
    differentiable w.r.t. all three. Keeps ``x`` (and ``scale``) for backward."""
    _check_x(x, "channel_affine")
    _check_channel_vector("scale", scale, x, "channel_affine")
    _check_channel_vector("shift", shift, x, "channel_affine")
    return _channel_affine(x, scale, shift)
