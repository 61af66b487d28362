"""Neuron test cases shared by the kernel, op and parity tests: one ``Case``, its inputs, its Hypothesis strategy.

Inputs never sit only near zero: ``special_values`` puts values at the threshold (also after LIF's division),
signed zeros, subnormals and huge values of the dtype among the random ones; layouts cover every stride pattern
the op reads in place (transposed, channels_last, time innermost, sliced, expanded over T).
"""
from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st

from revsnn_triton import runtime
from revsnn_triton.ops.neuron.reference import channel_view, neuron_forward_reference
from revsnn_triton.ops.neuron.spec import NeuronConfig, check_neuron_args
from revsnn_triton.surrogate import SURROGATES

# Hypothesis tests cannot take the function-scoped `kernel_device` fixture; same rule as conftest's.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYOUTS = ("contiguous", "transposed", "channels_last", "time_inner", "sliced", "expand")
SURROGATE_NAMES = sorted(SURROGATES)


def kernels_on(device: str):
    """Context in which ops on ``device`` run the Triton kernels (the interpreter on CPU tensors)."""
    if device == "cpu":
        if not runtime.interpreter_enabled():
            pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 before triton is imported (see conftest)")
        return runtime.cpu_kernels("triton")
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Case:
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


def special_values(case: Case) -> torch.Tensor:
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


def make_inputs(case: Case, device: str = "cpu"):
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


def make_affine(case: Case, device: str = "cpu") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(scale, shift)`` fp32 ``[C]`` for ``case.channel_dim`` (with zeros, negatives and exact ones among the
    scales), or ``(None, None)``."""
    if case.channel_dim is None:
        return None, None
    g = torch.Generator().manual_seed(case.seed + 1)
    channels = case.shape[case.channel_dim]
    scale = torch.randn(channels, generator=g) * 1.5
    specials = torch.tensor([0.0, 1.0, -1.0, 0.5, 1e-3, 3.0])
    pick = torch.rand(channels, generator=g) < 0.3
    scale = torch.where(pick, specials[torch.randint(len(specials), (channels,), generator=g)], scale)
    shift = torch.randn(channels, generator=g) * 0.5
    return scale.to(device), shift.to(device)


def affine_kwargs(case: Case, device: str = "cpu") -> dict:
    """``scale``, ``shift``, ``channel_dim`` for ``multistep_neuron`` (empty without an affine input)."""
    if case.channel_dim is None:
        return {}
    scale, shift = make_affine(case, device)
    return dict(scale=scale, shift=shift, channel_dim=case.channel_dim)


def explicit_input(case: Case, x: torch.Tensor) -> torch.Tensor:
    """``y = x * scale[c] + shift[c]`` written out in fp32 (what the fused affine input must equal)."""
    scale, shift = make_affine(case, x.device)
    view = [1] * (x.dim() - 1)
    view[case.channel_dim] = -1
    return x.float() * scale.view(view) + shift.view(view)


def config(case: Case, x: torch.Tensor) -> NeuronConfig:
    """The case's validated configuration, as the op computes it."""
    return check_neuron_args(x, None, tau=case.tau if case.kind == "lif" else None,
                             w=torch.zeros(1, device=x.device) if case.kind == "plif" else None,
                             decay_input=case.decay_input, v_threshold=case.v_threshold, v_reset=case.v_reset,
                             detach_reset=case.detach_reset, surrogate=case.surrogate, alpha=case.alpha_value,
                             **affine_kwargs(case, x.device))


def affine_views(case: Case, cfg: NeuronConfig, x: torch.Tensor):
    """The reference's ``affine`` argument: ``(scale, shift)`` broadcast over x's per-step shape, or None."""
    scale, shift = make_affine(case, x.device)
    if scale is None:
        return None
    return channel_view(scale, cfg.channel_dim, x.shape[1:]), channel_view(shift, cfg.channel_dim, x.shape[1:])


def plif_w_term_scale(case: Case, x: torch.Tensor, v_init: torch.Tensor | None, w: torch.Tensor,
                      grad_x: torch.Tensor) -> float:
    """An upper bound of the terms ``dL/dH * dH/dq * q (1 - q)`` summed into PLIF's grad of ``w``, for the
    reduction-length tolerance: ``|dL/dH| <= |grad_x| / q`` (``decay_input``; else ``grad_x``) and
    ``|dH/dq| <= |Y| + |V| + |v_reset|`` with ``|V| <= max(|H|, |v_init|, |v_reset| + |v_threshold|)``."""
    x = x.detach().cpu()
    cfg = config(case, x)
    q = torch.sigmoid(w.detach().cpu().float()).reshape(())
    v0 = torch.full(x.shape[1:], cfg.v_reset) if v_init is None else v_init.detach().cpu()
    affine = affine_views(case, cfg, x)
    _, _, h = neuron_forward_reference(x, v0, q, cfg, affine=affine)
    y = x.float() if affine is None else x.float() * affine[0] + affine[1]
    finite_max = lambda t: float(torch.nan_to_num(t.abs(), posinf=0.0).max()) if t.numel() else 0.0  # noqa: E731
    v_max = max(finite_max(h), finite_max(v0), abs(cfg.v_reset) + abs(cfg.v_threshold))
    grad_h = finite_max(grad_x.float()) / (float(q) if cfg.decay_input else 1.0)
    dh_dq = finite_max(y) + v_max + abs(cfg.v_reset)
    return grad_h * dh_dq * float(q * (1 - q))


