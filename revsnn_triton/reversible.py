"""Exactly invertible reversible blocks and the memory-saving engine that runs them.

A :class:`RevBlock` splits its input stream into two equal halves along ``split_dim`` and couples them:
``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)`` (:meth:`RevBlock.couple`); backward undoes it, ``X2 = Y2 - G(Y1)``,
``X1 = Y1 - F(X2)`` (:meth:`RevBlock.uncouple`). A :class:`RevSequence` runs blocks on a **fixed-point stream**
(:mod:`revsnn_triton.ops.coupling`): the branch outputs are quantized to multiples of ``2**-frac_bits`` before they
are added, in integer arithmetic that wraps modulo 2**32, so the uncoupling is exact for every input as long as F
and G are recomputed bit-identically (:mod:`revsnn_triton.replay` makes sure they see what the forward saw).

Memory. The forward (``reversible=True``, training) keeps no graph: per block the parameters' version counters, per
branch call a small :class:`~revsnn_triton.replay.CallRecord` (RNG state only if the call drew random numbers,
autocast state, train/eval flags, the BatchNorm statistics of :class:`~revsnn_triton.batchnorm.SeqBatchNorm`
layers) and, with ``check=True``, two int32 checksums per block; and the output stream. The output stream is the
returned float tensor itself whenever it holds the stream exactly (float64 always; float32 when every intermediate
value has ``|value| < 2**(24 - frac_bits)``, 256 at frac_bits=16), else an int32 copy. Backward walks the blocks in
reverse, one autograd node per block (each block's parameter gradients are accumulated as soon as the block is
done): it recomputes each branch from its rebuilt input, takes the vector-Jacobian product with
``torch.autograd.grad``, and rebuilds the block input **in place**, in the output's memory when nothing else
holds the output; the stream gradients live **in the incoming gradient's memory** when nothing else holds it, so the
gradient of the input is that same tensor. Otherwise one copy is made (the output or the gradient stays intact).

Branches may read tensors other than the sequence's parameters (a parent's ``nn.Parameter``, a conditioning tensor
computed upstream that requires grad): the forward finds them and they get the gradients ``reversible=False`` gives.

``recompute_batch=N`` ("floor mode"): F and G run on micro-batches of N samples (dim 1 of ``[T, B, ...]``), in
forward and backward, so what a branch holds during backward scales with N instead of B; BatchNorm layers must be
:class:`~revsnn_triton.batchnorm.SeqBatchNorm` (their batch-wide statistics and statistics gradients take extra
passes, see :class:`~revsnn_triton.replay.Segment`).

``reversible=False`` runs the same blocks and the same quantized arithmetic with ordinary autograd
(straight-through gradients through the quantizers): the baseline the reversible gradients are compared with.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

from revsnn_triton import replay
from revsnn_triton.ops import coupling as C

__all__ = ["RevBlock", "RevSequence", "ReconstructionError", "StreamOverflowError"]

StreamHook = Callable[[str, int, Tensor, Tensor], None]
# run(module, name, src, dst, apply): run branch ``name`` on half ``src``, hand its output to ``apply(dst, ...)``
BranchRunner = Callable[[nn.Module, str, int, int, Callable], None]


class ReconstructionError(RuntimeError):
    """A block input rebuilt in backward differs from the one the forward saw (nondeterministic F or G), or
    something the reconstruction depends on changed between forward and backward."""


class StreamOverflowError(ValueError):
    """A reversible sequence's stream left the range of its fixed-point grid (values would wrap around)."""


