"""Checks of what a reversible sequence promises, for your own blocks: exact inversion on the fixed-point grid,
gradients equal to ordinary autograd, BatchNorm statistics updated once per step, a bit-identical recomputation,
and the margin of its stream before overflow.

Each ``assert_*`` function runs its check, raises ``AssertionError`` with a report naming the block (and branch,
parameter or buffer) when it fails, and returns what it measured (a :class:`CheckResult`). :func:`stream_headroom`
measures only. :func:`check_sequence` runs them all without raising, :func:`check_model` on every
:class:`~revsnn_triton.reversible.RevSequence` of a model (what ``revsnn check`` prints).

The checks leave no trace: the module's buffers (BatchNorm running statistics), parameter gradients, train/eval
flags, ``reversible``/``check`` settings and the RNG states are restored afterwards. They draw their own random
numbers from ``seed``, the same in every run they compare.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from revsnn_triton import replay
from revsnn_triton.launch import LaunchConfig
from revsnn_triton.ops import coupling as C
from revsnn_triton.reversible import ReconstructionError, RevBlock, RevSequence, StreamOverflowError

from .compare import bit_mismatch, grad_tolerance, mismatch_report, tolerance

__all__ = ["CheckResult", "BlockHeadroom", "Headroom", "SequenceReport", "TUNING_EXTREMES", "assert_invertible",
           "assert_gradients_match", "assert_batchnorm_updated_once", "assert_recompute_deterministic",
           "stream_headroom", "check_sequence", "check_model", "record_streams", "StreamRecord",
           "forced_launch_config"]

SequenceLike = Union[RevSequence, RevBlock]


def _tuning_extremes() -> tuple[LaunchConfig, ...]:
    from revsnn_triton.tuning import DEFAULT_CANDIDATES
    smallest, largest = min(DEFAULT_CANDIDATES), max(DEFAULT_CANDIDATES)
    return LaunchConfig(*smallest), LaunchConfig(*largest)


# The smallest and the largest (block_size, num_warps) that `revsnn tune` tries: launch configurations a tuning
# cache may hold, against which assert_recompute_deterministic checks a branch besides the one in use.
TUNING_EXTREMES: tuple[LaunchConfig, ...] = _tuning_extremes()


# ------------------------------------------------------------------------------------------------- results

@dataclass
class CheckResult:
    """What one check found.

    ``check``: its name; ``problems``: one line per failure (empty: passed); ``blocks``: a value per block index
    (``invertible`` / ``deterministic``: bool; ``gradients``: the largest deviation of the block's parameter
    gradients relative to the largest gradient; ``batchnorm``: bool, or None for a block without buffers);
    ``details``: further figures of the check."""

    check: str
    problems: list[str] = field(default_factory=list)
    blocks: dict[int, object] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.problems

    def raise_if_failed(self) -> "CheckResult":
        if self.problems:
            raise AssertionError(f"{self.check}: " + "\n".join(self.problems))
        return self


@dataclass(frozen=True)
class BlockHeadroom:
    """The stream after one block: its largest ``|value|`` and the bits left before the grid's limit
    (``log2(limit / max_abs)``; inf for an all-zero stream). None for a block that overflowed or came after one."""

    block: int
    max_abs: Optional[float]
    bits: Optional[float]


@dataclass(frozen=True)
class Headroom:
    """:func:`stream_headroom`'s answer: per block the largest stream value against ``limit = 2**(31 - frac_bits)``.

    Each bit of headroom is one doubling the values can still take; each fractional bit less doubles the range (and
    halves the precision). ``overflow``: the engine's message when the forward left the range (``overflow_block``
    names the block), else None."""

    frac_bits: int
    limit: float
    input_max_abs: float
    blocks: tuple[BlockHeadroom, ...]
    overflow: Optional[str] = None
    overflow_block: Optional[int] = None

    @property
    def min_bits(self) -> float:
        """The smallest headroom of any block, in bits (-inf after an overflow)."""
        if self.overflow is not None:
            return float("-inf")
        return min((b.bits for b in self.blocks if b.bits is not None), default=float("inf"))


# --------------------------------------------------------------------------------------------- helpers

def _as_sequence(seq: object, caller: str) -> RevSequence:
    if isinstance(seq, RevSequence):
        return seq
    if isinstance(seq, RevBlock):
        return RevSequence([seq])
    raise TypeError(f"{caller}: seq must be a RevSequence or a RevBlock, got {type(seq).__name__}")


def _check_float(x: object, caller: str, allow_int32: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{caller}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype in C.FLOAT_DTYPES or (allow_int32 and x.dtype == torch.int32):
        return x
    expected = "a float tensor" + (" or an int32 stream" if allow_int32 else "")
    raise TypeError(f"{caller}: x must be {expected}, got {x.dtype}")


def _check_count(caller: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_seed(caller: str, seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{caller}: seed must be an int >= 0, got {seed!r}")
    return seed


def _cuda_devices(module: nn.Module, *tensors: Tensor) -> list[int]:
    devices = {t.device.index or 0 for t in (*module.parameters(), *module.buffers(), *tensors)
               if isinstance(t, Tensor) and t.device.type == "cuda"}
    return sorted(devices)


@contextlib.contextmanager
def _preserved(module: nn.Module, *tensors: Tensor) -> Iterator[None]:
    """Run a check without a trace on ``module``: buffers, parameter gradients, train/eval flags, the settings of
    its sequences and the RNG states (CPU and the CUDA devices it uses) are restored afterwards."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
    flags = [(m, m.training) for m in module.modules()]
    settings = [(s, s.reversible, s.check) for s in module.modules() if isinstance(s, RevSequence)]
    with torch.random.fork_rng(devices=_cuda_devices(module, *tensors)):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in grads:
                p.grad = g
            for m, flag in flags:
                m.training = flag
            for s, reversible, check in settings:
                s.reversible, s.check = reversible, check
            from revsnn_triton.functional import reset_net
            reset_net(module)


