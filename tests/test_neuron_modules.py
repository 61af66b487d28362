"""Neuron modules: API compatibility with spikingjelly, state handling, step modes, validation."""
from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
import torch.nn as nn

from revsnn_triton import surrogate
from revsnn_triton.functional import reset_net
from revsnn_triton.neuron import IFNode, LIFNode, ParametricLIFNode
from revsnn_triton.testing import assert_close, assert_equal

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

PAIRS = [(IFNode, sj_neuron.IFNode), (LIFNode, sj_neuron.LIFNode), (ParametricLIFNode, sj_neuron.ParametricLIFNode)]
OUR_EXTRAS = {"backend": "triton", "save": None}  # save=None: the op's default ("input")


@pytest.mark.parametrize("ours, theirs", PAIRS)
def test_parameter_names_and_defaults_match_spikingjelly(ours, theirs) -> None:
    mine = inspect.signature(ours).parameters
    ref = inspect.signature(theirs).parameters
    for name, p in ref.items():
        assert name in mine, f"{ours.__name__} lacks spikingjelly's argument {name!r}"
        if name == "surrogate_function":  # their Sigmoid(alpha=4.0) and ours are different classes
            assert type(p.default).__name__ == "Sigmoid" and p.default.alpha == 4.0
            assert mine[name].default == surrogate.Sigmoid(alpha=4.0)
            continue
        assert mine[name].default == p.default, f"{ours.__name__}.{name}: {mine[name].default} != {p.default}"
    assert list(mine)[:len(ref)] == list(ref), "positional order differs from spikingjelly's"
    for name, default in OUR_EXTRAS.items():
        assert mine[name].default == default


def test_plif_initial_w_and_tau() -> None:
    for init_tau in (1.5, 2.0, 7.25):
        node = ParametricLIFNode(init_tau=init_tau)
        ref = sj_neuron.ParametricLIFNode(init_tau=init_tau)
        assert isinstance(node.w, nn.Parameter) and node.w.requires_grad
        assert_equal(node.w.detach(), ref.w.detach(), "w")
        assert math.isclose(node.tau, init_tau, rel_tol=1e-6)
    node = ParametricLIFNode()
    assert [n for n, _ in node.named_parameters()] == ["w"]
    assert set(node.state_dict()) == {"w"}  # the membrane state is not saved


def test_spikingjelly_surrogate_instances_are_mapped() -> None:
    for cls_name in ("Sigmoid", "ATan", "PiecewiseQuadratic", "PiecewiseExp", "SoftSign", "SuperSpike", "Erf"):
        node = LIFNode(surrogate_function=getattr(sj_surrogate, cls_name)(alpha=1.75))
        assert type(node.surrogate_function).__name__ == cls_name
        assert type(node.surrogate_function).__module__ == "revsnn_triton.surrogate"
        assert node.surrogate_function.alpha == 1.75


@pytest.mark.parametrize("bad, match", [
    (sj_surrogate.PiecewiseLeakyReLU(), "PiecewiseLeakyReLU has no fused kernel.*Sigmoid.*ATan.*Erf"),
    (sj_surrogate.Sigmoid(spiking=False), "spiking=False"),
    (lambda x: (x >= 0).float(), "has no fused kernel"),
    ("atan", "has no fused kernel"),
])
def test_unsupported_surrogates_are_refused(bad, match) -> None:
    with pytest.raises(TypeError, match=match):
        LIFNode(surrogate_function=bad)


@pytest.mark.parametrize("cls", [IFNode, LIFNode, ParametricLIFNode])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_single_step_over_T_equals_multi_step(cls, backend) -> None:
    x = torch.randn(6, 4, 5) * 2 + 0.5
    g = torch.randn(6, 4, 5)
    results = []
    for mode in ("m", "s"):
        node = cls(step_mode=mode, backend=backend, v_reset=None, detach_reset=True)
        xr = x.clone().requires_grad_()
        out = node(xr) if mode == "m" else torch.stack([node(xt) for xt in xr])
        ((out * g).sum() + node.v.sum()).backward()
        results.append((out.detach(), node.v.detach(), xr.grad, getattr(node, "w", None)))
    (sm, vm, gm, wm), (ss, vs, gs, ws) = results
    assert_equal(ss, sm, "spikes")
    assert_equal(vs, vm, "final v")
    assert_close(gs, gm, "input grad")
    if wm is not None:
        # w's grad sums over every neuron-step; single- and multi-step sum in a different order.
        assert_close(ws.grad, wm.grad, "grad of w", rtol=1e-5, atol=1e-5)


