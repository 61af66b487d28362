"""Model registry: ``create_model(name, num_classes=..., T=..., neuron_impl=..., **overrides)``, and what is known
about each model without building it (:func:`model_info`, :func:`counterpart`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from revsnn_triton.suggest import did_you_mean

from .neurons import NEURON_IMPLS

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_INFO: dict[str, "ModelInfo"] = {}


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a registered model, known without building it.

    Attributes:
        name: the registered name.
        family: the model class, e.g. ``"RevSResNet"``, ``"MSResNet"``, ``"RevSFormer"``, ``"Spikingformer"``.
        reversible: whether its blocks run on the reversible engine (memory per image flat in depth).
        counterpart: for a reversible model, the registered non-reversible model of the same design that it is
            compared with (memory, accuracy); None otherwise.
        dataset: what it is configured for, e.g. ``"CIFAR-10/100"``, ``"DVS128 Gesture / CIFAR10-DVS"``.
        input: the input it takes, e.g. ``"images [B, 3, 32, 32]"`` or ``"event frames [B, T, 2, 128, 128]"``
            (images are repeated over T; H and W may differ from the native size within the model's limits).
        T, num_classes: the factory's defaults (None when a factory declares none).
        layers: weighted layers counted as the name does (ResNets: convolutions and the Linear head), else None.
        description: the factory's docstring.
    """

    name: str
    family: str
    reversible: bool
    counterpart: Optional[str]
    dataset: str
    input: str
    T: Optional[int]
    num_classes: Optional[int]
    layers: Optional[int]
    description: str

    def num_parameters(self, num_classes: Optional[int] = None) -> int:
        """Trainable and frozen parameters of the model with ``num_classes`` (default: the model's default),
        counted on the meta device (shapes only: no memory, no initialisation); cached."""
        if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                        or num_classes < 1):
            raise ValueError(f"num_parameters: num_classes must be an integer >= 1 or None, got {num_classes!r}")
        return _parameter_count(self.name, num_classes)


@functools.lru_cache(maxsize=None)
def _parameter_count(name: str, num_classes: Optional[int]) -> int:
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device("meta"):
        model = create_model(name, neuron_impl="torch", **kwargs)
    return sum(p.numel() for p in model.parameters())


def _factory_default(factory: Callable, arg: str) -> Optional[int]:
    param = inspect.signature(factory).parameters.get(arg)
    default = None if param is None else param.default
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def register_model(name: str, *, family: Optional[str] = None, reversible: bool = False,
                   counterpart: Optional[str] = None, dataset: str = "", input: str = "",
                   layers: Optional[int] = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``factory(num_classes=..., T=..., neuron_impl=..., **overrides) -> nn.Module`` under
    ``name``, with the facts :func:`model_info` reports (default T and classes are read from the factory's
    signature, the description from its docstring at registration time; ``family`` defaults to ``name``).

    ``counterpart`` names a non-reversible model and is only allowed with ``reversible=True``; it may be
    registered later (a test of the zoo checks that every counterpart exists).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_model: name must be a non-empty string, got {name!r}")
    if not isinstance(reversible, bool):
        raise TypeError(f"register_model: reversible must be a bool, got {type(reversible).__name__}")
    if counterpart is not None and (not reversible or not isinstance(counterpart, str)):
        raise ValueError(f"register_model: counterpart must be None or, for a reversible model, a model name; "
                         f"got {counterpart!r} for {name!r} (reversible={reversible})")
    if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers < 1):
        raise ValueError(f"register_model: layers must be a positive integer or None, got {layers!r}")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"register_model: a model named {name!r} is already registered")
        _REGISTRY[name] = factory
        _INFO[name] = ModelInfo(name=name, family=family or name, reversible=reversible, counterpart=counterpart,
                                dataset=dataset, input=input, T=_factory_default(factory, "T"),
                                num_classes=_factory_default(factory, "num_classes"), layers=layers,
                                description=inspect.cleandoc(factory.__doc__ or ""))
        return factory
    return decorator


def register_variants(model_cls: Callable[..., nn.Module], configs: dict[str, dict], *, num_classes: int, T: int,
                      doc: str, dataset: str, input: str, reversible: bool = False,
                      counterparts: Optional[dict[str, str]] = None, **common) -> None:
    """Register one factory per entry of ``configs`` (name -> keyword arguments of ``model_cls``).

    Each factory takes ``(num_classes=num_classes, T=T, neuron_impl="triton", **overrides)`` and builds
    ``model_cls(name=name, **common, **config, **overrides)``; ``doc`` is formatted with the config's keys.
    ``dataset``, ``input``, ``reversible`` and ``counterparts`` (name -> counterpart name) go into the
    :class:`ModelInfo` of each entry, and so does ``model_cls.layer_count(blocks)`` where the class defines it.
    """
    counterparts = counterparts or {}
    layer_count = getattr(model_cls, "layer_count", None)
    unknown = set(counterparts) - set(configs)
    if unknown:
        raise ValueError(f"register_variants: counterparts given for unregistered names {sorted(unknown)}")
    for name, config in configs.items():
        config = {**common, **config}
        factory = _variant_factory(model_cls, name, config, num_classes, T)
        factory.__doc__ = doc.format(name=name, **{k: list(v) if isinstance(v, tuple) else v
                                                   for k, v in config.items()})
        register_model(name, family=getattr(model_cls, "__name__", name), reversible=reversible,
                       counterpart=counterparts.get(name), dataset=dataset, input=input,
                       layers=None if layer_count is None else layer_count(config["blocks"]))(factory)


def _variant_factory(model_cls, name: str, config: dict, default_classes: int, default_T: int):
    def factory(num_classes: int = default_classes, T: int = default_T, neuron_impl: str = "triton",
                **overrides) -> nn.Module:
        kw = {**config, **overrides}
        return model_cls(num_classes=num_classes, T=T, neuron_impl=neuron_impl, name=name, **kw)
    return factory


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`, sorted."""
    return sorted(_REGISTRY)


def _check_name(caller: str, name: object) -> str:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"{caller}: unknown model {name!r}{did_you_mean(name, _REGISTRY)}; choose one of: "
                         f"{', '.join(list_models())}")
    return name


def create_model(name: str, *, neuron_impl: str = "triton", **kwargs) -> nn.Module:
    """Build a registered model.

    ``neuron_impl`` picks the spiking neurons: ``"triton"`` (our fused kernels; plain PyTorch on CPU),
    ``"spikingjelly"`` (spikingjelly 2.0 nodes) or ``"torch"`` (our plain-PyTorch oracle, autograd).
    Other keyword arguments (``num_classes``, ``T``, ...) go to the model's factory.
    """
    _check_name("create_model", name)
    if neuron_impl not in NEURON_IMPLS:
        raise ValueError(f"create_model: neuron_impl must be one of {NEURON_IMPLS}, got {neuron_impl!r}")
    return _REGISTRY[name](neuron_impl=neuron_impl, **kwargs)


def model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of a registered model (no model is built)."""
    return _INFO[_check_name("model_info", name)]


def counterpart(name: str) -> Optional[str]:
    """The non-reversible counterpart of the reversible model ``name`` (e.g. ``"RevSResNet37"`` ->
    ``"MS-ResNet34"``), or None for a model without one (every non-reversible model)."""
    return model_info(name).counterpart
