"""Non-reversible counterparts: MS-ResNet18/34/104 and the narrow deep MS-ResNet250/498/998 (CIFAR), MS-ResNet20
(DVS).

Membrane-shortcut ResNet (Hu et al.): every basic block adds ``neuron -> conv3x3 -> BN -> neuron -> conv3x3 ->
BN`` (the same :class:`~revsnn_triton.models.conv.SpikingResidualBranch` as RevSResNet's F and G) to its
input; the first block of a downsampling stage uses a stride-2 branch and the shortcut ``neuron -> 1x1 conv
stride 2 -> BN``. Stem, head, neurons and spike storage are shared with RevSResNet, so the memory and speed
benchmarks compare like with like: the only difference is that autograd keeps every block's graph.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .base import SpikingModel, check_widths_blocks, init_conv_bn
from .conv import Downsample, SpikingResidualBranch
from .neurons import CIFAR_RESNET_NEURON, DVS_NEURON, NeuronFactory, neuron_factory
from .stems import SpikingHead, Stem
from .registry import register_variants


class MSBasicBlock(nn.Module):
    """``x + branch(x)``, with a :class:`Downsample` shortcut (no pooling) when stride or width change."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, neuron: NeuronFactory, compact: bool):
        super().__init__()
        self.branch = SpikingResidualBranch(in_ch, out_ch, neuron, stride=stride, compact=compact)
        self.shortcut = (Downsample(in_ch, out_ch, neuron, pool=False, compact=compact)
                         if stride != 1 or in_ch != out_ch else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        return identity + self.branch(x)


class MSResNet(SpikingModel):
    """Spiking MS-ResNet with basic blocks.

    Args:
        widths: channels of each stage (stage i > 0 halves the resolution); the stem outputs ``widths[0]``.
        blocks: basic blocks per stage. Other arguments as :class:`~revsnn_triton.models.revs_resnet.RevSResNet`
        (``event_input=True``: stem stride 2 followed by MaxPool(3, 2, 1); ``zero_init_last``: every residual
        branch starts with its last BatchNorm weight at 0, on for the deep MS-ResNet250/498/998).
    Forward returns logits ``[B, num_classes]`` (mean over T).
    """

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], *, num_classes: int, T: int,
                 neuron_impl: str, neuron: dict, in_channels: int, event_input: bool, compact_spikes: bool = True,
                 neuron_save: Optional[str] = None, zero_init_last: bool = False, name: str = "MSResNet"):
        super().__init__()
        check_widths_blocks(name, widths, blocks)
        self.setup_input(name, num_classes, T, in_channels, event_input,
                         min_size=(4 if event_input else 1) * 2 ** (len(widths) - 1))
        kw = dict(neuron)
        sn = neuron_factory(neuron_impl, kw.pop("kind"), save=neuron_save, **kw)
        self.stem = Stem(in_channels, widths[0], stride=2 if event_input else 1,
                         pool="max" if event_input else None)
        layers = []
        in_ch = widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(MSBasicBlock(in_ch, width, 2 if (i and not j) else 1, sn, compact_spikes))
                in_ch = width
        self.blocks = nn.Sequential(*layers)
        self.head = SpikingHead(widths[-1], num_classes, sn)
        init_conv_bn(self, zero_init_last=zero_init_last)

    @staticmethod
    def layer_count(blocks: Sequence[int]) -> int:
        """Weighted layers, counted as the MS-ResNet names do: the stem conv, two 3x3 convs per basic block and
        the Linear head (the 1x1 shortcut convs are not counted)."""
        return 1 + 2 * sum(blocks) + 1

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


CIFAR_WIDTHS = (64, 128, 256, 512)
# The narrow deep family next to RevSResNet1001 (the per-half widths of RevSResNet1001, twice its blocks per stage
# for MS-ResNet998): a depth sweep of a network whose memory per image grows with depth. Initialised as
# RevSResNet1001 (zero_init_last), so that it trains at such depths.
DEEP_WIDTHS = (16, 32, 64, 128)
CONFIGS = {
    "MS-ResNet18": dict(widths=CIFAR_WIDTHS, blocks=(2, 2, 2, 2)),
    "MS-ResNet34": dict(widths=CIFAR_WIDTHS, blocks=(3, 4, 6, 3)),
    "MS-ResNet104": dict(widths=CIFAR_WIDTHS, blocks=(3, 8, 32, 8)),
    "MS-ResNet250": dict(widths=DEEP_WIDTHS, blocks=(31, 31, 31, 31), zero_init_last=True),
    "MS-ResNet498": dict(widths=DEEP_WIDTHS, blocks=(62, 62, 62, 62), zero_init_last=True),
    "MS-ResNet998": dict(widths=DEEP_WIDTHS, blocks=(124, 124, 126, 124), zero_init_last=True),
}


register_variants(MSResNet, CONFIGS, num_classes=100, T=4, neuron=CIFAR_RESNET_NEURON, in_channels=3,
                  event_input=False, dataset="CIFAR-10/100", input="images [B, 3, 32, 32]",
                  doc="{name} (CIFAR, images [B, 3, H, W]): widths {widths}, blocks {blocks}, IF neurons, "
                      "ATan(2), detach_reset. Overrides: see MSResNet.")


register_variants(MSResNet, {"MS-ResNet20": dict(widths=(16, 32, 64), blocks=(3, 3, 3))}, num_classes=10, T=10,
                  neuron=DVS_NEURON, in_channels=2, event_input=True,
                  dataset="DVS128 Gesture / CIFAR10-DVS", input="event frames [B, T, 2, 128, 128]",
                  doc="{name} (DVS, event frames [B, T, 2, 128, 128]): widths {widths}, blocks {blocks}, LIF "
                      "tau=1.5 with Sigmoid(4), detach_reset; stem conv stride 2 + MaxPool. Overrides: see MSResNet.")
