"""revsnn_triton: memory-efficient reversible spiking neural networks on fused Triton kernels.

Layers, bottom to top: ``revsnn_triton.kernels`` (Triton kernels and launchers) -> ``revsnn_triton.ops``
(``torch.library`` custom ops in the ``revsnn`` namespace, with plain-PyTorch reference implementations) ->
modules (:class:`IFNode`, :class:`LIFNode`, :class:`ParametricLIFNode`, :class:`RevBlock`,
:class:`RevSequence`, :class:`Recompute`) -> ``revsnn_triton.models`` (``create_model``) -> the ``revsnn`` command line.

The names below load on first use, so that ``import revsnn_triton`` (and ``revsnn --help``) does not import
torch until something needs it.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "IFNode": ".neuron", "LIFNode": ".neuron", "ParametricLIFNode": ".neuron",
    "RevBlock": ".reversible", "RevSequence": ".reversible", "ReconstructionError": ".reversible",
    "StreamOverflowError": ".reversible", "SeqBatchNorm": ".batchnorm", "convert_batchnorm": ".batchnorm",
    "Recompute": ".recompute", "recompute": ".recompute",
    "convert_spikingjelly": ".convert",
    "multistep_neuron": ".ops.neuron",
    "create_model": ".models", "list_models": ".models",
    "load_model": ".evaluation",
}
_SUBMODULES = ("functional", "surrogate", "models")   # exported as themselves


class _Package(types.ModuleType):
    """The package's module type: exported names load on first access."""

    def __getattr__(self, name: str):
        if name in _SUBMODULES:
            return importlib.import_module(f".{name}", __name__)
        if name not in _EXPORTS:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value) -> None:
        # The import system binds every loaded submodule on its package; the function ``recompute`` keeps its
        # name (as it did when this package imported everything eagerly).
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(self.__dict__) | set(_EXPORTS) | set(_SUBMODULES))


sys.modules[__name__].__class__ = _Package

__all__ = [
    "IFNode", "LIFNode", "ParametricLIFNode", "RevBlock", "RevSequence", "ReconstructionError", "StreamOverflowError",
    "SeqBatchNorm", "convert_batchnorm", "Recompute", "recompute",
    "convert_spikingjelly", "create_model", "list_models", "load_model", "multistep_neuron", "functional", "surrogate",
]
