"""Model registry: ``create_model(name, num_classes=..., T=..., neuron_impl=..., **overrides)``."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

NEURON_IMPLS = ("triton", "spikingjelly", "torch")

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``factory(num_classes=..., T=..., neuron_impl=..., **overrides) -> nn.Module``."""
    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"register_model: a model named {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory
    return decorator


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
