"""Building blocks shared by every model of the zoo (reversible and non-reversible alike).

Layout conventions: a spiking tensor is ``[T, B, C, H, W]`` (feature maps) or ``[T, B, C, N]`` (tokens, channels
first so that 1x1 convolutions and BatchNorm act on the channel axis). Convolutions and BatchNorm see time and
batch merged (``[T*B, ...]``), so BatchNorm statistics are taken over T, B and space, as in MS-ResNet and
Spikingformer.

Memory design (what each piece keeps for backward; see ``revsnn_triton.bench.memory`` for the measurement):

- :class:`SeqConvBN` with ``spike_input=True`` runs its convolution through :func:`spike_conv`, which keeps the
  binary input spikes as ``torch.bool`` (1 byte per element instead of 4 in fp32) and rebuilds them in backward;
  an optional 3x3/stride-2 pooling in front (average: the downsample layers; max: the transformer tokenizer) is
  fused the same way, so neither the fp32 spikes, nor the pooled map, nor MaxPool's int64 argmax indices are
  kept. BatchNorm keeps its fp32 input as usual.
- Neurons keep what their ``save=`` option says (ours: ``"h"`` fp32 H, ``"h_bf16"``, or ``"input"``: nothing
  beyond the input that the producer keeps anyway); spikingjelly's nodes keep their own choice. Every neuron
  of the zoo is wrapped in :class:`SequenceNeuron`, which drops the final membrane tensor after each call.
- Stems compute the image path once per image and repeat it over T with ``expand`` (a stride-0 view), never a
  copy; BatchNorm on the repeated map has the same batch statistics as on the T copies.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

NEURON_IMPLS = ("triton", "spikingjelly", "torch")
NEURON_KINDS = ("if", "lif", "plif")

# Surrogate ids (as in revsnn_triton.surrogate.SURROGATES) -> spikingjelly 2.0 class names.
_SPIKINGJELLY_SURROGATES = {
    "sigmoid": "Sigmoid", "atan": "ATan", "piecewise_quadratic": "PiecewiseQuadratic",
    "piecewise_exp": "PiecewiseExp", "soft_sign": "SoftSign", "super_spike": "SuperSpike", "erf": "Erf",
}

NeuronFactory = Callable[..., nn.Module]


def make_neuron(neuron_impl: str, kind: str, *, tau: float = 2.0, init_tau: float = 2.0,
                decay_input: bool = True, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                detach_reset: bool = False, surrogate: str = "sigmoid", alpha: Optional[float] = None,
                save: Optional[str] = None) -> nn.Module:
    """Build one multi-step spiking neuron (``step_mode="m"``: input and output ``[T, *shape]``).

    Args:
        neuron_impl: ``"triton"`` (our fused op: Triton on CUDA, the plain-PyTorch path on CPU), ``"torch"`` (our
            autograd oracle) or ``"spikingjelly"`` (spikingjelly 2.0's nodes).
        kind: ``"if"``, ``"lif"`` (``tau``, ``decay_input``) or ``"plif"`` (learnable tau from ``init_tau``).
        surrogate, alpha: surrogate-gradient id (e.g. ``"sigmoid"``, ``"atan"``) and its parameter; ``alpha=None``
            uses the surrogate's default (Sigmoid 4, ATan 2).
        save: what our neurons keep for backward (``"h"``, ``"h_bf16"``, ``"input"``; None = the module default).
            spikingjelly's nodes have no such choice; ``save`` other than None raises for them.
    Other arguments carry spikingjelly's names and defaults.
    """
    if neuron_impl not in NEURON_IMPLS:
        raise ValueError(f"make_neuron: neuron_impl must be one of {NEURON_IMPLS}, got {neuron_impl!r}")
    if kind not in NEURON_KINDS:
        raise ValueError(f"make_neuron: kind must be one of {NEURON_KINDS}, got {kind!r}")
    if surrogate not in _SPIKINGJELLY_SURROGATES:
        raise ValueError(f"make_neuron: surrogate must be one of {sorted(_SPIKINGJELLY_SURROGATES)}, "
                         f"got {surrogate!r}")
    common = dict(v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach_reset, step_mode="m")
    if kind == "lif":
        common.update(tau=tau, decay_input=decay_input)
    elif kind == "plif":
        common.update(init_tau=init_tau, decay_input=decay_input)
    class_name = {"if": "IFNode", "lif": "LIFNode", "plif": "ParametricLIFNode"}[kind]
    surrogate_kw = {} if alpha is None else {"alpha": alpha}

    if neuron_impl == "spikingjelly":
        if save is not None:
            raise ValueError("make_neuron: save= is an option of our neurons; spikingjelly's nodes do not take it")
        from spikingjelly.activation_based import neuron as sj_neuron
        from spikingjelly.activation_based import surrogate as sj_surrogate
        surrogate_fn = getattr(sj_surrogate, _SPIKINGJELLY_SURROGATES[surrogate])(**surrogate_kw)
        return getattr(sj_neuron, class_name)(surrogate_function=surrogate_fn, **common)

    from revsnn_triton import neuron as our_neuron
    from revsnn_triton import surrogate as our_surrogate
    surrogate_fn = our_surrogate.SURROGATES[surrogate](**surrogate_kw)
    if save is not None:
        common["save"] = save
    return getattr(our_neuron, class_name)(surrogate_function=surrogate_fn, backend=neuron_impl, **common)


class SequenceNeuron(nn.Module):
    """A multi-step neuron that keeps no state between calls: ``[T, *shape] -> spikes [T, *shape]``.

    After each call the wrapped neuron is reset, so its final membrane ``v`` (``[*shape]`` fp32) is released
    at once instead of living until the next reset. Inside a reversible sequence that matters: every F and G
    of every block would otherwise hold one such tensor from its forward until its recomputation, which makes
    memory grow with depth. Gradients are unaffected (autograd keeps what backward needs).
    """

    def __init__(self, neuron: nn.Module):
        super().__init__()
        self.neuron = neuron

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.neuron(x)
        finally:
            self.neuron.reset()


def neuron_factory(neuron_impl: str, kind: str, **kwargs) -> NeuronFactory:
    """A callable building a fresh :class:`SequenceNeuron` around ``make_neuron(neuron_impl, kind, **kwargs)``;
    keyword arguments given to the call override ``kwargs`` (e.g. ``v_threshold`` of the attention neuron).

    Validates eagerly by building one neuron, so a bad configuration fails when the model is built.
    """
    make_neuron(neuron_impl, kind, **kwargs)

    def build(**overrides) -> SequenceNeuron:
        return SequenceNeuron(make_neuron(neuron_impl, kind, **{**kwargs, **overrides}))
    return build


# --------------------------------------------------------------------------------------------- spike convolution
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _pool(x: torch.Tensor, pool: Optional[str]) -> torch.Tensor:
    if pool == "avg":
        return F.avg_pool2d(x, 3, 2, 1)
    if pool == "max":
        return F.max_pool2d(x, 3, 2, 1)
    return x


class _SpikeConv(torch.autograd.Function):
    """Convolution of a binary input that keeps the input as ``torch.bool`` for backward.

    Forward: ``out = conv(pool(s), weight, bias)``; ``pool`` is None, ``"avg"`` (AvgPool(3, 2, 1)) or ``"max"``
    (MaxPool(3, 2, 1)). Saved for backward: ``s != 0`` (bool, 1 byte per element) and the weight. The pooled
    map (and MaxPool's argmax indices, which are a deterministic function of the input) are recomputed.
    Under autocast the convolution runs in the autocast dtype (as ``F.conv*d`` would) and so does its backward.
    """

    @staticmethod
    def forward(ctx, spikes, weight, bias, stride, padding, pool):
        dtype = _compute_dtype(spikes)
        x = spikes.to(dtype)
        with torch.autocast(spikes.device.type, enabled=False):
            x = _pool(x, pool)
            out = torch.ops.aten.convolution(
                x, weight.to(dtype), None if bias is None else bias.to(dtype), stride, padding,
                [1] * len(stride), False, [0] * len(stride), 1)
        ctx.save_for_backward(spikes != 0, weight)
        ctx.conf = (stride, padding, pool, dtype, spikes.dtype, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # Ordered so that no two input-sized tensors coexist needlessly: the rebuilt spikes live only until they
        # are pooled (MaxPool's indices kept), the pooled map only until the weight gradient is taken, and the
        # input gradients are allocated after both are gone (the backward calls get a stride-0 stand-in that
        # lends them its shape). The same convolutions and pooling backward as one joint call: identical bits.
        mask, weight = ctx.saved_tensors
        stride, padding, pool, dtype, in_dtype, has_bias = ctx.conf
        need_in, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = has_bias and ctx.needs_input_grad[2]
        nd = len(stride)
        args = (stride, padding, [1] * nd, False, [0] * nd, 1)
        grad_out, w = grad_out.to(dtype), weight.to(dtype)
        g_in = g_w = g_b = indices = None
        pooled_shape = None
        if need_w or need_b or (need_in and pool == "max"):
            pooled = mask.to(dtype)
            if pool == "max":
                pooled, indices = torch.ops.aten.max_pool2d_with_indices(pooled, [3, 3], [2, 2], [1, 1])
            elif pool == "avg":
                pooled = _pool(pooled, pool)
            pooled_shape = pooled.shape
            if need_w or need_b:
                _, g_w, g_b = torch.ops.aten.convolution_backward(
                    grad_out, pooled, w, [weight.shape[0]] if has_bias else None, *args, [False, need_w, need_b])
            del pooled
        if need_in:
            if pooled_shape is None:  # (not "max": its indices were computed above)
                # AvgPool(3, 2, 1) maps a size d to (d - 1) // 2 + 1
                pooled_shape = mask.shape if pool is None else (*mask.shape[:2], *((d - 1) // 2 + 1
                                                                                    for d in mask.shape[2:]))
            g_in, _, _ = torch.ops.aten.convolution_backward(grad_out, _shape_only(pooled_shape, grad_out), w, None,
                                                             *args, [True, False, False])
            if pool == "avg":
                g_in = torch.ops.aten.avg_pool2d_backward(g_in, _shape_only(mask.shape, g_in), [3, 3], [2, 2],
                                                          [1, 1], False, True, None)
            elif pool == "max":
                g_in = torch.ops.aten.max_pool2d_with_indices_backward(
                    g_in, _shape_only(mask.shape, g_in), [3, 3], [2, 2], [1, 1], [1, 1], False, indices)
        return (None if g_in is None else g_in.to(in_dtype),
                None if g_w is None else g_w.to(weight.dtype),
                None if g_b is None else g_b.to(weight.dtype), None, None, None)


def _shape_only(shape, like: torch.Tensor) -> torch.Tensor:
    """A stride-0 tensor of ``shape`` (one element of memory): the input argument of a backward call that reads
    only its shape."""
    return like.new_empty((1,) * len(shape)).expand(shape)


def spike_conv(spikes: torch.Tensor, conv: nn.Conv1d | nn.Conv2d, pool: Optional[str] = None) -> torch.Tensor:
    """Apply ``conv`` (groups 1, dilation 1) to a 0/1 spike map, optionally after ``pool``: ``"avg"``
    (AvgPool(3, 2, 1)) or ``"max"`` (MaxPool(3, 2, 1)).

    ``spikes``: ``[N, C, L]`` for Conv1d or ``[N, C, H, W]`` for Conv2d, float, values exactly 0 or 1 (a neuron's
    output; other values would make the saved bool copy wrong, so callers only pass neuron outputs).
    Returns the convolution output; keeps a bool copy of ``spikes`` for backward (see :class:`_SpikeConv`).
    """
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)) or conv.groups != 1 or any(d != 1 for d in conv.dilation):
        raise TypeError("spike_conv: conv must be an nn.Conv1d/nn.Conv2d with groups=1 and dilation=1")
    if spikes.dim() != conv.weight.dim() or spikes.shape[1] != conv.in_channels:
        raise ValueError(f"spike_conv: expected input [N, {conv.in_channels}, ...] with {conv.weight.dim()} dims, "
                         f"got {tuple(spikes.shape)}")
    if pool not in (None, "avg", "max"):
        raise ValueError(f"spike_conv: pool must be None, 'avg' or 'max', got {pool!r}")
    if pool is not None and spikes.dim() != 4:
        raise ValueError("spike_conv: pooling needs a 2-D feature map [N, C, H, W]")
    return _SpikeConv.apply(spikes, conv.weight, conv.bias, list(conv.stride), list(conv.padding), pool)


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
        if pool not in (None, "avg", "max") or (pool is not None and dims != 2):
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
            y = self.conv(_pool(y, self.pool))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_bn2(self.sn2(self.conv_bn1(self.sn1(x))))


# ----------------------------------------------------------------------------------------------- transformers
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
        if pool not in (None, "avg", "max"):
            raise ValueError(f"Stem: pool must be None, 'avg' or 'max', got {pool!r}")
        self.conv_bn = SeqConvBN(in_ch, out_ch, 3, stride=stride, spike_input=False)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = first_conv_bn(self.conv_bn, x)
        if self.pool is None:
            return y
        pool = F.avg_pool2d if self.pool == "avg" else F.max_pool2d
        return pool(y.flatten(0, 1), 3, 2, 1).unflatten(0, y.shape[:2])


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


# ------------------------------------------------------------------------------------------- input checks, head
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


# Neuron configurations of the zoo (DESIGN.md section 1 and the original code).
CIFAR_RESNET_NEURON = dict(kind="if", surrogate="atan", alpha=2.0, detach_reset=True)
DVS_NEURON = dict(kind="lif", tau=1.5, surrogate="sigmoid", alpha=4.0, detach_reset=True)
CIFAR_TRANSFORMER_NEURON = dict(kind="lif", tau=2.0, surrogate="sigmoid", alpha=4.0, detach_reset=True)


class SpikingModel(nn.Module):
    """Base of every zoo model: input checks and layout.

    The models process whole sequences; their neurons are :class:`SequenceNeuron` modules, so no state carries
    from one call to the next. Subclasses call :meth:`setup_input` and implement
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


def init_conv_bn(model: nn.Module) -> None:
    """MS-ResNet / RevSResNet initialisation: Kaiming-normal (fan_out) convs, BN weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_transformer(model: nn.Module) -> None:
    """Spikingformer initialisation: truncated-normal (std 0.02) Linear weights, zero Linear biases."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
