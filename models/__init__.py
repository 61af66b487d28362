"""Model zoo, importable as ``revsnn_triton.models``. Importing it registers every model."""
from . import ms_resnet, revs_former, revs_resnet, spikingformer  # noqa: F401  (registration)
from .registry import create_model, list_models, register_model

try:  # the digits models (training helper's file) register themselves when present
    from . import digits  # noqa: F401
except ModuleNotFoundError as error:
    if error.name != f"{__name__}.digits":
        raise

__all__ = ["create_model", "list_models", "register_model"]
