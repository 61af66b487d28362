"""Hypothesis strategies (and the builders behind them) for testing reversible blocks, neurons and the stream.

Inputs never sit only near zero: they mix magnitudes and put, in random places, values exactly at the threshold,
signed zeros, subnormals and huge values; shapes include ``T = 1``.

- Streams: :func:`int32_streams` (torch, any shape) and :data:`int32_arrays` / :func:`stream_and_branch` (numpy,
  1-d) over the full int32 range, extremes included.
- Float inputs of a reversible sequence: :func:`stream_values` (any shape, for your own block), :func:`input_for`
  (the seeded generator the engine tests use), :func:`stream_shapes`.
- Neurons: :class:`NeuronCase` (kind, tau, threshold, reset, surrogate, ... and its input), :func:`neuron_cases`,
  :func:`neuron_modules`, :func:`special_values`, :func:`make_inputs`.
- Random spiking branches and sequences: :func:`make_branch`, :func:`make_sequence`, :func:`engine_cases` and
  :func:`sequences` (a sequence with an input for it).

Everything is built on the CPU; move modules and tensors where you test them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from revsnn_triton.neuron import IFNode, LIFNode, ParametricLIFNode
from revsnn_triton.ops.coupling import representable_range
from revsnn_triton.reversible import RevBlock, RevSequence
from revsnn_triton.surrogate import SURROGATES, get_surrogate

__all__ = ["INT32_MIN", "INT32_MAX", "int32_streams", "int32_arrays", "finite_f32", "stream_and_branch",
           "stream_values", "stream_shapes", "input_for", "NeuronCase", "LAYOUTS", "SHAPES", "THRESHOLDS",
           "SURROGATE_NAMES", "special_values", "with_layout", "make_inputs", "neuron_cases", "neuron_modules",
           "SeqToANN", "Tokens", "make_branch", "make_sequence", "engine_cases", "sequences"]

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
Shape = Union[Sequence[int], st.SearchStrategy]


def _shape(draw, shape: Shape) -> tuple[int, ...]:
    drawn = draw(shape) if isinstance(shape, st.SearchStrategy) else shape
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in drawn):
        raise ValueError(f"shape must be a sequence of non-negative ints (or a strategy of them), got {drawn!r}")
    return tuple(drawn)


# ----------------------------------------------------------------------------------------- int32 streams

@st.composite
def int32_streams(draw, shape: Shape) -> torch.Tensor:
    """int32 tensors of ``shape`` (a tuple, or a strategy of tuples) uniform over the full int32 range, with
    ``INT32_MIN``, ``INT32_MAX``, 0 and -1 in random places: streams a coupling must invert however their values
    wrap around."""
    shape = _shape(draw, shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 63 - 1)))
    q = torch.randint(INT32_MIN, INT32_MAX + 1, shape, dtype=torch.int64, generator=g).to(torch.int32)
    extremes = torch.tensor([INT32_MIN, INT32_MAX, 0, -1], dtype=torch.int32)
    pick = torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.05, 0.5]))
    return torch.where(pick, extremes[torch.randint(len(extremes), shape, generator=g)], q)


int32_arrays = st.integers(1, 300).flatmap(lambda n: hnp.arrays(np.int32, n))
finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def stream_and_branch(draw):
    """``(x, f)``: a 1-d int32 stream (numpy) and a finite float32 branch output of its length."""
    n = draw(st.integers(1, 300))
    x = draw(hnp.arrays(np.int32, n))
    f = draw(hnp.arrays(np.float32, n, elements=finite_f32))
    return x, f


# ------------------------------------------------------------------------------------ float stream inputs

@st.composite
def stream_values(draw, shape: Shape, *, threshold: float = 1.0, frac_bits: int = 16,
                  scales: Sequence[float] = (1e-3, 0.7, 3.0, 300.0), dtype: torch.dtype = torch.float32,
                  max_magnitude: Optional[float] = None) -> torch.Tensor:
    """Float inputs of a reversible sequence, of ``shape`` (a tuple or a strategy of tuples): Gaussian values times
    one of ``scales``, and in random places ``+-threshold`` (where spiking neurons fire or not), ``+-0.0``,
    subnormals and huge values (up to ``max_magnitude``, default a quarter of the grid's range for ``frac_bits``:
    8192 at 16 bits, far beyond what float32 holds on the grid exactly). Every value is inside the grid's range,
    so the sequence can encode it."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"stream_values: dtype must be a float dtype, got {dtype!r}")
    shape = _shape(draw, shape)
    limit = representable_range(frac_bits)[1] / 4 if max_magnitude is None else float(max_magnitude)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 63 - 1)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from(list(scales)))
    tiny = torch.finfo(dtype).smallest_normal / 4
    specials = torch.tensor([threshold, -threshold, 0.0, -0.0, tiny, -tiny, limit, -limit], dtype=torch.float64)
    pick = torch.rand(shape, generator=g) < draw(st.sampled_from([0.0, 0.1, 0.3]))
    x = torch.where(pick, specials[torch.randint(len(specials), shape, generator=g)], x)
    return x.clamp(-limit, limit).to(dtype)


