"""Model zoo, importable as ``revsnn_triton.models``. Importing it registers every model."""
from . import digits, ms_resnet, revs_former, revs_resnet, spikingformer  # noqa: F401  (registration)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
