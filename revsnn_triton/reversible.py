"""Exactly invertible reversible blocks and the memory-saving engine that runs them.

A :class:`RevBlock` splits its input stream into two equal halves along ``split_dim`` and couples them:
``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``. A :class:`RevSequence` runs blocks on a **fixed-point stream**:
int32 with ``frac_bits`` fractional bits (see :mod:`revsnn_triton.ops.coupling_reference`). The branch
outputs are quantized before they are added, in integer arithmetic that wraps modulo 2**32, so
``X1 = Y1 - q(F(X2))`` is exact for every input as long as F (and G) are recomputed bit-identically.

Forward (``reversible=True``) runs under ``torch.no_grad`` and keeps, for backward, only the last
block's output stream, the RNG state (CPU, and CUDA when the input is on a GPU) before each branch
call that drew random numbers (none for branches without dropout), the autocast state and, with
``check=True``, two int64 checksums per block (and two for the output). The output stream is kept as the
float32/float64 output tensor itself whenever that decodes it exactly (float64: always; float32: every
``|y_q| < 2**24``, i.e. ``|value| < 2**(24 - frac_bits)``, 256 at frac_bits=16) and the output is finite:
an output saved by its own function costs no memory (the layer after the sequence usually keeps it for
its own backward anyway), and backward re-encodes it to the int32 stream bit for bit (float32: into the
output's own memory, whose float values are written back before backward returns). Otherwise (float16/
bfloat16 output, values beyond that range, or an output made NaN by a non-finite branch output) the int32
output halves are kept. Backward walks the blocks
in reverse: for each branch it resets the neuron state, recomputes the branch with gradients under the
forward's autocast state and RNG state (equal dropout masks), takes the vector-Jacobian product with
``torch.autograd.grad`` (never ``.backward()``), and rebuilds the block input exactly with one fused
pass that also accumulates the gradient. Forward and backward drop every tensor as soon as nothing reads it:
besides one branch's work space, the forward holds two int32 halves and one decoded half, and backward, while
F is recomputed, the output, Y1, the rebuilt X2 with its decode (F's input) and the two stream gradients (the
incoming gradient's halves are read in place). Parameters are inputs of the autograd function, so their
gradients reach ``.grad`` (and DDP's hooks) the ordinary way. BatchNorm running statistics are updated
once per step: a recomputation restores them afterwards, and it normalizes with the same batch
statistics as the forward because its input is bit-identical.

``reversible=False`` runs the same blocks and the same quantized arithmetic with ordinary autograd
(straight-through gradients through the quantizers): the baseline the reversible gradients are compared with.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from revsnn_triton.functional import reset_net
from revsnn_triton.ops import coupling as C

__all__ = ["RevBlock", "RevSequence", "ReconstructionError"]

StreamHook = Callable[[str, int, Tensor, Tensor], None]


class ReconstructionError(RuntimeError):
    """A block input rebuilt in backward differs from the one the forward saw (nondeterministic F or G)."""


class RevBlock(nn.Module):
    """One reversible coupling block: ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``.

    Args:
        f, g: modules mapping a half ``[..., C/2 (at split_dim), ...]`` to the same shape and dtype
            (under autocast, the autocast dtype is accepted too). Their neuron state is reset before
            every call. They must be deterministic functions of their input (and the RNG state).
        split_dim: dimension split into halves (2 = channels of ``[T, B, C, H, W]``; -1 for tokens
            ``[T, B, N, D]``).

    A block runs inside a :class:`RevSequence`, which owns the fixed-point stream.
    """

    def __init__(self, f: nn.Module, g: nn.Module, split_dim: int = 2) -> None:
        super().__init__()
        for name, m in (("f", f), ("g", g)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"RevBlock: {name} must be a torch.nn.Module, got {type(m).__name__}")
        if isinstance(split_dim, bool) or not isinstance(split_dim, int):
            raise TypeError(f"RevBlock: split_dim must be an int, got {type(split_dim).__name__}")
        self.f = f
        self.g = g
        self.split_dim = split_dim

    def forward(self, *args, **kwargs):
        raise RuntimeError("RevBlock is run by a RevSequence (it owns the fixed-point stream): "
                           "use RevSequence([block, ...])")

    def extra_repr(self) -> str:
        return f"split_dim={self.split_dim}"


# ------------------------------------------------------------------------------- recomputation state

def _batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


@contextlib.contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Run a recomputation without changing BatchNorm running statistics: snapshot the buffers and
    copy them back in place afterwards (the forward already updated them once). The recomputation
    still normalizes with the batch statistics of its (bit-identical) input, exactly like the forward."""
    saved = []
    for bn in _batchnorms(module):
        buffers = [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]
        saved.append((buffers, [b.clone() for b in buffers]))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffers, copies in saved:
                for b, c in zip(buffers, copies):
                    b.copy_(c)