class RevBlock(nn.Module):
    """One reversible coupling block: ``Y1 = X1 + F(X2)``, ``Y2 = X2 + G(Y1)``.

    Args:
        f, g: modules mapping a half ``[T, B, ..., C/2 (at split_dim), ...]`` to the same shape and dtype (under
            autocast, the autocast dtype is accepted too). Their neuron state is reset before and after every call.
            They must be deterministic functions of their input, their parameters and the RNG state.
        split_dim: dimension split into halves (2 = channels of ``[T, B, C, H, W]`` or of tokens ``[T, B, C, N]``;
            -1 for ``[T, B, N, D]``).

    A block runs inside a :class:`RevSequence`, which owns the fixed-point stream. :meth:`couple` and
    :meth:`uncouple` are the block's arithmetic; the sequence supplies how a branch is run (with or without
    recording, recomputed with its vector-Jacobian product, in micro-batches).
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

    def couple(self, stream: "_Stream", run: BranchRunner) -> None:
        """Forward: ``Y1 = X1 + F(X2)``, then ``Y2 = X2 + G(Y1)`` (halves 0 and 1 of ``stream``, in place)."""
        run(self.f, "F", 1, 0, stream.couple_)
        run(self.g, "G", 0, 1, stream.couple_)

    def uncouple(self, stream: "_Stream", run: BranchRunner) -> None:
        """Inverse: ``X2 = Y2 - G(Y1)``, then ``X1 = Y1 - F(X2)`` (in place)."""
        run(self.g, "G", 0, 1, stream.uncouple_)
        run(self.f, "F", 1, 0, stream.uncouple_)

    def forward(self, *args, **kwargs):
        raise RuntimeError("RevBlock is run by a RevSequence (it owns the fixed-point stream): "
                           "use RevSequence([block, ...])")

    def extra_repr(self) -> str:
        return f"split_dim={self.split_dim}"


# ------------------------------------------------------------------------------------------------- streams

def _halves(t: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """The two halves of ``t`` along dim ``d``, as views."""
    h = t.shape[d] // 2
    return t.narrow(d, 0, h), t.narrow(d, h, h)


def _alias(t: Tensor) -> Tensor:
    """A tensor on ``t``'s memory with its own version counter (in-place updates of the stream elsewhere are then
    not mistaken by autograd for modifications of a tensor a recomputed graph saved). Size-1 dims get the strides a
    dense tensor would give them (they address nothing), so ops that follow the input's stride order see the same
    order as for a dense copy."""
    strides = list(t.stride())
    for i in reversed(range(t.dim())):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1] if i + 1 < t.dim() else 1
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape,
                                                               strides)


def _sole_owner(t: Tensor, extra: int = 0) -> bool:
    """Whether nothing but the caller's reference (plus ``extra`` known ones) holds ``t`` or its memory."""
    use_count = getattr(t, "_use_count", None)
    if use_count is None:
        return False
    return use_count() <= 1 + extra and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2 + extra


class _Stream:
    """The in-place fixed-point stream of one sequence call: ``data`` (int32, or float32/float64 storage holding
    the stream exactly) split into halves along ``d``; branches run on micro-batches along dim 1."""

    def __init__(self, data: Tensor, d: int, frac_bits: int, dtype: torch.dtype,
                 flags: Optional[Tensor] = None) -> None:
        self.data, self.d, self.R, self.dtype, self.flags = data, d, frac_bits, dtype, flags

    def half(self, k: int, chunk: Optional[slice] = None) -> Tensor:
        h = _halves(self.data, self.d)[k]
        return h if chunk is None or chunk == slice(None) else h[:, chunk]

    def read(self, k: int, chunk: Optional[slice] = None, layout_free: bool = False) -> Tensor:
        """A branch's input: the half in the sequence's float dtype, dense. With ``layout_free`` and float storage of
        that dtype: an alias of the stream memory (a strided view, no copy)."""
        h = self.half(k, chunk)
        if layout_free and h.dtype == self.dtype:
            return _alias(h)
        return C.stream_decode(h, self.R, self.dtype)

    def couple_(self, k: int, chunk: Optional[slice], f: Tensor, row: Optional[int] = None) -> None:
        flags = None if self.flags is None or row is None else self.flags[row]
        C.stream_couple_(self.half(k, chunk), f, self.R, flags)

    def uncouple_(self, k: int, chunk: Optional[slice], f: Tensor, row: Optional[int] = None) -> None:
        C.stream_uncouple_(self.half(k, chunk), f, self.R)

    def ints(self, k: int) -> Tensor:
        """The int32 values of half ``k`` (a copy for float storage): what stream hooks see."""
        h = self.half(k)
        return h if h.dtype == torch.int32 else C.encode(h, self.R)

    def checksum(self) -> Tensor:
        """The sums of the integer values of the two halves, modulo 2**32."""
        return torch.stack([_stream_sum(self.half(0), self.R), _stream_sum(self.half(1), self.R)])


