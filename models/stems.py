"""The two ends of every zoo model: the stem on the analog input and the spiking classification head.

Stems compute the image path once per image and repeat it over T with ``expand`` (a stride-0 view), never a
copy; BatchNorm on the repeated map has the same batch statistics as on the T copies.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from revsnn_triton.ops.spike_conv import POOLS, pool3x3

from .conv import SeqConvBN
from .neurons import NeuronFactory


def first_conv_bn(conv_bn: SeqConvBN, x: torch.Tensor) -> torch.Tensor:
    """Apply a stem ``SeqConvBN`` to ``[T, B, C, H, W]``; when ``x`` is repeated over T by ``expand`` (time stride
    0), run it on one copy and ``expand`` the result, so neither the input nor the output is copied T times.

    BatchNorm's batch statistics over one copy equal those over T identical copies; only the running variance's
    unbiased correction n/(n-1) sees n = B*H*W instead of T*B*H*W.
    """
    if x.stride(0) == 0 and x.shape[0] > 1:
        return conv_bn(x[:1]).expand(x.shape[0], -1, -1, -1, -1)
    return conv_bn(x)


class Stem(nn.Module):
    """conv3x3 (stride) -> BN [-> AvgPool/MaxPool(3, 2, 1)] on analog input ``[T, B, C, H, W]``, no neuron.

    With an input repeated over T by ``expand`` the conv and BN run once per image (:func:`first_conv_bn`).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, pool: Optional[str] = None):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"Stem: pool must be None, 'avg' or 'max', got {pool!r}")
        self.conv_bn = SeqConvBN(in_ch, out_ch, 3, stride=stride, spike_input=False)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = first_conv_bn(self.conv_bn, x)
        if self.pool is None:
            return y
        return pool3x3(y.flatten(0, 1), self.pool).unflatten(0, y.shape[:2])


class SpikingHead(nn.Module):
    """neuron -> mean over space and time -> Linear: ``[T, B, C, H, W]`` -> logits ``[B, num_classes]``.

    The Linear layer of each time step followed by the mean over T equals the Linear layer of the mean
    (up to rounding), so it is applied once.
    """

    def __init__(self, in_ch: int, num_classes: int, neuron: NeuronFactory):
        super().__init__()
        self.sn = neuron()
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.sn(x).mean(dim=(3, 4)).mean(dim=0))
