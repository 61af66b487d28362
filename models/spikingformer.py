"""Non-reversible spiking transformers: Spikingformer-2-384, Spikingformer-4-384 (CIFAR), Spikingformer-2-256 (DVS).

Spikingformer (Zhou et al.): a convolutional spiking tokenizer, then ``depth`` blocks of ``x + SSA(x)`` and
``x + MLP(x)`` (spiking self-attention and spiking MLP from :mod:`revsnn_triton.models.transformer`, shared with
RevSFormer), then the mean over tokens and time and a Linear head. Tokens are ``[T, B, E, N]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from revsnn_triton.recompute import recompute

from .base import SpikingModel, init_conv_bn, init_transformer
from .neurons import CIFAR_TRANSFORMER_NEURON, DVS_NEURON, neuron_factory
from .registry import register_variants
from .transformer import SpikingMLP, SpikingSelfAttention, SpikingTokenizer


def _check_transformer_args(name: str, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float) -> None:
    for arg, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}: {arg} must be a positive integer, got {value!r}")
    if embed_dim % num_heads or embed_dim % 8:
        raise ValueError(f"{name}: embed_dim {embed_dim} must be divisible by num_heads {num_heads} and by 8")
    if not mlp_ratio > 0:
        raise ValueError(f"{name}: mlp_ratio must be > 0, got {mlp_ratio!r}")


RECOMPUTE_MODES = (False, True, "stages")


def _check_recompute_mode(name: str, mode: object) -> bool | str:
    if isinstance(mode, bool) or mode == "stages":
        return mode
    if not isinstance(mode, str):
        raise TypeError(f"{name}: recompute_tokenizer must be a bool or 'stages', got {type(mode).__name__}")
    raise ValueError(f"{name}: recompute_tokenizer must be one of {RECOMPUTE_MODES}, got {mode!r}")


class SpikingTransformerBlock(nn.Module):
    """``x = x + attn(x); x = x + mlp(x)`` on tokens ``[T, B, E, N]``."""

    def __init__(self, attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class SpikingTransformerBase(SpikingModel):
    """What Spikingformer and RevSFormer share: input handling, neurons, tokenizer, initialisation.

    Args: ``embed_dim`` (E, tokens per stream), ``depth``, ``num_heads``, ``mlp_ratio``, ``patch`` (2**k, the
    tokenizer's total pooling), ``attn_threshold`` (threshold of the neuron after Q K^T V), ``num_classes``,
    ``T``, ``neuron_impl``, ``neuron`` (kind and parameters), ``in_channels``, ``event_input`` (False: images
    ``[B, C, H, W]`` repeated over T; True: frames ``[B, T, C, H, W]``), ``compact_spikes``, ``neuron_save``,
    ``recompute_tokenizer`` (see below). H and W must be multiples of ``patch``.

    ``recompute_tokenizer`` (gradient checkpointing of the non-reversible tokenizer, through
    :func:`revsnn_triton.recompute.recompute`; only when gradients are needed; one extra tokenizer forward per
    training step; gradients, BatchNorm statistics and state_dict keys are the same in every mode):

    - ``False``: ordinary autograd; the tokenizer's graph lives from the forward to the end of backward.
    - ``True``: the whole tokenizer is one segment: the forward keeps only its input (the image view), and its
      whole graph is rebuilt at the end of backward. Best when the peak is reached while the tokenizer's graph
      waits underneath the blocks' backward (Spikingformer: the blocks keep their whole graph).
    - ``"stages"``: each stage of the tokenizer (``SpikingTokenizer.stages()``) is its own segment, cut where the
      spikes leave a neuron: the forward keeps each stage's input (the image view, then each neuron's spikes as
      ``torch.bool``, a quarter of the float map), and backward rebuilds one stage's graph at a time. Best when
      the peak is the tokenizer's own backward (RevSFormer: the reversible blocks keep almost nothing).

    ``transition_batch`` (None, or N): a recomputed tokenizer runs its recomputation in micro-batches of N images (its
    maps are the model's largest: at 128x128 DVS frames with T=10 one full-resolution map is ~20 MiB per image).
    Defaults, chosen by measurement: 8 for the CIFAR models, 2 for the DVS models (it acts only where the tokenizer
    is recomputed: RevSFormer's default; Spikingformer keeps its tokenizer's graph by default). Cost: one more
    pass per tokenizer stage in forward and in backward, for the batch-wide BatchNorm statistics.
    """

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, patch: int,
                 num_classes: int, T: int, neuron_impl: str, neuron: dict, in_channels: int, event_input: bool,
                 attn_threshold: float = 0.5, compact_spikes: bool = True, neuron_save: Optional[str] = None,
                 recompute_tokenizer: bool | str = False, transition_batch: Optional[int] = None, name: str):
        super().__init__()
        _check_transformer_args(name, embed_dim, depth, num_heads, mlp_ratio)
        self.recompute_tokenizer = _check_recompute_mode(name, recompute_tokenizer)
        self.transition_batch = transition_batch
        self.setup_input(name, num_classes, T, in_channels, event_input, min_size=patch, multiple=patch)
        kw = dict(neuron)
        self.neuron = neuron_factory(neuron_impl, kw.pop("kind"), save=neuron_save, **kw)
        self.tokenizer = SpikingTokenizer(in_channels, embed_dim, patch, self.neuron, compact=compact_spikes)
        self.embed_dim, self.depth = embed_dim, depth
        self._attn_kwargs = dict(num_heads=num_heads, neuron=self.neuron, attn_threshold=attn_threshold,
                                 compact=compact_spikes)
        self._mlp_kwargs = dict(hidden=int(embed_dim * mlp_ratio), neuron=self.neuron, compact=compact_spikes)

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, B, C, H, W]`` -> tokens ``[T, B, E, N]``, recomputed in backward as ``recompute_tokenizer`` says."""
        if self.recompute_tokenizer == "stages":
            head, first, *stages = self.tokenizer.stages()
            # the stem and the first stage are one segment: the gradient of the stem's spikes (the largest map,
            # at full resolution) then only exists inside it, one micro-batch at a time
            x = recompute(nn.Sequential(head, first), x, self.transition_batch)
            for stage in stages:
                x = recompute(stage, x, self.transition_batch, binary_input=True)  # spikes: kept as bool
            return x.flatten(3)
        if self.recompute_tokenizer:
            return recompute(self.tokenizer, x, self.transition_batch)
        return self.tokenizer(x)

    def extra_repr(self) -> str:
        return f"recompute_tokenizer={self.recompute_tokenizer!r}"

    def make_attention(self) -> SpikingSelfAttention:
        """A fresh spiking self-attention on E channels."""
        return SpikingSelfAttention(self.embed_dim, **self._attn_kwargs)

    def make_mlp(self) -> SpikingMLP:
        """A fresh spiking MLP on E channels."""
        return SpikingMLP(self.embed_dim, **self._mlp_kwargs)

    def init_weights(self) -> None:
        init_conv_bn(self)
        init_transformer(self)


class Spikingformer(SpikingTransformerBase):
    """Spikingformer-``depth``-``embed_dim``; arguments as :class:`SpikingTransformerBase`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.blocks = nn.Sequential(*(SpikingTransformerBlock(self.make_attention(), self.make_mlp())
                                      for _ in range(self.depth)))
        self.head = nn.Linear(self.embed_dim, self.num_classes)
        self.init_weights()

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.tokenize(x))
        return self.head(x.mean(dim=(0, 3)))


CIFAR = dict(num_heads=12, mlp_ratio=4.0, patch=4, neuron=CIFAR_TRANSFORMER_NEURON, in_channels=3, transition_batch=8,
             event_input=False)
DVS = dict(num_heads=16, mlp_ratio=4.0, patch=16, neuron=DVS_NEURON, in_channels=2, event_input=True,
           transition_batch=2)
# (model config, default T, default classes, dataset, input, {name suffix: (depth, embed_dim)})
FAMILY = (
    (CIFAR, 4, 10, "CIFAR-10/100", "images [B, 3, 32, 32]", {"2-384": (2, 384), "4-384": (4, 384)}),
    (DVS, 10, 10, "DVS128 Gesture / CIFAR10-DVS", "event frames [B, T, 2, 128, 128]", {"2-256": (2, 256)}),
)


def register_family(prefix: str, cls: type, *, reversible: bool = False, counterpart_prefix: Optional[str] = None
                    ) -> None:
    """Register ``<prefix>-<depth>-<embed_dim>`` for every entry of :data:`FAMILY`; a reversible family names
    its counterparts ``<counterpart_prefix>-<depth>-<embed_dim>``."""
    for config, T, num_classes, dataset, where, sizes in FAMILY:
        configs = {f"{prefix}-{suffix}": dict(depth=depth, embed_dim=dim) for suffix, (depth, dim) in sizes.items()}
        counterparts = (None if counterpart_prefix is None else
                        {f"{prefix}-{suffix}": f"{counterpart_prefix}-{suffix}" for suffix in sizes})
        register_variants(cls, configs, num_classes=num_classes, T=T, dataset=dataset, input=where,
                          reversible=reversible, counterparts=counterparts, **config,
                          doc="{name}: {depth} blocks, E={embed_dim}, {num_heads} heads, patch {patch}, LIF "
                              "tau={neuron[tau]}; input " + where + ". Overrides: see " + cls.__name__ + ".")


register_family("Spikingformer", Spikingformer)
