"""Stateful spiking neuron modules: ``IFNode``, ``LIFNode``, ``ParametricLIFNode``.

Drop-in counterparts of spikingjelly 2.0's nodes (same parameter names, defaults and semantics), running
on the fused multi-step op :func:`revsnn_triton.ops.neuron.multistep_neuron` (``backend="triton"``) or on
the plain-autograd oracle :func:`revsnn_triton.ops.neuron.reference.multistep_autograd`
(``backend="torch"``).

Dynamics per time step t, for membrane ``V[t-1]`` (starts at ``v_reset``, or 0 for soft reset):

- charge, IF:  ``H[t] = V[t-1] + X[t]``
- charge, LIF (``decay_input=True``):  ``H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau``
- charge, LIF (``decay_input=False``): ``H[t] = V[t-1] - (V[t-1] - V_reset) / tau + X[t]``
  (soft reset uses ``V_reset = 0`` in the charge)
- PLIF: LIF with a learnable ``1/tau = sigmoid(w)``, ``w`` initialised to ``-ln(init_tau - 1)``
- fire:  ``S[t] = (H[t] >= v_threshold)``; backward uses the surrogate derivative ``sg(H[t] - v_threshold)``
- reset, hard: ``V[t] = S[t] * V_reset + (1 - S[t]) * H[t]``; soft (``v_reset=None``):
  ``V[t] = H[t] - S[t] * v_threshold``. ``detach_reset=True`` cuts the gradient through ``S`` in the reset.

State follows spikingjelly's memory-module API (:class:`MemoryModule`): the membrane ``v`` is a registered
memory, so spikingjelly's ``base.named_memories`` / ``extract_memories`` / ``load_memories`` /
``to_functional_forward``, ``functional.reset_net`` / ``set_step_mode`` / ``detach_net`` and its monitors work
on these nodes unchanged. When spikingjelly is installed, :class:`MemoryModule` is a subclass of spikingjelly's
``base.MemoryModule`` (``isinstance`` checks in spikingjelly's tools pass); without it, the same API stands alone.

Differences from spikingjelly, on purpose: the membrane state ``v`` is always float32 (spikingjelly keeps it
in the input's dtype, so bf16/fp16 inputs lose precision in the state); a ``v`` whose shape no longer matches
the input is an error (spikingjelly silently restarts from ``v_reset``).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import surrogate as _surrogate
from .ops.neuron import DEFAULT_SAVE, multistep_neuron
from .ops.neuron.reference import multistep_autograd
from .ops.neuron.spec import INPUT_DTYPES, SAVE_MODES

try:  # spikingjelly's base class, so that its isinstance(m, base.MemoryModule) checks see our nodes
    from spikingjelly.activation_based.base import MemoryModule as _SpikingjellyMemoryModule
except ImportError:  # spikingjelly is optional: the API below stands alone
    _SpikingjellyMemoryModule = None

__all__ = ["MemoryModule", "BaseNode", "IFNode", "LIFNode", "ParametricLIFNode", "resolve_surrogate"]

STEP_MODES = ("s", "m")
BACKENDS = ("triton", "torch")
_DEFAULT_SURROGATE = _surrogate.Sigmoid()  # spikingjelly's default, alpha 4 (the objects are stateless)

# spikingjelly's surrogate classes carry the same class names as ours.
_SPIKINGJELLY_SURROGATE_MODULE = "spikingjelly.activation_based.surrogate"


def _supported_surrogates() -> str:
    return ", ".join(f"{cls.__name__} ({name!r})" for name, cls in _surrogate.SURROGATES.items())


def resolve_surrogate(surrogate_function: Any) -> Any:
    """Return an instance of one of our surrogate classes equivalent to ``surrogate_function``.

    Accepts an instance of a :mod:`revsnn_triton.surrogate` class (returned as is) or a spikingjelly 2.0
    surrogate instance of one of the seven types that have a fused kernel (mapped by class name and
    ``alpha``; it must have a plain-number ``alpha``). Either must be in spiking mode (a neuron fires spikes;
    ``spiking=False`` computes the primitive function instead). Anything else is a ``TypeError`` that lists
    the supported types.
    """
    ours = tuple(_surrogate.SURROGATES.values())
    cls = type(surrogate_function)
    if isinstance(surrogate_function, ours):
        resolved = surrogate_function
    elif cls.__module__ == _SPIKINGJELLY_SURROGATE_MODULE and cls.__name__ in {c.__name__ for c in ours}:
        alpha = getattr(surrogate_function, "alpha", None)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(
                f"surrogate_function: spikingjelly {cls.__name__} needs a plain-number alpha to map onto a "
                f"fused kernel, got alpha={alpha!r}")
        if not getattr(surrogate_function, "spiking", True):
            resolved = None
        else:
            resolved = {c.__name__: c for c in ours}[cls.__name__](alpha=float(alpha))
    else:
        where = "spikingjelly " if cls.__module__.startswith("spikingjelly") else ""
        raise TypeError(
            f"surrogate_function: {where}{cls.__module__}.{cls.__qualname__} has no fused kernel; supported: "
            f"{_supported_surrogates()} from revsnn_triton.surrogate, or spikingjelly's classes of the same names")
    if resolved is None or not resolved.spiking:
        raise TypeError(
            f"surrogate_function: {cls.__name__} with spiking=False has no fused kernel (it outputs the primitive "
            f"function, not spikes); use spiking=True (or set_spiking_mode(True))")
    return resolved


def _check_real(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "a real number or None" if allow_none else "a real number"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _copy_value(value: Any) -> Any:
    """An independent copy of a memory value: tensors detached and cloned, numbers as they are (immutable, and
    no ``copy.deepcopy``, which torch.compile cannot trace), anything else deep-copied."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if value is None or isinstance(value, (bool, int, float, complex, str)):
        return value
    return copy.deepcopy(value)


