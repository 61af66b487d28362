"""The spike convolution in plain PyTorch: ``conv(pool(spikes))`` under ordinary autograd.

This is the definition the registered op (:mod:`revsnn_triton.ops.spike_conv.op`) reproduces bit for bit, in
its output and in every gradient, and the oracle of its tests. It also serves the models' convolutions whose
input is not a spike map (a plain conv after the same pooling).

The pooling is the zoo's 3x3 / stride 2 / padding 1 window: ``"avg"`` (``AvgPool2d(3, 2, 1)``, zero padding
counted, as ``count_include_pad=True``), ``"max"`` (``MaxPool2d(3, 2, 1)``) or None (no pooling). It maps a
spatial size ``d`` to ``(d - 1) // 2 + 1``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

POOLS = (None, "avg", "max")
POOL_KERNEL, POOL_STRIDE, POOL_PADDING = 3, 2, 1


def pool3x3(x: torch.Tensor, pool: Optional[str]) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, (H - 1) // 2 + 1, (W - 1) // 2 + 1]`` for ``pool="avg"`` or ``"max"``;
    ``pool=None`` returns ``x`` itself (any rank)."""
    if pool == "avg":
        return F.avg_pool2d(x, POOL_KERNEL, POOL_STRIDE, POOL_PADDING)
    if pool == "max":
        return F.max_pool2d(x, POOL_KERNEL, POOL_STRIDE, POOL_PADDING)
    if pool is not None:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    return x


def pooled_shape(shape: Sequence[int], pool: Optional[str]) -> tuple[int, ...]:
    """The shape of ``pool3x3(x, pool)`` for ``x`` of ``shape``."""
    if pool is None:
        return tuple(shape)
    return (*shape[:2], *((d - 1) // 2 + 1 for d in shape[2:]))


def spike_conv_reference(spikes: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         stride: Sequence[int], padding: Sequence[int], pool: Optional[str] = None) -> torch.Tensor:
    """``conv(pool3x3(spikes, pool), weight, bias)`` (groups 1, dilation 1, zero padding): Conv1d for
    ``spikes [N, C, L]``, Conv2d for ``[N, C, H, W]``. Autograd keeps the float input (and, with pooling, the
    pooled map; MaxPool also its int64 argmax indices)."""
    conv = F.conv2d if spikes.dim() == 4 else F.conv1d
    return conv(pool3x3(spikes, pool), weight, bias, list(stride), list(padding))
