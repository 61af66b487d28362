"""convert_spikingjelly: a spikingjelly 2.0 model and its converted copy compute the same thing."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from revsnn_triton import surrogate
from revsnn_triton.convert import convert_spikingjelly
from revsnn_triton.functional import reset_net
from revsnn_triton.neuron import IFNode, LIFNode, ParametricLIFNode
from revsnn_triton.testing import assert_close, assert_equal

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import layer as sj_layer  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402


class Block(nn.Module):
    """A custom module holding nodes as attributes and in a ModuleList."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = sj_layer.SeqToANNContainer(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                               nn.BatchNorm2d(channels))
        self.nodes = nn.ModuleList([
            sj_neuron.ParametricLIFNode(init_tau=3.0, v_threshold=0.5, v_reset=None, detach_reset=True,
                                        step_mode="m", surrogate_function=sj_surrogate.SoftSign(alpha=1.5)),
            sj_neuron.IFNode(v_threshold=0.75, surrogate_function=sj_surrogate.Erf(), step_mode="m"),
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.nodes[1](self.conv(self.nodes[0](x))) + x


def spikingjelly_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        sj_layer.Conv2d(2, 4, 3, padding=1, bias=False, step_mode="m"),
        sj_layer.BatchNorm2d(4, step_mode="m"),
        sj_neuron.LIFNode(tau=1.5, v_reset=-0.1, decay_input=False, step_mode="m",
                          surrogate_function=sj_surrogate.ATan(alpha=3.0)),
        Block(4),
        sj_layer.Flatten(step_mode="m"),
        sj_layer.Linear(4 * 5 * 5, 3, step_mode="m"),
        sj_neuron.LIFNode(step_mode="m", surrogate_function=sj_surrogate.PiecewiseQuadratic(alpha=0.8)),
    )
    with torch.no_grad():
        net[3].nodes[0].w.fill_(0.37)  # a non-default PLIF w, so that the copied value is visible
        net[5].weight.mul_(8.0)  # so that the output layer spikes
    return net


def run(net: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.clone().requires_grad_()
    out = net(x)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_converted_conv_net_gives_identical_outputs_and_grads(backend: str) -> None:
    sj_net = spikingjelly_net()
    ours = convert_spikingjelly(sj_net, backend=backend)
    kinds = [type(m) for m in ours.modules() if isinstance(m, (IFNode, LIFNode, ParametricLIFNode))]
    assert kinds == [LIFNode, ParametricLIFNode, IFNode, LIFNode]
    assert not any(type(m).__module__.startswith("spikingjelly.activation_based.neuron") for m in ours.modules())
    # the original is untouched (inplace=False)
    assert isinstance(sj_net[2], sj_neuron.LIFNode)

    x = torch.randn(4, 3, 2, 5, 5) * 2
    g = torch.randn(4, 3, 3)
    for _ in range(2):  # twice, with a reset in between: state handling of both kinds of nodes
        out_ref, gx_ref, grads_ref = run(sj_net, x, g)
        out, gx, grads = run(ours, x, g)
        assert_equal(out, out_ref, "output spikes")
        assert_close(gx, gx_ref, "input grad")
        assert set(grads) == set(grads_ref)
        for name in grads_ref:
            # Weight grads reduce many neuron grads that differ from spikingjelly's only by fp32 rounding;
            # the reduction amplifies those ulps, hence a bit more than the fp32 table's rtol.
            assert_close(grads[name], grads_ref[name], f"grad of {name}", rtol=1e-5, atol=1e-5)
        sj_functional.reset_net(sj_net)
        reset_net(ours)
        sj_net.zero_grad()
        ours.zero_grad()
    # the comparison is not vacuous: the output layer spikes and gradients reach every layer
    assert 0 < out.mean() < 1, out.mean()
    assert gx.abs().sum() > 0 and all(g.abs().sum() > 0 for g in grads.values())


def test_parameters_are_kept() -> None:
    sj_net = spikingjelly_net()
    ours = convert_spikingjelly(sj_net)
    lif, plif, if_node, last = ours[2], ours[3].nodes[0], ours[3].nodes[1], ours[6]
    assert (lif.tau, lif.v_reset, lif.decay_input, lif.v_threshold, lif.step_mode) == (1.5, -0.1, False, 1.0, "m")
    assert lif.surrogate_function == surrogate.ATan(alpha=3.0)
    assert plif.v_reset is None and plif.detach_reset and plif.decay_input
    assert plif.surrogate_function == surrogate.SoftSign(alpha=1.5)
    assert plif.w.item() == pytest.approx(0.37) and plif.w.item() == sj_net[3].nodes[0].w.item()
    assert (if_node.v_threshold, if_node.surrogate_function) == (0.75, surrogate.Erf(alpha=2.0))
    assert last.surrogate_function == surrogate.PiecewiseQuadratic(alpha=0.8)
    # what a hand-built node does: the op's default save mode ("input": nothing kept beyond the input)
    assert all(m.backend == "triton" and m.save_mode == "input" for m in (lif, plif, if_node, last))
    assert "save=input" in repr(lif)
    # parameters other than the nodes' are the same values
    sj_params = dict(sj_net.named_parameters())
    for name, p in ours.named_parameters():
        assert_equal(p.detach(), sj_params[name].detach(), name)


def test_inplace_keeps_the_parameter_objects() -> None:
    sj_net = spikingjelly_net()
    w = sj_net[3].nodes[0].w
    conv_weight = sj_net[0].weight
    out = convert_spikingjelly(sj_net, inplace=True, backend="torch", save="h")
    assert out is sj_net
    assert isinstance(sj_net[3].nodes[0], ParametricLIFNode) and sj_net[3].nodes[0].w is w
    assert sj_net[0].weight is conv_weight
    assert sj_net[2].backend == "torch"


def test_single_node_shared_node_and_step_mode() -> None:
    node = sj_neuron.LIFNode(tau=2.5)  # single-step (spikingjelly's default)
    converted = convert_spikingjelly(node)
    assert isinstance(converted, LIFNode) and converted.step_mode == "s" and converted.tau == 2.5
    shared = sj_neuron.IFNode(step_mode="m")
    net = nn.Sequential(shared, nn.Identity(), shared)
    out = convert_spikingjelly(net)
    assert out[0] is out[2] and isinstance(out[0], IFNode)
    # a model with nothing to convert comes back equal (as a copy)
    plain = nn.Sequential(nn.Linear(2, 2))
    assert convert_spikingjelly(plain) is not plain


def test_node_inside_a_spikingjelly_multistep_container() -> None:
    """spikingjelly's MultiStepContainer drives a single-step node over T: the converted node works there."""
    model = sj_layer.MultiStepContainer(sj_neuron.LIFNode(tau=1.3, v_reset=None))
    converted = convert_spikingjelly(model)
    assert isinstance(converted[0], LIFNode) and converted[0].step_mode == "s"
    x = torch.randn(5, 2, 3) * 2
    assert_equal(converted(x), model(x), "spikes")


def test_converted_single_step_node_equals_spikingjelly() -> None:
    sj_node = sj_neuron.ParametricLIFNode(init_tau=1.7, v_reset=0.2, surrogate_function=sj_surrogate.SuperSpike())
    node = convert_spikingjelly(sj_node)
    x = torch.randn(5, 3, 4) * 2
    outs = [node(xt) for xt in x]
    refs = [sj_node(xt) for xt in x]
    for t, (o, r) in enumerate(zip(outs, refs)):
        assert_equal(o, r, f"spikes at step {t}")
    assert_close(node.v, sj_node.v, "final v")


@pytest.mark.parametrize("make, error, match", [
    (lambda: nn.Sequential(nn.Linear(2, 2), nn.Sequential(sj_neuron.QIFNode())), TypeError,
     r"module '1\.0' .*QIFNode.*no fused counterpart"),
    (lambda: nn.Sequential(sj_neuron.LIFNode(surrogate_function=sj_surrogate.PiecewiseLeakyReLU())), TypeError,
     r"module '0' .*PiecewiseLeakyReLU has no fused kernel"),
    (lambda: nn.Sequential(sj_neuron.IFNode(surrogate_function=sj_surrogate.Sigmoid(spiking=False))), TypeError,
     r"module '0' .*spiking=False"),
    (lambda: nn.Sequential(_with_precision(sj_neuron.LIFNode())), ValueError,
     r"module '0' .*neuron-precision setting"),
])
def test_refusals_name_the_module(make, error, match) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make()
    with pytest.raises(error, match=match):
        convert_spikingjelly(model)


def test_subclass_of_a_convertible_node_is_refused() -> None:
    class MyLIF(sj_neuron.LIFNode):
        pass

    with pytest.raises(TypeError, match=r"module 'body\.0' .*MyLIF.*exact classes"):
        convert_spikingjelly(_holder(MyLIF()))


def _with_precision(node: nn.Module) -> nn.Module:
    node._neuron_precision = (torch.bfloat16, "fp32", "fp32")  # what spikingjelly's precision.convert sets
    return node


def _holder(node: nn.Module) -> nn.Module:
    holder = nn.Module()
    holder.body = nn.Sequential(node)
    return holder


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert_spikingjelly([sj_neuron.IFNode()])
    with pytest.raises(ValueError, match="backend must be one of"):
        convert_spikingjelly(sj_neuron.IFNode(), backend="cuda")
    with pytest.raises(TypeError, match="inplace must be a bool"):
        convert_spikingjelly(sj_neuron.IFNode(), inplace="yes")


def test_store_v_seq_is_carried_and_our_own_nodes_are_left_alone() -> None:
    sj_node = sj_neuron.LIFNode(step_mode="m", store_v_seq=True)
    ours = IFNode(step_mode="m", v_threshold=0.5)
    converted = convert_spikingjelly(nn.Sequential(sj_node, ours), inplace=True)
    assert isinstance(converted[0], LIFNode) and converted[0].store_v_seq
    assert converted[1] is ours
    x = torch.rand(5, 2, 3) * 3
    assert_equal(converted[0](x), sj_node(x), "spikes")
    assert_close(converted[0].v_seq, sj_node.v_seq, "v_seq")
    with pytest.raises(ValueError, match="save must be None or one of"):
        convert_spikingjelly(sj_neuron.IFNode(), save="all")


def test_original_state_is_not_carried() -> None:
    sj_node = sj_neuron.LIFNode(step_mode="m")
    sj_node(torch.rand(3, 4) * 3)
    node = convert_spikingjelly(copy.deepcopy(sj_node))
    assert node.v == 0.0
