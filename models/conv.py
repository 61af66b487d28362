"""Convolution blocks on spike sequences: conv + BatchNorm, the downsample transition, the residual branch.

Convolutions and BatchNorm see time and batch merged (``[T*B, ...]``), so BatchNorm statistics are taken over
T, B and space, as in MS-ResNet and Spikingformer. A convolution whose input is a neuron's 0/1 output runs
through :func:`revsnn_triton.ops.spike_conv.spike_conv`, which keeps the input spikes as ``torch.bool`` for
backward (1 byte per element instead of 4 in fp32) and rebuilds them there; a 3x3 / stride-2 pooling in front
(average: the downsample layers; max: the transformer tokenizer) is fused the same way, so neither the pooled
map nor MaxPool's int64 argmax indices are kept. BatchNorm keeps its fp32 input as usual.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from revsnn_triton.ops.spike_conv import POOLS, pool3x3, spike_conv

from .neurons import NeuronFactory


class SeqConvBN(nn.Module):
    """Convolution (after an optional ``pool``: ``"avg"`` / ``"max"``, 3x3 stride 2 padding 1) and BatchNorm
    over a ``[T, B, C, ...]`` sequence.

    ``dims=2``: Conv2d/BatchNorm2d on ``[T, B, C, H, W]``; ``dims=1``: Conv1d/BatchNorm1d (kernel 1) on tokens
    ``[T, B, C, N]``. ``spike_input=True`` declares that the input is a neuron's 0/1 output and runs the conv
    through :func:`spike_conv` (1-byte saved input) when ``compact`` is on; otherwise a plain conv (which keeps
    its input as is). Returns ``[T, B, C_out, ...]`` in the conv's output dtype.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, bias: bool = False,
                 dims: int = 2, pool: Optional[str] = None, spike_input: bool = True, compact: bool = True):
        super().__init__()
        if dims not in (1, 2):
            raise ValueError(f"SeqConvBN: dims must be 1 or 2, got {dims}")
        if pool not in POOLS or (pool is not None and dims != 2):
            raise ValueError(f"SeqConvBN: pool must be None, or 'avg'/'max' with dims=2, got {pool!r}")
        conv_cls, bn_cls = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv = conv_cls(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
        self.bn = bn_cls(out_ch)
        self.pool = pool
        self.use_spike_conv = spike_input and compact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.flatten(0, 1)
        if self.use_spike_conv:
            y = spike_conv(y, self.conv, pool=self.pool)
        else:
            y = self.conv(pool3x3(y, self.pool))
        y = self.bn(y)
        return y.unflatten(0, x.shape[:2])


class Downsample(nn.Module):
    """Non-reversible transition between stages: neuron -> [AvgPool(3, s2, p1)] -> 1x1 conv -> BN.

    ``pool=True`` (RevSResNet): pool then a stride-1 1x1 conv; ``pool=False`` (MS-ResNet shortcut): a stride-2
    1x1 conv. ``[T, B, C_in, H, W] -> [T, B, C_out, H/2, W/2]``.
    """

    def __init__(self, in_ch: int, out_ch: int, neuron: NeuronFactory, pool: bool, compact: bool = True):
        super().__init__()
        self.sn = neuron()
        self.conv_bn = SeqConvBN(in_ch, out_ch, kernel_size=1, stride=1 if pool else 2,
                                 pool="avg" if pool else None, compact=compact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_bn(self.sn(x))


class SpikingResidualBranch(nn.Module):
    """neuron -> 3x3 conv (stride) -> BN -> neuron -> 3x3 conv -> BN on ``[T, B, C_in, H, W]``.

    The residual function of MS-ResNet's basic block and the F/G of RevSResNet's reversible block.
    """

    def __init__(self, in_ch: int, out_ch: int, neuron: NeuronFactory, stride: int = 1, compact: bool = True):
        super().__init__()
        self.sn1 = neuron()
        self.conv_bn1 = SeqConvBN(in_ch, out_ch, 3, stride=stride, compact=compact)
        self.sn2 = neuron()
        self.conv_bn2 = SeqConvBN(out_ch, out_ch, 3, compact=compact)

    def zero_init_last(self) -> None:
        """Zero the last BatchNorm's weight: the branch then outputs its BN bias (0 at initialisation)."""
        nn.init.zeros_(self.conv_bn2.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_bn2(self.sn2(self.conv_bn1(self.sn1(x))))
