"""Surrogate functions: names, defaults and formulas against spikingjelly 2.0."""
from __future__ import annotations

import math

import pytest
import torch

from revsnn_triton import surrogate
from revsnn_triton.testing import assert_close, assert_equal

sj_surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
from spikingjelly._ops.surrogate import _SURROGATE_IDS, _surrogate_gradient  # noqa: E402

CLASSES = list(surrogate.SURROGATES.values())


def probe_points() -> torch.Tensor:
    """Dense around 0 plus the edges: exact zeros, the PiecewiseQuadratic kinks, huge and subnormal values."""
    return torch.cat([torch.linspace(-3, 3, 601), torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e30, -1e30,
                                                                1e-40, -1e-40, 2.0, -2.0])])


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_names_defaults_and_ids_match_spikingjelly(cls) -> None:
    sj_cls = getattr(sj_surrogate, cls.__name__)
    assert cls().alpha == sj_cls().alpha
    assert surrogate.SURROGATE_IDS[cls.name] == _SURROGATE_IDS[cls.__name__]
    assert surrogate.SPIKINGJELLY_NAMES[cls.__name__] == cls.name


@pytest.mark.parametrize("alpha", [None, 0.5, 3.0])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_derivative_equals_spikingjelly(cls, alpha) -> None:
    fn = cls(alpha)
    x = probe_points()
    # spikingjelly's fused-op formula: same operations in the same order -> bit-equal.
    assert_equal(fn.derivative(x), _surrogate_gradient(x, fn.alpha, _SURROGATE_IDS[cls.__name__]),
                 f"{cls.__name__} derivative vs spikingjelly _ops")
    # spikingjelly's module (its own backward), through autograd.
    xs = x.clone().requires_grad_()
    getattr(sj_surrogate, cls.__name__)(alpha=fn.alpha)(xs).sum().backward()
    assert_close(fn.derivative(x), xs.grad, f"{cls.__name__} derivative vs spikingjelly module")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_call_is_heaviside_with_surrogate_gradient(cls, dtype) -> None:
    fn = cls()
    x = probe_points()[:-6].to(dtype).requires_grad_()
    y = fn(x)
    assert y.dtype == dtype
    assert_equal(y.detach(), (x.detach() >= 0).to(dtype), "Heaviside forward (-0.0 counts as >= 0)")
    g = torch.randn(x.shape).to(dtype)
    y.backward(g)
    assert_close(x.grad, g * fn.derivative(x.detach()), "surrogate backward", dtype=dtype)


def test_closed_forms_at_zero() -> None:
    """g'(0) from the formulas written by hand (an oracle independent of the implementation)."""
    expected = {"sigmoid": 4.0 / 4, "atan": 2.0 / 2, "piecewise_quadratic": 1.0, "piecewise_exp": 0.5,
                "soft_sign": 1 / (2 * 2.0 * (1 / 2.0) ** 2), "super_spike": 1.0, "erf": 2.0 / math.sqrt(math.pi)}
    for name, value in expected.items():
        got = surrogate.SURROGATES[name]().derivative(torch.zeros(1))
        assert abs(got.item() - value) < 1e-6, (name, got.item(), value)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="alpha"):
        surrogate.Sigmoid(alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        surrogate.ATan(alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha"):
        surrogate.Erf(alpha="2")
    with pytest.raises(ValueError, match="fused surrogates"):
        surrogate.get_surrogate("relu")
    with pytest.raises(TypeError, match="surrogate"):
        surrogate.get_surrogate(3)
    with pytest.raises(ValueError, match="unknown surrogate"):
        surrogate.surrogate_derivative("relu", torch.zeros(1), 1.0)
    assert surrogate.get_surrogate("atan", 3.0) == surrogate.ATan(3.0)
    assert surrogate.get_surrogate("atan").alpha == 2.0


def test_kernel_ids_are_the_specs_and_match_the_classes() -> None:
    """The kernels select a surrogate by the op spec's id (kernels never import this module): the spec names
    the same seven surrogates in the same order, so its ids equal ``SURROGATE_IDS`` (and spikingjelly's)."""
    from revsnn_triton.ops.neuron import spec
    assert spec.SURROGATES == tuple(surrogate.SURROGATES)
    assert spec.SURROGATE_IDS == surrogate.SURROGATE_IDS
    assert {name: _SURROGATE_IDS[cls.__name__] for name, cls in surrogate.SURROGATES.items()} == spec.SURROGATE_IDS
