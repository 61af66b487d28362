"""Spiking neurons of the zoo: presets, a builder over three implementations, and a stateless wrapper.

Every neuron is multi-step (``step_mode="m"``: input and output ``[T, *shape]``) and can run on our fused op
(``neuron_impl="triton"``), our plain-PyTorch autograd oracle (``"torch"``) or spikingjelly 2.0's nodes
(``"spikingjelly"``), so that each model can be compared side by side with spikingjelly. Memory kept for
backward: what our neurons' ``save=`` option says (``"h"`` fp32 H, ``"h_bf16"``, or ``"input"``: nothing
beyond the input, which the producer keeps anyway); spikingjelly's nodes keep their own choice.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

NEURON_IMPLS = ("triton", "spikingjelly", "torch")
NEURON_KINDS = ("if", "lif", "plif")

# Surrogate ids (as in revsnn_triton.surrogate.SURROGATES) -> spikingjelly 2.0 class names.
_SPIKINGJELLY_SURROGATES = {
    "sigmoid": "Sigmoid", "atan": "ATan", "piecewise_quadratic": "PiecewiseQuadratic",
    "piecewise_exp": "PiecewiseExp", "soft_sign": "SoftSign", "super_spike": "SuperSpike", "erf": "Erf",
}

NeuronFactory = Callable[..., nn.Module]

# Neuron configurations of the zoo, as in the original RevSNN code: IF neurons with ATan(2) for the CIFAR
# ResNets, LIF tau=1.5 for the DVS models, LIF tau=2 for the CIFAR transformers; detach_reset everywhere.
CIFAR_RESNET_NEURON = dict(kind="if", surrogate="atan", alpha=2.0, detach_reset=True)
DVS_NEURON = dict(kind="lif", tau=1.5, surrogate="sigmoid", alpha=4.0, detach_reset=True)
CIFAR_TRANSFORMER_NEURON = dict(kind="lif", tau=2.0, surrogate="sigmoid", alpha=4.0, detach_reset=True)


def make_neuron(neuron_impl: str, kind: str, *, tau: float = 2.0, init_tau: float = 2.0,
                decay_input: bool = True, v_threshold: float = 1.0, v_reset: Optional[float] = 0.0,
                detach_reset: bool = False, surrogate: str = "sigmoid", alpha: Optional[float] = None,
                save: Optional[str] = None) -> nn.Module:
    """Build one multi-step spiking neuron (``step_mode="m"``: input and output ``[T, *shape]``).

    Args:
        neuron_impl: ``"triton"`` (our fused op: Triton on CUDA, the plain-PyTorch path on CPU), ``"torch"`` (our
            autograd oracle) or ``"spikingjelly"`` (spikingjelly 2.0's nodes).
        kind: ``"if"``, ``"lif"`` (``tau``, ``decay_input``) or ``"plif"`` (learnable tau from ``init_tau``).
        surrogate, alpha: surrogate-gradient id (e.g. ``"sigmoid"``, ``"atan"``) and its parameter; ``alpha=None``
            uses the surrogate's default (Sigmoid 4, ATan 2).
        save: what our neurons keep for backward (``"h"``, ``"h_bf16"``, ``"input"``; None = the module default).
            spikingjelly's nodes have no such choice; ``save`` other than None raises for them.
    Other arguments carry spikingjelly's names and defaults.
    """
    if neuron_impl not in NEURON_IMPLS:
        raise ValueError(f"make_neuron: neuron_impl must be one of {NEURON_IMPLS}, got {neuron_impl!r}")
    if kind not in NEURON_KINDS:
        raise ValueError(f"make_neuron: kind must be one of {NEURON_KINDS}, got {kind!r}")
    if surrogate not in _SPIKINGJELLY_SURROGATES:
        raise ValueError(f"make_neuron: surrogate must be one of {sorted(_SPIKINGJELLY_SURROGATES)}, "
                         f"got {surrogate!r}")
    common = dict(v_threshold=v_threshold, v_reset=v_reset, detach_reset=detach_reset, step_mode="m")
    if kind == "lif":
        common.update(tau=tau, decay_input=decay_input)
    elif kind == "plif":
        common.update(init_tau=init_tau, decay_input=decay_input)
    class_name = {"if": "IFNode", "lif": "LIFNode", "plif": "ParametricLIFNode"}[kind]
    surrogate_kw = {} if alpha is None else {"alpha": alpha}

    if neuron_impl == "spikingjelly":
        if save is not None:
            raise ValueError("make_neuron: save= is an option of our neurons; spikingjelly's nodes do not take it")
        from spikingjelly.activation_based import neuron as sj_neuron
        from spikingjelly.activation_based import surrogate as sj_surrogate
        surrogate_fn = getattr(sj_surrogate, _SPIKINGJELLY_SURROGATES[surrogate])(**surrogate_kw)
        return getattr(sj_neuron, class_name)(surrogate_function=surrogate_fn, **common)

    from revsnn_triton import neuron as our_neuron
    from revsnn_triton import surrogate as our_surrogate
    surrogate_fn = our_surrogate.SURROGATES[surrogate](**surrogate_kw)
    if save is not None:
        common["save"] = save
    return getattr(our_neuron, class_name)(surrogate_function=surrogate_fn, backend=neuron_impl, **common)


class SequenceNeuron(nn.Module):
    """A multi-step neuron that keeps no state between calls: ``[T, *shape] -> spikes [T, *shape]``.

    After each call the wrapped neuron is reset, so its final membrane ``v`` (``[*shape]`` fp32) is released
    at once instead of living until the next reset. Inside a reversible sequence that matters: every F and G
    of every block would otherwise hold one such tensor from its forward until its recomputation, which makes
    memory grow with depth. Gradients are unaffected (autograd keeps what backward needs).
    """

    def __init__(self, neuron: nn.Module):
        super().__init__()
        self.neuron = neuron

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.neuron(x)
        finally:
            self.neuron.reset()


def neuron_factory(neuron_impl: str, kind: str, **kwargs) -> NeuronFactory:
    """A callable building a fresh :class:`SequenceNeuron` around ``make_neuron(neuron_impl, kind, **kwargs)``;
    keyword arguments given to the call override ``kwargs`` (e.g. ``v_threshold`` of the attention neuron).

    Validates eagerly by building one neuron, so a bad configuration fails when the model is built.
    """
    make_neuron(neuron_impl, kind, **kwargs)

    def build(**overrides) -> SequenceNeuron:
        return SequenceNeuron(make_neuron(neuron_impl, kind, **{**kwargs, **overrides}))
    return build