def stream_shapes(kind: str = "conv", *, width: Optional[int] = None, max_T: int = 3, max_batch: int = 3,
                  max_width: int = 3, max_size: int = 4) -> st.SearchStrategy:
    """Shapes of a sequence input, ``T`` from 1: ``kind="conv"``: ``[T, B, 2 * width, H, W]`` (split_dim 2);
    ``"tokens"``: ``[T, B, N, 2 * width]`` (split_dim -1). ``width`` (channels of a half) fixed, or drawn up to
    ``max_width``."""
    if kind not in ("conv", "tokens"):
        raise ValueError(f"stream_shapes: kind must be 'conv' or 'tokens', got {kind!r}")
    if width is not None and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise ValueError(f"stream_shapes: width must be None or an int >= 1, got {width!r}")
    T, B, s = st.integers(1, max_T), st.integers(1, max_batch), st.integers(1, max_size)
    w = st.integers(1, max_width) if width is None else st.just(width)
    if kind == "conv":
        return st.tuples(T, B, w.map(lambda n: 2 * n), s, s)
    return st.tuples(T, B, s, w.map(lambda n: 2 * n))


def input_for(kind: str, T: int, B: int, width: int, size: int, scale: float, seed: int) -> torch.Tensor:
    """Random stream input with mixed magnitudes: Gaussian times ``scale``, some exact threshold values
    (1.0), negative zeros and subnormals."""
    g = torch.Generator().manual_seed(seed)
    shape = (T, B, 2 * width, size, size) if kind == "conv" else (T, B, size, 2 * width)
    x = torch.randn(shape, generator=g) * scale
    pick = torch.rand(shape, generator=g)
    x = torch.where(pick < 0.1, torch.ones_like(x), x)
    x = torch.where((pick >= 0.1) & (pick < 0.15), torch.full_like(x, -0.0), x)
    x = torch.where((pick >= 0.15) & (pick < 0.2), torch.full_like(x, 1e-40), x)
    return x


# ------------------------------------------------------------------------------------------------ neurons

LAYOUTS = ("contiguous", "transposed", "channels_last", "time_inner", "sliced", "expand")
SURROGATE_NAMES = sorted(SURROGATES)


@dataclass(frozen=True)
class NeuronCase:
    """One neuron call: the neuron (``w`` is PLIF's op argument; the modules take ``init_tau=tau``), the input
    ``[T, *shape]`` (dtype, layout, magnitude ``scale``, fraction of special values, seed), an initial state,
    and optionally a per-channel affine input along ``channel_dim``."""

    kind: str = "lif"
    tau: float = 2.0
    decay_input: bool = True
    v_threshold: float = 1.0
    v_reset: float | None = 0.0
    detach_reset: bool = False
    surrogate: str = "sigmoid"
    alpha: float | None = None  # None: the surrogate's default
    T: int = 3
    shape: tuple[int, ...] = (3, 5)
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    random_v_init: bool = True
    scale: float = 1.0
    special_frac: float = 0.2
    w: float = 0.3
    seed: int = 0
    channel_dim: int | None = None

    @property
    def alpha_value(self) -> float:
        return SURROGATES[self.surrogate].default_alpha if self.alpha is None else self.alpha

    def kwargs(self) -> dict:
        """Keyword arguments of ``multistep_neuron`` / ``multistep_autograd`` (besides tensors)."""
        kw = dict(decay_input=self.decay_input, v_threshold=self.v_threshold, v_reset=self.v_reset,
                  detach_reset=self.detach_reset, surrogate=self.surrogate, alpha=self.alpha_value)
        if self.kind == "lif":
            kw["tau"] = self.tau
        return kw

    def module(self, step_mode: str = "m", **kwargs) -> nn.Module:
        """The neuron module of this case (:class:`IFNode`, :class:`LIFNode` or :class:`ParametricLIFNode` with
        ``init_tau=tau``); ``kwargs`` go to its constructor (e.g. ``backend``, ``save``)."""
        common = dict(v_threshold=self.v_threshold, v_reset=self.v_reset, detach_reset=self.detach_reset,
                      surrogate_function=get_surrogate(self.surrogate, self.alpha_value), step_mode=step_mode,
                      **kwargs)
        if self.kind == "if":
            return IFNode(**common)
        if self.kind == "lif":
            return LIFNode(tau=self.tau, decay_input=self.decay_input, **common)
        return ParametricLIFNode(init_tau=self.tau, decay_input=self.decay_input, **common)


