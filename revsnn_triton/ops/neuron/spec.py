"""What the multi-step neuron op is: its arguments, its memory layout, what it keeps and what it moves.

Every layer of the neuron family reads this module and none repeats it: the kernels (``kernels/neurons.py``)
take their constexpr ids, kernel names and layout from here; the reference, the CPU backend and the op take the
validated :class:`NeuronConfig` and the :data:`SAVE_PLANS`; the benchmark and the tests take the byte plan
(:func:`forward_traffic`, :func:`backward_traffic`). It imports nothing but torch.

- :data:`KINDS` (IF, LIF, PLIF), :data:`SURROGATES` (the fused surrogate derivatives, in spikingjelly 2.0's
  order), :data:`INPUT_DTYPES`; the kernels select kinds and surrogates by their index (:data:`KIND_IDS`,
  :data:`SURROGATE_IDS`).
- :func:`check_neuron_args` validates a call once and returns a :class:`NeuronConfig`.
- The neuron layout: every tensor of the op is dense with time outermost and the per-step dims in ``x``'s
  stride order (:func:`empty_neuron_layout`), so that neuron ``n`` of step ``t`` is at offset ``t * N + n``
  and ``channels_last`` stays ``channels_last``.
- :data:`SAVE_PLANS`: per save mode, what the forward writes for backward and what the backward reads.
- The byte plan: bytes each launch reads and writes, per tensor (tested against the addresses the kernels
  really touch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
import torch

KINDS = ("if", "lif", "plif")
KIND_IDS = {name: i for i, name in enumerate(KINDS)}
# The fused surrogate derivatives (formulas: revsnn_triton.surrogate), numbered as spikingjelly 2.0 numbers them.
SURROGATES = ("sigmoid", "atan", "piecewise_quadratic", "piecewise_exp", "soft_sign", "super_spike", "erf")
SURROGATE_IDS = {name: i for i, name in enumerate(SURROGATES)}
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Kernel names: the launch-configuration cache keys and what the tuner measures.
FORWARD_KERNEL = "neuron_forward"
BACKWARD_KERNEL = "neuron_backward"  # from the saved H (or a transient one)
RECOMPUTE_KERNEL = "neuron_backward_recompute"  # save="input", H recomputed in registers
KERNELS = (FORWARD_KERNEL, BACKWARD_KERNEL, RECOMPUTE_KERNEL)
# Longest sequence whose save="input" backward recomputes H in registers (T unrolled: one compiled variant per T).
MAX_RECOMPUTE_T = 32


@dataclass(frozen=True)
class NeuronConfig:
    """Validated scalar configuration of a multi-step neuron (tensors are passed separately)."""

    kind: str  # "if" | "lif" | "plif"
    tau: float  # LIF only (1.0 otherwise, unused)
    decay_input: bool
    v_threshold: float
    hard_reset: bool
    v_reset: float  # the hard-reset value; 0.0 for soft reset (that is what the charge uses)
    detach_reset: bool
    surrogate: str
    alpha: float
    channel_dim: int | None = None  # dim of the per-step shape that scale/shift index; None: no affine input

    @property
    def affine(self) -> bool:
        return self.channel_dim is not None


# ------------------------------------------------------------------------------------------ validation

def _is_finite(value: float) -> bool:
    # Not math.isfinite: under torch.compile(dynamic=True) Dynamo cannot trace it on a float argument.
    return value - value == 0


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_neuron_args(x_seq, v_init, *, tau, w, decay_input, v_threshold, v_reset, detach_reset, surrogate,
                      alpha, save="h", scale=None, shift=None, channel_dim=None,
                      where="multistep_neuron") -> NeuronConfig:
    """Validate the arguments of a multi-step neuron call; raise ``TypeError``/``ValueError`` naming the argument.

    Accepted: ``x_seq`` a float32/float16/bfloat16 tensor with at least 2 dims ``[T, *shape]``, T >= 1;
    ``v_init`` None or a float32 tensor of shape ``shape`` on ``x_seq``'s device; ``w`` None or a 1-element
    floating tensor on the same device (PLIF); ``tau`` None or a finite float > 1 (LIF; ignored with ``w``);
    finite ``v_threshold``, ``v_reset`` (None = soft reset), ``alpha`` > 0; ``surrogate`` one of
    :data:`SURROGATES`; ``save`` one of :data:`SAVE_MODES`; ``scale`` and ``shift`` both None, or both float32
    1-D tensors of length ``x_seq.shape[1 + channel_dim]`` on ``x_seq``'s device, with ``channel_dim`` an int
    indexing ``x_seq.shape[1:]`` (negative counts from the end; returned normalized).
    """
    if not isinstance(x_seq, torch.Tensor):
        raise TypeError(f"{where}: x_seq must be a torch.Tensor, got {type(x_seq).__name__}")
    if x_seq.dtype not in INPUT_DTYPES:
        raise TypeError(f"{where}: x_seq must have dtype float32, float16 or bfloat16, got {x_seq.dtype}")
    if x_seq.dim() < 2:
        raise ValueError(f"{where}: x_seq must have a time axis first, shape [T, *shape] with at least 2 dims; "
                         f"got shape {tuple(x_seq.shape)}")
    if x_seq.shape[0] < 1:
        raise ValueError(f"{where}: x_seq must have T >= 1 time steps, got shape {tuple(x_seq.shape)}")
    if v_init is not None:
        if not isinstance(v_init, torch.Tensor):
            raise TypeError(f"{where}: v_init must be a torch.Tensor or None, got {type(v_init).__name__}")
        if v_init.dtype != torch.float32:
            raise TypeError(f"{where}: v_init must be float32 (the membrane is kept in fp32), got {v_init.dtype}")
        if v_init.shape != x_seq.shape[1:]:
            raise ValueError(f"{where}: v_init must have shape {tuple(x_seq.shape[1:])} (x_seq without T), "
                             f"got {tuple(v_init.shape)}")
        if v_init.device != x_seq.device:
            raise ValueError(f"{where}: v_init is on {v_init.device} but x_seq is on {x_seq.device}")
    if w is not None:
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{where}: w must be a torch.Tensor or None, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"{where}: w must be a floating-point tensor, got {w.dtype}")
        if w.numel() != 1:
            raise ValueError(f"{where}: w must have exactly 1 element (PLIF's shared 1/tau = sigmoid(w)), "
                             f"got shape {tuple(w.shape)}")
        if w.device != x_seq.device:
            raise ValueError(f"{where}: w is on {w.device} but x_seq is on {x_seq.device}")
        kind = "plif"
    elif tau is not None:
        kind = "lif"
    else:
        kind = "if"
    if kind == "lif":
        if not _is_real_number(tau):
            raise TypeError(f"{where}: tau must be a float, got {type(tau).__name__}")
        if not _is_finite(tau) or tau <= 1:
            raise ValueError(f"{where}: tau must be finite and > 1 for LIF, got {tau}")
    if not _is_real_number(v_threshold):
        raise TypeError(f"{where}: v_threshold must be a float, got {type(v_threshold).__name__}")
    if not _is_finite(v_threshold):
        raise ValueError(f"{where}: v_threshold must be finite, got {v_threshold}")
    if v_reset is not None:
        if not _is_real_number(v_reset):
            raise TypeError(f"{where}: v_reset must be a float or None (soft reset), got {type(v_reset).__name__}")
        if not _is_finite(v_reset):
            raise ValueError(f"{where}: v_reset must be finite or None (soft reset), got {v_reset}")
    if not isinstance(surrogate, str):
        raise TypeError(f"{where}: surrogate must be a name (str), got {type(surrogate).__name__}; "
                        f"fused surrogates: {sorted(SURROGATES)}")
    if surrogate not in SURROGATES:
        raise ValueError(f"{where}: surrogate {surrogate!r} has no fused kernel; fused surrogates: "
                         f"{sorted(SURROGATES)}")
    if not _is_real_number(alpha):
        raise TypeError(f"{where}: alpha must be a float, got {type(alpha).__name__}")
    if not _is_finite(alpha) or alpha <= 0:
        raise ValueError(f"{where}: alpha must be finite and > 0, got {alpha}")
    if save not in SAVE_MODES:
        raise ValueError(f"{where}: save must be one of {SAVE_MODES}, got {save!r}")
    for name, flag in (("decay_input", decay_input), ("detach_reset", detach_reset)):
        if not isinstance(flag, bool):
            raise TypeError(f"{where}: {name} must be a bool, got {type(flag).__name__}")
    return NeuronConfig(kind=kind, tau=float(tau) if kind == "lif" else 1.0, decay_input=decay_input,
                        v_threshold=float(v_threshold), hard_reset=v_reset is not None,
                        v_reset=0.0 if v_reset is None else float(v_reset), detach_reset=detach_reset,
                        surrogate=surrogate, alpha=float(alpha),
                        channel_dim=_check_affine(x_seq, scale, shift, channel_dim, where))


def _check_affine(x_seq, scale, shift, channel_dim, where: str) -> int | None:
    """The normalized ``channel_dim`` of a valid ``scale``/``shift`` pair, or None when both are None."""
    if scale is None and shift is None:
        if channel_dim is not None:
            raise ValueError(f"{where}: channel_dim={channel_dim!r} is given without scale and shift; "
                             f"pass both of them with it, or none of the three")
        return None
    if scale is None or shift is None:
        given, missing = ("scale", "shift") if shift is None else ("shift", "scale")
        raise ValueError(f"{where}: {given} is given but {missing} is None; pass both (the neuron's input is "
                         f"x * scale[c] + shift[c]) or neither")
    ndim = x_seq.dim() - 1
    if channel_dim is None:
        raise ValueError(f"{where}: channel_dim is required with scale and shift (the dim of x_seq.shape[1:] "
                         f"that they index, e.g. 1 for [T, B, C, H, W])")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"{where}: channel_dim must be an int, got {type(channel_dim).__name__}")
    if not -ndim <= channel_dim < ndim:
        raise ValueError(f"{where}: channel_dim must index x_seq.shape[1:] = {tuple(x_seq.shape[1:])}, i.e. lie "
                         f"in [{-ndim}, {ndim - 1}], got {channel_dim}")
    channel_dim %= ndim
    channels = x_seq.shape[1 + channel_dim]
    for name, t in (("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{where}: {name} must be float32 (the input transform runs in fp32), got {t.dtype}")
        if t.shape != (channels,):
            raise ValueError(f"{where}: {name} must have shape ({channels},) (x_seq.shape[{1 + channel_dim}], "
                             f"channel_dim={channel_dim}), got {tuple(t.shape)}")
        if t.device != x_seq.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x_seq is on {x_seq.device}")
    return channel_dim


# ---------------------------------------------------------------------------------------- neuron layout

def neuron_perm(x: torch.Tensor) -> list[int]:
    """Inner dims of ``x [T, *shape]`` (numbered from 0 over ``shape``) from outermost to innermost in memory:
    sorted by decreasing stride, ties by dim index; size-1 dims are left out (their stride is irrelevant)."""
    dims = [d for d in range(x.dim() - 1) if x.shape[d + 1] != 1]
    return sorted(dims, key=lambda d: -x.stride(d + 1))


def neuron_layout_strides(x: torch.Tensor, with_time: bool) -> list[int]:
    """Strides of the dense neuron layout of ``x``: time outermost (``with_time``), inner dims in
    :func:`neuron_perm` order, size-1 dims stride 1. Applied to a tensor already in it, gives it back."""
    shape = list(x.shape[1:])
    strides = [1] * len(shape)
    step = 1
    for d in reversed(neuron_perm(x)):
        strides[d] = step
        step *= shape[d]
    return [step] + strides if with_time else strides


def empty_neuron_layout(x: torch.Tensor, dtype: torch.dtype, with_time: bool = True) -> torch.Tensor:
    """An uninitialized tensor in the neuron layout of ``x``: ``[T, *shape]`` (or ``[*shape]``), ``dtype``."""
    shape = list(x.shape) if with_time else list(x.shape[1:])
    return torch.empty_strided(shape, neuron_layout_strides(x, with_time), dtype=dtype, device=x.device)


def has_neuron_layout(t: torch.Tensor, template: torch.Tensor, with_time: bool) -> bool:
    """Whether ``t`` is laid out as :func:`empty_neuron_layout` would make it (strides of size-1 dims ignored)."""
    expected = neuron_layout_strides(template, with_time)
    return all(size == 1 or stride == e for size, stride, e in zip(t.shape, t.stride(), expected))


def to_neuron_layout(t: torch.Tensor, template: torch.Tensor, with_time: bool) -> torch.Tensor:
    """``t`` itself if it already has the neuron layout of ``template``, else a copy in it."""
    if has_neuron_layout(t, template, with_time):
        return t
    out = empty_neuron_layout(template, t.dtype, with_time)
    out.copy_(t)
    return out


def channel_geometry(x: torch.Tensor, channel_dim: int) -> tuple[int, int]:
    """``(inner, size)`` such that neuron ``n`` of ``x [T, *shape]``, numbered in its neuron layout, belongs to
    channel ``(n // inner) % size`` of dim ``channel_dim`` of ``shape``: ``inner`` is the number of neurons of
    the dims laid out inside that dim."""
    perm = neuron_perm(x)
    if channel_dim not in perm:  # a channel dim of size 1
        return 1, 1
    inner = math.prod(x.shape[1 + d] for d in perm[perm.index(channel_dim) + 1:])
    return inner, x.shape[1 + channel_dim]


# ------------------------------------------------------------------------------------------- save plans

@dataclass(frozen=True)
class SavePlan:
    """What one save mode keeps for backward and what its backward reads.

    ``saved_dtype``: the per-neuron-step tensor the forward writes (``forward_save_id`` selects it in the
    forward kernel), or None; ``recomputes``: the backward re-runs the forward recurrence from ``x``;
    ``exact``: its gradients are bit-identical to ``"h"``'s."""

    name: str
    saved_dtype: torch.dtype | None
    forward_save_id: int
    recomputes: bool
    exact: bool
    doc: str = field(default="", compare=False)

    @property
    def saved_bytes(self) -> int:
        """Bytes per neuron-step of the saved tensor."""
        return 0 if self.saved_dtype is None else torch.empty((), dtype=self.saved_dtype).element_size()

    def backward_kernel(self, T: int) -> str:
        """The backward kernel that runs for ``T`` steps."""
        return RECOMPUTE_KERNEL if self.recomputes and T <= MAX_RECOMPUTE_T else BACKWARD_KERNEL

    def backward_reads_x(self, cfg: NeuronConfig, affine_grad: bool) -> bool:
        """``x`` is read by the recomputation, by PLIF's ``dH/dq = Y - (V - v_reset)`` (``decay_input``) and by
        the grad of ``scale`` (``sum dL/dy * x``)."""
        return self.recomputes or (cfg.kind == "plif" and cfg.decay_input) or affine_grad

    def keeps_x(self, cfg: NeuronConfig) -> bool:
        """What autograd keeps: ``x`` whenever a backward may read it (with an affine input, always)."""
        return self.backward_reads_x(cfg, affine_grad=cfg.affine)

    def backward_reads_v_init(self, cfg: NeuronConfig) -> bool:
        """A given ``v_init`` is read by the recomputation and by PLIF (``V[-1]`` in ``dH[0]/dq``)."""
        return self.recomputes or cfg.kind == "plif"


SAVE_PLANS = {p.name: p for p in (
    SavePlan("h", torch.float32, 1, recomputes=False, exact=True, doc="fp32 H: 4 bytes per neuron-step"),
    SavePlan("h_bf16", torch.bfloat16, 2, recomputes=False, exact=False,
             doc="bf16 H - v_threshold: 2 bytes per neuron-step; spikes from its sign bit, approximate gradients"),
    SavePlan("input", None, 0, recomputes=True, exact=True,
             doc="nothing beyond x: the backward recomputes H (in registers for T <= MAX_RECOMPUTE_T)"),
)}
SAVE_MODES = tuple(SAVE_PLANS)
DEFAULT_SAVE = "input"


# -------------------------------------------------------------------------------------------- byte plan

@dataclass(frozen=True)
class Traffic:
    """Bytes one launch reads and writes in device memory, by tensor. Broadcast operands (PLIF's ``q``, the
    affine ``scale``/``shift``) count once, as their size: every program reads the same few bytes."""

    reads: dict[str, int]
    writes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.reads.values()) + sum(self.writes.values())

    def __add__(self, other: "Traffic") -> "Traffic":
        merge = lambda a, b: {k: a.get(k, 0) + b.get(k, 0) for k in dict.fromkeys([*a, *b])}  # noqa: E731
        return Traffic(merge(self.reads, other.reads), merge(self.writes, other.writes))


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_traffic(save: str, cfg: NeuronConfig, T: int, n: int, dtype: torch.dtype, *, channels: int = 0,
                    v_init_given: bool = False, store_v_final: bool = True) -> Traffic:
    """The forward kernel over ``T`` steps of ``n`` neurons with input ``dtype``: reads ``x`` (and a given
    ``v_init``; the constant default state is not read), writes the spikes (in ``x``'s dtype), the saved
    tensor of ``save`` and, when someone reads it, ``v_final``. ``channels``: the affine input's C."""
    b = _element_size(dtype)
    reads = {"x": T * n * b}
    if v_init_given:
        reads["v_init"] = 4 * n
    reads |= _broadcast_reads(cfg, channels)
    writes = {"spikes": T * n * b}
    plan = SAVE_PLANS[save]
    if plan.saved_bytes:
        writes["saved"] = T * n * plan.saved_bytes
    if store_v_final:
        writes["v_final"] = 4 * n
    return Traffic(reads, writes)


