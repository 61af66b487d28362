"""spikingjelly's tools on our neurons: memory utilities, explicit-state forward, membrane traces, monitors,
surrogates in and out of spiking mode; and the same API without spikingjelly installed."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn

from revsnn_triton import surrogate
from revsnn_triton.models import create_model
from revsnn_triton.neuron import BaseNode, IFNode, LIFNode, MemoryModule, ParametricLIFNode
from revsnn_triton.testing import assert_close, assert_equal

sj_base = pytest.importorskip("spikingjelly.activation_based.base")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import monitor as sj_monitor  # noqa: E402
from spikingjelly.activation_based import neuron as sj_neuron  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

NODES = [IFNode, LIFNode, ParametricLIFNode]


def small_net(**node_kw) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), LIFNode(step_mode="m", **node_kw), nn.Linear(6, 5),
                         ParametricLIFNode(step_mode="m", v_reset=None, **node_kw), nn.Linear(5, 3),
                         IFNode(step_mode="m", **node_kw))


def test_our_nodes_are_spikingjelly_memory_modules() -> None:
    for cls in NODES:
        node = cls()
        assert isinstance(node, sj_base.MemoryModule) and isinstance(node, MemoryModule)
        assert list(node._memories) == ["v"] and dict(node.named_memories()) == {"v": node.v}


def test_named_memories_finds_every_neuron_of_a_zoo_model() -> None:
    model = create_model("RevSResNet-digits", num_classes=10, T=2)
    ours = [name for name, m in model.named_modules() if isinstance(m, BaseNode)]
    assert len(ours) >= 4
    found = [name for name, _ in sj_base.named_memories(model)]
    assert found == [f"{name}.v" for name in ours]
    x = torch.rand(3, 1, 8, 8)
    # the zoo's neurons reset after every call (their state is not carried between sequences), so the
    # memories are there, at their reset values, after a forward too
    model(x)
    assert all(v == 0.0 for v in sj_base.memories(model))


def test_extract_and_load_memories_round_trip() -> None:
    net = small_net()
    x = torch.rand(4, 2, 4) * 3
    net(x)
    saved = sj_base.extract_memories(net)
    assert [tuple(v.shape) for v in saved] == [(2, 6), (2, 5), (2, 3)]
    after_first = net(x)
    sj_functional.reset_net(net)
    assert sj_base.extract_memories(net) == [0.0, 0.0, 0.0]
    sj_base.load_memories(net, saved)
    assert all(a is b for a, b in zip(sj_base.extract_memories(net), saved))
    assert_equal(net(x), after_first, "spikes continued from the loaded memories")


@pytest.mark.parametrize("cls", NODES)
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_functional_forward_is_pure(cls, step_mode: str) -> None:
    node = cls(step_mode=step_mode, v_reset=None)
    x = torch.randn((5, 2, 3) if step_mode == "m" else (2, 3)) * 2
    v = torch.randn((2, 3), requires_grad=True)
    node.v = v
    states = (v,)
    v_before = v.detach().clone()
    outputs, new_states = node.functional_forward((x,), states)
    assert node.v is v and node._memories["v"] is v and states[0] is v  # nothing of the module changed
    assert_equal(v.detach(), v_before, "the given state")
    stateful = node(x)  # the stateful forward is the same computation, then stores the new state
    assert_equal(outputs[0], stateful, "spikes")
    assert_equal(new_states[0], node.v, "new state")
    (outputs[0].sum() + new_states[0].sum()).backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    # a float state is the constant start value; a state of the wrong count is refused
    assert_equal(node.functional_forward((x,), (0.0,))[0][0], cls(step_mode=step_mode, v_reset=None)(x), "from 0")
    with pytest.raises(ValueError, match="states must hold 1 item"):
        node.functional_forward((x,), ())


def test_to_functional_forward_of_a_network() -> None:
    net = small_net()
    x = torch.rand(4, 2, 4) * 3
    expected = net(x)
    expected_states = sj_base.extract_memories(net)
    sj_functional.reset_net(net)
    forward = sj_base.to_functional_forward(net)
    outputs, states = forward((x,), tuple(sj_base.extract_memories(net)))
    assert_equal(outputs[0], expected, "spikes")
    for got, want in zip(states, expected_states):
        assert_equal(got, want, "state")
    assert sj_base.extract_memories(net) == [0.0, 0.0, 0.0]  # the network itself was not touched


@pytest.mark.parametrize("cls", NODES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_v_seq_is_stored_when_asked(cls, backend: str) -> None:
    x = torch.randn(6, 3, 4) * 2 + 0.5
    plain, traced = cls(step_mode="m", backend=backend), cls(step_mode="m", backend=backend, store_v_seq=True)
    assert traced.v_seq is None
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    spikes, traced_spikes = plain(xa), traced(xb)
    assert_equal(traced_spikes, spikes, "spikes with store_v_seq")
    assert plain.v_seq is None and traced.v_seq.shape == (6, 3, 4) and traced.v_seq.dtype == torch.float32
    assert_equal(traced.v_seq[-1], traced.v, "last step of v_seq is v")
    # oracle: the membrane after each step from single-step calls
    single = cls(backend=backend)
    expected = []
    for xt in x:
        single(xt)
        expected.append(single.v)
    assert_equal(traced.v_seq, torch.stack(expected), "v_seq")
    # against spikingjelly's own trace
    ref = getattr(sj_neuron, cls.__name__)(step_mode="m", store_v_seq=True)
    ref(x)
    assert_close(traced.v_seq, ref.v_seq, "v_seq vs spikingjelly")
    # differentiable, like spikingjelly's
    traced.v_seq.sum().backward()
    assert xb.grad is not None and xb.grad.abs().sum() > 0
    traced.reset()
    assert traced.v_seq is None


def test_v_seq_in_single_step_mode_grows_until_reset() -> None:
    node = LIFNode(store_v_seq=True)
    x = torch.rand(4, 2, 3) * 3
    for t, xt in enumerate(x):
        node(xt)
        assert node.v_seq.shape == (t + 1, 2, 3)
    node.detach()
    assert not node.v_seq.requires_grad
    node.reset()
    assert node.v_seq is None
    node(torch.rand(5))
    assert node.v_seq.shape == (1, 5)


def test_spikingjelly_monitors_on_our_neurons() -> None:
    net = small_net()
    outputs = sj_monitor.OutputMonitor(net, (IFNode, LIFNode, ParametricLIFNode))
    membranes = sj_monitor.AttributeMonitor("v", pre_forward=False, net=net, instance=LIFNode)
    x = torch.rand(4, 2, 4) * 3
    spikes = net(x)
    assert outputs.monitored_layers == ["1", "3", "5"] and membranes.monitored_layers == ["1"]
    assert [tuple(r.shape) for r in outputs.records] == [(4, 2, 6), (4, 2, 5), (4, 2, 3)]
    assert_equal(outputs.records[-1], spikes, "recorded output of the last neuron")
    assert_equal(membranes.records[0], net[1].v, "recorded membrane")
    for mon in (outputs, membranes):
        mon.remove_hooks()


def test_spikingjelly_reset_net_and_detach_net_need_no_warning() -> None:
    net = small_net()
    net(torch.rand(3, 2, 4, requires_grad=True) * 3)
    assert all(isinstance(m.v, torch.Tensor) and m.v.requires_grad for m in (net[1], net[3], net[5]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sj_functional.detach_net(net)
        assert not any(m.v.requires_grad for m in (net[1], net[3], net[5]))
        sj_functional.reset_net(net)
    assert sj_base.extract_memories(net) == [0.0, -0.0, 0.0] and net[3].v == 0.0


def test_register_memory_on_a_subclass() -> None:
    class CountingLIF(LIFNode):
        def __init__(self) -> None:
            super().__init__(step_mode="m")
            self.register_memory("calls", 0)

        def multi_step_forward(self, x_seq):
            self.calls = self.calls + 1
            return super().multi_step_forward(x_seq)

    node = CountingLIF()
    node(torch.rand(2, 3))
    node(torch.rand(2, 3))
    assert node.calls == 2 and [n for n, _ in sj_base.named_memories(node)] == ["v", "calls"]
    node.reset()
    assert node.calls == 0 and node.v == 0.0
    with pytest.raises(ValueError, match="already has an attribute 'tau'"):
        node.register_memory("tau", 1.0)


# ------------------------------------------------------------------------------------ surrogates

PRIMITIVES = [cls for cls in surrogate.SURROGATES.values() if cls is not surrogate.SuperSpike]


@pytest.mark.parametrize("cls", PRIMITIVES, ids=lambda c: c.__name__)
def test_surrogate_non_spiking_mode_is_the_primitive(cls) -> None:
    x = torch.cat([torch.linspace(-3, 3, 241), torch.tensor([0.0, -0.0, 1e6, -1e6])]).requires_grad_()
    sg = cls(alpha=1.5, spiking=False)
    assert repr(sg) == f"{cls.__name__}(alpha=1.5, spiking=False)" and sg != cls(alpha=1.5)
    y = sg(x)
    ref = getattr(sj_surrogate, cls.__name__)(alpha=1.5, spiking=False)(x.detach())
    assert_close(y.detach(), ref, f"{cls.__name__} primitive vs spikingjelly's")
    assert float(y[-2].detach()) == pytest.approx(1.0) and float(y[-1].detach()) == pytest.approx(0.0, abs=1e-6)
    y.sum().backward()
    # the primitive's autograd derivative is the surrogate's derivative (except on PiecewiseQuadratic's
    # two kinks, where the one-sided derivatives differ)
    inner = (x.detach().abs() - 1 / 1.5).abs() > 1e-3
    assert_close(x.grad[inner], sg.derivative(x.detach())[inner], f"{cls.__name__} d primitive / dx",
                 rtol=1e-5, atol=1e-6)
    # spiking mode again: spikes with the surrogate gradient
    sg.set_spiking_mode(True)
    assert_equal(sg(x.detach()), (x.detach() >= 0).float(), "spikes")
    assert_equal(cls.spiking_function(x.detach(), 1.5), (x.detach() >= 0).float(), "spiking_function")


def test_surrogate_spiking_mode_validation() -> None:
    with pytest.raises(TypeError, match="spiking must be a bool"):
        surrogate.ATan(spiking=1)
    with pytest.raises(ValueError, match="SuperSpike: spiking=False is not available"):
        surrogate.SuperSpike(spiking=False)
    with pytest.raises(ValueError, match="SuperSpike: spiking=False"):
        surrogate.SuperSpike().set_spiking_mode(False)
    # a neuron needs spikes: a surrogate in the primitive mode is refused, ours or spikingjelly's
    for sg in (surrogate.ATan(spiking=False), sj_surrogate.ATan(spiking=False)):
        with pytest.raises(TypeError, match="spiking=False has no fused kernel"):
            LIFNode(surrogate_function=sg)
    node = LIFNode(step_mode="m", surrogate_function=surrogate.ATan())
    node.surrogate_function.set_spiking_mode(False)
    with pytest.raises(TypeError, match="spiking=False"):
        node(torch.rand(2, 3))


# ------------------------------------------------------------------------------ without spikingjelly

def test_the_api_stands_alone_without_spikingjelly() -> None:
    code = textwrap.dedent("""
        import sys
        sys.modules["spikingjelly"] = None  # import spikingjelly -> ImportError
        import torch
        from revsnn_triton.neuron import LIFNode, MemoryModule
        assert MemoryModule.__mro__[1] is torch.nn.Module, MemoryModule.__mro__
        node = LIFNode(step_mode="m", store_v_seq=True)
        x = torch.rand(3, 2, 4) * 3
        spikes = node(x)
        assert dict(node.named_memories()).keys() == {"v"} and node.v_seq.shape == (3, 2, 4)
        out, (v,) = node.functional_forward((x,), (node.v,))
        assert out[0].shape == (3, 2, 4) and v.shape == (2, 4)
        node.reset()
        assert node.v == 0.0 and node.v_seq is None
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