def _rng_state(devices: Sequence[int]) -> list[Tensor]:
    return [torch.get_rng_state()] + [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: list[Tensor], devices: Sequence[int]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1:]):
        torch.cuda.set_rng_state(s, d)


def _weights(y: Tensor, seed: int) -> Tensor:
    """Fixed random weights of the loss ``(y * w).sum()``: every output element gets its own gradient."""
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)


def _block_and_branch(name: str) -> tuple[Optional[int], str]:
    """``"blocks.3.f.conv.weight"`` -> ``(3, "F")``."""
    m = re.match(r"blocks\.(\d+)\.(f|g)\.", name)
    if m is None:
        m2 = re.match(r"blocks\.(\d+)\.", name)
        return (int(m2.group(1)) if m2 else None), ""
    return int(m.group(1)), m.group(2).upper()


def _where(name: str) -> str:
    block, branch = _block_and_branch(name)
    if block is None:
        return name
    return f"block {block}" + (f" branch {branch}" if branch else "") + f" ({name})"


def _block_label(seq: RevSequence, i: int) -> str:
    block = seq.blocks[i]
    kind = "" if type(block) is RevBlock else f" ({type(block).__name__})"
    return f"block {i}{kind}"


def _engine_message(error: Exception) -> str:
    """The engine's error message without the repr of the branch module it may end with (the message names the
    block and branch already)."""
    return str(error).split(" Module: ")[0]


def _real(q: Tensor, frac_bits: int) -> Tensor:
    """The real values of an int32 stream, exactly (float64)."""
    return q.detach().cpu().double() * 2.0 ** -frac_bits


_ENGINE_BLOCK = re.compile(r"block (\d+)")


def _engine_block(message: str) -> Optional[int]:
    m = _ENGINE_BLOCK.search(message)
    return int(m.group(1)) if m else None


class StreamRecord(dict):
    """``{phase: {block index: [(x1_q, x2_q), ...]}}`` for the phases ``"forward"``, ``"backward"`` and
    ``"inverse"``: copies of the int32 input halves the stream hook saw, one pair per call. :meth:`remove` stops
    recording."""

    def __init__(self, seq: RevSequence) -> None:
        super().__init__(forward={}, backward={}, inverse={})

        def hook(phase, i, x1, x2):
            self[phase].setdefault(i, []).append((x1.clone(), x2.clone()))
        self.handle = seq.register_stream_hook(hook)

    def remove(self) -> None:
        self.handle.remove()


def record_streams(seq: RevSequence) -> StreamRecord:
    """Record the int32 input halves of every block in every forward, backward and inverse of ``seq`` from now on
    (``seq.register_stream_hook``): a :class:`StreamRecord`."""
    if not isinstance(seq, RevSequence):
        raise TypeError(f"record_streams: seq must be a RevSequence, got {type(seq).__name__}")
    return StreamRecord(seq)


