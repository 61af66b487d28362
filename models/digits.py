"""Small models for scikit-learn's 8x8 grayscale digits (the offline default of ``revsnn train``).

``RevSResNet-digits``: a two-stage :class:`~revsnn_triton.models.revs_resnet.RevSResNet` (per-half widths
``[16, 32]``, two reversible blocks per stage) on images ``[B, 1, 8, 8]`` repeated over T. ``MS-ResNet-digits``: its
non-reversible counterpart, an :class:`~revsnn_triton.models.ms_resnet.MSResNet` with widths ``[16, 32]`` and four
basic blocks per stage (a reversible block holds two residual functions, F and G, of the half width: the same
pairing as RevSResNet21 / MS-ResNet18). Both use IF neurons with the ATan(2) surrogate and detach_reset, as the
CIFAR ResNets. Overrides (``widths``, ``blocks``, ``neuron``, ``reversible``, ...) go to the model class.
"""
from __future__ import annotations

import torch.nn as nn

from .layers import CIFAR_RESNET_NEURON
from .registry import register_model

DIGITS_WIDTHS = (16, 32)


@register_model("RevSResNet-digits")
def revs_resnet_digits(num_classes: int = 10, T: int = 4, neuron_impl: str = "triton", **overrides) -> nn.Module:
    """Reversible spiking ResNet for ``[B, 1, 8, 8]`` digits: per-half widths [16, 32], blocks [2, 2]."""
    from .revs_resnet import RevSResNet  # imported on use: the reversible engine is only needed to build it

    kw = dict(widths=DIGITS_WIDTHS, blocks=(2, 2), neuron=CIFAR_RESNET_NEURON, in_channels=1, event_input=False)
    kw.update(overrides)
    return RevSResNet(num_classes=num_classes, T=T, neuron_impl=neuron_impl, name="RevSResNet-digits", **kw)


@register_model("MS-ResNet-digits")
def ms_resnet_digits(num_classes: int = 10, T: int = 4, neuron_impl: str = "triton", **overrides) -> nn.Module:
    """Non-reversible counterpart of RevSResNet-digits: MS-ResNet, widths [16, 32], blocks [4, 4]."""
    from .ms_resnet import MSResNet

    kw = dict(widths=DIGITS_WIDTHS, blocks=(4, 4), neuron=CIFAR_RESNET_NEURON, in_channels=1, event_input=False)
    kw.update(overrides)
    return MSResNet(num_classes=num_classes, T=T, neuron_impl=neuron_impl, name="MS-ResNet-digits", **kw)
