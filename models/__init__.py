"""Model zoo, importable as ``revsnn_triton.models``. Importing it registers every model.

Use :func:`create_model` / :func:`list_models`; :func:`model_info` and :func:`counterpart` tell what a model is
(dataset, input, default T and classes, layers, parameters, its non-reversible counterpart) without building it.

Layout: a spiking tensor is ``[T, B, C, H, W]`` (feature maps) or ``[T, B, C, N]`` (tokens, channels first so that
1x1 convolutions and BatchNorm act on the channel axis). Modules, in reading order:

- ``neurons``: neuron presets of the zoo, ``make_neuron`` over our kernels / our oracle / spikingjelly, and the
  stateless ``SequenceNeuron`` wrapper every model uses;
- ``conv``: conv + BatchNorm on sequences (spike inputs through ``revsnn_triton.ops.spike_conv``), the downsample
  transition and the residual branch shared by RevSResNet and MS-ResNet;
- ``stems``: the stem on the analog input and the spiking classification head;
- ``transformer``: Spikingformer's self-attention, MLP and tokenizer, shared by Spikingformer and RevSFormer;
- ``base``: the models' base class, input checks and initialisation;
- ``registry``: the registry and its metadata;
- the models: ``revs_resnet``, ``ms_resnet``, ``spikingformer``, ``revs_former``, ``digits``.
"""
from . import digits, ms_resnet, revs_former, revs_resnet, spikingformer  # noqa: F401  (registration)
from .registry import ModelInfo, counterpart, create_model, list_models, model_info, register_model

__all__ = ["ModelInfo", "counterpart", "create_model", "list_models", "model_info", "register_model"]