@contextlib.contextmanager
def forced_launch_config(config: Optional[LaunchConfig]) -> Iterator[list[int]]:
    """Inside the block every Triton kernel launch of this library takes ``config``, as a tuning cache entry for it
    would give it (None: the configurations in use). Yields a one-element list counting the launches that asked."""
    launches = [0]
    if config is None:
        yield launches
        return
    if not isinstance(config, LaunchConfig):
        raise TypeError(f"forced_launch_config: config must be a LaunchConfig or None, got {type(config).__name__}")
    from revsnn_triton import launch
    saved = launch.launch_config, launch.lookup_config

    def fixed(*args, **kwargs) -> LaunchConfig:
        launches[0] += 1
        return config

    def fixed_lookup(*args, **kwargs) -> tuple[LaunchConfig, str]:
        launches[0] += 1
        return config, "tuned"

    launch.launch_config, launch.lookup_config = fixed, fixed_lookup
    try:
        yield launches
    finally:
        launch.launch_config, launch.lookup_config = saved


def _stream_inputs(seq: RevSequence, q: Tensor, dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
    """Block inputs (int32, whole streams) of ``forward_fixed(q)`` and its output."""
    rec = record_streams(seq)
    try:
        y = seq.forward_fixed(q, dtype)
    finally:
        rec.remove()
    d = seq.split_dim % q.dim()
    inputs = [torch.cat(rec["forward"][i][0], d) for i in range(len(seq.blocks))]
    return inputs, y


# -------------------------------------------------------------------------------------------- invertible

def assert_invertible(seq: SequenceLike, x: Tensor, *, dtype: Optional[torch.dtype] = None,
                      seed: int = 0) -> CheckResult:
    """The blocks of ``seq`` (a :class:`RevSequence`, or one :class:`RevBlock`, then at ``frac_bits=16``) invert
    exactly, bit for bit, on the fixed-point grid.

    ``x``: a float input ``[T, B, ...]`` (put on the grid with ``seq.encode``) or an int32 stream of that shape
    (any values: integer arithmetic wraps, so the inverse must undo even a wrapped stream). ``dtype``: what F and G
    see (default ``x``'s dtype; float32 for a stream). Two checks:

    1. every block's ``inverse_fixed`` undoes its ``forward_fixed`` on the input the sequence gave it. Dropout
       layers are in eval mode here (the inverse calls the branches in reverse order and cannot redraw the
       forward's masks);
    2. float ``x`` only: one training step (reversible forward, backward of a fixed random loss) rebuilds every
       block's input exactly as the forward saw it (the engine's own path, dropout masks replayed), and the stream
       stays in the grid's range (:class:`~revsnn_triton.reversible.StreamOverflowError` is a failure here).

    The report names the block, the half (X1/X2) and how many elements differ, and where (indices into the block
    input). A failure of a block spoils the rebuilt inputs of the blocks before it in check 2: the named block is
    the last one (in forward order) whose input differs. Returns a :class:`CheckResult` (``blocks``: exact or not).
    """
    return _invertible(seq, x, dtype, seed).raise_if_failed()


def _invertible(seq: SequenceLike, x: Tensor, dtype: Optional[torch.dtype], seed: int) -> CheckResult:
    caller = "assert_invertible"
    seq = _as_sequence(seq, caller)
    x = _check_float(x, caller, allow_int32=True)
    _check_seed(caller, seed)
    if dtype is not None and dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"{caller}: dtype must be one of {[str(t) for t in C.FLOAT_DTYPES]}, got {dtype!r}")
    stream_input = x.dtype == torch.int32
    dtype = dtype or (torch.float32 if stream_input else x.dtype)
    q = x if stream_input else seq.encode(x)
    result = CheckResult("invertible", blocks={i: True for i in range(len(seq.blocks))})
    devices = _cuda_devices(seq, x)
    d = seq.split_dim % q.dim() if q.dim() else 0
    with _preserved(seq, x):
        # 1. per block, on the grid
        for m in seq.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        torch.manual_seed(seed)
        before = _rng_state(devices)
        inputs, y = _stream_inputs(seq, q, dtype)
        drew = any(not torch.equal(a, b) for a, b in zip(before, _rng_state(devices)))
        outputs = inputs[1:] + [y]
        for i, block in enumerate(seq.blocks):
            single = RevSequence([block], frac_bits=seq.frac_bits, check=False)
            torch.manual_seed(seed)
            back = single.inverse_fixed(outputs[i], dtype)
            bad = bit_mismatch(back, inputs[i])
            if bad.any():
                result.blocks[i] = False
                halves = [bool(h.any()) for h in bad.chunk(2, d)] if bad.dim() else [True, True]
                hint = (" (the branches drew random numbers outside dropout layers; the inverse cannot replay them)"
                        if drew else "")
                result.problems.append(
                    f"{_block_label(seq, i)}: inverse_fixed does not give back the input of forward_fixed "
                    f"(X1 {'differs' if halves[0] else 'equal'}, X2 {'differs' if halves[1] else 'equal'}){hint}; "
                    + mismatch_report(_real(back, seq.frac_bits), _real(inputs[i], seq.frac_bits), bad,
                                      "block input"))
        del inputs, outputs, y
        # 2. the training path: the engine's reconstruction in backward
        if not stream_input:
            _training_reconstruction(seq, x, seed, result)
    return result


