"""BatchNorm for memory-saving recomputation: :class:`SeqBatchNorm`, a drop-in for ``torch.nn.BatchNorm1d/2d/3d``.

It normalizes ``x [N, C, *]`` (channels at dim 1) as ``x * scale[c] + shift[c]`` with ``scale = weight /
sqrt(var + eps)`` and ``shift = bias - mean * scale`` (the ops of :mod:`revsnn_triton.ops.batchnorm`): in training
mode from the batch statistics, in eval mode from the running statistics. Parameters, buffers, defaults and the
running-statistics update are those of ``torch.nn.BatchNorm2d``, so state dicts are interchangeable. What it adds:

- its training graph keeps only ``x`` (which the layer before keeps anyway, or which a recomputation rebuilds);
- inside a recorded forward and its recomputation (:mod:`revsnn_triton.replay`: the reversible engine and
  :func:`revsnn_triton.recompute`), the recomputation normalizes with the statistics the forward computed, so it is
  bit-identical by construction, and the running statistics are updated once;
- recomputation in micro-batches with the whole batch's statistics and statistics gradients;
- :func:`batchnorm_neuron`: the normalization fused into the spiking neuron that follows it, so the normalized
  tensor is never materialized (our neurons' ``scale``/``shift`` input); other neurons get it materialized.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from revsnn_triton import replay
from revsnn_triton.ops.batchnorm import batch_mean_var, channel_affine

__all__ = ["SeqBatchNorm", "batchnorm_neuron", "convert_batchnorm"]


class SeqBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over ``[N, C, *]`` (any number of trailing dims; channels at dim 1).

    Arguments and defaults as ``torch.nn.BatchNorm2d``: ``num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True``. Input float32/float16/bfloat16; output in the input's dtype and shape. Saved for
    backward in training mode: the input and four ``[C]`` vectors.
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"SeqBatchNorm: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"SeqBatchNorm: expected input [N, {self.num_features}, *], got shape {tuple(x.shape)}")

    def normalization(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` float32 ``[C]`` such that the layer's output is ``x * scale[c] + shift[c]``; in
        training mode differentiable w.r.t. ``x`` (through the batch statistics) and the parameters."""
        self._check_input_dim(x)
        if self.training or not self.track_running_stats:
            stats = replay.batch_statistics(self, x) if self.training else None
            if stats is None:
                mean, var = batch_mean_var(x)
                if self.training:
                    self.update_running_stats(mean, var, x)
            else:
                mean, var = stats
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.float()
            shift = self.bias.float() - mean * scale
        else:
            shift = -mean * scale
        return scale, shift

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.normalization(x)
        return channel_affine(x, scale, shift)

    @torch.no_grad()
    def update_running_stats(self, mean: Tensor, var: Tensor, x: Optional[Tensor] = None,
                             count: Optional[int] = None) -> None:
        """The running-statistics update of ``torch.nn.BatchNorm`` for batch statistics ``mean``, biased ``var``
        over ``count`` values per channel (or those of ``x``); a no-op without ``track_running_stats``."""
        if not (self.training and self.track_running_stats):
            return
        n = count if count is not None else x.numel() // x.shape[1]
        self.num_batches_tracked.add_(1)
        momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
        unbiased = var * (n / (n - 1)) if n > 1 else var
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def batchnorm_neuron(bn: SeqBatchNorm, neuron: nn.Module, x: Tensor, time_steps: int, repeated: bool = False) -> Tensor:
    """``neuron(bn(x))`` for ``x [T*B, C, *]`` (time and batch merged, as convolutions see them): the neuron gets
    ``[T, B, C, *]``. With ``repeated``, ``x`` is one time step ``[B, C, *]`` of an input repeated over T (a stem run
    once per image): the neuron gets it repeated by ``expand`` (the batch statistics of one copy are those of T
    copies). Our neurons take the normalization as their input transform (``scale``/``shift``), so the normalized
    tensor is never materialized and the graph keeps ``x`` only; any other neuron module gets it materialized.
    Returns the spikes ``[T, B, C, *]``."""
    def sequence(t: Tensor) -> Tensor:
        return t.unsqueeze(0).expand(time_steps, *t.shape) if repeated else t.unflatten(0, (time_steps, -1))

    if not isinstance(bn, SeqBatchNorm):  # a torch.nn BatchNorm: no fusion
        return neuron(sequence(bn(x)))
    scale, shift = bn.normalization(x)

    if callable(getattr(neuron, "forward_affine", None)) and getattr(neuron, "fuses_affine", True):
        return neuron.forward_affine(sequence(x), scale, shift, 1)
    return neuron(sequence(channel_affine(x, scale, shift)))


def convert_batchnorm(module: nn.Module, to: str = "seq") -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` (in place; also ``module`` itself) by a
    :class:`SeqBatchNorm` with the same parameters, buffers and settings (``to="seq"``), or every SeqBatchNorm by a
    ``torch.nn`` BatchNorm of any number of dims (``to="torch"``, e.g. to compare), and return the result. The parameters stay the same
    objects (an optimizer keeps them); the outputs are equal up to float rounding (SeqBatchNorm computes the
    normalization as ``x * scale + shift``)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert_batchnorm: module must be a torch.nn.Module, got {type(module).__name__}")
    if to not in ("seq", "torch"):
        raise ValueError(f"convert_batchnorm: to must be 'seq' or 'torch', got {to!r}")
    if to == "seq":
        match = isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and \
            not isinstance(module, SeqBatchNorm)
        cls = SeqBatchNorm
    else:
        match, cls = isinstance(module, SeqBatchNorm), _TorchBatchNorm
    if match:
        new = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                  device=_device_of(module), dtype=_dtype_of(module))
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight, new.bias = module.weight, module.bias  # the same Parameter objects (optimizers keep them)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, to))
    return module


class _TorchBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn``'s BatchNorm (``F.batch_norm``) on ``[N, C, *]`` of any number of dims."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"BatchNorm: expected input [N, C, *], got shape {tuple(x.shape)}")


def _device_of(m: nn.Module) -> Optional[torch.device]:
    t = next(iter(m.buffers()), None) if m.weight is None else m.weight
    return None if t is None else t.device


def _dtype_of(m: nn.Module) -> Optional[torch.dtype]:
    return None if m.weight is None else m.weight.dtype
