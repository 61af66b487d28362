"""Running a module again exactly as the forward ran it: the state a recomputation must share with its forward.

A memory-saving forward runs a module without keeping its graph; backward runs it again and takes the
vector-Jacobian product. For the two runs to compute the same numbers, the second must see what the first saw:

- the same input (the reversible engine rebuilds it exactly; :mod:`revsnn_triton.recompute` keeps it);
- neuron state reset before each call (:func:`run_fresh`: reset, run, reset);
- the same random numbers (the CPU and device RNG states, kept only for calls that drew any);
- the same autocast settings and the same train/eval mode of every submodule;
- the same BatchNorm statistics: :class:`revsnn_triton.batchnorm.SeqBatchNorm` records its batch mean and
  variance in the forward and the recomputation normalizes with exactly those (a few floats per channel; no
  second reduction, bit-identical by construction), and BatchNorm running statistics are updated once, by the
  forward. Plain ``torch.nn`` BatchNorm layers recompute their statistics from the identical input and get their
  running statistics restored.

:class:`Segment` runs a module over the whole batch, or over micro-batches of it (the same micro-batches in
forward and backward, so every kernel sees the same shapes). With micro-batches, BatchNorm statistics and their
gradients are batch-wide quantities: the forward takes one pass per BatchNorm layer to accumulate its statistics
(each pass stops at that layer), and backward one pass per layer, last first, to accumulate the gradients of its
statistics, before the final pass that takes the vector-Jacobian product of each micro-batch. Memory then scales
with the micro-batch, at the cost of those extra passes.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import get_device_states, set_device_states

from revsnn_triton.functional import reset_net

__all__ = ["CallRecord", "Segment", "run_fresh", "batch_statistics", "frozen_statistics", "micro_batches",
           "plain_batchnorms"]


# ------------------------------------------------------------------------------------------ one call

def run_fresh(module: nn.Module, x: Tensor, where: str) -> Tensor:
    """``module(x)`` from reset neuron state, reset again afterwards (a final membrane state is not needed and would
    otherwise stay allocated); the output must be one Tensor (``where`` names the call in the error)."""
    reset_net(module)
    try:
        out = module(x)
    finally:
        reset_net(module)
    if not isinstance(out, Tensor):
        raise TypeError(f"{where} ({type(module).__name__}) must return a single torch.Tensor, got "
                        f"{type(out).__name__}")
    return out


class _Rng:
    """The CPU RNG state and the states of the devices of the given tensors (torch.utils.checkpoint's helpers)."""

    def __init__(self, *tensors: Tensor) -> None:
        self.cpu = torch.get_rng_state()
        self.devices, self.states = get_device_states(*tensors)
        self.device_type = next((t.device.type for t in tensors if t.device.type not in ("cpu", "meta")), None)

    def unchanged(self) -> bool:
        """Whether the generators are still in this state (nothing drew random numbers since)."""
        if not torch.equal(self.cpu, torch.get_rng_state()):
            return False
        if not self.devices:
            return True
        device_module = getattr(torch, self.device_type)
        for device, state in zip(self.devices, self.states):
            with device_module.device(device):
                if not torch.equal(state, device_module.get_rng_state()):
                    return False
        return True

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type or "cuda"):
            torch.set_rng_state(self.cpu)
            if self.devices:
                set_device_states(self.devices, self.states, device_type=self.device_type)
            yield


@contextlib.contextmanager
def _seeded(seed: int, like: Tensor) -> Iterator[None]:
    """Run under generators seeded with ``seed`` (CPU and ``like``'s device), leaving the global state untouched."""
    devices = [like.device.index or 0] if like.device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=like.device.type if devices else "cuda"):
        torch.manual_seed(seed)
        yield


def _autocast_state(device_type: str) -> dict[str, dict]:
    kinds = {device_type, "cpu"}
    return {k: dict(enabled=torch.is_autocast_enabled(k), dtype=torch.get_autocast_dtype(k),
                    cache_enabled=torch.is_autocast_cache_enabled()) for k in kinds}


@contextlib.contextmanager
def _autocast(state: dict[str, dict]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for kind, kwargs in state.items():
            stack.enter_context(torch.autocast(kind, **kwargs))
        yield


def plain_batchnorms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """``torch.nn`` BatchNorm layers of ``module`` (not :class:`~revsnn_triton.batchnorm.SeqBatchNorm`) that update
    running statistics in training mode."""
    from revsnn_triton.batchnorm import SeqBatchNorm
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not isinstance(m, SeqBatchNorm) and m.training and m.track_running_stats]