def _training_reconstruction(seq: RevSequence, x: Tensor, seed: int, result: CheckResult) -> None:
    seq.reversible = True
    xf = x.detach().clone().requires_grad_(True)
    rec = record_streams(seq)
    guard = None
    try:
        torch.manual_seed(seed)
        y = seq(xf)
        torch.autograd.grad((y * _weights(y, seed)).sum(), xf)
    except StreamOverflowError as error:
        i = _engine_block(str(error))
        if i is not None:
            result.blocks[i] = False
        result.problems.append(f"the training forward left the fixed-point range: {error}")
        return
    except ReconstructionError as error:
        guard = _engine_message(error)
    finally:
        rec.remove()
    d = seq.split_dim % x.dim()
    faulty = None
    for i in reversed(range(len(seq.blocks))):
        forward, backward = rec["forward"].get(i), rec["backward"].get(i)
        if not forward or not backward:
            continue
        want, got = torch.cat(forward[0], d), torch.cat(backward[0], d)
        bad = bit_mismatch(got, want)
        if bad.any():
            halves = [bool(h.any()) for h in bad.chunk(2, d)]
            faulty = i
            result.blocks[i] = False
            result.problems.append(
                f"{_block_label(seq, i)}: the backward rebuilt its input differently from the forward's "
                f"(X1 {'differs' if halves[0] else 'equal'}, X2 {'differs' if halves[1] else 'equal'}; a wrong X2 "
                f"is G's recomputation, a wrong X1 alone F's); "
                + mismatch_report(_real(got, seq.frac_bits), _real(want, seq.frac_bits), bad, "rebuilt block input"))
            break
    if guard is not None and faulty is None:
        i = _engine_block(guard)
        if i is not None:
            result.blocks[i] = False
        result.problems.append(f"the exactness guard: {guard}")


# --------------------------------------------------------------------------------------------- gradients

def assert_gradients_match(seq: SequenceLike, x: Tensor, *, rtol: Optional[float] = None,
                           atol: Optional[float] = None, exact: bool = False, seed: int = 0) -> CheckResult:
    """The gradients of the reversible engine (``reversible=True``: recomputation in backward) equal those of
    ordinary autograd through the same quantized arithmetic (``reversible=False``), for the input and every
    parameter that requires grad, for the loss ``(seq(x) * w).sum()`` with fixed random weights ``w``.

    Tolerance: :func:`~revsnn_triton.testing.grad_tolerance` (reordered floating-point sums only; rtol 1.5e-5 and
    atol 1.5e-5 of the largest gradient for float32), or ``rtol``/``atol``; ``exact=True`` asks for bit-identical
    gradients (what a CPU gives when every op is deterministic). Both runs start from the same RNG state (the same
    dropout masks). Returns a :class:`CheckResult`: ``blocks`` holds the largest deviation of each block's parameter
    gradients relative to the largest gradient, ``details["input"]`` that of the input gradient."""
    return _gradients(seq, x, rtol, atol, exact, seed).raise_if_failed()


