"""Convolution of a 0/1 spike map that keeps the input for backward as ``torch.bool``.

A convolution under autograd keeps its input; after a neuron that input is a spike map of exact 0s and 1s in
4 bytes per element (fp32). :func:`spike_conv` computes the same ``conv(pool(spikes))`` and keeps 1 byte per
element instead, rebuilding the float spikes, the pooled map and MaxPool's indices in backward. Output and
gradients are bit-identical to ``conv(pool(spikes))`` under ordinary autograd.

Reading order: :mod:`.reference` (the definition and test oracle), :mod:`.op` (the registered custom ops
``revsnn::spike_conv`` / ``revsnn::spike_conv_backward``), then :func:`spike_conv` below (the entry point the
models call).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from revsnn_triton.ops.spike_conv.op import spike_conv_backward, spike_conv_forward
from revsnn_triton.ops.spike_conv.reference import POOLS, pool3x3, spike_conv_reference

__all__ = ["spike_conv", "spike_conv_forward", "spike_conv_backward", "spike_conv_reference", "pool3x3", "POOLS"]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` runs in: the autocast dtype of ``x``'s device type when autocast is on
    there (as ``F.conv2d`` would), else ``x.dtype``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def spike_conv(spikes: torch.Tensor, conv: nn.Conv1d | nn.Conv2d, pool: Optional[str] = None) -> torch.Tensor:
    """``conv(pool3x3(spikes, pool))``, keeping ``spikes != 0`` (``torch.bool``) and the weight for backward.

    Args:
        spikes: ``[N, C_in, L]`` for an ``nn.Conv1d``, ``[N, C_in, H, W]`` for an ``nn.Conv2d``; floating point,
            values exactly 0 or 1 (a neuron's output: any other value would be rebuilt as 1 in backward, so pass
            only spike maps).
        conv: the convolution (``groups=1``, ``dilation=1``, ``padding_mode="zeros"``, numeric padding); its
            weight and bias get gradients as they would under autograd.
        pool: None, ``"avg"`` (``AvgPool2d(3, 2, 1)``) or ``"max"`` (``MaxPool2d(3, 2, 1)``) in front of the conv;
            only for 2-D maps.

    Returns ``[N, C_out, ...]`` in the autocast dtype under autocast, else in ``spikes``' dtype (the weight is
    cast to it, as the op computes in one dtype); gradients come back in the dtypes of ``spikes`` and of the
    parameters. Differentiable under ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(spikes, torch.Tensor) or not spikes.is_floating_point():
        raise TypeError(f"spike_conv: spikes must be a floating-point torch.Tensor, got "
                        f"{spikes.dtype if isinstance(spikes, torch.Tensor) else type(spikes).__name__}")
    if (not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or conv.groups != 1 or any(d != 1 for d in conv.dilation)
            or conv.padding_mode != "zeros" or isinstance(conv.padding, str)):
        raise TypeError("spike_conv: conv must be an nn.Conv1d/nn.Conv2d with groups=1, dilation=1, "
                        "padding_mode='zeros' and numeric padding")
    if spikes.dim() != conv.weight.dim() or spikes.shape[1] != conv.in_channels:
        raise ValueError(f"spike_conv: expected input [N, {conv.in_channels}, ...] with {conv.weight.dim()} dims, "
                         f"got {tuple(spikes.shape)}")
    if pool not in POOLS:
        raise ValueError(f"spike_conv: pool must be None, 'avg' or 'max', got {pool!r}")
    if pool is not None and spikes.dim() != 4:
        raise ValueError("spike_conv: pooling needs a 2-D feature map [N, C, H, W]")
    out, _ = spike_conv_forward(spikes, conv.weight, conv.bias, list(conv.stride), list(conv.padding), pool,
                                compute_dtype(spikes))
    return out
