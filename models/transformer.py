"""Spikingformer's building blocks, shared by Spikingformer and RevSFormer: the spiking self-attention, the
spiking MLP and the convolutional tokenizer.

Tokens are ``[T, B, C, N]``, channels before tokens, so that 1x1 convolutions and BatchNorm act on the channel
axis. The tokenizer's max pooling of spikes is fused into its convolutions (bool input kept, argmax indices
recomputed in backward).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .conv import SeqConvBN
from .neurons import NeuronFactory
from .stems import first_conv_bn


class SpikingSelfAttention(nn.Module):
    """Spikingformer's spiking self-attention on tokens ``[T, B, C, N]`` -> ``[T, B, C, N]``.

    neuron -> (1x1 conv -> BN -> neuron) for Q, K, V -> per head ``(Q K^T) V * scale`` (no softmax; spikes make
    it non-negative) -> neuron with ``attn_threshold`` -> 1x1 conv (bias) -> BN.
    """

    def __init__(self, dim: int, num_heads: int, neuron: NeuronFactory, attn_threshold: float = 0.5,
                 scale: float = 0.125, compact: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SpikingSelfAttention: dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.scale = num_heads, scale
        self.in_sn = neuron()
        self.q = SeqConvBN(dim, dim, 1, dims=1, compact=compact)
        self.k = SeqConvBN(dim, dim, 1, dims=1, compact=compact)
        self.v = SeqConvBN(dim, dim, 1, dims=1, compact=compact)
        self.q_sn, self.k_sn, self.v_sn = neuron(), neuron(), neuron()
        self.attn_sn = neuron(v_threshold=attn_threshold)
        self.proj = SeqConvBN(dim, dim, 1, bias=True, dims=1, compact=compact)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        T, B, C, N = x.shape
        return x.reshape(T, B, self.num_heads, C // self.num_heads, N).transpose(-1, -2)  # [T, B, h, N, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.in_sn(x)
        q = self._heads(self.q_sn(self.q(s)))
        k = self._heads(self.k_sn(self.k(s)))
        v = self._heads(self.v_sn(self.v(s)))
        y = (q @ k.transpose(-1, -2)) @ v * self.scale            # [T, B, h, N, d]
        y = y.transpose(-1, -2).flatten(2, 3)                      # [T, B, C, N]
        return self.proj(self.attn_sn(y))


class SpikingMLP(nn.Module):
    """neuron -> 1x1 conv (bias) -> BN -> neuron -> 1x1 conv (bias) -> BN on tokens ``[T, B, C, N]``."""

    def __init__(self, dim: int, hidden: int, neuron: NeuronFactory, compact: bool = True):
        super().__init__()
        self.sn1 = neuron()
        self.fc1 = SeqConvBN(dim, hidden, 1, bias=True, dims=1, compact=compact)
        self.sn2 = neuron()
        self.fc2 = SeqConvBN(hidden, dim, 1, bias=True, dims=1, compact=compact)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.sn2(self.fc1(self.sn1(x))))


class _TokenizerStem(nn.Module):
    """The tokenizer's first conv -> BN, once per image on an expanded input (:func:`first_conv_bn`)."""

    def __init__(self, conv_bn: SeqConvBN):
        super().__init__()
        self.conv_bn = conv_bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_conv_bn(self.conv_bn, x)


class _TokenizerStage(nn.Module):
    """One tokenizer stage: neuron -> [MaxPool] conv -> BN on ``[T, B, C, H, W]``."""

    def __init__(self, sn: nn.Module, conv_bn: SeqConvBN):
        super().__init__()
        self.sn, self.conv_bn = sn, conv_bn

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.conv_bn(self.sn(y))


class SpikingTokenizer(nn.Module):
    """Spikingformer's convolutional tokenizer: ``[T, B, C_in, H, W]`` -> tokens ``[T, B, E, H*W/patch^2]``.

    conv3x3 -> BN (E/8 channels), then four stages neuron -> [MaxPool(3, 2, 1)] -> conv3x3 -> BN with E/4, E/2,
    E, E channels; the last ``log2(patch)`` stages pool. ``x`` may be a stride-0 ``expand`` over T (CIFAR): the
    first conv then runs once per image (see :func:`first_conv_bn`). :meth:`stages` gives the same computation
    as a chain of modules (the segments of a stage-by-stage recomputation).
    """

    def __init__(self, in_ch: int, embed_dim: int, patch: int, neuron: NeuronFactory, compact: bool = True):
        super().__init__()
        n_pool = int(round(math.log2(patch)))
        if patch < 1 or 2 ** n_pool != patch or n_pool > 4:
            raise ValueError(f"SpikingTokenizer: patch must be 1, 2, 4, 8 or 16, got {patch}")
        if embed_dim % 8:
            raise ValueError(f"SpikingTokenizer: embed_dim must be divisible by 8, got {embed_dim}")
        self.patch = patch
        self.stem = SeqConvBN(in_ch, embed_dim // 8, 3, spike_input=False)
        widths = [embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim, embed_dim]
        self.sns = nn.ModuleList(neuron() for _ in range(4))
        # the max pooling of spikes is fused into the conv (bool input kept, argmax recomputed)
        self.convs = nn.ModuleList(SeqConvBN(widths[i], widths[i + 1], 3, pool="max" if i >= 4 - n_pool else None,
                                             compact=compact) for i in range(4))

    def stages(self) -> list[nn.Module]:
        """The stem and the four stages as modules that share this tokenizer's submodules (built on each call and
        never registered, so the state_dict keys stay those of the tokenizer); chained, then ``flatten(3)``, they
        are :meth:`forward`."""
        return [_TokenizerStem(self.stem), *map(_TokenizerStage, self.sns, self.convs)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x.flatten(3)