def _gradients(seq: SequenceLike, x: Tensor, rtol: Optional[float], atol: Optional[float], exact: bool,
               seed: int) -> CheckResult:
    caller = "assert_gradients_match"
    seq = _as_sequence(seq, caller)
    x = _check_float(x, caller)
    _check_seed(caller, seed)
    if not isinstance(exact, bool):
        raise TypeError(f"{caller}: exact must be a bool, got {type(exact).__name__}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0):
            raise ValueError(f"{caller}: {name} must be None or a number >= 0, got {v!r}")
    named = [(n, p) for n, p in seq.named_parameters() if p.requires_grad]
    names = ["input"] + [n for n, _ in named]
    params = [p for _, p in named]
    result = CheckResult("gradients", blocks={i: 0.0 for i in range(len(seq.blocks))})

    def run(reversible: bool):
        seq.reversible = reversible
        xf = x.detach().clone().requires_grad_(True)
        torch.manual_seed(seed)
        y = seq(xf)
        return torch.autograd.grad((y * _weights(y, seed)).sum(), [xf, *params], allow_unused=True)

    with _preserved(seq, x):
        try:
            got = run(True)
        except (StreamOverflowError, ReconstructionError) as error:
            result.problems.append(f"the reversible run failed: {_engine_message(error)}")
            result.blocks = {}
            return result
        want = run(False)
    r, a = grad_tolerance(want)
    scale = max((float(g.abs().max()) for g in want if g is not None and g.numel()), default=0.0)
    r = r if rtol is None else float(rtol)
    a = a if atol is None else float(atol)
    result.details.update(rtol=r, atol=a, largest_gradient=scale, input=0.0)
    for name, g, w in zip(names, got, want):
        block, _ = _block_and_branch(name)
        label = "the input gradient" if name == "input" else f"the gradient of {_where(name)}"
        if g is None or w is None:
            if g is not w:
                result.problems.append(f"{label}: {'none' if g is None else 'one'} in the reversible run, "
                                       f"{'none' if w is None else 'one'} with reversible=False")
            continue
        deviation = float((g.double() - w.double()).abs().max()) / scale if g.numel() and scale > 0 else 0.0
        if name == "input":
            result.details["input"] = deviation
        elif block is not None:
            result.blocks[block] = max(result.blocks.get(block, 0.0), deviation)
        gc, wc = g.detach().cpu().double(), w.detach().cpu().double()
        bad = ~torch.isclose(gc, wc, rtol=r, atol=a, equal_nan=True)
        if exact:
            bad |= bit_mismatch(g, w)
        if bad.any():
            result.problems.append(
                f"{label} differs from reversible=False: "
                + mismatch_report(gc, wc, bad, f"reversible vs reversible=False ({'bit-exact' if exact else ''}"
                                               f"{', ' if exact else ''}rtol={r:g}, atol={a:g})"))
    result.details["max"] = max([result.details["input"], *result.blocks.values()])
    return result


# --------------------------------------------------------------------------------------------- batchnorm

def assert_batchnorm_updated_once(seq: SequenceLike, x: Tensor, *, steps: int = 2, seed: int = 0) -> CheckResult:
    """``steps`` training steps (forward and backward, in training mode) of the reversible engine leave every
    buffer of ``seq`` (BatchNorm running statistics and batch counters, and any other state a branch keeps) as the
    same steps without recomputation (``reversible=False``) do: a layer that updates its statistics again when the
    backward recomputes it is reported with its block, branch and buffer. Float buffers are compared with the
    tolerance table of their dtype, integer ones exactly. Both runs start from the same buffers and RNG states.
    Returns a :class:`CheckResult` (``blocks``: True, False, or None for a block without buffers;
    ``details["buffers"]``: how many were compared)."""
    return _batchnorm_once(seq, x, steps, seed).raise_if_failed()


def _batchnorm_once(seq: SequenceLike, x: Tensor, steps: int, seed: int) -> CheckResult:
    caller = "assert_batchnorm_updated_once"
    seq = _as_sequence(seq, caller)
    x = _check_float(x, caller)
    _check_count(caller, "steps", steps)
    _check_seed(caller, seed)
    result = CheckResult("batchnorm", blocks={i: None for i in range(len(seq.blocks))})
    with _preserved(seq, x):
        seq.train()
        start = {n: b.detach().clone() for n, b in seq.named_buffers()}

        def run(reversible: bool) -> dict[str, Tensor]:
            with torch.no_grad():
                for n, b in seq.named_buffers():
                    b.copy_(start[n])
            seq.reversible = reversible
            for step in range(steps):
                xf = x.detach().clone().requires_grad_(True)
                torch.manual_seed(seed + step)
                y = seq(xf)
                torch.autograd.grad((y * _weights(y, seed + step)).sum(), xf)
            return {n: b.detach().clone() for n, b in seq.named_buffers()}

        try:
            got = run(True)
        except (StreamOverflowError, ReconstructionError) as error:
            result.problems.append(f"the reversible run failed: {_engine_message(error)}")
            return result
        want = run(False)
    result.details["buffers"] = len(want)
    for name, w in want.items():
        g = got[name]
        block, _ = _block_and_branch(name)
        if block is not None and result.blocks.get(block) is None:
            result.blocks[block] = True
        if w.is_floating_point():
            rtol, atol = tolerance(w.dtype) if w.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                           torch.float64) else (0.0, 0.0)
            gc, wc = g.cpu().double(), w.cpu().double()
            bad = ~torch.isclose(gc, wc, rtol=rtol, atol=atol, equal_nan=True)
        else:
            gc, wc = g.cpu(), w.cpu()
            bad = gc != wc
        if bad.any():
            if block is not None:
                result.blocks[block] = False
            values = (f"{gc.item()} vs {wc.item()}" if w.numel() == 1 else
                      mismatch_report(gc, wc, bad, "reversible vs reversible=False"))
            result.problems.append(
                f"{_where(name)} after {steps} steps differs from the same steps without recomputation: {values} "
                f"(a layer updated its state again while the backward recomputed it; torch.nn BatchNorm and "
                f"revsnn_triton.batchnorm.SeqBatchNorm layers are updated once)")
    return result