class _AutogradStream:
    """The stream of ``reversible=False``: per half an int32 tensor and its differentiable float carrier,
    coupled by the straight-through ops (ordinary autograd keeps every block's graph)."""

    def __init__(self, x: Tensor, d: int, frac_bits: int, flags: Tensor) -> None:
        q, xf = C.encode_ste(x, frac_bits)
        # dense halves, as the reversible forward decodes them (some reductions depend on the memory layout)
        self.q, self.f = list(_halves(q, d)), [h.contiguous() for h in _halves(xf, d)]
        self.d, self.R, self.dtype, self.flags = d, frac_bits, x.dtype, flags

    def read(self, k: int, chunk: Optional[slice] = None) -> Tensor:
        # a branch may modify its input in place (e.g. a ReLU(inplace=True) first); the carrier is the stream
        # itself here (it becomes the output), so the branch gets a copy, as the reversible forward's decode is one
        return self.f[k].clone()

    def couple_(self, k: int, chunk: Optional[slice], f: Tensor, row: Optional[int] = None) -> None:
        if row is not None:
            self.flags[row].bitwise_or_(C.coupling_flags(self.q[k], f, self.R))
        self.q[k], self.f[k] = C.couple_ste(self.q[k], self.f[k], f, self.R)

    def ints(self, k: int) -> Tensor:
        return self.q[k]

    def output(self) -> Tensor:
        return torch.cat(self.f, self.d)