def special_values(case: NeuronCase) -> torch.Tensor:
    """At the threshold (also after LIF's division) and one fp32 ulp around it, signed zeros, subnormals and
    huge values of the dtype."""
    tiny = torch.finfo(case.dtype).smallest_normal / 4
    huge = 3e4 if case.dtype == torch.float16 else 1e30
    th = case.v_threshold
    return torch.tensor([th, th * case.tau, 2 * th, -th, 0.0, -0.0, tiny, -tiny, huge, -huge, th + 1e-7, th - 1e-7],
                        dtype=torch.float32)


def with_layout(base: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``base [T, *shape]`` but with the named memory layout."""
    if layout == "transposed" and base.dim() >= 3:
        return base.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "channels_last" and base.dim() >= 3:
        return base.movedim(2, -1).contiguous().movedim(-1, 2)
    if layout == "time_inner":
        return base.movedim(0, -1).contiguous().movedim(-1, 0)
    if layout == "sliced":
        big = torch.zeros((base.shape[0], *base.shape[1:-1], 2 * base.shape[-1] + 1), dtype=base.dtype)
        view = big[..., 1::2]
        view.copy_(base)
        return view
    if layout == "expand":
        return base[:1].expand(base.shape)
    return base.contiguous()


def make_inputs(case: NeuronCase, device: str = "cpu"):
    """``x_seq`` (in ``case.layout``), ``v_init`` (or None), ``w`` (or None), grads of spikes and of v_final."""
    g = torch.Generator().manual_seed(case.seed)
    full = (case.T, *case.shape)
    x = torch.randn(full, generator=g) * case.scale + 0.5 * case.v_threshold
    specials = special_values(case)
    pick = torch.rand(full, generator=g) < case.special_frac
    x = torch.where(pick, specials[torch.randint(len(specials), full, generator=g)], x).to(case.dtype)
    x = with_layout(x, case.layout).to(device)
    v_init = (torch.randn(case.shape, generator=g) * 0.5).to(device) if case.random_v_init else None
    w = torch.tensor([case.w], device=device) if case.kind == "plif" else None
    grad_s = torch.randn(full, generator=g).to(case.dtype).to(device)
    grad_v = torch.randn(case.shape, generator=g).to(device)
    return x, v_init, w, grad_s, grad_v


SHAPES = ((1,), (7,), (131,), (3, 5), (2, 3, 4), (1, 5, 1), (2, 1, 3, 3))
THRESHOLDS = st.sampled_from([1.0, 0.5, 0.0, -0.5]) | st.floats(-2.0, 3.0)


@st.composite
def neuron_cases(draw, dtypes=(torch.float32, torch.float32, torch.bfloat16, torch.float16), affine: bool = True,
                 layouts=LAYOUTS, shapes=SHAPES, thresholds=THRESHOLDS, max_T: int = 6,
                 kinds=("if", "lif", "plif")) -> NeuronCase:
    """:class:`NeuronCase` s: every kind, surrogate, reset and layout; tau, threshold and alpha from ranges too;
    ``T`` from 1."""
    name = draw(st.sampled_from(SURROGATE_NAMES))
    shape = draw(st.sampled_from(shapes))
    channel_dims = st.none() | st.none() | st.integers(-len(shape), len(shape) - 1) if affine else st.none()
    return NeuronCase(
        kind=draw(st.sampled_from(list(kinds))),
        tau=draw(st.sampled_from([1.5, 2.0, 3.0]) | st.floats(1.01, 20.0)),
        decay_input=draw(st.booleans()),
        v_threshold=draw(thresholds),
        v_reset=draw(st.sampled_from([0.0, None, -0.5, 0.3, -1.0])),
        detach_reset=draw(st.booleans()),
        surrogate=name,
        alpha=draw(st.none() | st.floats(0.25, 8.0)),
        T=draw(st.integers(1, max_T)),
        shape=shape,
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(layouts)),
        random_v_init=draw(st.booleans()),
        scale=draw(st.sampled_from([0.3, 1.0, 3.0, 30.0])),
        special_frac=draw(st.sampled_from([0.0, 0.2, 0.6])),
        w=draw(st.floats(-3.0, 3.0)),
        seed=draw(st.integers(0, 2**31 - 1)),
        channel_dim=draw(channel_dims),
    )


def neuron_modules(kinds=("if", "lif", "plif"), step_mode: str = "m", **kwargs) -> st.SearchStrategy:
    """Neuron modules (multi-step by default) with random tau, threshold, reset, surrogate and alpha, built by
    :meth:`NeuronCase.module`; ``kwargs`` go to the constructor."""
    return neuron_cases(kinds=kinds).map(lambda case: case.module(step_mode, **kwargs))


# --------------------------------------------------------------------------------- branches and sequences

class SeqToANN(nn.Module):
    """Apply a per-frame module to ``[T, B, ...]`` by merging T and B."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*modules)

    def forward(self, x):
        y = self.body(x.flatten(0, 1))
        return y.reshape(x.shape[:2] + y.shape[1:])


class Tokens(nn.Module):
    """``[T, B, N, D]`` -> body on rows -> same shape."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x).reshape(x.shape)


def make_branch(kind: str, width: int, *, neuron: str = "if", bn: bool = True, dropout: float = 0.0) -> nn.Module:
    """A small spiking branch mapping a half to the same shape: neuron -> conv/linear -> [BN] -> [dropout].
    ``kind="conv"``: ``[T, B, width, H, W]``; ``kind="linear"``: tokens ``[T, B, N, width]``."""
    node = {"if": lambda: IFNode(step_mode="m"), "lif": lambda: LIFNode(tau=2.0, step_mode="m"),
            "none": nn.Identity}[neuron]()  # "none": a non-spiking branch (float64 runs)
    if kind == "conv":
        layers = [nn.Conv2d(width, width, 3, padding=1)] + ([nn.BatchNorm2d(width)] if bn else [])
    else:
        layers = [nn.Flatten(0, 1), nn.Linear(width, width)]
        if bn:
            layers += [nn.Flatten(0, 1), nn.BatchNorm1d(width)]
        layers = [Tokens(nn.Sequential(*layers))]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(node, SeqToANN(*layers) if kind == "conv" else nn.Sequential(*layers))


def make_sequence(kind: str, depth: int, width: int, *, seed: int = 0, frac_bits: int = 16,
                  **branch_kw) -> RevSequence:
    """``depth`` blocks of :func:`make_branch` F and G (``kind="conv"``: split_dim 2; ``"linear"``: -1), seeded
    weights, BatchNorm affine parameters away from their identity defaults."""
    torch.manual_seed(seed)
    split_dim = 2 if kind == "conv" else -1
    blocks = [RevBlock(make_branch(kind, width, **branch_kw), make_branch(kind, width, **branch_kw),
                       split_dim=split_dim) for _ in range(depth)]
    seq = RevSequence(blocks, frac_bits=frac_bits)
    with torch.no_grad():  # non-trivial BatchNorm affine parameters
        for m in seq.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return seq


@st.composite
def engine_cases(draw, kinds=("conv", "linear"), max_depth: int = 8):
    """Keyword cases of a random sequence and its input: ``kind``, ``depth``, ``T`` (from 1), ``B``, ``width``,
    ``size``, input ``scale``, ``frac_bits``, ``neuron`` (IF/LIF), ``bn``, ``dropout``, ``seed``."""
    kind = draw(st.sampled_from(list(kinds)))
    return dict(
        kind=kind, depth=draw(st.integers(1, max_depth)), T=draw(st.integers(1, 3)), B=draw(st.integers(1, 3)),
        width=draw(st.integers(1, 3)), size=draw(st.integers(2, 4)),
        scale=draw(st.sampled_from([1e-3, 0.7, 3.0, 300.0])), frac_bits=draw(st.sampled_from([8, 16, 20])),
        neuron=draw(st.sampled_from(["if", "lif"])), bn=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.3])), seed=draw(st.integers(0, 2 ** 16)))


def sequences(kinds=("conv", "linear"), max_depth: int = 4) -> st.SearchStrategy:
    """``(seq, x)``: a random :class:`RevSequence` of spiking branches (:func:`engine_cases`,
    :func:`make_sequence`) and an input for it (:func:`input_for`)."""
    def build(case: dict):
        seq = make_sequence(case["kind"], case["depth"], case["width"], neuron=case["neuron"], bn=case["bn"],
                            dropout=case["dropout"], frac_bits=case["frac_bits"], seed=case["seed"])
        x = input_for(case["kind"], case["T"], case["B"], case["width"], case["size"], case["scale"], case["seed"])
        return seq, x
    return engine_cases(kinds, max_depth).map(build)