@contextlib.contextmanager
def _frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Recompute without changing plain BatchNorm running statistics (the forward already updated them): snapshot
    the buffers and copy them back in place afterwards."""
    saved = []
    for bn in plain_batchnorms(module):
        buffers = [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]
        saved.append((buffers, [b.clone() for b in buffers]))
    try:
        yield
    finally:
        with torch.no_grad():
            for buffers, copies in saved:
                for b, c in zip(buffers, copies):
                    b.copy_(c)


@contextlib.contextmanager
def _training_flags(module: nn.Module, flags: tuple[bool, ...]) -> Iterator[None]:
    modules = list(module.modules())
    now = tuple(m.training for m in modules)
    for m, flag in zip(modules, flags):
        m.training = flag
    try:
        yield
    finally:
        for m, flag in zip(modules, now):
            m.training = flag


@dataclass
class _Stats:
    """One BatchNorm call of a recorded run: its batch statistics, and (micro-batches) the batch-wide gradients of
    them, accumulated by the backward passes."""
    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    module: Optional[nn.Module] = None
    count: int = 0
    grad_mean: Optional[Tensor] = None
    grad_var: Optional[Tensor] = None


@dataclass
class CallRecord:
    """What a module call depended on besides its input and parameters, kept by the forward for the recomputation.

    ``rng``: the RNG state before the call, None if the call drew no random numbers (micro-batches: ``seed``, the
    seed of every micro-batch's generators); ``autocast``; ``training``: the train/eval flag of every submodule;
    ``stats``: the BatchNorm statistics, in call order; ``input_modified``: the call modified its input in place
    (the recomputation then gets a copy, so the saved or rebuilt input survives); ``layout_free``: its results do not
    depend on its input's memory layout; ``externals``: tensors from outside the module that it read and that
    require grad (see :class:`_Watch`)."""
    autocast: dict
    training: tuple[bool, ...]
    rng: Optional[_Rng] = None
    seed: Optional[int] = None
    stats: list[_Stats] = field(default_factory=list)
    input_modified: bool = False
    layout_free: bool = False
    externals: list[Tensor] = field(default_factory=list)


# ------------------------------------------------------------------------------ BatchNorm statistics plans

class _Plan:
    """How :class:`SeqBatchNorm` layers get their statistics during one run (``batch_statistics``)."""

    def __init__(self, record: CallRecord) -> None:
        self.record = record
        self.index = 0

    def statistics(self, bn, x: Tensor) -> tuple[Tensor, Tensor]:
        k = self.index
        self.index += 1
        return self.get(k, bn, x)

    def get(self, k: int, bn, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class _Record(_Plan):
    """Forward over the whole batch: compute, update running statistics, remember."""

    def get(self, k, bn, x):
        from revsnn_triton.ops.batchnorm import batch_mean_var
        mean, var = batch_mean_var(x)
        bn.update_running_stats(mean, var, x)
        self.record.stats.append(_Stats(mean.detach(), var.detach()))
        return mean, var


class _Replay(_Plan):
    """Recomputation over the whole batch: the recorded statistics, with their ordinary gradient."""

    def get(self, k, bn, x):
        from revsnn_triton.ops.batchnorm import batch_mean_var_replay
        s = self.record.stats[k]
        return batch_mean_var_replay(x, s.mean, s.var)


class _Compute(_Plan):
    """Statistics computed from the input, running statistics left alone (an exact inverse run)."""

    def get(self, k, bn, x):
        from revsnn_triton.ops.batchnorm import batch_mean_var
        return batch_mean_var(x)


@contextlib.contextmanager
def frozen_statistics(module: nn.Module) -> Iterator[None]:
    """Run ``module`` with BatchNorm layers normalizing by the batch statistics of their input but without updating
    their running statistics (SeqBatchNorm and torch.nn's)."""
    with _frozen_running_stats(module), _plan(_Compute(CallRecord(autocast={}, training=()))):
        yield


class _StopPass(Exception):
    """Ends a run at the BatchNorm layer whose statistics a pass accumulates."""


class _ForwardPass(_Plan):
    """Micro-batch forward pass ``layer``: earlier layers use their finished statistics, layer ``layer`` adds the
    micro-batch's sums and stops the run. ``layer=None``: the final pass (every layer finished)."""

    def __init__(self, record: CallRecord, layer: Optional[int]) -> None:
        super().__init__(record)
        self.layer = layer
        self.stopped = False

    def get(self, k, bn, x):
        stats = self.record.stats
        if k == self.layer:
            if k == len(stats):
                stats.append(_Stats(module=bn))
            s = stats[k]
            # this micro-batch's mean and biased variance (the chunked two-pass reduction of the whole-batch op),
            # combined with the earlier ones by Chan et al.'s parallel formula, in float64
            from revsnn_triton.ops.batchnorm import batch_mean_var
            mean, var = (t.double() for t in batch_mean_var(x.detach()))
            n = x.numel() // x.shape[1]
            if s.count == 0:
                s.mean, s.var = mean, var * n  # var holds the sum of squared deviations while accumulating
            else:
                total = s.count + n
                delta = mean - s.mean
                s.var = s.var + var * n + delta * delta * (s.count * n / total)
                s.mean = s.mean + delta * (n / total)
            s.count += n
            self.stopped = True
            raise _StopPass
        s = stats[k]
        return s.mean, s.var

    def finish(self) -> None:
        """Turn the sums of layer ``layer`` into statistics; update that layer's running statistics once."""
        s = self.record.stats[self.layer]
        s.mean, s.var = s.mean.float(), (s.var / max(s.count, 1)).float()
        s.module.update_running_stats(s.mean, s.var, count=s.count)


class _BackwardPass(_Plan):
    """Micro-batch backward pass for layer ``layer``: layers after it apply their batch-wide statistics gradients
    (finished by earlier passes), layer ``layer`` exposes its statistics so that their gradient can be taken;
    ``layer=None``: the final pass (every layer applies its batch-wide gradients)."""

    def __init__(self, record: CallRecord, layer: Optional[int]) -> None:
        super().__init__(record)
        self.layer = layer
        self.exposed: Optional[tuple[Tensor, Tensor]] = None

    def get(self, k, bn, x):
        from revsnn_triton.ops.batchnorm import batch_mean_var_given
        s = self.record.stats[k]
        if self.layer is not None and k == self.layer:
            # leaves, so that the gradient reaching them can be asked for
            self.exposed = (s.mean.clone().requires_grad_(), s.var.clone().requires_grad_())
            return self.exposed
        if self.layer is not None and k < self.layer:
            return s.mean, s.var  # before the layer of this pass: no gradient flows there
        return batch_mean_var_given(x, s.mean, s.var, s.grad_mean, s.grad_var, s.count)


_ACTIVE: Optional[_Plan] = None


def batch_statistics(bn, x: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """The batch statistics a :class:`SeqBatchNorm` layer in training mode must use for ``x`` during a recorded or
    replayed run (None outside one: compute them the ordinary way)."""
    return None if _ACTIVE is None else _ACTIVE.statistics(bn, x)


@contextlib.contextmanager
def _plan(plan: Optional[_Plan]) -> Iterator[None]:
    global _ACTIVE
    if plan is not None:
        plan.index = 0  # each run calls the layers from the first one
    previous, _ACTIVE = _ACTIVE, plan
    try:
        yield
    finally:
        _ACTIVE = previous


# Ops whose results do not depend on their input's memory layout (they read any strides and reduce in a fixed
# order): a branch whose input goes to one of these first may be handed a strided view of the stream in backward.
_LAYOUT_FREE_OPS = frozenset({"revsnn::neuron_forward", "revsnn::batch_mean_var", "revsnn::channel_affine"})


class _Watch(TorchFunctionMode):
    """Watches a module's forward (run under ``torch.no_grad``, where every tensor made inside requires no grad):

    - ``found``: the tensors that require grad and are read by the module, other than the ``known`` ones (its
      parameters): a parent's parameter, or a conditioning tensor computed upstream. They become inputs of the
      autograd node, so they get their gradients;
    - ``layout_free``: whether the first op that reads the module's input (or a view of it) is one whose result
      does not depend on the input's memory layout (then backward may pass the input as a strided view of the
      reversible stream instead of a dense copy)."""

    def __init__(self, known: set[int]) -> None:
        super().__init__()
        self.known = known
        self.found: dict[int, Tensor] = {}
        self.layout_free: Optional[bool] = None
        self._inputs: list[Tensor] = []
        self._storages: set[int] = set()

    def track(self, x: Tensor) -> Tensor:
        if self.layout_free is None:  # (once decided, nothing is followed: no reference is kept)
            self._inputs = [x]
            self._storages = {x.untyped_storage().data_ptr()}
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        for a in flat:
            if isinstance(a, Tensor) and a.requires_grad and id(a) not in self.known:
                self.found.setdefault(id(a), a)
        out = func(*args, **kwargs)
        if self.layout_free is None and any(isinstance(a, Tensor) and any(a is t for t in self._inputs)
                                            for a in flat):
            results = [o for o in tree_flatten(out)[0] if isinstance(o, Tensor)]
            if results and all(o.untyped_storage().data_ptr() in self._storages for o in results):
                self._inputs.extend(results)  # a view of the input: follow it
            elif results:
                self.layout_free = getattr(func, "_name", None) in _LAYOUT_FREE_OPS
                self._inputs, self._storages = [], set()
        return out


# ----------------------------------------------------------------------------------------- segments

def micro_batches(batch: int, size: Optional[int]) -> list[slice]:
    """Slices of ``range(batch)`` of ``size`` (the last may be smaller); one slice of everything for None."""
    if size is None or size >= batch:
        return [slice(None)]
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


class Segment:
    """A module run without a graph in forward and recomputed in backward, over the whole batch or over
    micro-batches (``chunks``, slices of the batch dim, the same in forward and backward).

    ``where`` names the module in errors. The caller supplies the data movement: ``read(chunk)`` returns the input
    of a micro-batch (a tensor the segment may not modify), ``write(chunk, out)`` consumes its output, and in
    backward ``grad_of(chunk)`` gives the gradient of the output and ``add_grad(chunk, g)`` receives the gradient of
    the input.
    """

    def __init__(self, module: nn.Module, where: str, chunks: Sequence[slice]) -> None:
        self.module = module
        self.where = where
        self.chunks = list(chunks)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.split = len(self.chunks) > 1
        if self.split:
            plain = plain_batchnorms(module)
            if plain:
                raise ValueError(
                    f"{where}: runs in micro-batches, which needs the batch-wide statistics of every BatchNorm layer; "
                    f"{type(plain[0]).__name__} layers of torch.nn compute theirs per call. Use "
                    "revsnn_triton.batchnorm.SeqBatchNorm (revsnn_triton.batchnorm.convert_batchnorm(module) "
                    "replaces them) or run without micro-batches")

    # ----------------------------------------------------------------------------------- forward

    def forward(self, read: Callable[[slice], Tensor], write: Callable[[slice, Tensor], None]) -> CallRecord:
        """Run the module (no gradients) on every micro-batch, passing each output to ``write``; return the record
        for :meth:`backward`."""
        watch = _Watch({id(p) for p in self.params})
        with watch:
            record = self._forward(lambda chunk: watch.track(read(chunk)), write)
        record.layout_free = bool(watch.layout_free)
        record.externals = list(watch.found.values())
        return record

    def _forward(self, read, write) -> CallRecord:
        probe = read(self.chunks[0])
        record = CallRecord(autocast=_autocast_state(probe.device.type),
                            training=tuple(m.training for m in self.module.modules()))
        with torch.no_grad():
            if not self.split:
                rng = _Rng(probe)
                version = probe._version
                with _plan(_Record(record)):
                    out = run_fresh(self.module, probe, self.where)
                record.input_modified = probe._version != version
                record.rng = None if rng.unchanged() else rng
                del probe
                write(self.chunks[0], out)
                return record
            del probe
            # Every run of a micro-batch starts from the same generator state (the passes run it several times).
            record.seed = _derived_seed()
            layer = 0
            while True:
                plan = _ForwardPass(record, layer)
                for i, chunk in enumerate(self.chunks):
                    x = read(chunk)
                    version = x._version
                    with _seeded(record.seed + i, x), _plan(plan):
                        try:
                            out = run_fresh(self.module, x, self.where)
                        except _StopPass:
                            out = None
                    record.input_modified |= x._version != version
                    if out is not None:
                        write(chunk, out)
                    del x, out
                if not plan.stopped:
                    return record
                plan.finish()
                layer += 1

    # ---------------------------------------------------------------------------------- backward

    def backward(self, record: CallRecord, read: Callable[[slice], Tensor], write: Callable[[slice, Tensor], None],
                 grad_of: Callable[[slice], Tensor], add_grad: Optional[Callable[[slice, Tensor], None]],
                 inputs: Sequence[Tensor]) -> list[Optional[Tensor]]:
        """Recompute each micro-batch with gradients, hand its output (detached) to ``write``, and take the
        vector-Jacobian product with ``grad_of(chunk)`` for the input (``add_grad``; None: not needed) and for
        ``inputs`` (parameters and other tensors the module reads), whose gradients are returned summed over the
        micro-batches (None where unused)."""
        totals: list[Optional[Tensor]] = [None] * len(inputs)
        if self.split:
            self._statistics_gradients(record, read, grad_of)
        for i, chunk in enumerate(self.chunks):
            plan = _Replay(record) if not self.split else _BackwardPass(record, None)
            out, x, grads = self._vjp(record, i, chunk, read, grad_of, plan, add_grad is not None, list(inputs),
                                      write)
            if add_grad is not None and grads is not None:
                add_grad(chunk, grads[0] if grads[0] is not None else torch.zeros_like(x))
            if grads is not None:
                for k, g in enumerate(grads[1:] if add_grad is not None else grads):
                    if g is not None:
                        totals[k] = g if totals[k] is None else totals[k].add_(g)
            del out, x, grads
        return totals

    def _run(self, record: CallRecord, i: int, x: Tensor, plan: _Plan) -> Tensor:
        """The recomputation of micro-batch ``i`` under the recorded state (graph kept)."""
        rng = (contextlib.nullcontext() if not self.split and record.rng is None else
               record.rng.restored() if not self.split else _seeded(record.seed + i, x))
        with torch.enable_grad(), rng, _autocast(record.autocast), _training_flags(self.module, record.training), \
                _plan(plan):
            return run_fresh(self.module, x.clone() if record.input_modified else x, self.where)

    def _vjp(self, record, i, chunk, read, grad_of, plan, want_x, inputs, write):
        x = read(chunk).detach().requires_grad_(want_x)
        wrt = ([x] if want_x else []) + inputs
        # plain BatchNorm running statistics are restored only after the vjp: its backward checks the versions of
        # the buffers it saved
        with _frozen_running_stats(self.module):
            out = self._run(record, i, x, plan)
            write(chunk, out.detach())
            if not out.requires_grad:
                return out, x, None
            _release(out)
            grad = grad_of(chunk).to(out.dtype)
            if not _layout_free_gradient(out):
                grad = grad.contiguous()  # as ordinary autograd would hand it over
            grads = torch.autograd.grad(out, wrt, grad, allow_unused=True)
        return out, x, grads

    def _statistics_gradients(self, record: CallRecord, read, grad_of) -> None:
        """Backward passes for the batch-wide gradients of each BatchNorm layer's statistics, last layer first."""
        for layer in reversed(range(len(record.stats))):
            s = record.stats[layer]
            s.grad_mean, s.grad_var = torch.zeros_like(s.mean), torch.zeros_like(s.var)
            for i, chunk in enumerate(self.chunks):
                plan = _BackwardPass(record, layer)
                x = read(chunk).detach()
                with _frozen_running_stats(self.module):
                    out = self._run(record, i, x, plan)
                    if plan.exposed is None or not out.requires_grad:
                        continue
                    grad = grad_of(chunk).to(out.dtype)
                    if not _layout_free_gradient(out):
                        grad = grad.contiguous()
                    gm, gv = torch.autograd.grad(out, plan.exposed, grad, allow_unused=True)
                if gm is not None:
                    s.grad_mean += gm
                if gv is not None:
                    s.grad_var += gv
                del out, x


# The autograd nodes of ops whose backward gives the same bits for a gradient of any memory layout, and the view
# nodes that pass a gradient through unchanged. A gradient reaching one of the former (through the latter only) may
# stay a strided view of the engine's gradient buffer; any other gets a dense copy (some backward kernels, such as
# torch's CPU BatchNorm, reduce in a layout-dependent order).
_LAYOUT_FREE_BACKWARD = ("GeneratedBackwardFor_revsnn_channel_affine_defaultBackward",)
_VIEW_BACKWARD = ("ViewBackward0", "UnsafeViewBackward0", "AliasBackward0")


def _layout_free_gradient(out: Tensor) -> bool:
    node = out.grad_fn
    while node is not None and node.name() in _VIEW_BACKWARD:
        node = node.next_functions[0][0]
    return node is not None and node.name() in _LAYOUT_FREE_BACKWARD


def _release(out: Tensor) -> None:
    """Free the memory of a recomputed output that has been consumed, when nothing but the caller holds it or the
    tensor it is a view of (the vector-Jacobian product needs only its graph and shape). An output that the graph
    saved (e.g. by a sigmoid) or that other tensors alias is kept."""
    if getattr(out, "_use_count", None) is None or out._use_count() != 1:
        return
    base = out._base
    # references: out's own, the view's to its base and this function's to the base (when a view), and the
    # temporary storage object of the count itself
    if base is not None and base._use_count() != 2:
        return
    if torch._C._storage_Use_Count(out.untyped_storage()._cdata) == (2 if base is None else 3):
        out.untyped_storage().resize_(0)


def _derived_seed() -> int:
    """A seed derived from (not drawn from) the global CPU generator's state: the global state is left as it is."""
    digest = hashlib.blake2b(torch.get_rng_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
