"""What every zoo model shares: the base class with its input contract, argument checks, initialisation.

A model takes images ``[B, C, H, W]``, repeated over T by ``expand`` (a stride-0 view, no copy), or event frames
``[B, T, C, H, W]`` (the tonic / spikingjelly frame layout), and works on ``[T, B, C, H, W]`` inside. Its neurons
keep no state from one call to the next.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


def check_image_input(name: str, x: torch.Tensor, channels: int, min_size: int, multiple: int = 1) -> None:
    """Validate a CIFAR-style batch ``[B, channels, H, W]`` (float, H and W >= min_size and divisible by multiple)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name}: expected images [B, {channels}, H, W], got shape {tuple(x.shape)}")
    _check_spatial(name, x, min_size, multiple)


def check_event_input(name: str, x: torch.Tensor, T: int, channels: int, min_size: int, multiple: int = 1) -> None:
    """Validate an event-frame batch ``[B, T, channels, H, W]`` (tonic / spikingjelly frame layout)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 5 or x.shape[1] != T or x.shape[2] != channels:
        raise ValueError(f"{name}: expected event frames [B, T={T}, {channels}, H, W], got shape {tuple(x.shape)}")
    _check_spatial(name, x, min_size, multiple)


def _check_spatial(name: str, x: torch.Tensor, min_size: int, multiple: int) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: input must be a floating-point tensor, got {x.dtype}")
    H, W = x.shape[-2:]
    if H < min_size or W < min_size or H % multiple or W % multiple:
        raise ValueError(f"{name}: spatial size must be at least {min_size} and divisible by {multiple}, "
                         f"got {H}x{W}")
    if x.shape[0] < 1:
        raise ValueError(f"{name}: empty batch")


def image_sequence(x: torch.Tensor, T: int) -> torch.Tensor:
    """Images ``[B, C, H, W]`` -> ``[T, B, C, H, W]`` repeated over T by ``expand`` (a view; time stride 0)."""
    return x.unsqueeze(0).expand(T, *x.shape)


def event_sequence(x: torch.Tensor) -> torch.Tensor:
    """Event frames ``[B, T, C, H, W]`` -> ``[T, B, C, H, W]`` (a view)."""
    return x.transpose(0, 1)


def check_widths_blocks(name: str, widths: Sequence[int], blocks: Sequence[int]) -> None:
    """Stage configuration: equally long, non-empty sequences of positive integers."""
    ok = (len(widths) == len(blocks) and len(widths) > 0
          and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (*widths, *blocks)))
    if not ok:
        raise ValueError(f"{name}: widths and blocks must be equally long lists of positive integers, "
                         f"got {list(widths)} and {list(blocks)}")


def check_common_args(name: str, num_classes: int, T: int) -> None:
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise ValueError(f"{name}: T must be an integer >= 1, got {T!r}")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{name}: num_classes must be an integer >= 1, got {num_classes!r}")


class SpikingModel(nn.Module):
    """Base of every zoo model: input checks and layout.

    The models process whole sequences; their neurons are :class:`~revsnn_triton.models.neurons.SequenceNeuron`
    modules, so no state carries from one call to the next. Subclasses call :meth:`setup_input` and implement
    ``forward_sequence(x: [T, B, C, H, W]) -> logits``.
    """

    def setup_input(self, name: str, num_classes: int, T: int, in_channels: int, event_input: bool,
                    min_size: int, multiple: int = 1) -> None:
        """Record (and validate) what the model accepts: images ``[B, in_channels, H, W]`` repeated over T, or
        event frames ``[B, T, in_channels, H, W]``; H and W at least ``min_size`` and divisible by ``multiple``."""
        check_common_args(name, num_classes, T)
        self.name, self.num_classes, self.T = name, num_classes, T
        self.in_channels, self.event_input = in_channels, event_input
        self.min_size, self.multiple = min_size, multiple

    def input_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """Validate ``x`` and return it as ``[T, B, C, H, W]`` (a view; images are expanded, not copied)."""
        if self.event_input:
            check_event_input(self.name, x, self.T, self.in_channels, self.min_size, self.multiple)
            return event_sequence(x)
        check_image_input(self.name, x, self.in_channels, self.min_size, self.multiple)
        return image_sequence(x, self.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: images ``[B, C, H, W]`` or event frames ``[B, T, C, H, W]``; returns logits ``[B, classes]``."""
        return self.forward_sequence(self.input_sequence(x))

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def init_conv_bn(model: nn.Module, zero_init_last: bool = False) -> None:
    """MS-ResNet / RevSResNet initialisation: Kaiming-normal (fan_out) convs, BN weight 1 and bias 0.

    ``zero_init_last``: then every submodule with a ``zero_init_last()`` method (a residual branch) zeroes the
    weight of its last BatchNorm, so each residual block starts as the identity (timm's ``zero_init_last``).
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_last:
        for m in model.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()


def init_transformer(model: nn.Module) -> None:
    """Spikingformer initialisation: truncated-normal (std 0.02) Linear weights, zero Linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
