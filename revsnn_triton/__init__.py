"""revsnn_triton: memory-efficient reversible spiking neural networks on fused Triton kernels.

Layers, bottom to top: ``revsnn_triton.kernels`` (Triton kernels and launchers) -> ``revsnn_triton.ops``
(``torch.library`` custom ops in the ``revsnn`` namespace, with plain-PyTorch reference implementations) ->
modules (:class:`IFNode`, :class:`LIFNode`, :class:`ParametricLIFNode`, :class:`RevBlock`,
:class:`RevSequence`, :class:`Recompute`) -> ``revsnn_triton.models`` (``create_model``) -> the ``revsnn`` command line.
"""
from . import functional, surrogate
from .convert import convert_spikingjelly
from .neuron import IFNode, LIFNode, ParametricLIFNode
from .ops.neuron import multistep_neuron
from .recompute import Recompute, recompute
from .reversible import ReconstructionError, RevBlock, RevSequence

__version__ = "0.1.0"


def __getattr__(name: str):
    # The model zoo is imported on first use, so that `import revsnn_triton` stays light.
    if name in ("create_model", "list_models", "models"):
        import importlib

        models = importlib.import_module(".models", __name__)
        return models if name == "models" else getattr(models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazily imported names (create_model, list_models, models) belong in dir() and tab completion too
    return sorted(set(globals()) | {"create_model", "list_models", "models"})


__all__ = [
    "IFNode", "LIFNode", "ParametricLIFNode", "RevBlock", "RevSequence", "ReconstructionError", "Recompute",
    "recompute",
    "convert_spikingjelly", "create_model", "list_models", "multistep_neuron", "functional", "surrogate",
]