SHAPES = ((1,), (7,), (131,), (3, 5), (2, 3, 4), (1, 5, 1), (2, 1, 3, 3))
THRESHOLDS = st.sampled_from([1.0, 0.5, 0.0, -0.5]) | st.floats(-2.0, 3.0)


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float32, torch.bfloat16, torch.float16), affine: bool = True,
          layouts=LAYOUTS, shapes=SHAPES, thresholds=THRESHOLDS, max_T: int = 6) -> Case:
    name = draw(st.sampled_from(SURROGATE_NAMES))
    shape = draw(st.sampled_from(shapes))
    channel_dims = st.none() | st.none() | st.integers(-len(shape), len(shape) - 1) if affine else st.none()
    return Case(
        kind=draw(st.sampled_from(["if", "lif", "plif"])),
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


def n_terms(*tensors: torch.Tensor) -> int:
    """Neuron-steps summed into a parameter's gradient (PLIF's w)."""
    return max(1, sum(math.prod(t.shape) for t in tensors))


# ------------------------------------------------------------------------------ memory accesses

class AccessLog:
    """Bytes the interpreted kernels read and write, by named tensor (its storage's address range), per launch:
    streamed tensors count every access (each pass over them costs its bytes), the broadcast operands
    (``q``, ``scale``, ``shift``) their distinct bytes. Addresses outside every named tensor count as
    ``"h (transient)"`` (the one buffer the launchers allocate themselves)."""

    BROADCAST = ("q", "scale", "shift")

    def __init__(self, tensors: dict[str, torch.Tensor | None]):
        self.spans = []
        for name, t in tensors.items():
            if t is not None and t.numel():
                start = t.untyped_storage().data_ptr()
                self.spans.append((start, start + t.untyped_storage().nbytes(), name))
        self.reads: collections.Counter = collections.Counter()
        self.writes: collections.Counter = collections.Counter()
        self._seen: set = set()
        self.launch = 0

    def account(self, counter, ptrs, mask) -> None:
        import numpy as np
        addrs = ptrs.data.reshape(-1)
        if mask is not None:  # a combined mask (`a & b`) can come as integers: as an index it would pick elements
            addrs = addrs[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape).reshape(-1)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        claimed = np.zeros(addrs.shape, dtype=bool)
        for start, end, name in self.spans:
            inside = (addrs >= start) & (addrs < end)
            claimed |= inside
            if name in self.BROADCAST:
                for a in addrs[inside].tolist():
                    if (self.launch, a) not in self._seen:
                        self._seen.add((self.launch, a))
                        counter[name] += size
            else:
                counter[name] += size * int(inside.sum())
        counter["h (transient)"] += size * int((~claimed).sum())

    def plain(self) -> tuple[dict, dict]:
        return ({k: v for k, v in self.reads.items() if v}, {k: v for k, v in self.writes.items() if v})


@contextlib.contextmanager
def recorded_accesses(monkeypatch, tensors: dict):
    """Inside the block, every load and store of the interpreted kernels (and every launch of the neuron
    launchers) is counted in the :class:`AccessLog` it yields."""
    from triton.runtime import interpreter
    log = AccessLog(tensors)
    builder = interpreter.InterpreterBuilder
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store
    load, store = builder.create_load, builder.create_store

    def record_masked_load(self, ptrs, mask, *args):
        log.account(log.reads, ptrs, mask)
        return masked_load(self, ptrs, mask, *args)

    def record_masked_store(self, ptrs, value, mask, *args):
        log.account(log.writes, ptrs, mask)
        return masked_store(self, ptrs, value, mask, *args)

    def record_load(self, ptr, *args):
        log.account(log.reads, ptr, None)
        return load(self, ptr, *args)

    def record_store(self, ptr, value, *args):
        log.account(log.writes, ptr, None)
        return store(self, ptr, value, *args)

    from revsnn_triton.kernels import neurons as K
    run = K._run

    def next_launch(*args, **kwargs):
        log.launch += 1
        return run(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(builder, "create_masked_load", record_masked_load)
        mp.setattr(builder, "create_masked_store", record_masked_store)
        mp.setattr(builder, "create_load", record_load)
        mp.setattr(builder, "create_store", record_store)
        mp.setattr(K, "_run", next_launch)
        yield log
