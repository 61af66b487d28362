"""The multi-step IF / LIF / PLIF neuron op family. Read in this order:

- :mod:`.spec`: what the op is: kinds, surrogates, dtypes, the validated config, the neuron layout, the save
  plans and the bytes each launch moves; the one module every other layer (kernels included) reads;
- ``revsnn_triton.kernels.neurons``: the fused Triton kernels and their launchers;
- :mod:`.reference`: the formulas in plain PyTorch (the oracle) and :mod:`.cpu`, the CPU backend built on them;
- :mod:`.op`: the ``revsnn::neuron_*`` custom ops (fake, autograd) and :func:`multistep_neuron`.
"""
from revsnn_triton.ops.neuron.op import DEFAULT_SAVE, multistep_neuron, neuron_backward, neuron_forward

__all__ = ["multistep_neuron", "neuron_forward", "neuron_backward", "DEFAULT_SAVE"]