# ----------------------------------------------------------------------------------------- deterministic

def assert_recompute_deterministic(module: nn.Module, x: Tensor, *, runs: int = 3,
                                   launch_configs: Sequence[LaunchConfig] = TUNING_EXTREMES,
                                   seed: int = 0) -> CheckResult:
    """A recomputation gives the same bits as the forward: ``module`` run ``runs`` times on ``x`` from reset neuron
    state and the same RNG state (the first run without gradients, as the engine's forward; the others with, as
    its recomputation) gives bit-identical outputs, and so it does with each of ``launch_configs`` forced on every
    Triton kernel launch (default :data:`TUNING_EXTREMES`: configurations a tuning cache may pick).

    ``module``: one branch (any module, ``x`` its input), or a :class:`RevSequence` / :class:`RevBlock` (``x`` its
    input; then every F and G is checked on the input the sequence gives it, named by block and branch).
    Returns a :class:`CheckResult` (``blocks``: deterministic or not; ``details["launches"]``: kernel launches
    that took a forced configuration, 0 where the branches launch no Triton kernel, e.g. ops on CPU tensors
    outside ``revsnn_triton.runtime.cpu_kernels("triton")``)."""
    return _deterministic(module, x, runs, launch_configs, seed).raise_if_failed()


def _branch_inputs(seq: RevSequence, x: Tensor) -> list[tuple[int, str, nn.Module, Tensor]]:
    """``(block, "F" | "G", branch, its input)`` for every branch call of the sequence's forward on ``x``."""
    stream_input = x.dtype == torch.int32
    dtype = torch.float32 if stream_input else x.dtype
    q = x if stream_input else seq.encode(x)
    inputs, y = _stream_inputs(seq, q, dtype)
    d = seq.split_dim % q.dim()
    calls = []
    for i, block in enumerate(seq.blocks):
        following = inputs[i + 1] if i + 1 < len(inputs) else y
        x2, y1 = inputs[i].chunk(2, d)[1], following.chunk(2, d)[0]
        calls.append((i, "F", block.f, seq.decode(x2.contiguous(), dtype)))
        calls.append((i, "G", block.g, seq.decode(y1.contiguous(), dtype)))
    return calls


def _deterministic(module: nn.Module, x: Tensor, runs: int, launch_configs: Sequence[LaunchConfig],
                   seed: int) -> CheckResult:
    caller = "assert_recompute_deterministic"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{caller}: module must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"{caller}: x must be a torch.Tensor, got {type(x).__name__}")
    _check_count(caller, "runs", runs, minimum=2)
    _check_seed(caller, seed)
    configs = list(launch_configs)
    for c in configs:
        if not isinstance(c, LaunchConfig):
            raise TypeError(f"{caller}: launch_configs must hold revsnn_triton.launch.LaunchConfig, got "
                            f"{type(c).__name__}")
    is_sequence = isinstance(module, (RevSequence, RevBlock))
    seq = _as_sequence(module, caller) if is_sequence else None
    if is_sequence:
        _check_float(x, caller, allow_int32=True)
    result = CheckResult("deterministic")
    result.details.update(runs=runs, launch_configs=len(configs), launches=0)
    devices = _cuda_devices(module, x)
    with _preserved(module, x):
        torch.manual_seed(seed)
        calls = _branch_inputs(seq, x) if seq is not None else [(None, "", module, x)]
        for block, name, branch, xin in calls:
            where = f"block {block}: branch {name}" if block is not None else "module"
            if block is not None:
                result.blocks[block] = result.blocks.get(block, True)
            problem = _repeat(branch, xin, where, runs, configs, seed, devices, result)
            if problem is not None:
                if block is not None:
                    result.blocks[block] = False
                result.problems.append(problem)
    return result


def _repeat(branch: nn.Module, x: Tensor, where: str, runs: int, configs: list, seed: int, devices: list[int],
            result: CheckResult) -> Optional[str]:
    torch.manual_seed(seed)
    state = _rng_state(devices)
    first = None
    for config in [None, *configs]:
        with forced_launch_config(config) as launches:
            for r in range(runs):
                _set_rng_state(state, devices)
                grad = first is not None
                xin = x.detach().clone().requires_grad_(grad and x.is_floating_point())
                with torch.set_grad_enabled(grad):
                    out = replay.run_fresh(branch, xin, where).detach()
                if first is None:
                    first = out
                    continue
                run = f"run {r + 1}" + ("" if config is None else f" with launch config {config}")
                if out.shape != first.shape or out.dtype != first.dtype:
                    return (f"{where} ({type(branch).__name__}): {run} gives shape {tuple(out.shape)} {out.dtype}, "
                            f"the first gave {tuple(first.shape)} {first.dtype}")
                bad = bit_mismatch(out, first)
                if bad.any():
                    cause = ("nondeterministic kernel, state kept between calls, or randomness outside torch's RNG"
                             if config is None else "a result that depends on the launch configuration, e.g. a "
                             "reduction in an order that follows block_size or num_warps")
                    return (f"{where} ({type(branch).__name__}) is not deterministic: {run} differs from the first "
                            f"run (no gradients, configurations in use): "
                            + mismatch_report(out.cpu(), first.cpu(), bad, "output") + f" ({cause})")
        result.details["launches"] += launches[0]
    return None


