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

Differences from spikingjelly, on purpose: the membrane state ``v`` is always float32 (spikingjelly keeps it
in the input's dtype, so bf16/fp16 inputs lose precision in the state); a ``v`` whose shape no longer matches
the input is an error (spikingjelly silently restarts from ``v_reset``); ``store_v_seq`` is not offered.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from . import surrogate as _surrogate
from .ops.neuron import DEFAULT_SAVE, multistep_neuron
from .ops.neuron.reference import multistep_autograd
from .ops.neuron.spec import INPUT_DTYPES, SAVE_MODES

__all__ = ["BaseNode", "IFNode", "LIFNode", "ParametricLIFNode", "resolve_surrogate"]

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
    ``alpha``; it must be in spiking mode and have a plain-number ``alpha``). Anything else is a ``TypeError``
    that lists the supported types.
    """
    ours = tuple(_surrogate.SURROGATES.values())
    if isinstance(surrogate_function, ours):
        return surrogate_function
    cls = type(surrogate_function)
    by_class_name = {c.__name__: c for c in ours}
    if cls.__module__ == _SPIKINGJELLY_SURROGATE_MODULE and cls.__name__ in by_class_name:
        if not getattr(surrogate_function, "spiking", True):
            raise TypeError(
                f"surrogate_function: spikingjelly {cls.__name__} with spiking=False has no fused kernel "
                f"(it outputs the primitive function, not spikes); use spiking=True")
        alpha = getattr(surrogate_function, "alpha", None)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(
                f"surrogate_function: spikingjelly {cls.__name__} needs a plain-number alpha to map onto a "
                f"fused kernel, got alpha={alpha!r}")
        return by_class_name[cls.__name__](alpha=float(alpha))
    where = "spikingjelly " if cls.__module__.startswith("spikingjelly") else ""
    raise TypeError(
        f"surrogate_function: {where}{cls.__module__}.{cls.__qualname__} has no fused kernel; supported: "
        f"{_supported_surrogates()} from revsnn_triton.surrogate, or spikingjelly's classes of the same names")


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


class BaseNode(nn.Module):
    """Common state handling of the neuron modules (not used directly).

    State: ``v``, the membrane potential after the last step, float32 of the per-step shape ``[*shape]``;
    between :meth:`reset` and the first call it is the Python float ``v_reset`` (0.0 for soft reset), as in
    spikingjelly. ``v`` is not a buffer (it is not saved in ``state_dict``); it follows ``.to(device)`` and
    stays float32 under ``.half()``/``.to(dtype)``. ``v`` carries the autograd graph from one call to the
    next, so gradients flow across calls until :meth:`reset` or :meth:`detach`.
    """

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 surrogate_function: Any = _DEFAULT_SURROGATE, detach_reset: bool = False, step_mode: str = "s",
                 backend: str = "triton", save: str | None = None) -> None:
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
        self.v: float | torch.Tensor = self._v_start()

    # ----- configuration -------------------------------------------------------------------------
    @property
    def step_mode(self) -> str:
        """``"s"``: one step ``[*shape]`` per call; ``"m"``: a whole sequence ``[T, *shape]`` per call."""
        return self._step_mode

    @step_mode.setter
    def step_mode(self, value: str) -> None:
        _check_choice("step_mode", value, STEP_MODES)
        self._step_mode = value

    def _check_hyperparameters(self) -> None:
        """Validate the (user-mutable) attributes; called by each subclass's constructor and on every forward."""
        _check_real("v_threshold", self.v_threshold)
        _check_real("v_reset", self.v_reset, allow_none=True)
        _check_bool("detach_reset", self.detach_reset)
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
        """Forget the membrane state: ``v`` goes back to ``v_reset`` (0.0 for soft reset)."""
        self.v = self._v_start()

    def detach(self) -> None:
        """Cut the autograd graph carried by ``v`` (truncated backpropagation through time)."""
        if isinstance(self.v, torch.Tensor):
            self.v = self.v.detach()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 (nn.Module signature)
        # Follow device moves, but keep the state float32 (``.half()`` must not round the membrane).
        if isinstance(self.v, torch.Tensor):
            with torch.no_grad():
                device = fn(self.v.detach()).device
            self.v = self.v.to(device=device)
        return super()._apply(fn, recurse)

    def _initial_v(self, x_step_shape: torch.Size, x: torch.Tensor) -> torch.Tensor | None:
        """The carried state as the op's ``v_init``, or None right after a reset."""
        v = self.v
        if not isinstance(v, torch.Tensor):
            _check_real("v", v)
            if float(v) == self._v_start():
                return None
            return torch.full(x_step_shape, float(v), dtype=torch.float32, device=x.device)
        if v.shape != x_step_shape:
            raise ValueError(
                f"{type(self).__name__}: the carried membrane state v has shape {tuple(v.shape)} from the "
                f"previous call, but this input has per-step shape {tuple(x_step_shape)} (step_mode="
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

    # ----- forward ---------------------------------------------------------------------------------
    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(
                f"{type(self).__name__}: input dtype must be one of float32, float16, bfloat16, got {x.dtype}")

    def _run(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Run ``x_seq`` ``[T, *shape]`` from the carried state; store the final state; return spikes."""
        v_init = self._initial_v(x_seq.shape[1:], x_seq)
        sg = resolve_surrogate(self.surrogate_function)  # it may have been reassigned since construction
        kwargs = dict(self._kind_kwargs(), v_threshold=float(self.v_threshold),
                      v_reset=None if self.v_reset is None else float(self.v_reset),
                      detach_reset=self.detach_reset, surrogate=sg.name, alpha=float(sg.alpha))
        if self.backend == "triton":
            save = DEFAULT_SAVE if self.save is None else self.save
            spikes, v_final = multistep_neuron(x_seq, v_init, save=save, **kwargs)
        else:
            spikes, v_final = multistep_autograd(x_seq, v_init, **kwargs)
        self.v = v_final
        return spikes

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One time step: ``x`` ``[*shape]`` -> spikes ``[*shape]`` in x's dtype; updates ``v``."""
        self._check_input(x)
        if x.dim() == 0:
            raise ValueError(
                f"{type(self).__name__}: step_mode='s' expects one step [*shape] with at least one dim "
                f"(e.g. [N]), got a 0-dim tensor")
        return self._run(x.unsqueeze(0))[0]

    def multi_step_forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """All T steps in one op call: ``x_seq`` ``[T, *shape]`` -> spikes ``[T, *shape]``; updates ``v``."""
        self._check_input(x_seq)
        if x_seq.dim() < 2 or x_seq.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__}: step_mode='m' expects input [T, *shape] (at least 2 dims, T >= 1), got "
                f"shape {tuple(x_seq.shape)}; for a single step use step_mode='s'")
        if isinstance(self.v, torch.Tensor) and x_seq.shape == self.v.shape:
            raise ValueError(
                f"{type(self).__name__}: step_mode='m' expects input [T, *shape], but the input has the shape "
                f"{tuple(x_seq.shape)} of one step (the carried state v); add a time axis (x[None]) or use "
                f"step_mode='s'")
        return self._run(x_seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_hyperparameters()
        if self.step_mode == "m":
            return self.multi_step_forward(x)
        return self.single_step_forward(x)

    def extra_repr(self) -> str:
        sg = self.surrogate_function
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
                f"step_mode={self.step_mode}, surrogate={type(sg).__name__}(alpha={getattr(sg, 'alpha', None)}), "
                f"backend={self.backend}, save={self.save}")