def _check_tuple(where: str, name: str, value: Any, length: int | None = None) -> tuple:
    if not isinstance(value, tuple):
        raise TypeError(f"{where}: {name} must be a tuple, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{where}: {name} must hold {length} item(s), got {len(value)}")
    return value


class MemoryModule(*((_SpikingjellyMemoryModule,) if _SpikingjellyMemoryModule is not None else (nn.Module,))):
    """A stateful module with spikingjelly 2.0's memory API (a subclass of spikingjelly's ``MemoryModule`` when
    spikingjelly is installed; the same API without it).

    - :meth:`register_memory` ``(name, value)`` declares a state variable, read and written as the attribute
      ``self.<name>``; :meth:`reset` restores every memory to its reset value, :meth:`detach` cuts their graphs.
    - ``_memories`` / ``_memories_rv``: the current values and the reset values, by name (spikingjelly's tools
      read these dicts directly); :meth:`memories`, :meth:`named_memories` iterate over them.
    - :meth:`functional_forward` ``(inputs, states) -> (outputs, new_states)``: the forward with explicit
      state, ``states`` in the order of ``_memories``; it changes neither the module's memories nor ``states``.
      The stateful :meth:`forward` is that call on the module's own memories, followed by storing the new ones.
    - memories are not part of ``state_dict``; tensor memories follow ``.to(...)``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._memories: dict[str, Any] = {}
        self._memories_rv: dict[str, Any] = {}
        self._step_mode = "s"

    # ----- memories ------------------------------------------------------------------------------
    def register_memory(self, name: str, value: Any) -> None:
        """Declare the state variable ``name`` with initial and reset value ``value``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"register_memory: name must be an identifier string, got {name!r}")
        if name in self._memories or hasattr(self, name):
            raise ValueError(f"register_memory: {type(self).__name__} already has an attribute {name!r}")
        self._memories[name] = value
        self.set_reset_value(name, value)

    def set_reset_value(self, name: str, value: Any) -> None:
        """The value that :meth:`reset` gives the memory ``name`` (stored as a copy)."""
        self._memories_rv[name] = _copy_value(value)

    def get_reset_value(self, name: str) -> Any:
        if name not in self._memories:
            raise KeyError(f"{name!r} is not a registered memory of {type(self).__name__}")
        return self._memories_rv[name]

    def memories(self) -> Iterator[Any]:
        yield from self._memories.values()

    def named_memories(self) -> Iterator[tuple[str, Any]]:
        yield from self._memories.items()

    def reset(self) -> None:
        """Every memory back to its reset value (tensors are copied, never shared with the reset value)."""
        for name, value in self._memories_rv.items():
            self._memories[name] = _copy_value(value)

    def detach(self) -> None:
        """Cut the autograd graph carried by every tensor memory (truncated backpropagation through time)."""
        for name, value in self._memories.items():
            if isinstance(value, torch.Tensor):
                self._memories[name] = value.detach()

    def __getattr__(self, name: str) -> Any:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            return memories[name]
        return nn.Module.__getattr__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            memories[name] = value
        else:
            nn.Module.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        memories = self.__dict__.get("_memories")
        if memories is not None and name in memories:
            del memories[name]
            self._memories_rv.pop(name, None)
        else:
            nn.Module.__delattr__(self, name)

    def __dir__(self):
        return sorted(set(nn.Module.__dir__(self)) | set(self._memories))

    def _apply_to_memory(self, name: str, value: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
        """How ``.to()``/``.cuda()``/``.half()`` (``fn``) change a tensor memory; subclasses may keep a dtype."""
        return fn(value)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module signature)
        for store in (self._memories, self._memories_rv):
            for name, value in store.items():
                if isinstance(value, torch.Tensor):
                    store[name] = self._apply_to_memory(name, value, fn)
        return nn.Module._apply(self, fn, recurse)

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._memories = self._memories.copy()
        return replica

    # ----- step mode -----------------------------------------------------------------------------
    def supported_step_mode(self) -> tuple[str, ...]:
        return STEP_MODES

    @property
    def step_mode(self) -> str:
        """``"s"``: one step ``[*shape]`` per call; ``"m"``: a whole sequence ``[T, *shape]`` per call."""
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        _check_choice("step_mode", value, self.supported_step_mode())
        self._step_mode = value

    # ----- functional forward ----------------------------------------------------------------------
    def materialize_states(self, inputs: tuple, states: tuple, step_mode: str) -> tuple:
        """States ready for :meth:`functional_forward` (here: unchanged; subclasses may build tensors)."""
        return states

    def single_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs: Any) -> tuple[tuple, tuple]:
        raise NotImplementedError(f"{type(self).__name__} does not implement single_step_functional_forward")

    def multi_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs: Any) -> tuple[tuple, tuple]:
        """Default: :meth:`single_step_functional_forward` at each step of ``inputs`` (time first), stacked."""
        steps = []
        for t in range(inputs[0].shape[0]):
            outputs, states = self.single_step_functional_forward(tuple(x[t] for x in inputs), states, **kwargs)
            steps.append(outputs)
        return tuple(torch.stack(seq) for seq in zip(*steps)), states

    def functional_forward(self, inputs: tuple, states: tuple, **kwargs: Any) -> tuple[tuple, tuple]:
        """``(outputs, new_states)`` of one call in the current step mode, from explicit ``states``."""
        _check_tuple(type(self).__name__, "inputs", inputs)
        _check_tuple(type(self).__name__, "states", states, len(self._memories))
        states = self.materialize_states(inputs, states, self.step_mode)
        if self.step_mode == "m":
            return self.multi_step_functional_forward(inputs, states, **kwargs)
        return self.single_step_functional_forward(inputs, states, **kwargs)

    def _commit(self, states: tuple) -> None:
        for name, value in zip(list(self._memories), states):
            self._memories[name] = value

    def single_step_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        outputs, states = self.single_step_functional_forward((x, *args), tuple(self._memories.values()), **kwargs)
        self._commit(states)
        return outputs[0] if len(outputs) == 1 else outputs

    def multi_step_forward(self, x_seq: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        outputs, states = self.multi_step_functional_forward((x_seq, *args), tuple(self._memories.values()),
                                                             **kwargs)
        self._commit(states)
        return outputs[0] if len(outputs) == 1 else outputs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.step_mode == "m":
            return self.multi_step_forward(*args, **kwargs)
        return self.single_step_forward(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode}"


class BaseNode(MemoryModule):
    """Common state handling of the neuron modules (not used directly).

    State: the memory ``v``, the membrane potential after the last step, float32 of the per-step shape
    ``[*shape]``; between :meth:`reset` and the first call it is the Python float ``v_reset`` (0.0 for soft
    reset), as in spikingjelly (the op then starts from that constant without materializing it). ``v`` follows
    ``.to(device)`` and stays float32 under ``.half()``/``.to(dtype)``. ``v`` carries the autograd graph from one
    call to the next, so gradients flow across calls until :meth:`reset` or :meth:`detach`.

    ``store_v_seq=True`` also keeps ``v_seq``, the membrane after every step, float32: in step mode ``"m"``
    ``[T, *shape]`` of the last call, in ``"s"`` the steps since the last :meth:`reset` stacked (restarted when
    the shape changes). It is differentiable and costs one ``[*shape]`` tensor per step, and in step mode ``"m"``
    the sequence then runs as T single-step calls of the fused op instead of one (for monitoring, not training).
    """

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 surrogate_function: Any = _DEFAULT_SURROGATE, detach_reset: bool = False, step_mode: str = "s",
                 store_v_seq: bool = False, backend: str = "triton", save: str | None = None) -> None:
        super().__init__()
        if surrogate_function is None:
            surrogate_function = _surrogate.Sigmoid()
        self.v_threshold = v_threshold
        self.v_reset = v_reset
        self.surrogate_function = resolve_surrogate(surrogate_function)
        self.detach_reset = detach_reset
        self.step_mode = step_mode
        self.backend = backend
        self.save = save
        self.store_v_seq = store_v_seq
        _check_real("v_reset", v_reset, allow_none=True)
        self.register_memory("v", self._v_start())

    # ----- configuration -------------------------------------------------------------------------
    @property
    def store_v_seq(self) -> bool:
        return self._store_v_seq

    @store_v_seq.setter
    def store_v_seq(self, value: bool) -> None:
        _check_bool("store_v_seq", value)
        self._store_v_seq = value
        self.v_seq = None

    @property
    def save_mode(self) -> str | None:
        """What the op keeps for backward with the current settings: ``save``, or the op's default
        (``"input"``) when ``save`` is None; None for ``backend="torch"`` (autograd keeps what it keeps)."""
        if self.backend == "torch":
            return None
        return DEFAULT_SAVE if self.save is None else self.save

    def _check_hyperparameters(self) -> None:
        """Validate the (user-mutable) attributes; called by each subclass's constructor and on every forward."""
        _check_real("v_threshold", self.v_threshold)
        _check_real("v_reset", self.v_reset, allow_none=True)
        _check_bool("detach_reset", self.detach_reset)
        _check_bool("store_v_seq", self.store_v_seq)
        _check_choice("backend", self.backend, BACKENDS)
        if self.save is not None:
            _check_choice("save", self.save, SAVE_MODES)
        if self.backend == "torch" and self.save not in (None, "h"):
            raise ValueError(
                f"save={self.save!r} applies to backend='triton' only; backend='torch' keeps what autograd "
                f"saves (use save='h')")

    def _kind_kwargs(self) -> dict[str, Any]:
        """``tau=`` (LIF) or ``w=`` (PLIF) plus ``decay_input=`` for the op; IF passes neither."""
        return {}

    def _v_start(self) -> float:
        return 0.0 if self.v_reset is None else float(self.v_reset)

    # ----- state -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the state: ``v`` goes back to ``v_reset`` (0.0 for soft reset; read now, so a changed
        ``v_reset`` counts), other registered memories to their reset values, ``v_seq`` to None."""
        self.set_reset_value("v", self._v_start())
        super().reset()
        self.v_seq = None

    def detach(self) -> None:
        """Cut the autograd graph carried by ``v`` (and ``v_seq``): truncated backpropagation through time."""
        super().detach()
        if isinstance(self.v_seq, torch.Tensor):
            self.v_seq = self.v_seq.detach()

    def _apply_to_memory(self, name: str, value: torch.Tensor, fn) -> torch.Tensor:  # noqa: ANN001
        if name != "v":
            return fn(value)
        # Follow device moves, but keep the membrane float32 (``.half()`` must not round it).
        with torch.no_grad():
            device = fn(value.detach()).device
        return value.to(device=device)

    def _initial_v(self, v: Any, step_shape: torch.Size, x: torch.Tensor) -> torch.Tensor | None:
        """The membrane ``v`` (a float or a tensor of ``step_shape``) as the op's ``v_init``: None for the
        constant start value (never materialized), else a float32 tensor on ``x``'s device."""
        if not isinstance(v, torch.Tensor):
            _check_real("v", v)
            if float(v) == self._v_start():
                return None
            return torch.full(step_shape, float(v), dtype=torch.float32, device=x.device)
        if v.shape != step_shape:
            raise ValueError(
                f"{type(self).__name__}: the carried membrane state v has shape {tuple(v.shape)} from the "
                f"previous call, but this input has per-step shape {tuple(step_shape)} (step_mode="
                f"{self.step_mode!r}); call reset() on the node (or revsnn_triton.functional.reset_net(model)) "
                f"before feeding a new sequence")
        if v.device != x.device:
            raise ValueError(
                f"{type(self).__name__}: the carried membrane state v is on {v.device} but the input is on "
                f"{x.device}; call reset() or move the module with .to({str(x.device)!r})")
        if v.dtype != torch.float32:
            raise ValueError(
                f"{type(self).__name__}: the membrane state v must be float32, got {v.dtype}; call reset()")
        return v

    def materialize_states(self, inputs: tuple, states: tuple, step_mode: str) -> tuple:
        """``states`` with a float ``v`` turned into a float32 tensor of the per-step shape of ``inputs[0]``
        (the forward does not need this: it passes a constant start value to the op unmaterialized)."""
        x = self._one_input(inputs)
        step_shape = x.shape[1:] if step_mode == "m" else x.shape
        v = self._initial_v(states[0], step_shape, x)
        if v is None:
            v = torch.full(step_shape, self._v_start(), dtype=torch.float32, device=x.device)
        return (v, *states[1:])

    # ----- forward ---------------------------------------------------------------------------------
    def _one_input(self, inputs: Any) -> torch.Tensor:
        _check_tuple(type(self).__name__, "inputs", inputs, 1)
        x = inputs[0]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: input dtype must be one of float32, float16, bfloat16, got {x.dtype}")
        return x

    def _run(self, x_seq: torch.Tensor, v_init: torch.Tensor | None,
             affine: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One op call over ``x_seq`` ``[T, *shape]`` (at least 2 dims) from ``v_init``: ``(spikes, v_final)``.
        ``affine``: ``(scale, shift, channel_dim)``, a per-channel input transform (see :meth:`forward_affine`)."""
        sg = resolve_surrogate(self.surrogate_function)  # it may have been reassigned since construction
        kwargs = dict(self._kind_kwargs(), v_threshold=float(self.v_threshold),
                      v_reset=None if self.v_reset is None else float(self.v_reset),
                      detach_reset=self.detach_reset, surrogate=sg.name, alpha=float(sg.alpha))
        if self.backend == "triton":
            if affine is not None:
                kwargs.update(scale=affine[0], shift=affine[1], channel_dim=affine[2])
            return multistep_neuron(x_seq, v_init, save=self.save_mode, **kwargs)
        if affine is not None:
            scale, shift, d = affine
            shape = [1] * (x_seq.dim() - 1)
            shape[d] = -1
            x_seq = x_seq.float() * scale.reshape(shape) + shift.reshape(shape)
        return multistep_autograd(x_seq, v_init, **kwargs)

    def forward_affine(self, x_seq: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                       channel_dim: int) -> torch.Tensor:
        """Multi-step forward of the input ``x_seq * scale[c] + shift[c]`` (``c`` indexes ``channel_dim`` of one step's
        shape ``x_seq.shape[1:]``; ``scale``/``shift`` float32 ``[C]``): a BatchNorm fused into the neuron. On the
        fused op (``backend="triton"``) the transformed input is never materialized and only ``x_seq`` is kept for
        backward. Updates ``v`` like :meth:`multi_step_forward` (``store_v_seq`` is not supported here)."""
        self._check_hyperparameters()
        if self.store_v_seq:
            raise ValueError(f"{type(self).__name__}: forward_affine does not record v_seq; set store_v_seq=False")
        x_seq = self._check_sequence(self._one_input((x_seq,)), self.v)
        spikes, v_final = self._run(x_seq, self._initial_v(self.v, x_seq.shape[1:], x_seq),
                                    (scale, shift, channel_dim))
        self._commit((v_final, *tuple(self._memories.values())[1:]))
        return spikes

    def single_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs: Any) -> tuple[tuple, tuple]:
        """One step with explicit state: ``((x,), (v, *rest)) -> ((spikes,), (v_new, *rest))``; ``x`` ``[*shape]``
        (0-dim too), ``v`` a float or a float32 tensor of ``x``'s shape. Changes neither the module nor ``states``."""
        self._check_hyperparameters()
        x = self._one_input(inputs)
        v_init = self._initial_v(states[0], x.shape, x)
        if x.dim() == 0:  # the op wants [T, *shape] with a non-empty shape: run one neuron, give back 0-dim
            spikes, v_final = self._run(x.reshape(1, 1), None if v_init is None else v_init.reshape(1))
            return (spikes.reshape(()),), (v_final.reshape(()), *states[1:])
        spikes, v_final = self._run(x.unsqueeze(0), v_init)
        return (spikes[0],), (v_final, *states[1:])

    def multi_step_functional_forward(self, inputs: tuple, states: tuple, **kwargs: Any) -> tuple[tuple, tuple]:
        """All T steps in one op call with explicit state: ``((x_seq,), (v, *rest)) -> ((spikes,), (v_final,
        *rest))``; ``x_seq`` ``[T, *shape]``. Changes neither the module nor ``states``."""
        self._check_hyperparameters()
        x_seq = self._check_sequence(self._one_input(inputs), states[0])
        spikes, v_final = self._run(x_seq, self._initial_v(states[0], x_seq.shape[1:], x_seq))
        return (spikes,), (v_final, *states[1:])

    def _check_sequence(self, x_seq: torch.Tensor, v: Any) -> torch.Tensor:
        if x_seq.dim() < 2 or x_seq.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__}: step_mode='m' expects input [T, *shape] (at least 2 dims, T >= 1), got "
                f"shape {tuple(x_seq.shape)}; for a single step use step_mode='s'")
        if isinstance(v, torch.Tensor) and x_seq.shape == v.shape:
            raise ValueError(
                f"{type(self).__name__}: step_mode='m' expects input [T, *shape], but the input has the shape "
                f"{tuple(x_seq.shape)} of one step (the carried state v); add a time axis (x[None]) or use "
                f"step_mode='s'")
        return x_seq

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One time step: ``x`` ``[*shape]`` -> spikes ``[*shape]`` in x's dtype; updates ``v`` (and ``v_seq``)."""
        spikes = super().single_step_forward(x)
        if self.store_v_seq:
            v_step, seq = self.v.unsqueeze(0), self.v_seq
            restart = seq is None or seq.shape[1:] != v_step.shape[1:] or seq.device != v_step.device
            self.v_seq = v_step if restart else torch.cat((seq, v_step))
        return spikes

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """All T steps: ``x_seq`` ``[T, *shape]`` -> spikes ``[T, *shape]``; updates ``v`` (and ``v_seq``).
        One op call, or T single-step calls with ``store_v_seq`` (the same spikes and state)."""
        if not self.store_v_seq:
            return super().multi_step_forward(x_seq)
        x_seq = self._check_sequence(self._one_input((x_seq,)), self.v)
        spikes, v_steps = [], []
        for x in x_seq:
            (spike,), states = self.single_step_functional_forward((x,), tuple(self._memories.values()))
            self._commit(states)
            spikes.append(spike)
            v_steps.append(self.v)
        self.v_seq = torch.stack(v_steps)
        return torch.stack(spikes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "m":
            return self.multi_step_forward(x)
        return self.single_step_forward(x)

    def extra_repr(self) -> str:
        sg = self.surrogate_function
        text = (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
                f"step_mode={self.step_mode}, surrogate={sg!r}, backend={self.backend}")
        if self.backend != "torch":
            text += f", save={self.save_mode}"
        return text + (", store_v_seq=True" if self.store_v_seq else "")


class IFNode(BaseNode):
    """Integrate-and-fire neuron: ``H[t] = V[t-1] + X[t]``, then fire and reset (module docstring).

    Args (spikingjelly's names, defaults and order, plus ``backend`` and ``save``):
        v_threshold: firing threshold.
        v_reset: hard-reset value, or None for soft reset (subtract the threshold).
        surrogate_function: a :mod:`revsnn_triton.surrogate` instance (default, or None: ``Sigmoid()``,
            alpha 4) or a spikingjelly instance of the same seven types, in spiking mode.
        detach_reset: no gradient through the spike inside the reset.
        step_mode: ``"s"`` (input ``[*shape]``, one step per call) or ``"m"`` (``[T, *shape]``).
        store_v_seq: also keep the membrane after every step in ``v_seq`` (see :class:`BaseNode`).
        backend: ``"triton"`` = the fused op (Triton on CUDA, plain PyTorch on CPU), ``"torch"`` = plain
            autograd through a Python loop (the oracle; keeps every step's intermediates).
        save: (backend "triton") what the op keeps for backward per neuron-step: ``"h"`` = H in fp32
            (4 bytes, exact gradients), ``"h_bf16"`` = H - v_threshold in bf16 (2 bytes, approximate
            surrogate gradients), ``"input"`` = nothing beyond the input (the forward is recomputed in backward,
            in registers for T <= 32; gradients bit-identical to ``"h"``'s). None (default): the op's default,
            ``"input"`` (least memory and least memory traffic of the exact modes; see
            :mod:`revsnn_triton.ops.neuron`); :attr:`save_mode` and the repr show the mode in effect. Backend
            "torch" keeps what autograd saves: only None or ``"h"``.

    Input: float32/float16/bfloat16. Output: spikes (0/1) in the input's dtype and shape. State ``v``: float32.
    Gradients flow to the input (and through the carried ``v`` to earlier calls).
    """

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 surrogate_function: Any = _DEFAULT_SURROGATE, detach_reset: bool = False, step_mode: str = "s",
                 store_v_seq: bool = False, backend: str = "triton", save: str | None = None) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq, backend,
                         save)
        self._check_hyperparameters()


