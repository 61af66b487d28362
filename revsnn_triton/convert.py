"""Swap the spiking neurons of an existing spikingjelly 2.0 model for ours."""
from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from .neuron import BACKENDS, SAVE_MODES, BaseNode, IFNode, LIFNode, ParametricLIFNode, resolve_surrogate

__all__ = ["convert_spikingjelly"]


def _spikingjelly_classes() -> tuple[dict[type, type], tuple[type, ...]]:
    """``({spikingjelly node class: our class}, base classes of every spikingjelly neuron)``."""
    try:
        from spikingjelly.activation_based import neuron as sj_neuron
        from spikingjelly.activation_based.neuron import base_node as sj_base
    except ImportError as error:  # pragma: no cover - spikingjelly is a test dependency
        raise ImportError(
            "convert_spikingjelly needs spikingjelly 2.0 (pip install 'revsnn-triton[spikingjelly]')") from error
    mapping = {sj_neuron.IFNode: IFNode, sj_neuron.LIFNode: LIFNode, sj_neuron.ParametricLIFNode: ParametricLIFNode}
    bases = tuple(getattr(sj_base, name) for name in ("BaseNode", "SimpleBaseNode", "NonSpikingBaseNode")
                  if hasattr(sj_base, name))
    return mapping, bases


def _is_spikingjelly_neuron(module: nn.Module, bases: tuple[type, ...]) -> bool:
    return isinstance(module, bases) or type(module).__module__.startswith("spikingjelly.activation_based.neuron")


def _convert_node(node: nn.Module, ours: type, path: str, backend: str, save: str | None) -> BaseNode:
    where = f"convert_spikingjelly: module {path!r} ({type(node).__module__}.{type(node).__qualname__})"
    if getattr(node, "_neuron_precision", None) is not None:
        raise ValueError(f"{where} has a spikingjelly neuron-precision setting ({node._neuron_precision!r}); "
                         f"our neurons keep the state in fp32 and spikes in the input dtype (clear it first)")
    try:
        surrogate_function = resolve_surrogate(node.surrogate_function)
    except TypeError as error:
        raise TypeError(f"{where}: {error}") from None
    common: dict[str, Any] = dict(
        v_threshold=node.v_threshold, v_reset=node.v_reset, surrogate_function=surrogate_function,
        detach_reset=node.detach_reset, step_mode=node.step_mode,
        store_v_seq=bool(getattr(node, "store_v_seq", False)), backend=backend, save=save)
    try:
        if ours is IFNode:
            new: BaseNode = IFNode(**common)
        elif ours is LIFNode:
            new = LIFNode(tau=node.tau, decay_input=node.decay_input, **common)
        else:
            new = ParametricLIFNode(decay_input=node.decay_input, **common)
            # Reuse the Parameter object itself: its value, dtype, device, requires_grad and (with
            # inplace=True) an optimizer's reference to it are all kept.
            new.w = node.w
    except (TypeError, ValueError) as error:
        raise type(error)(f"{where}: {error}") from None
    new.train(node.training)
    return new


def convert_spikingjelly(model: nn.Module, inplace: bool = False, backend: str = "triton",
                         save: str | None = None) -> nn.Module:
    """Replace every spikingjelly 2.0 ``IFNode``/``LIFNode``/``ParametricLIFNode`` in ``model`` with ours.

    Kept: ``v_threshold``, ``v_reset`` (hard/soft), ``detach_reset``, ``step_mode``, ``store_v_seq``, ``tau`` and
    ``decay_input`` (LIF), the ``w`` Parameter itself (PLIF), the surrogate (type and ``alpha``) and the
    training flag. The membrane state is not carried: converted nodes start reset. Works at any depth
    (``Sequential``, ``ModuleList``, custom modules, spikingjelly containers); a node that appears at several
    places stays one shared module; a ``model`` that is itself a node is returned converted.

    Refused with a ``TypeError``/``ValueError`` naming the module path: any other spikingjelly neuron type
    (including subclasses of the three, which may change the dynamics), a surrogate without a fused kernel or
    not in spiking mode, a spikingjelly neuron-precision setting. Our own nodes in ``model`` are left as they are.

    Args:
        model: the network. inplace: modify ``model`` itself (default: convert a deep copy).
        backend, save: passed to every new node (see :class:`revsnn_triton.neuron.IFNode`); ``save=None``
            (default) is what a hand-built node does: ``"input"`` with ``backend="triton"`` (nothing kept beyond
            the input, exact gradients), autograd's own with ``backend="torch"``.
    Returns the converted model (``model`` itself when ``inplace=True``, unless ``model`` is a node).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_spikingjelly: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"convert_spikingjelly: inplace must be a bool, got {type(inplace).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"convert_spikingjelly: backend must be one of {BACKENDS}, got {backend!r}")
    if save is not None and save not in SAVE_MODES:
        raise ValueError(f"convert_spikingjelly: save must be None or one of {SAVE_MODES}, got {save!r}")
    mapping, bases = _spikingjelly_classes()
    if not inplace:
        model = copy.deepcopy(model)

    converted: dict[int, BaseNode] = {}  # id(spikingjelly node) -> its replacement (keeps shared nodes shared)

    def replacement(module: nn.Module, path: str) -> BaseNode | None:
        if id(module) in converted:
            return converted[id(module)]
        ours = mapping.get(type(module))
        if ours is None:
            if not isinstance(module, BaseNode) and _is_spikingjelly_neuron(module, bases):
                raise TypeError(
                    f"convert_spikingjelly: module {path!r} is a {type(module).__module__}."
                    f"{type(module).__qualname__}, which has no fused counterpart; convertible: spikingjelly's "
                    f"IFNode, LIFNode, ParametricLIFNode (exact classes, not subclasses)")
            return None
        converted[id(module)] = _convert_node(module, ours, path, backend, save)
        return converted[id(module)]

    root = replacement(model, "<model>")
    if root is not None:
        return root

    def visit(parent: nn.Module, prefix: str) -> None:
        # Not named_children(): it yields a module shared by several slots only once.
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            new = replacement(child, path)
            if new is not None:
                setattr(parent, name, new)
            else:
                visit(child, path)

    visit(model, "")
    return model