class IFNode(BaseNode):
    """Integrate-and-fire neuron: ``H[t] = V[t-1] + X[t]``, then fire and reset (module docstring).

    Args (spikingjelly's names and defaults, plus ``backend`` and ``save``):
        v_threshold: firing threshold.
        v_reset: hard-reset value, or None for soft reset (subtract the threshold).
        surrogate_function: a :mod:`revsnn_triton.surrogate` instance (default, or None: ``Sigmoid()``,
            alpha 4) or a spikingjelly instance of the same seven types.
        detach_reset: no gradient through the spike inside the reset.
        step_mode: ``"s"`` (input ``[*shape]``, one step per call) or ``"m"`` (``[T, *shape]``).
        backend: ``"triton"`` = the fused op (Triton on CUDA, plain PyTorch on CPU), ``"torch"`` = plain
            autograd through a Python loop (the oracle; keeps every step's intermediates).
        save: (backend "triton") what the op keeps for backward per neuron-step: ``"h"`` = H in fp32
            (4 bytes, exact gradients), ``"h_bf16"`` = H - v_threshold in bf16 (2 bytes, approximate
            surrogate gradients), ``"input"`` = nothing beyond the input (the forward is recomputed in backward,
            in registers for T <= 32; gradients bit-identical to ``"h"``'s). None (default): the op's default,
            ``"input"`` (least memory and least memory traffic of the exact modes; see
            :mod:`revsnn_triton.ops.neuron`). Backend "torch" keeps what autograd saves: only None or ``"h"``.

    Input: float32/float16/bfloat16. Output: spikes (0/1) in the input's dtype and shape. State ``v``: float32.
    Gradients flow to the input (and through the carried ``v`` to earlier calls).
    """

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0,
                 surrogate_function: Any = _DEFAULT_SURROGATE, detach_reset: bool = False, step_mode: str = "s",
                 backend: str = "triton", save: str | None = None) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, save)
        self._check_hyperparameters()


class LIFNode(BaseNode):
    """Leaky integrate-and-fire neuron with a fixed time constant ``tau > 1`` (module docstring for the math).

    ``decay_input=True``: ``H = V + (X - (V - V_reset)) / tau``; ``False``: ``H = V - (V - V_reset) / tau + X``.
    Other arguments, shapes, dtypes and what is saved: as :class:`IFNode`.
    """

    def __init__(self, tau: float = 2.0, decay_input: bool = True, v_threshold: float = 1.0,
                 v_reset: float | None = 0.0, surrogate_function: Any = _DEFAULT_SURROGATE,
                 detach_reset: bool = False, step_mode: str = "s", backend: str = "triton",
                 save: str | None = None) -> None:
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, save)
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
                 detach_reset: bool = False, step_mode: str = "s", backend: str = "triton",
                 save: str | None = None) -> None:
        _check_real("init_tau", init_tau)
        if init_tau <= 1.0:
            raise ValueError(f"ParametricLIFNode: init_tau must be > 1, got {init_tau!r}")
        super().__init__(v_threshold, v_reset, surrogate_function, detach_reset, step_mode, backend, save)
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