def _stream_sum(x: Tensor, frac_bits: int) -> Tensor:
    """The sum of a stream view's integer values modulo 2**32 (int32; integer addition is associative, so it does
    not depend on the reduction order or the layout). Float storage is converted chunk by chunk."""
    if x.dtype == torch.int32:
        return x.sum(dtype=torch.int32)
    total = torch.zeros((), dtype=torch.int32, device=x.device)
    if x.numel() == 0:
        return total
    step = max(1, (1 << 20) // max(1, x.numel() // x.shape[0]))
    for i in range(0, x.shape[0], step):
        total += (x[i:i + step] * 2.0 ** frac_bits).to(torch.int32).sum(dtype=torch.int32)
    return total


# ------------------------------------------------------------------------------------------------ sequence

class RevSequence(nn.Module):
    """A sequence of :class:`RevBlock` on an int32 fixed-point stream.

    Args:
        blocks: iterable of :class:`RevBlock`, all with the same ``split_dim``.
        frac_bits: fractional bits R of the stream, in [1, 30]; values are multiples of ``2**-R`` in
            ``representable_range(R)`` (R=16: [-32768, 32768)). A stream that leaves that range raises
            :class:`StreamOverflowError` naming the block and branch.
        reversible: True: memory-saving forward (keeps only the output stream) and recomputing backward; False:
            ordinary autograd through the same quantized math (for debugging and comparison).
        check: exactness guard (reversible only): checksums of both halves of every block input kept in forward and
            compared with the rebuilt input in backward; a mismatch raises :class:`ReconstructionError` naming the
            block and the branch.
        recompute_batch: None (default): F and G run on the whole batch. N: on micro-batches of N samples (dim 1 of
            the input) in forward and backward ("floor mode": backward memory of a branch scales with N; every
            BatchNorm in F and G must be a :class:`~revsnn_triton.batchnorm.SeqBatchNorm`).

    ``forward(x)``: ``x`` float16/bfloat16/float32/float64 ``[T, B, ...]`` with an even size at ``split_dim`` -> same
    shape and dtype. The input is quantized once on entry (round half to even; non-finite or out-of-range values
    raise ``ValueError``) and the output dequantized on exit; F and G see the halves in ``x``'s dtype. The gradient
    through the quantizers is straight-through. A branch output with NaN/inf cannot be carried by the stream, so
    the whole output becomes NaN, as float arithmetic would make it. Checking the stream costs one host
    synchronization per forward. Double backward is not supported.
    """

    def __init__(self, blocks: Iterable[RevBlock], frac_bits: int = 16, reversible: bool = True,
                 check: bool = True, recompute_batch: Optional[int] = None) -> None:
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
        if recompute_batch is not None and (isinstance(recompute_batch, bool) or not isinstance(recompute_batch, int)
                                            or recompute_batch < 1):
            raise ValueError(f"RevSequence: recompute_batch must be None or an int >= 1, got {recompute_batch!r}")
        self.blocks = nn.ModuleList(blocks)
        self.split_dim = blocks[0].split_dim
        self.frac_bits = C.check_frac_bits(frac_bits)
        self.reversible = reversible
        self.check = check
        self.recompute_batch = recompute_batch
        if recompute_batch is not None:
            for i, b in enumerate(blocks):
                for name, branch in (("F", b.f), ("G", b.g)):
                    replay.Segment(branch, f"RevSequence block {i}: {name}", [slice(0, 1), slice(1, 2)])
        self._stream_hooks: OrderedDict[int, StreamHook] = OrderedDict()

    def extra_repr(self) -> str:
        extra = "" if self.recompute_batch is None else f", recompute_batch={self.recompute_batch}"
        return f"frac_bits={self.frac_bits}, reversible={self.reversible}, check={self.check}{extra}"

    # ----------------------------------------------------------------------------------- public helpers

    def register_stream_hook(self, hook: StreamHook) -> RemovableHandle:
        """Debug hook ``hook(phase, index, x1_q, x2_q)`` called with the int32 input halves of block ``index``:
        ``phase="forward"`` when the forward reaches the block, ``"backward"`` when backward has rebuilt them (and
        ``"inverse"`` in :meth:`inverse_fixed`). The tensors must not be modified."""
        if not callable(hook):
            raise TypeError(f"register_stream_hook: hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self._stream_hooks)
        self._stream_hooks[handle.id] = hook
        return handle

    def _call_hooks(self, phase: str, index: int, stream) -> None:
        for hook in self._stream_hooks.values():
            hook(phase, index, stream.ints(0), stream.ints(1))

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
        if self.recompute_batch is not None and (t.dim() < 2 or d == 1):
            raise ValueError(f"RevSequence: with recompute_batch, {what} must be [T, B, ...] (micro-batches are taken "
                             f"along dim 1) and split_dim={self.split_dim} must not be the batch dim; got shape "
                             f"{tuple(t.shape)}")
        if t.shape[d] % 2:
            raise ValueError(f"RevSequence: {what} has odd size {t.shape[d]} along split_dim={self.split_dim} "
                             f"(shape {tuple(t.shape)}); the stream is split into two equal halves")
        return d

    def _check_input(self, x: object, what: str) -> int:
        if not isinstance(x, Tensor):
            raise TypeError(f"RevSequence: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in C.FLOAT_DTYPES:
            raise TypeError(f"RevSequence: {what} must be a floating tensor, got {x.dtype}")
        return self._dim(x, what)

    # -------------------------------------------------------------------------------- the two loops

    def _run_forward(self, stream, run_block: Callable[[int], BranchRunner], phase: str = "forward") -> None:
        """Every block's coupling, in order."""
        for i, block in enumerate(self.blocks):
            if self._stream_hooks:
                self._call_hooks(phase, i, stream)
            block.couple(stream, run_block(i))

    def _run_inverse(self, stream, run_block: Callable[[int], BranchRunner]) -> None:
        """Every block's uncoupling, in reverse order."""
        for i in reversed(range(len(self.blocks))):
            self.blocks[i].uncouple(stream, run_block(i))
            if self._stream_hooks:
                self._call_hooks("inverse", i, stream)

    def _direct(self, stream, dtype: torch.dtype, record_flags: bool = True) -> Callable[[int], BranchRunner]:
        """Runners that call each branch once on the whole batch (no recording)."""
        def run_block(i: int) -> BranchRunner:
            def run(module, name, src, dst, apply):
                x = stream.read(src)
                out = replay.run_fresh(module, x, f"RevSequence block {i}: {name}")
                _check_branch_output(i, name, module, out, x, dtype)
                del x
                apply(dst, None, out, _flag_row(i, name) if record_flags else None)
            return run
        return run_block

    # -------------------------------------------------------------------------------- fixed point

    def forward_fixed(self, q: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """int32 stream -> int32 stream through all blocks (no gradients). F and G see halves decoded to ``dtype``.
        A bijection of the int32 stream: :meth:`inverse_fixed` undoes it bit for bit."""
        if not isinstance(q, Tensor) or q.dtype != torch.int32:
            raise TypeError(f"forward_fixed: q must be an int32 tensor, got {getattr(q, 'dtype', type(q))}")
        d = self._dim(q, "q")
        stream = _Stream(q.clone(memory_format=torch.contiguous_format), d, self.frac_bits, _check_dtype(dtype))
        with torch.no_grad():
            self._run_forward(stream, self._direct(stream, dtype, record_flags=False))
        return stream.data

    def inverse_fixed(self, q: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Exact inverse of :meth:`forward_fixed` (same ``dtype``). BatchNorm running statistics are left unchanged;
        with dropout in training mode the RNG state must equal the forward's."""
        if not isinstance(q, Tensor) or q.dtype != torch.int32:
            raise TypeError(f"inverse_fixed: q must be an int32 tensor, got {getattr(q, 'dtype', type(q))}")
        d = self._dim(q, "q")
        stream = _Stream(q.clone(memory_format=torch.contiguous_format), d, self.frac_bits, _check_dtype(dtype))
        with torch.no_grad(), replay.frozen_statistics(self):
            self._run_inverse(stream, self._direct(stream, dtype, record_flags=False))
        return stream.data

    def inverse(self, y: Tensor) -> Tensor:
        """Float inverse: ``decode(inverse_fixed(encode(y)))`` in ``y``'s dtype. ``inverse(seq(x))`` equals
        ``decode(encode(x))`` (``x`` on the fixed-point grid) exactly whenever every output value is exactly
        representable in ``y``'s dtype (float32: ``|y| < 2**(24 - frac_bits)``, i.e. 256 for frac_bits=16; float64:
        always)."""
        self._check_input(y, "y")
        return self.decode(self.inverse_fixed(self.encode(y), y.dtype), y.dtype)

    # ---------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor) -> Tensor:
        d = self._check_input(x, "x")
        params = [p for p in self.parameters() if p.requires_grad]
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if self.reversible and needs_grad:
            return _reversible_forward(self, x, d)
        flags = C.new_flags(2 * len(self.blocks) + 1, x.device)
        if needs_grad:  # reversible=False: ordinary autograd through the same quantized arithmetic
            stream = _AutogradStream(x, d, self.frac_bits, flags)
            self._run_forward(stream, self._direct(stream, x.dtype))
            return _finish(self, x, flags, stream.output())
        with torch.no_grad():
            stream = _Stream(torch.empty(x.shape, dtype=torch.int32, device=x.device), d, self.frac_bits,
                             x.dtype, flags)
            C.stream_encode_(stream.data, x, self.frac_bits, flags[-1])
            self._run_forward(stream, self._direct(stream, x.dtype))
            return _finish(self, x, flags, lambda: C.stream_decode(stream.data, self.frac_bits, x.dtype))


@torch.compiler.disable
def _reversible_forward(seq: RevSequence, x: Tensor, d: int) -> Tensor:
    # The engine's backward drives Python-level recomputation (neuron resets, RNG/autocast restore, autograd.grad),
    # which Dynamo cannot trace: it runs eagerly, one graph break around the sequence. F and G may themselves be
    # compiled modules.
    return _SequenceCall(seq, x, d).run()


def _check_dtype(dtype: object) -> torch.dtype:
    if dtype not in C.FLOAT_DTYPES:
        raise TypeError(f"RevSequence: dtype must be one of {[str(t) for t in C.FLOAT_DTYPES]}, got {dtype!r}")
    return dtype  # type: ignore[return-value]


def _flag_row(i: int, name: str) -> int:
    return 2 * i + (name == "G")


def _check_branch_output(i: int, name: str, module: nn.Module, out: Tensor, x: Tensor, dtype: torch.dtype) -> None:
    allowed = {dtype}
    if torch.is_autocast_enabled(x.device.type):
        allowed.add(torch.get_autocast_dtype(x.device.type))
    if out.shape != x.shape or out.dtype not in allowed:
        raise ValueError(
            f"RevSequence block {i}: {name} ({type(module).__name__}) maps {tuple(x.shape)} {dtype} to "
            f"{tuple(out.shape)} {out.dtype}; F and G must keep the shape and dtype of a half (under autocast the "
            f"autocast dtype is accepted)")


def _finish(seq: RevSequence, x: Tensor, flags: Tensor, output) -> Tensor:
    """The one synchronization of a forward: raise for an input that cannot be encoded or a stream that overflowed;
    return the output (``output``: a tensor or a callable making it), NaN where a branch output was not finite.
    Inside ``torch.compile`` (which cannot raise on a value without a graph break) the output is made NaN instead of
    raising, without synchronizing: a compiled forward's loss shows the overflow."""
    if torch.compiler.is_compiling():
        out = output() if callable(output) else output
        bad = (flags[:, C.OVERFLOW] | flags[:, C.NONFINITE]).any()
        return torch.where(bad, torch.full((), float("nan"), dtype=out.dtype, device=out.device), out)
    f = flags.cpu()
    _raise_for_flags(seq, x, f)
    out = output() if callable(output) else output
    if bool(f[:, C.NONFINITE].any()):
        out = out.masked_fill(torch.ones((), dtype=torch.bool, device=out.device), float("nan"))
    return out


def _raise_for_flags(seq: RevSequence, x: Tensor, f: Tensor) -> None:
    if bool(f[-1, C.OVERFLOW] or f[-1, C.NONFINITE]):
        from revsnn_triton.ops.coupling.reference import raise_not_encodable
        raise_not_encodable(x, seq.frac_bits, False, "RevSequence input x")
    bad = f[:-1, C.OVERFLOW].nonzero()
    nonfinite = f[:-1, C.NONFINITE].nonzero()
    # after a non-finite branch output the stream holds saturated values, and whatever overflows later is a
    # consequence of it: the output is NaN then (the loss shows the divergence), not an overflow error
    if len(bad) and not (len(nonfinite) and int(nonfinite[0]) <= int(bad[0])):
        row = int(bad[0])
        i, name = row // 2, "FG"[row % 2]
        branch = getattr(seq.blocks[i], name.lower())
        lo, hi = C.representable_range(seq.frac_bits)
        raise StreamOverflowError(
            f"RevSequence block {i}: branch {name} ({type(branch).__name__}) took the stream beyond the fixed-point "
            f"range [{lo:g}, {hi:g}] of frac_bits={seq.frac_bits} (its values would wrap around). The network's "
            f"values grew too large: lower the learning rate, or use a smaller frac_bits (each bit less doubles the "
            f"range)")


# ----------------------------------------------------------------------------- the reversible engine

class _SequenceCall:
    """One training forward of a :class:`RevSequence` and its backward: the stream, what the forward recorded, and
    the gradient buffer. Shared by the per-block autograd nodes (:class:`_BlockFunction`)."""

    def __init__(self, seq: RevSequence, x: Tensor, d: int) -> None:
        self.seq, self.d, self.dtype, self.R = seq, d, x.dtype, seq.frac_bits
        self.x = x
        self.chunks = replay.micro_batches(x.shape[1], seq.recompute_batch)
        self.flags = C.new_flags(2 * len(seq.blocks) + 1, x.device)
        self.records: dict[tuple[int, str], replay.CallRecord] = {}
        self.inputs: dict[tuple[int, str], list[Tensor]] = {}  # per branch: params + externals, for its vjp
        self.block_inputs: list[list[Tensor]] = []             # per block: params + externals (Function inputs)
        self.versions: list[list[int]] = []
        self.checksums: list[Tensor] = []
        self.grad: Optional[Tensor] = None
        self.int_stream: Optional[Tensor] = None
        self.float_storage = False
        self.output_sum: Optional[Tensor] = None
        self.position = len(seq.blocks)  # the stream holds the output of block position - 1
        self.param_grads: dict[int, Tensor] = {}

    # ----------------------------------------------------------------------------------- forward

    def run(self) -> Tensor:
        seq = self.seq
        stream = _Stream(torch.empty(self.x.shape, dtype=torch.int32, device=self.x.device), self.d, self.R,
                         self.dtype, self.flags)
        with torch.no_grad():
            C.stream_encode_(stream.data, self.x, self.R, self.flags[-1])
            for i, block in enumerate(seq.blocks):
                params = [p for p in block.parameters() if p.requires_grad]
                if seq.check:
                    self.checksums.append(stream.checksum())
                if seq._stream_hooks:
                    seq._call_hooks("forward", i, stream)
                found: dict[int, Tensor] = {id(p): p for p in params}
                block.couple(stream, self._recorder(i, stream, found))
                self.block_inputs.append(list(found.values()))
                self.versions.append([p._version for p in params])
            x, out = self.x, self._output(stream)
        self.out = out  # handed to the last block's node (not as an input: it is that node's output)
        carrier = x
        for i in range(len(seq.blocks)):
            carrier = _BlockFunction.apply(carrier, self, i, *self.block_inputs[i])
        return carrier

    def _recorder(self, i: int, stream: _Stream, found: dict[int, Tensor]) -> BranchRunner:
        def run(module, name, src, dst, apply):
            segment = replay.Segment(module, f"RevSequence block {i}: {name}", self.chunks)

            def write(chunk, out):
                _check_branch_output(i, name, module, out, stream.half(src, chunk), self.dtype)
                apply(dst, chunk, out, _flag_row(i, name))

            record = segment.forward(lambda chunk: stream.read(src, chunk), write)
            self.records[(i, name)] = record
            found.update((id(t), t) for t in record.externals)
            self.inputs[(i, name)] = segment.params + record.externals
        return run

    def _output(self, stream: _Stream) -> Tensor:
        """The one synchronization: check the flags, then choose how the output stream is kept."""
        f = self.flags.cpu()
        _raise_for_flags(self.seq, self.x, f)
        if self.seq.check:
            self.output_sum = stream.checksum()
        nonfinite = bool(f[:, C.NONFINITE].any())
        exact = not nonfinite and (self.dtype == torch.float64 or (
            self.dtype == torch.float32 and not bool(f[:, C.INEXACT].any())))
        self.x = None  # the input is not needed by backward
        if exact and self.dtype == torch.float32:
            self.float_storage = True
            return _alias(C.stream_to_float_(stream.data, self.R))  # the output is the stream's own memory
        out = C.stream_decode(stream.data, self.R, self.dtype)
        if exact:
            self.float_storage = True  # float64 holds every int32 value exactly
            return out
        self.int_stream = stream.data
        return torch.full_like(out, float("nan")) if nonfinite else out

    # ---------------------------------------------------------------------------------- backward

    def begin_backward(self, grad_out: Tensor, out: Optional[Tensor]) -> None:
        """At the last block: the stream from the saved output (its own memory when nothing else holds it) and the
        gradient buffer (the incoming gradient's memory when nothing else holds it)."""
        L = len(self.seq.blocks)
        if self.float_storage and not _sole_owner(out, extra=1):
            # the caller (or a saved graph) still holds the output: backward works on a copy and leaves it intact
            data, self.position = out.clone(), L
        elif self.float_storage:
            data = _alias(out)  # nothing else refers to the output's memory: the stream is rebuilt in it
        else:
            data = self.int_stream
        if self.position != L:
            raise ReconstructionError(
                "RevSequence: a second backward through the same forward (retain_graph=True) found the stream already "
                "rebuilt in place by the first one (nothing else held the output); keep a reference to the output, "
                "or run the forward again")
        if self.float_storage and self.seq.check and not torch.equal(self.output_sum, self._sums(data)):
            raise ReconstructionError(
                "RevSequence output: the output kept for backward was modified after the forward (e.g. through "
                ".data); the reconstruction would start from wrong values")
        self.stream = _Stream(data, self.d, self.R, self.dtype)
        own = (_sole_owner(grad_out, extra=1) and grad_out.dtype == self.dtype and grad_out.is_contiguous())
        self.grad = grad_out if own else grad_out.to(self.dtype, memory_format=torch.contiguous_format, copy=True)
        self.rebuilt: list[Tensor] = []

    def _sums(self, data: Tensor) -> Tensor:
        return _Stream(data, self.d, self.R, self.dtype).checksum()

    def backward_block(self, i: int) -> list[Optional[Tensor]]:
        """Rebuild block ``i``'s input in place and accumulate the stream gradients; return the gradients of the
        block's Function inputs (parameters and external tensors)."""
        seq, stream = self.seq, self.stream
        block = seq.blocks[i]
        for p, v in zip(self.block_inputs[i][:len(self.versions[i])], self.versions[i]):
            if p._version != v:
                name = next((n for n, q in seq.named_parameters() if q is p), "a parameter")
                raise ReconstructionError(
                    f"RevSequence block {i}: {name} was modified in place between the forward and the backward "
                    f"(e.g. an optimizer step before backward); the gradients would be taken at the wrong point")
        grads: dict[int, Tensor] = {}
        block.uncouple(stream, self._vjp_runner(i, grads))
        self.position = i
        if seq.check:
            self.rebuilt.append(stream.checksum())
        if seq._stream_hooks:
            seq._call_hooks("backward", i, stream)
        return [grads.get(id(t)) for t in self.block_inputs[i]]

    def _vjp_runner(self, i: int, grads: dict[int, Tensor]) -> BranchRunner:
        grad = _Stream(self.grad, self.d, self.R, self.dtype)

        def run(module, name, src, dst, apply):
            segment = replay.Segment(module, f"RevSequence block {i}: {name}", self.chunks)
            inputs = self.inputs[(i, name)]
            record = self.records[(i, name)]
            got = segment.backward(
                record,
                read=lambda chunk: self.stream.read(src, chunk, record.layout_free),
                write=lambda chunk, out: apply(dst, chunk, out),
                grad_of=lambda chunk: grad.half(dst, chunk),
                add_grad=lambda chunk, g: grad.half(src, chunk).add_(g),
                inputs=inputs)
            for t, g in zip(inputs, got):
                if g is not None:
                    grads[id(t)] = g if id(t) not in grads else grads[id(t)].add_(g)
        return run

    def end_backward(self) -> Optional[Tensor]:
        """After the first block: compare the checksums (one synchronization); return the gradient of the input."""
        if self.seq.check:
            n = len(self.rebuilt)
            _compare_checksums(self.seq, self.checksums[-n:] if n else [], self.rebuilt[::-1],
                               len(self.seq.blocks) - n)
        grad, self.grad, self.stream = self.grad, None, None
        return grad


class _BlockFunction(torch.autograd.Function):
    """Autograd node of one block of a reversible sequence call. The forward has already run (:class:`_SequenceCall`);
    the node returns the carrier of the block's output (an empty tensor between blocks; the sequence output after the
    last block) and, in backward, rebuilds the block's input and returns the gradients of its parameters and of the
    external tensors its branches read. The stream and its gradient travel on the :class:`_SequenceCall`."""

    @staticmethod
    def forward(ctx, carrier: Tensor, call: _SequenceCall, index: int, *inputs: Tensor):
        ctx.call, ctx.index = call, index
        ctx.last = index == len(call.seq.blocks) - 1
        if ctx.last:
            out, call.out = call.out, None
            ctx.save_for_backward(out if call.float_storage else None)
            return out
        return carrier.new_empty(0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, *_):
        call: _SequenceCall = ctx.call
        if ctx.last:
            out = ctx.saved_tensors[0]
            call.begin_backward(grad, out)
            del out
        grads = call.backward_block(ctx.index)
        if ctx.index == 0 or not ctx.needs_input_grad[0]:  # no node below: the sequence's backward ends here
            grad_x = call.end_backward()
            carrier_grad = grad_x if ctx.index == 0 and ctx.needs_input_grad[0] else None
        else:
            carrier_grad = grad.new_empty(0)
        return (carrier_grad, None, None, *grads)


def _compare_checksums(seq: RevSequence, forward: list[Tensor], rebuilt: list[Tensor], offset: int) -> None:
    """One synchronization for the whole sequence. The faulty block is the last one (in forward order) whose rebuilt
    input differs: every earlier block is rebuilt from its wrong output."""
    if not forward:
        return
    bad = (torch.stack(forward) != torch.stack(rebuilt)).cpu()
    if not bool(bad.any()):
        return
    k = int(bad.any(dim=1).nonzero().max())
    i = offset + k
    block = seq.blocks[i]
    # Backward rebuilds X2 first (from the block's output and G), then X1 from F(X2): a wrong X2 is G's fault (and
    # usually spoils X1 too); a wrong X1 alone is F's.
    which, branch = ("G", block.g) if bad[k, 1] else ("F", block.f)
    raise ReconstructionError(
        (f"RevSequence block {i}: the input rebuilt in backward differs from the forward's "
         f"(X1 {'differs' if bad[k, 0] else 'equal'}, X2 {'differs' if bad[k, 1] else 'equal'}): branch {which} "
         f"({type(branch).__name__}) did not recompute bit-identically (nondeterministic kernel, state not reset, "
         f"or randomness outside torch's RNG). Module: {branch!r}")[:2000])