class _RngState:
    """CPU RNG state and, for a CUDA stream, that device's RNG state (what torch.utils.checkpoint keeps)."""
    __slots__ = ("cpu", "cuda_device", "cuda")

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device = device.index if device.type == "cuda" else None
        if self.cuda_device is not None:
            self.cuda = torch.cuda.get_rng_state(self.cuda_device)

    def unchanged(self) -> bool:
        """Whether the generators are still in this state (the branch drew no random numbers)."""
        if not torch.equal(self.cpu, torch.get_rng_state()):
            return False
        return self.cuda_device is None or torch.equal(self.cuda, torch.cuda.get_rng_state(self.cuda_device))

    @staticmethod
    @contextlib.contextmanager
    def restore(state: "_RngState | None") -> Iterator[None]:
        """Recompute under ``state`` (None: the branch used no randomness; nothing to restore)."""
        if state is None:
            yield
            return
        with state.restored():
            yield

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        devices = [] if self.cuda_device is None else [self.cuda_device]
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda_device is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield


class _AutocastState:
    """The autocast settings of the stream's device (and of the CPU) at forward time."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.kinds = {}
        for kind in {device_type, "cpu"}:
            self.kinds[kind] = dict(enabled=torch.is_autocast_enabled(kind), dtype=torch.get_autocast_dtype(kind),
                                    cache_enabled=torch.is_autocast_cache_enabled())

    def enabled_dtype(self) -> torch.dtype | None:
        s = self.kinds[self.device_type]
        return s["dtype"] if s["enabled"] else None

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for kind, kwargs in self.kinds.items():
                stack.enter_context(torch.autocast(kind, **kwargs))
            yield


# ------------------------------------------------------------------------------------------ sequence

class RevSequence(nn.Module):
    """A sequence of :class:`RevBlock` on an int32 fixed-point stream.

    Args:
        blocks: iterable of :class:`RevBlock`, all with the same ``split_dim``.
        frac_bits: fractional bits R of the stream, in [1, 30]; values are multiples of ``2**-R`` in
            ``representable_range(R)`` (R=16: [-32768, 32768)).
        reversible: True: memory-saving forward (keeps only the output stream) and recomputing backward;
            False: ordinary autograd through the same quantized math (for debugging and comparison).
        check: exactness guard (reversible only): an int64 checksum of both halves of every block input is
            kept in forward and compared with the rebuilt input in backward; a mismatch raises
            :class:`ReconstructionError` naming the block and the branch.

    ``forward(x)``: ``x`` float16/bfloat16/float32/float64 ``[..., C, ...]`` with C even at ``split_dim``
    -> same shape and dtype. The input is quantized once on entry (``encode``: round half to even;
    non-finite or out-of-range values raise ``ValueError``) and the output dequantized on exit; F and G see
    ``decode(half)`` in ``x``'s dtype. The gradient through the quantizers is straight-through.

    Range: stream values must stay within ``representable_range(frac_bits)``; beyond it the int32 stream
    wraps around (the coupling stays exactly invertible, but the decoded values are wrong). A branch
    output with NaN/inf cannot be carried by the stream (the quantizer maps NaN to 0 and saturates inf),
    so the whole output becomes NaN, as float arithmetic would make it. ``forward`` of a sequence in
    training mode with gradients enabled keeps for backward the output stream, per branch that drew
    random numbers one RNG state, and 16 bytes of checksums per block (plus 16 for the output); nothing
    else. The stream is kept as the returned output tensor itself (no extra memory) when it decodes the
    stream exactly (float64 always; float32 when every ``|value| < 2**(24 - frac_bits)``), else as int32
    halves (the same bytes as a float32 output). Modifying the output in place before backward is then
    an error (autograd's version check; with ``check=True`` the output checksum catches writes through
    ``.data`` too). Deciding costs one host synchronization per forward (float32/float64 only).
    Double backward is not supported.
    """

    def __init__(self, blocks: Iterable[RevBlock], frac_bits: int = 16, reversible: bool = True,
                 check: bool = True) -> None:
        super().__init__()
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError("RevSequence: blocks must be an iterable of RevBlock, got a single module")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("RevSequence: blocks must not be empty")
        for i, b in enumerate(blocks):
            if not isinstance(b, RevBlock):
                raise TypeError(f"RevSequence: blocks[{i}] must be a RevBlock, got {type(b).__name__}")
        dims = {b.split_dim for b in blocks}
        if len(dims) != 1:
            raise ValueError(f"RevSequence: all blocks must use the same split_dim, got {sorted(dims)}")
        for name, v in (("reversible", reversible), ("check", check)):
            if not isinstance(v, bool):
                raise TypeError(f"RevSequence: {name} must be a bool, got {type(v).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.split_dim = blocks[0].split_dim
        self.frac_bits = C.check_frac_bits(frac_bits)
        self.reversible = reversible
        self.check = check
        self._stream_hooks: OrderedDict[int, StreamHook] = OrderedDict()

    def extra_repr(self) -> str:
        return f"frac_bits={self.frac_bits}, reversible={self.reversible}, check={self.check}"

    # ----------------------------------------------------------------------------- public helpers

    def register_stream_hook(self, hook: StreamHook) -> RemovableHandle:
        """Debug hook ``hook(phase, index, x1_q, x2_q)`` called with the int32 input halves of block
        ``index``: ``phase="forward"`` when the forward reaches the block, ``"backward"`` when backward
        has rebuilt them (and ``"inverse"`` in :meth:`inverse_fixed`). The tensors must not be modified."""
        if not callable(hook):
            raise TypeError(f"register_stream_hook: hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._stream_hooks)
        self._stream_hooks[handle.id] = hook
        return handle

    def _call_hooks(self, phase: str, index: int, x1: Tensor, x2: Tensor) -> None:
        for hook in self._stream_hooks.values():
            hook(phase, index, x1, x2)

    def encode(self, x: Tensor, saturate: bool = False) -> Tensor:
        """float -> int32 stream (see :func:`revsnn_triton.ops.coupling.encode`)."""
        return C.encode(x, self.frac_bits, saturate)

    def decode(self, q: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """int32 stream -> float in ``dtype``."""
        return C.decode(q, self.frac_bits, dtype)

    def _dim(self, t: Tensor, what: str) -> int:
        if t.dim() == 0 or not -t.dim() <= self.split_dim < t.dim():
            raise ValueError(f"RevSequence: {what} has {t.dim()} dims, split_dim={self.split_dim} is out of range")
        d = self.split_dim % t.dim()
        if t.shape[d] % 2:
            raise ValueError(f"RevSequence: {what} has odd size {t.shape[d]} along split_dim={self.split_dim} "
                             f"(shape {tuple(t.shape)}); the stream is split into two equal halves")
        return d

    def _split(self, t: Tensor, d: int) -> tuple[Tensor, Tensor]:
        return tuple(half.contiguous() for half in _halves(t, d))

    def _branch(self, index: int, which: str, module: nn.Module, x: Tensor, rng: list | None = None) -> Tensor:
        """Run ``module`` on ``x`` from reset neuron state (and reset it after); check that the output keeps
        the shape and dtype of ``x``.
        With ``rng`` (a list), append the RNG state the call started from, or None if it drew no random
        numbers (so branches without dropout store nothing)."""
        reset_net(module)
        state = _RngState(x.device) if rng is not None else None
        out = module(x)
        if rng is not None:
            rng.append(None if state.unchanged() else state)
        # Reset again: a neuron's final membrane state is not needed (the next call resets it anyway), and
        # keeping it would hold one tensor per branch, memory that grows with depth.
        reset_net(module)
        if not isinstance(out, Tensor):
            raise TypeError(f"RevSequence block {index}: {which} ({type(module).__name__}) returned "
                            f"{type(out).__name__}, expected a Tensor")
        allowed = {x.dtype}
        if torch.is_autocast_enabled(x.device.type):
            allowed.add(torch.get_autocast_dtype(x.device.type))
        if out.shape != x.shape or out.dtype not in allowed:
            raise ValueError(
                f"RevSequence block {index}: {which} ({type(module).__name__}) maps {tuple(x.shape)} {x.dtype} "
                f"to {tuple(out.shape)} {out.dtype}; F and G must keep the shape and dtype of a half "
                f"(under autocast the autocast dtype is accepted)")
        return out

    # -------------------------------------------------------------------------------- fixed point

    def _run_blocks(self, x1: Tensor, x1f: Tensor, x2: Tensor, x2f: Tensor,
                    rng: list | None = None, checksums: list | None = None, finite: list | None = None):
        """The forward arithmetic shared by every path: ``(y1, y1f, y2, y2f)`` int32 halves and their
        float decodes. With grad enabled it is differentiable (straight-through couplings). ``finite``
        collects one bool tensor per branch call: whether its output was all finite."""
        R = self.frac_bits
        for i, block in enumerate(self.blocks):
            self._call_hooks("forward", i, x1, x2)
            if checksums is not None:
                checksums.append(_checksum(x1, x2))
            f = self._branch(i, "F", block.f, x2f, rng)
            if finite is not None:
                finite.append(torch.isfinite(f).all())
            y1, y1f = C.couple_ste(x1, x1f, f, R)
            g = self._branch(i, "G", block.g, y1f, rng)
            if finite is not None:
                finite.append(torch.isfinite(g).all())
            y2, y2f = C.couple_ste(x2, x2f, g, R)
            x1, x1f, x2, x2f = y1, y1f, y2, y2f
        return x1, x1f, x2, x2f

    def _run_blocks_no_grad(self, x1: Tensor, x2: Tensor, dtype: torch.dtype, rng: list | None = None,
                            checksums: list | None = None, finite: list | None = None):
        """The same arithmetic as :meth:`_run_blocks` without gradients, from the int32 input halves only, keeping
        as little alive as it can: a block holds its two int32 halves, the decoded half its branch reads and
        the branch's own work space (the coupling writes the new half and its decode in one pass, and every
        tensor is dropped as soon as nothing reads it). Returns ``(y1, decode(y1), y2, decode(y2))``."""
        R = self.frac_bits
        x2f = self.decode(x2, dtype)
        for i, block in enumerate(self.blocks):
            self._call_hooks("forward", i, x1, x2)
            if checksums is not None:
                checksums.append(_checksum(x1, x2))
            f = self._branch(i, "F", block.f, x2f, rng)
            del x2f
            if finite is not None:
                finite.append(torch.isfinite(f).all())
            x1, y1f = C.couple_decode(x1, f, R, dtype)
            del f
            g = self._branch(i, "G", block.g, y1f, rng)
            if finite is not None:
                finite.append(torch.isfinite(g).all())
            if i + 1 < len(self.blocks):
                del y1f
            x2, x2f = C.couple_decode(x2, g, R, dtype)
            del g
        return x1, y1f, x2, x2f

    def forward_fixed(self, q: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """int32 stream -> int32 stream through all blocks (no gradients). F and G see halves decoded to
        ``dtype``. A bijection of the int32 stream: :meth:`inverse_fixed` undoes it bit for bit."""
        if not isinstance(q, Tensor) or q.dtype != torch.int32:
            raise TypeError(f"forward_fixed: q must be an int32 tensor, got {getattr(q, 'dtype', type(q))}")
        d = self._dim(q, "q")
        x1, x2 = self._split(q, d)
        with torch.no_grad():
            y1, _, y2, _ = self._run_blocks_no_grad(x1, x2, dtype)
        return torch.cat([y1, y2], d)

    def inverse_fixed(self, q: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact inverse of :meth:`forward_fixed` (same ``dtype``). BatchNorm running statistics are left
        unchanged; with dropout in training mode the RNG state must equal the forward's."""
        if not isinstance(q, Tensor) or q.dtype != torch.int32:
            raise TypeError(f"inverse_fixed: q must be an int32 tensor, got {getattr(q, 'dtype', type(q))}")
        d = self._dim(q, "q")
        y1, y2 = self._split(q, d)
        R = self.frac_bits
        with torch.no_grad():
            for i in reversed(range(len(self.blocks))):
                block = self.blocks[i]
                with _frozen_running_stats(block.g):
                    g = self._branch(i, "G", block.g, self.decode(y1, dtype))
                x2 = C.uncouple(y2, g, R)
                with _frozen_running_stats(block.f):
                    f = self._branch(i, "F", block.f, self.decode(x2, dtype))
                x1 = C.uncouple(y1, f, R)
                self._call_hooks("inverse", i, x1, x2)
                y1, y2 = x1, x2
        return torch.cat([y1, y2], d)

    def inverse(self, y: Tensor) -> Tensor:
        """Float inverse: ``decode(inverse_fixed(encode(y)))`` in ``y``'s dtype. ``inverse(seq(x))`` equals
        ``decode(encode(x))`` exactly when every output value is exactly representable in ``y``'s dtype
        (float32: ``|y| < 2**(24 - frac_bits)``, i.e. 256 for frac_bits=16; float64: always)."""
        self._check_input(y, "y")
        return self.decode(self.inverse_fixed(self.encode(y), y.dtype), y.dtype)

    # ---------------------------------------------------------------------------------- forward

    def _check_input(self, x: object, what: str) -> int:
        if not isinstance(x, Tensor):
            raise TypeError(f"RevSequence: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"RevSequence: {what} must be a floating tensor, got {x.dtype}")
        return self._dim(x, what)

    def forward(self, x: Tensor) -> Tensor:
        d = self._check_input(x, "x")
        params = [p for p in self.parameters() if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if self.reversible and needs_grad:
            return _reversible_apply(self, d, x, params)
        q, xf = C.encode_ste(x, self.frac_bits, False)
        x1, x2 = self._split(q, d)
        x1f, x2f = self._split(xf, d)
        finite: list[Tensor] = []
        _, y1f, _, y2f = self._run_blocks(x1, x1f, x2, x2f, finite=finite)
        return _poison_if_not_finite(torch.cat([y1f, y2f], d), finite)


def _halves(t: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """The two halves of ``t`` along dim ``d``, as views."""
    h = t.shape[d] // 2
    return t.narrow(d, 0, h), t.narrow(d, h, h)


def _poison_if_not_finite(out: Tensor, finite: list[Tensor]) -> Tensor:
    """A branch output with NaN/inf cannot be carried by the int32 stream (the quantizer maps NaN to 0
    and saturates inf): make the whole sequence output NaN instead, as float arithmetic would, so a
    diverging network shows up in the loss. No synchronization; the same in both modes."""
    ok = torch.stack(finite).all()
    return torch.where(ok, out, torch.full((), float("nan"), dtype=out.dtype, device=out.device))


def _stream_sum(x: Tensor) -> Tensor:
    """A checksum of an int32 tensor: the int64 sum of its bits read as int64 pairs, wrapping modulo
    2**64 (integer addition is associative, so the result does not depend on the reduction order).
    Reading pairs is ~40x faster on CPU than the promoting ``int32.sum()``."""
    flat = x.reshape(-1)
    n = flat.numel()
    if not flat.is_contiguous() or flat.storage_offset() % 2:
        return flat.sum()
    total = flat[: n - n % 2].view(torch.int64).sum()
    return total + flat[-1].to(torch.int64) if n % 2 else total


def _checksum(x1: Tensor, x2: Tensor) -> Tensor:
    return torch.stack([_stream_sum(x1), _stream_sum(x2)])


@torch.compiler.disable
def _reversible_apply(seq: RevSequence, d: int, x: Tensor, params: list[nn.Parameter]) -> Tensor:
    # The engine's backward drives Python-level recomputation (neuron resets, RNG/autocast restore,
    # autograd.grad), which Dynamo cannot trace: it runs eagerly, one graph break around the sequence.
    # F and G may themselves be compiled modules.
    return _ReversibleFunction.apply(x, seq, d, *params)


class _ReversibleFunction(torch.autograd.Function):
    """Forward without a graph; backward by exact reconstruction. Saves the output stream: the float
    output tensor itself where it decodes the int32 stream exactly (see :func:`_output_is_exact`), else the
    int32 output halves."""

    @staticmethod
    def forward(ctx, x: Tensor, seq: RevSequence, d: int, *params: nn.Parameter) -> Tensor:
        ctx.seq, ctx.d, ctx.x_dtype, ctx.params = seq, d, x.dtype, params
        ctx.autocast = _AutocastState(x.device.type)
        ctx.rng = []
        ctx.checksums = [] if seq.check else None
        ctx.output_sum = None
        with torch.no_grad():
            x1, x2 = (seq.encode(half).contiguous() for half in _halves(x, d))
            finite: list[Tensor] = []
            y1, y1f, y2, y2f = seq._run_blocks_no_grad(x1, x2, x.dtype, ctx.rng, ctx.checksums, finite)
            del x1, x2
            ctx.from_output = _output_is_exact(x.dtype, y1, y2, finite)
            if ctx.from_output:
                if seq.check:
                    ctx.output_sum = _checksum(y1, y2)
                del y1, y2  # before the output is assembled: the float output re-encodes to them
            out = torch.cat([y1f, y2f], d)
            del y1f, y2f
            if not ctx.from_output:
                out = _poison_if_not_finite(out, finite)
        if ctx.from_output:
            ctx.save_for_backward(out)  # the returned tensor: no extra memory
        else:
            ctx.save_for_backward(y1, y2)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        if not ctx.from_output:
            y1, y2 = ctx.saved_tensors
            return _ReversibleFunction._walk_back(ctx, grad_out, y1, y2, None)
        with _output_stream(ctx.seq, ctx.saved_tensors[0], ctx.d) as (y1, y2, output_sum):
            output_sums = None if ctx.output_sum is None else (ctx.output_sum, output_sum)
            return _ReversibleFunction._walk_back(ctx, grad_out, y1, y2, output_sums)

    @staticmethod
    def _walk_back(ctx, grad_out: Tensor, y1: Tensor, y2: Tensor, output_sums: tuple[Tensor, Tensor] | None):
        """Backward through the blocks from the int32 output halves ``y1``, ``y2`` (not modified)."""
        seq: RevSequence = ctx.seq
        d, dtype, R = ctx.d, ctx.x_dtype, seq.frac_bits
        slot = {id(p): k for k, p in enumerate(ctx.params)}  # the parameters given to forward, in order
        param_grads: list[Tensor | None] = [None] * len(ctx.params)
        # Views of the incoming gradient, not copies: autograd holds grad_out for the whole call anyway.
        dy1, dy2 = _halves(grad_out.to(dtype), d)
        y1f = C.decode(y1, R, dtype)
        rebuilt_sums = []
        # Every tensor is dropped as soon as nothing reads it: while F is recomputed, the engine holds Y1,
        # the rebuilt X2 (int32), X2's decode (F's input) and the two stream gradients -- not Y2 or Y1's decode.
        for i in reversed(range(len(seq.blocks))):
            block = seq.blocks[i]
            g, gy1 = _recompute_vjp(seq, i, "G", block.g, y1f, dy2, ctx.rng[2 * i + 1], ctx.autocast,
                                    slot, param_grads)
            del y1f
            x2, x2f, dy1 = C.uncouple_step(y2, g, dy1, gy1, R, dtype)
            del g, gy1, y2
            f, gx2 = _recompute_vjp(seq, i, "F", block.f, x2f, dy1, ctx.rng[2 * i], ctx.autocast,
                                    slot, param_grads)
            del x2f
            x1, y1f, dy2 = C.uncouple_step(y1, f, dy2, gx2, R, dtype)
            del f, gx2, y1
            seq._call_hooks("backward", i, x1, x2)
            if ctx.checksums is not None:
                rebuilt_sums.append(_checksum(x1, x2))
            y1, y2 = x1, x2
            del x1, x2
        del y1f
        if ctx.checksums is not None:
            _compare_checksums(seq, ctx.checksums, rebuilt_sums[::-1], output_sums)
        grad_x = torch.cat([dy1, dy2], d) if ctx.needs_input_grad[0] else None
        return (grad_x, None, None, *param_grads)


# float32 holds every integer of magnitude below 2**24 exactly, so decode (int32 -> float32, then an exact
# scale by a power of two) loses nothing there and encode(decode(y_q)) == y_q.
_FLOAT32_EXACT = 2 ** 24


def _output_is_exact(dtype: torch.dtype, y1: Tensor, y2: Tensor, finite: list[Tensor]) -> bool:
    """Whether the float output ``decode(y_q, dtype)`` determines the int32 stream ``y_q`` bit for bit and is
    the plain decode (no branch output was non-finite, so the output was not replaced by NaN). float16/
    bfloat16: never (no synchronization). float32: every ``|y_q| < 2**24``; float64: always. This reads the
    answer on the host: one synchronization per sequence forward, the price of saving the output instead
    of a second copy of the stream."""
    if dtype not in (torch.float32, torch.float64):
        return False
    flags = [torch.stack(finite).all()]
    if dtype == torch.float32:
        for y in (y1, y2):
            lo, hi = torch.aminmax(y)
            flags.append((lo > -_FLOAT32_EXACT) & (hi < _FLOAT32_EXACT))
    return bool(torch.stack(flags).all())


@contextlib.contextmanager
def _output_stream(seq: RevSequence, out: Tensor, d: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
    """The int32 output halves re-encoded from the saved float output (exact, see :func:`_output_is_exact`), and
    their checksum (None without ``check``).

    float32: the output's own memory holds them while backward runs (an int32 view of it, written half by
    half through ``.data``, so autograd's version counter is untouched), and the float values are written back
    bit for bit on exit, also when backward fails; nothing reads the output meanwhile (the layers after the
    sequence have finished their backward; a second backward with ``retain_graph`` finds it restored). The
    stream thus costs no memory beyond the output. float64: two new int32 halves. (encode checks its input:
    one more host synchronization per sequence backward.)"""
    halves = _halves(out, d)
    in_place = out.dtype == torch.float32
    stream = [None, None]
    sums = []
    written = []
    try:
        for k in (0, 1):
            try:
                q = C.encode(halves[k], seq.frac_bits).contiguous()
            except ValueError as e:  # only if the output was overwritten (e.g. through .data) with unencodable values
                raise ReconstructionError(
                    f"RevSequence output: the float output kept for backward no longer encodes the output stream "
                    f"({e}); was it modified after the forward?") from e
            if seq.check:
                sums.append(_stream_sum(q))
            if in_place:
                view = halves[k].data.view(torch.int32)
                view.copy_(q)
                written.append(k)
                stream[k] = view
            else:
                stream[k] = q
            del q
        yield stream[0], stream[1], torch.stack(sums) if sums else None
    finally:
        for k in written:
            halves[k].data.copy_(C.decode(stream[k], seq.frac_bits, out.dtype))


def _vjp_of_recomputation(run: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor, want_x: bool,
                          params: list[Tensor], grad: Tensor, rng: _RngState | None, autocast: _AutocastState,
                          contiguous_grad: bool = False) -> tuple[Tensor, tuple[Tensor | None, ...] | None]:
    """Recompute ``run(x)`` (a call of ``module``) as the forward ran it -- under its RNG state (``rng``; None: it
    drew none) and autocast state, with ``module``'s BatchNorm running statistics left as the forward set them --
    and take the vector-Jacobian product with ``grad`` by ``torch.autograd.grad`` for ``x`` (if ``want_x``) and
    ``params``. Returns ``(output, vjps)``: the output detached, and one vjp per input (None where unused), or
    None when the output depends on nothing differentiable. ``contiguous_grad``: pass ``grad`` contiguous, as
    ordinary autograd would (some backward kernels, e.g. oneDNN's, sum in another order for other layouts)."""
    x = x.detach().requires_grad_(want_x)
    inputs = ([x] if want_x else []) + list(params)
    # Running statistics are restored only after the vjp: BatchNorm's backward checks the versions
    # of the buffers it saved.
    with _frozen_running_stats(module):
        with torch.enable_grad(), _RngState.restore(rng), autocast.restored():
            out = run(x)
        if not out.requires_grad:
            return out.detach(), None
        grad = grad.to(out.dtype)
        grads = torch.autograd.grad(out, inputs, grad.contiguous() if contiguous_grad else grad, allow_unused=True)
        del grad
    return out.detach(), grads


def _recompute_vjp(seq: RevSequence, index: int, which: str, module: nn.Module, x: Tensor, grad: Tensor,
                   rng: _RngState | None, autocast: _AutocastState, slot: dict[int, int],
                   param_grads: list[Tensor | None]) -> tuple[Tensor, Tensor]:
    """Recompute branch ``which`` of block ``index`` on ``x`` and return ``(output, vjp w.r.t. x)``; the vjps of
    the parameters in ``slot`` are added to ``param_grads``. The output is detached. The gradient is passed
    contiguous: the vjps must be bit-identical to those of ``reversible=False``."""
    params = [p for p in module.parameters() if id(p) in slot]
    out, grads = _vjp_of_recomputation(lambda t: seq._branch(index, which, module, t), module, x, True, params,
                                       grad, rng, autocast, contiguous_grad=True)
    if grads is None:
        return out, torch.zeros_like(x)
    for p, gp in zip(params, grads[1:]):
        if gp is not None:
            k = slot[id(p)]
            param_grads[k] = gp if param_grads[k] is None else param_grads[k] + gp
    gx = grads[0] if grads[0] is not None else torch.zeros_like(x)
    return out, gx.to(x.dtype)


def _compare_checksums(seq: RevSequence, forward: list[Tensor], rebuilt: list[Tensor],
                       output: tuple[Tensor, Tensor] | None = None) -> None:
    """One synchronization for the whole sequence. ``output``: the checksums of the output stream in
    forward and as re-encoded from the saved float output; if they differ, everything rebuilt from it is
    wrong and the output is named. Otherwise the faulty block is the last one (in forward order) whose
    rebuilt input differs: every earlier block is rebuilt from its wrong output."""
    if output is not None:
        forward, rebuilt = [*forward, output[0]], [*rebuilt, output[1]]
    bad = (torch.stack(forward) != torch.stack(rebuilt)).cpu()
    if not bool(bad.any()):
        return
    if output is not None:
        if bool(bad[-1].any()):
            raise ReconstructionError(
                "RevSequence output: the float output kept for backward does not re-encode to the output "
                "stream of the forward (was it modified after the forward, e.g. through .data?)")
        bad = bad[:-1]
    i = int(bad.any(dim=1).nonzero().max())
    block = seq.blocks[i]
    # Backward rebuilds X2 first (from the verified outputs and G), then X1 from F(X2): a wrong X2 is
    # G's fault (and usually spoils X1 too); a wrong X1 alone is F's.
    which, branch = ("G", block.g) if bad[i, 1] else ("F", block.f)
    raise ReconstructionError(
        (f"RevSequence block {i}: the input rebuilt in backward differs from the forward's "
         f"(X1 {'differs' if bad[i, 0] else 'equal'}, X2 {'differs' if bad[i, 1] else 'equal'}): "
         f"branch {which} ({type(branch).__name__}) did not recompute bit-identically (nondeterministic "
         f"kernel, state not reset, or randomness outside torch's RNG). Module: {branch!r}")[:2000])