def test_reset_semantics() -> None:
    node = LIFNode(step_mode="m", v_reset=-0.25)
    assert node.v == -0.25
    assert IFNode(v_reset=None).v == 0.0
    x = torch.rand(3, 2, 7) * 3
    first = node(x)
    assert isinstance(node.v, torch.Tensor) and node.v.dtype == torch.float32 and node.v.shape == (2, 7)
    carried = node(x)  # continues from the carried state
    node.reset()
    assert node.v == -0.25
    assert_equal(node(x), first, "spikes after reset()")
    # The carried state really is used: the second call equals a single call over the concatenated input.
    node.reset()
    both = node(torch.cat([x, x]))
    assert_equal(torch.cat([first, carried]), both, "two calls vs one call")


def test_state_shape_change_without_reset_is_an_error() -> None:
    node = LIFNode(step_mode="m")
    node(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*\(5, 4\).*reset\(\)"):
        node(torch.rand(2, 5, 4))
    node.reset()
    assert node(torch.rand(2, 5, 4)).shape == (2, 5, 4)


def test_reset_net_resets_ours_and_spikingjelly() -> None:
    seq = nn.Sequential(nn.Linear(4, 4), LIFNode(step_mode="m"), sj_neuron.IFNode(step_mode="m"))
    plif = ParametricLIFNode(step_mode="m", v_reset=None)
    net = nn.ModuleDict({"seq": seq, "list": nn.ModuleList([plif])})
    seq(torch.randn(2, 3, 4))
    plif(torch.randn(2, 3, 4))
    assert all(isinstance(m.v, torch.Tensor) for m in (seq[1], seq[2], plif))
    reset_net(net)
    assert seq[1].v == 0.0 and seq[2].v == 0.0 and plif.v == 0.0
    seq(torch.randn(2, 3, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # spikingjelly would warn about a node that is not one of its MemoryModules
        sj_functional.reset_net(net)
    assert seq[1].v == 0.0 and seq[2].v == 0.0


def test_spikingjelly_set_step_mode_reaches_our_nodes() -> None:
    net = nn.Sequential(LIFNode(), sj_neuron.LIFNode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sj_functional.set_step_mode(net, "m")
    assert net[0].step_mode == "m" and net[1].step_mode == "m"


def test_detach_cuts_the_carried_graph() -> None:
    node = IFNode(step_mode="m", backend="torch")
    x = torch.rand(3, 4, requires_grad=True)
    node(x)
    assert node.v.requires_grad
    node.detach()
    assert not node.v.requires_grad


def test_dtype_conversion_keeps_fp32_state_and_plif_works_in_half() -> None:
    node = ParametricLIFNode(step_mode="m")
    x = torch.rand(3, 8) * 2
    node(x)
    node.half()
    assert node.v.dtype == torch.float32 and node.w.dtype == torch.float16
    node.reset()
    xh = x.half().requires_grad_()
    out = node(xh)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert node.w.grad is not None and node.w.grad.dtype == torch.float16
    assert xh.grad.dtype == torch.float16
    node.to("meta")  # a device move takes the carried state along, still fp32
    assert node.v.device.type == "meta" and node.v.dtype == torch.float32


def test_extra_repr_names_the_configuration() -> None:
    text = repr(LIFNode(tau=1.5, v_reset=None, surrogate_function=surrogate.ATan(alpha=3.0), detach_reset=True,
                        step_mode="m", backend="torch"))
    for part in ("tau=1.5", "v_reset=None", "ATan(alpha=3.0)", "detach_reset=True", "step_mode=m",
                 "backend=torch"):
        assert part in text, (part, text)
    assert "save=" not in text  # backend "torch" has no save mode: autograd keeps what it keeps
    # the save mode in effect, never "save=None"
    assert "save=input" in repr(IFNode()) and IFNode().save_mode == "input"
    assert "save=h_bf16" in repr(ParametricLIFNode(save="h_bf16"))
    assert "store_v_seq=True" in repr(IFNode(store_v_seq=True)) and "store_v_seq" not in repr(IFNode())


@pytest.mark.parametrize("cls", [IFNode, LIFNode, ParametricLIFNode])
def test_zero_dim_input_in_single_step_mode_matches_spikingjelly(cls) -> None:
    ours, theirs = cls(v_reset=None), getattr(sj_neuron, cls.__name__)(v_reset=None)
    for value in (0.6, 0.7, -0.2, 1.5, 0.4):
        x = torch.tensor(value)
        spike, ref = ours(x), theirs(x)
        assert spike.shape == () and ours.v.shape == ()
        assert_equal(spike, ref, f"spike for input {value}")
        assert_close(ours.v, theirs.v, f"membrane after input {value}")
    with pytest.raises(ValueError, match=r"shape \(\).*\(3,\).*reset\(\)"):
        ours(torch.zeros(3))


@pytest.mark.parametrize("make, error, match", [
    (lambda: LIFNode(tau=1.0), ValueError, "tau must be > 1"),
    (lambda: LIFNode(tau=0.5), ValueError, "tau must be > 1"),
    (lambda: LIFNode(tau=float("inf")), ValueError, "tau must be finite"),
    (lambda: LIFNode(tau="2"), TypeError, "tau must be a real number"),
    (lambda: ParametricLIFNode(init_tau=1.0), ValueError, "init_tau must be > 1"),
    (lambda: IFNode(v_threshold=float("nan")), ValueError, "v_threshold must be finite"),
    (lambda: IFNode(v_threshold=True), TypeError, "v_threshold must be a real number"),
    (lambda: IFNode(v_reset="0"), TypeError, "v_reset must be a real number or None"),
    (lambda: IFNode(detach_reset=1), TypeError, "detach_reset must be a bool"),
    (lambda: IFNode(store_v_seq=1), TypeError, "store_v_seq must be a bool"),
    (lambda: LIFNode(decay_input=None), TypeError, "decay_input must be a bool"),
    (lambda: IFNode(step_mode="multi"), ValueError, "step_mode must be one of"),
    (lambda: IFNode(backend="cuda"), ValueError, "backend must be one of"),
    (lambda: IFNode(save="h_fp16"), ValueError, "save must be one of"),
    (lambda: IFNode(backend="torch", save="input"), ValueError, "applies to backend='triton' only"),
])
def test_bad_construction_arguments(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_bad_step_mode_assignment() -> None:
    node = IFNode()
    with pytest.raises(ValueError, match="step_mode must be one of"):
        node.step_mode = "t"
    assert node.step_mode == "s"


@pytest.mark.parametrize("step_mode, x, error, match", [
    ("m", torch.arange(6, dtype=torch.int32).reshape(2, 3), TypeError, "input dtype must be one of"),
    ("m", torch.zeros(2, 3, dtype=torch.complex64), TypeError, "input dtype must be one of"),
    ("m", torch.zeros(2, 3, dtype=torch.float64), TypeError, "input dtype must be one of"),
    ("s", [1.0, 2.0], TypeError, "input must be a torch.Tensor"),
    ("m", torch.zeros(5), ValueError, "expects input \\[T, \\*shape\\]"),
    ("m", torch.zeros(0, 3), ValueError, "T >= 1"),
])
def test_bad_inputs(step_mode, x, error, match) -> None:
    for backend in ("triton", "torch"):
        with pytest.raises(error, match=match):
            LIFNode(step_mode=step_mode, backend=backend)(x)


def test_missing_time_axis_after_a_step_is_named() -> None:
    node = LIFNode(step_mode="m")
    node(torch.rand(4, 2, 3))
    with pytest.raises(ValueError, match="shape \\(2, 3\\) of one step.*x\\[None\\]"):
        node(torch.rand(2, 3))


def test_bad_carried_state() -> None:
    node = IFNode(step_mode="m")
    node.v = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="must be float32.*reset\\(\\)"):
        node(torch.rand(2, 3))
    node.v = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match="is on meta but the input is on cpu"):
        node(torch.rand(2, 3))


def test_attributes_changed_after_construction_are_validated() -> None:
    node = LIFNode(step_mode="m")
    node.tau = 0.9
    with pytest.raises(ValueError, match="tau must be > 1"):
        node(torch.rand(2, 3))
    node.tau, node.backend = 2.0, "jax"
    with pytest.raises(ValueError, match="backend must be one of"):
        node(torch.rand(2, 3))
    node.backend = "triton"
    node.surrogate_function = sj_surrogate.ATan(alpha=2.5)  # a spikingjelly object assigned later is mapped
    x = torch.rand(3, 2, 3) * 2
    expected = LIFNode(step_mode="m", surrogate_function=surrogate.ATan(alpha=2.5))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    node.reset()
    node(xa).sum().backward()
    expected(xb).sum().backward()
    assert_equal(xa.grad, xb.grad, "input grad with the reassigned surrogate")
    node.surrogate_function = sj_surrogate.S2NN()
    with pytest.raises(TypeError, match="S2NN has no fused kernel"):
        node(x)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_input_repeated_over_time_by_expand(backend: str) -> None:
    """A stride-0 time axis (``expand``) and a non-contiguous view give the same as a materialized copy."""
    x = torch.randn(2, 6, 3) * 2
    g = torch.randn(4, 3, 6)
    results = []
    for make in (lambda t: t[0].t().expand(4, 3, 6),  # time stride 0, transposed inner dims
                 lambda t: t[0].t().contiguous().repeat(4, 1, 1)):
        xr = x.clone().requires_grad_()
        node = ParametricLIFNode(step_mode="m", backend=backend)
        out = node(make(xr))
        (out * g).sum().backward()
        results.append((out.detach(), xr.grad, node.w.grad))
    assert_equal(results[0][0], results[1][0], "spikes")
    assert_close(results[0][1], results[1][1], "input grad")
    assert_close(results[0][2], results[1][2], "grad of w", rtol=1e-5, atol=1e-5)  # summation order