def backward_traffic(save: str, cfg: NeuronConfig, T: int, n: int, dtype: torch.dtype, *, channels: int = 0,
                     v_init_given: bool = False, grad_v_final_given: bool = False,
                     need_grad_v_init: bool = False, affine_grad: bool = True) -> Traffic:
    """The backward launches of ``save`` (the gradients in ``dtype``): reads the spikes' gradient (and a given
    ``grad_v_final``; None means zero, not read), the saved tensor, or ``x`` to recompute H; writes ``grad_x``
    and the per-neuron partials (PLIF's ``w``, the affine ``scale`` and ``shift``), and ``grad_v_init`` only
    when asked. ``save="input"`` beyond ``MAX_RECOMPUTE_T`` steps first re-runs the forward kernel into a
    transient fp32 H (``"h (transient)"``), which the backward kernel then reads."""
    plan = SAVE_PLANS[save]
    b = _element_size(dtype)
    affine_grad = cfg.affine and affine_grad
    reads = {"grad_spikes": T * n * b}
    writes = {"grad_x": T * n * b}
    total = Traffic({}, {})
    if grad_v_final_given:
        reads["grad_v_final"] = 4 * n
    fused = plan.backward_kernel(T) == RECOMPUTE_KERNEL
    x_passes = int(fused) + int((cfg.kind == "plif" and cfg.decay_input) or affine_grad)
    if plan.recomputes and not fused:
        total = forward_traffic(save, cfg, T, n, dtype, channels=channels, v_init_given=v_init_given,
                                store_v_final=False)
        total = Traffic(total.reads, {"h (transient)": T * n * 4})
        reads["h (transient)"] = T * n * 4
    elif plan.saved_bytes:
        reads["saved"] = T * n * plan.saved_bytes
    if x_passes:
        reads["x"] = x_passes * T * n * b
    if v_init_given and (fused or cfg.kind == "plif"):  # the initial state of the recurrence, V[-1] of dH[0]/dq
        reads["v_init"] = 4 * n
    reads |= _broadcast_reads(cfg, channels)
    if need_grad_v_init:
        writes["grad_v_init"] = 4 * n
    if cfg.kind == "plif":
        writes["w_partial"] = 4 * n
    if affine_grad:
        writes["scale_partial"] = writes["shift_partial"] = 4 * n
    return total + Traffic(reads, writes)


def _broadcast_reads(cfg: NeuronConfig, channels: int) -> dict[str, int]:
    reads = {"q": 4} if cfg.kind == "plif" else {}
    if cfg.affine:
        reads["scale"] = reads["shift"] = 4 * channels
    return reads


__all__ = [
    "KINDS", "KIND_IDS", "SURROGATES", "SURROGATE_IDS", "INPUT_DTYPES", "FORWARD_KERNEL", "BACKWARD_KERNEL",
    "RECOMPUTE_KERNEL", "KERNELS", "MAX_RECOMPUTE_T", "NeuronConfig", "check_neuron_args", "neuron_perm",
    "neuron_layout_strides", "empty_neuron_layout", "has_neuron_layout", "to_neuron_layout", "channel_geometry",
    "SavePlan", "SAVE_PLANS", "SAVE_MODES", "DEFAULT_SAVE", "Traffic", "forward_traffic", "backward_traffic"]
