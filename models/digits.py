"""Small models for scikit-learn's 8x8 grayscale digits (the offline default of ``revsnn train``).

``RevSResNet-digits``: a two-stage :class:`~revsnn_triton.models.revs_resnet.RevSResNet` (per-half widths
``[16, 32]``, two reversible blocks per stage) on images ``[B, 1, 8, 8]`` repeated over T. ``MS-ResNet-digits``: its
non-reversible counterpart, an :class:`~revsnn_triton.models.ms_resnet.MSResNet` with widths ``[16, 32]`` and four
basic blocks per stage (a reversible block holds two residual functions, F and G, of the half width: the same
pairing as RevSResNet21 / MS-ResNet18). Both use IF neurons with the ATan(2) surrogate and detach_reset, as the
CIFAR ResNets. Overrides (``widths``, ``blocks``, ``neuron``, ``reversible``, ...) go to the model class.
"""
from __future__ import annotations

from .neurons import CIFAR_RESNET_NEURON
from .ms_resnet import MSResNet
from .registry import register_variants
from .revs_resnet import RevSResNet

DIGITS_WIDTHS = (16, 32)
_DIGITS = dict(num_classes=10, T=4, neuron=CIFAR_RESNET_NEURON, in_channels=1, event_input=False,
               dataset="scikit-learn digits", input="images [B, 1, 8, 8]")

register_variants(RevSResNet, {"RevSResNet-digits": dict(widths=DIGITS_WIDTHS, blocks=(2, 2))}, **_DIGITS,
                  reversible=True, counterparts={"RevSResNet-digits": "MS-ResNet-digits"},
                  doc="Reversible spiking ResNet for [B, 1, 8, 8] digits: per-half widths {widths}, blocks {blocks}.")
register_variants(MSResNet, {"MS-ResNet-digits": dict(widths=DIGITS_WIDTHS, blocks=(4, 4))}, **_DIGITS,
                  doc="Non-reversible counterpart of RevSResNet-digits: MS-ResNet, widths {widths}, blocks {blocks}.")
