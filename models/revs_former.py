"""Reversible spiking transformers: RevSFormer-2-384, RevSFormer-4-384 (CIFAR), RevSFormer-2-256 (DVS).

The tokenizer output ``X`` is duplicated into the two streams (``X1 = X2 = X``, ``[T, B, 2E, N]``), then
``depth`` reversible blocks with ``F`` = spiking self-attention and ``G`` = spiking MLP (the same modules as
Spikingformer's, acting on one E-channel half), one :class:`revsnn_triton.reversible.RevSequence`, the mean over
tokens and time of both streams, and a Linear head on 2E features.

Memory per image: the stored output stream of the sequence and one block's recomputation graph during backward
(its attention products ``Q K^T`` per head are the largest part at 64 tokens), or the tokenizer's backward,
whichever is larger; nothing grows with ``depth`` (target: RevSFormer-4-384 <= 16 MiB/image, fp32, T=4). The
tokenizer is non-reversible and works at full resolution; by default it is recomputed stage by stage (see
:class:`RevSFormer`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .spikingformer import SpikingTransformerBase, register_family


class RevSFormer(SpikingTransformerBase):
    """RevSFormer-``depth``-``embed_dim``; arguments as :class:`SpikingTransformerBase` plus ``reversible`` and
    ``frac_bits`` (passed to the ``RevSequence``).

    ``recompute_tokenizer`` defaults to ``"stages"`` here. The reversible blocks keep almost nothing, so the
    training-memory peak is the tokenizer's own backward (its 32x32 maps with up to E/2 channels), not the
    blocks'. Recomputing the whole tokenizer in backward (``True``) rebuilds that same graph and barely lowers
    the peak; recomputing it one stage at a time keeps only one stage's graph (plus the stage inputs, which the
    neurons keep anyway) alive during its backward. Cost: one extra tokenizer forward per training step.
    Gradients, BatchNorm statistics and state_dict keys are the same in every mode.
    """

    def __init__(self, *, reversible: bool = True, frac_bits: int = 16, recompute_tokenizer: bool | str = "stages",
                 **kwargs):
        from revsnn_triton.reversible import RevBlock, RevSequence  # the engine; imported when a model is built

        super().__init__(recompute_tokenizer=recompute_tokenizer, **kwargs)
        blocks = [RevBlock(self.make_attention(), self.make_mlp(), split_dim=2) for _ in range(self.depth)]
        self.blocks = RevSequence(blocks, frac_bits=frac_bits, reversible=reversible)
        self.head = nn.Linear(2 * self.embed_dim, self.num_classes)
        self.init_weights()

    def forward_sequence(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenize(x)
        x = self.blocks(torch.cat([tokens, tokens], dim=2))
        return self.head(x.mean(dim=(0, 3)))


register_family("RevSFormer", RevSFormer, reversible=True, counterpart_prefix="Spikingformer")