# ------------------------------------------------------------------------------------------------ headroom

def stream_headroom(seq: SequenceLike, x: Tensor) -> Headroom:
    """How far the stream of ``seq`` on input ``x`` stays from the limit of its fixed-point grid: per block the
    largest ``|value|`` of the stream after it (both halves), against ``limit = 2**(31 - frac_bits)``, in bits
    (``log2(limit / max_abs)``). Runs one forward without gradients in the module's current mode; a forward that
    overflows is reported (``overflow``, ``overflow_block``), not raised. Use it to pick ``frac_bits``: with ``b``
    bits of headroom at the largest activations training reaches, ``frac_bits`` can grow by up to ``b`` (finer
    grid), and must shrink when ``b`` approaches 0."""
    caller = "stream_headroom"
    seq = _as_sequence(seq, caller)
    x = _check_float(x, caller)
    R = seq.frac_bits
    limit = 2.0 ** (31 - R)
    maxima: dict[int, float] = {}

    def hook(phase, i, x1, x2):
        if phase == "forward":
            maxima[i] = max(int(h.to(torch.int64).abs().max()) if h.numel() else 0 for h in (x1, x2)) * 2.0 ** -R

    def bits(m: float) -> float:
        return math.inf if m == 0 else math.log2(limit / m)

    overflow, overflow_block, out_max = None, None, 0.0
    with _preserved(seq, x):
        handle = seq.register_stream_hook(hook)
        try:
            with torch.no_grad():
                y = seq(x)
            out_max = float(y.abs().max()) if y.numel() else 0.0
        except StreamOverflowError as error:
            overflow, overflow_block = str(error), _engine_block(str(error))
            if overflow_block is None:
                overflow_block = 0
        finally:
            handle.remove()
    L = len(seq.blocks)
    rows = []
    for i in range(L):
        if overflow_block is not None and i >= overflow_block:
            rows.append(BlockHeadroom(i, None, None))
            continue
        m = maxima[i + 1] if i + 1 < L else out_max
        rows.append(BlockHeadroom(i, m, bits(m)))
    return Headroom(frac_bits=R, limit=limit, input_max_abs=maxima.get(0, 0.0), blocks=tuple(rows),
                    overflow=overflow, overflow_block=overflow_block)


# ----------------------------------------------------------------------------------------- all at once

