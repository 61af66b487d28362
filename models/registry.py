"""Model registry: ``create_model(name, num_classes=..., T=..., neuron_impl=..., **overrides)``."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .neurons import NEURON_IMPLS

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``factory(num_classes=..., T=..., neuron_impl=..., **overrides) -> nn.Module``."""
    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"register_model: a model named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorator


def register_variants(model_cls: Callable[..., nn.Module], configs: dict[str, dict], *, num_classes: int, T: int,
                      doc: str, **common) -> None:
    """Register one factory per entry of ``configs`` (name -> keyword arguments of ``model_cls``).

    Each factory takes ``(num_classes=num_classes, T=T, neuron_impl="triton", **overrides)`` and builds
    ``model_cls(name=name, **common, **config, **overrides)``; ``doc`` is formatted with the config's keys.
    """
    for name, config in configs.items():
        _register_variant(model_cls, name, {**common, **config}, num_classes, T, doc)


def _register_variant(model_cls, name: str, config: dict, default_classes: int, default_T: int, doc: str) -> None:
    @register_model(name)
    def factory(num_classes: int = default_classes, T: int = default_T, neuron_impl: str = "triton", **overrides):
        kw = {**config, **overrides}
        return model_cls(num_classes=num_classes, T=T, neuron_impl=neuron_impl, name=name, **kw)

    factory.__doc__ = doc.format(name=name, **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()})


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, *, neuron_impl: str = "triton", **kwargs) -> nn.Module:
    """Build a registered model.

    ``neuron_impl`` picks the spiking neurons: ``"triton"`` (our fused kernels; plain PyTorch on CPU),
    ``"spikingjelly"`` (spikingjelly 2.0 nodes) or ``"torch"`` (our plain-PyTorch oracle, autograd).
    Other keyword arguments (``num_classes``, ``T``, ...) go to the model's factory.
    """
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"create_model: unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if neuron_impl not in NEURON_IMPLS:
        raise ValueError(f"create_model: neuron_impl must be one of {NEURON_IMPLS}, got {neuron_impl!r}")
    return _REGISTRY[name](neuron_impl=neuron_impl, **kwargs)