class LIFNode(BaseNode):
    """Leaky integrate-and-fire neuron with a fixed time constant ``tau > 1`` (module docstring for the math).

    ``decay_input=True``: ``H = V + (X - (V - V_reset)) / tau``; ``False``: ``H = V - (V - V_reset) / tau + X``.
    Other arguments, shapes, dtypes and what is saved: as :class:`IFNode`.
    """

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate_function: Any = _DEFAULT_SURROGATE,
                 detach_reset: bool = False, step_mode: str = "s", store_v_seq: bool = False,
                 backend: str = "triton", save: str | None = None) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq, backend,
                         save)
        self.tau = tau
        self.decay_input = decay_input
        self._check_hyperparameters()

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        _check_real("tau", self.tau)
        if self.tau <= 1.0:
            raise ValueError(f"LIFNode: tau must be > 1 (1/tau is the leak per step), got {self.tau!r}")
        _check_bool("decay_input", self.decay_input)

    def _kind_kwargs(self) -> dict[str, Any]:
        return {"tau": float(self.tau), "decay_input": self.decay_input}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tau={self.tau}, decay_input={self.decay_input}"


class ParametricLIFNode(BaseNode):
    """LIF neuron with a learnable time constant: ``1/tau = sigmoid(w)``, ``w = -ln(init_tau - 1)`` at start.

    ``w`` is a 0-d ``nn.Parameter`` (as in spikingjelly); its gradient is computed by the op. ``init_tau > 1``.
    Other arguments, shapes, dtypes and what is saved: as :class:`LIFNode`.
    """

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate_function: Any = _DEFAULT_SURROGATE,
                 detach_reset: bool = False, step_mode: str = "s", store_v_seq: bool = False,
                 backend: str = "triton", save: str | None = None) -> None:
        _check_real("init_tau", init_tau)
        if init_tau <= 1.0:
            raise ValueError(f"ParametricLIFNode: init_tau must be > 1, got {init_tau!r}")
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, store_v_seq, backend,
                         save)
        self.decay_input = decay_input
        self._check_hyperparameters()
        self.w = nn.Parameter(torch.as_tensor(-math.log(init_tau - 1.0), dtype=torch.float32))

    def _check_hyperparameters(self) -> None:
        super()._check_hyperparameters()
        _check_bool("decay_input", self.decay_input)

    def _kind_kwargs(self) -> dict[str, Any]:
        w = self.w
        if not isinstance(w, torch.Tensor) or w.numel() != 1 or not w.is_floating_point():
            raise TypeError(f"ParametricLIFNode: w must be a 1-element float tensor, got {w!r}")
        # The op works in fp32; a .half()'d module still gets its gradient back in w's own dtype.
        return {"w": w if w.dtype == torch.float32 else w.float(), "decay_input": self.decay_input}

    @property
    def tau(self) -> float:
        """The current time constant ``1 / sigmoid(w)`` (read-only; train ``w``)."""
        with torch.no_grad():
            return float(1.0 / torch.sigmoid(self.w.detach().float()))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tau={self.tau}, decay_input={self.decay_input}"