@dataclass
class SequenceReport:
    """Every check on one sequence (:func:`check_sequence`): ``name`` (its path in the model), the input it was
    checked on (``shape``, ``dtype``), its ``frac_bits`` and blocks, the four :class:`CheckResult` s and the
    :class:`Headroom`; ``trains_reversible``: the sequence's own ``reversible`` setting (every check runs it as a
    reversible sequence either way)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    frac_bits: int
    num_blocks: int
    invertible: CheckResult
    gradients: CheckResult
    batchnorm: CheckResult
    deterministic: CheckResult
    headroom: Headroom
    min_headroom_bits: float = 0.0
    trains_reversible: bool = True

    @property
    def problems(self) -> list[str]:
        found = [f"{r.check}: {p}" for r in (self.invertible, self.gradients, self.batchnorm, self.deterministic)
                 for p in r.problems]
        if self.headroom.overflow is not None:
            found.append(f"stream headroom: {self.headroom.overflow}")
        elif self.headroom.min_bits < self.min_headroom_bits:
            low = [b.block for b in self.headroom.blocks if b.bits is not None and b.bits < self.min_headroom_bits]
            found.append(f"stream headroom: block {low[0]} keeps {self.headroom.blocks[low[0]].bits:.1f} bits, "
                         f"fewer than the {self.min_headroom_bits:g} asked for (lower frac_bits)")
        return found

    @property
    def passed(self) -> bool:
        return not self.problems

    def table(self) -> str:
        """One row per block: exact, max gradient deviation, BN once, deterministic, headroom in bits."""
        def yes(v) -> str:
            return "-" if v is None else ("yes" if v else "NO")

        header = ["block", "exact", "max grad dev", "BN once", "deterministic", "headroom (bits)"]
        rows = []
        for i in range(self.num_blocks):
            dev = self.gradients.blocks.get(i)
            h = self.headroom.blocks[i]
            room = ("overflow" if self.headroom.overflow_block == i else "-") if h.bits is None else (
                "inf" if math.isinf(h.bits) else f"{h.bits:.1f}")
            rows.append([str(i), yes(self.invertible.blocks.get(i)), "-" if dev is None else f"{dev:.2g}",
                         yes(self.batchnorm.blocks.get(i)), yes(self.deterministic.blocks.get(i)), room])
        cells = [header] + rows
        widths = [max(len(r[k]) for r in cells) for k in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])

    def format(self) -> str:
        """The heading, the table, and a line of sequence-wide figures."""
        blocks = f"{self.num_blocks} block{'s' if self.num_blocks != 1 else ''}"
        dtype = str(self.dtype).replace("torch.", "")
        head = f"{self.name}: RevSequence of {blocks}, input {list(self.shape)} {dtype}, frac_bits {self.frac_bits}"
        if not self.trains_reversible:
            head += " (trains with reversible=False, keeping its graph; checked as a reversible sequence)"
        g, det = self.gradients.details, self.deterministic.details
        launches = det.get("launches", 0)
        tail = (f"input grad dev {g['input']:.2g} (tolerance rtol {g['rtol']:.2g}, atol {g['atol']:.2g}); "
                if "input" in g else "")
        tail += (f"recomputed {det.get('runs', 0)} times with {det.get('launch_configs', 0)} forced launch configs "
                 + (f"({launches} kernel launches took them)" if launches else
                    "(no Triton kernel launched: the configs had nothing to change)"))
        return "\n".join([head, self.table(), tail])


def check_sequence(seq: SequenceLike, x: Tensor, *, name: str = "sequence", steps: int = 2, runs: int = 3,
                   launch_configs: Sequence[LaunchConfig] = TUNING_EXTREMES, seed: int = 0,
                   min_headroom_bits: float = 0.0) -> SequenceReport:
    """Every check on ``seq`` with float input ``x``, without raising: :func:`assert_invertible`,
    :func:`assert_gradients_match`, :func:`assert_batchnorm_updated_once` (``steps``),
    :func:`assert_recompute_deterministic` (``runs``, ``launch_configs``) and :func:`stream_headroom` (a block with
    fewer than ``min_headroom_bits`` bits fails). Returns a :class:`SequenceReport`."""
    seq = _as_sequence(seq, "check_sequence")
    x = _check_float(x, "check_sequence")
    trains_reversible = seq.reversible  # (the checks switch it and restore it)
    return SequenceReport(
        name=name, shape=tuple(x.shape), dtype=x.dtype, frac_bits=seq.frac_bits, num_blocks=len(seq.blocks),
        invertible=_invertible(seq, x, None, seed), gradients=_gradients(seq, x, None, None, False, seed),
        batchnorm=_batchnorm_once(seq, x, steps, seed),
        deterministic=_deterministic(seq, x, runs, launch_configs, seed),
        headroom=stream_headroom(seq, x), min_headroom_bits=float(min_headroom_bits),
        trains_reversible=trains_reversible)


def check_model(model: nn.Module, example_input, **kwargs) -> list[SequenceReport]:
    """:func:`check_sequence` on every :class:`RevSequence` of ``model``, each on the input it gets when ``model``
    runs ``example_input`` (a tensor, or a tuple of positional arguments) in its current mode (training mode is
    what training runs). ``kwargs`` go to :func:`check_sequence`. The model is left as it was. Raises
    ``ValueError`` when the model has no RevSequence, or a sequence is not called by the forward."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"check_model: model must be a torch.nn.Module, got {type(model).__name__}")
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    sequences = [(n or type(model).__name__, m) for n, m in model.named_modules() if isinstance(m, RevSequence)]
    if not sequences:
        raise ValueError(f"check_model: {type(model).__name__} has no RevSequence to check")
    captured: dict[str, Tensor] = {}
    handles = []
    for name, seq in sequences:
        def capture(module, inputs, _name=name):
            if _name not in captured and inputs and isinstance(inputs[0], Tensor):
                captured[_name] = inputs[0].detach().clone()
        handles.append(seq.register_forward_pre_hook(capture))
    try:
        with _preserved(model, *[a for a in args if isinstance(a, Tensor)]), torch.no_grad():
            model(*args)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in sequences if n not in captured]
    if missing:
        raise ValueError(f"check_model: the forward on the example input did not call {', '.join(missing)}")
    return [check_sequence(seq, captured[name], name=name, **kwargs) for name, seq in sequences]
