"""Surrogate gradients for the spike function, with spikingjelly 2.0's names, defaults and formulas.

Forward of every surrogate is the Heaviside step ``S = (x >= 0)`` in ``x``'s dtype; backward replaces its
derivative by a smooth ``g'(x)``. Each class's :meth:`derivative` is the single plain-PyTorch source of that
formula (the reference neuron backward and the tests use it); the fused Triton kernels implement the same
formulas in ``revsnn_triton.kernels.neurons`` and select them by :attr:`name`.

=====================  =========  =====================================================
class                  alpha      ``g'(x)``
=====================  =========  =====================================================
``Sigmoid``            4.0        ``alpha * s * (1 - s)``, ``s = sigmoid(alpha * x)``
``ATan``               2.0        ``(alpha / 2) / (1 + (pi / 2 * alpha * x)^2)``
``PiecewiseQuadratic`` 1.0        ``max(alpha - alpha^2 * |x|, 0)``
``PiecewiseExp``       1.0        ``(alpha / 2) * exp(-alpha * |x|)``
``SoftSign``           2.0        ``1 / (2 * alpha * (1 / alpha + |x|)^2)``
``SuperSpike``         1.0        ``alpha / (1 + |x|)^2``
``Erf``                2.0        ``alpha / sqrt(pi) * exp(-(alpha * x)^2)``
=====================  =========  =====================================================
"""
from __future__ import annotations

import math

import torch


class SurrogateFunction:
    """Base class: Heaviside forward, ``derivative(x)`` backward. Subclasses set ``name`` and ``default_alpha``."""

    name: str = ""
    default_alpha: float = 1.0

    def __init__(self, alpha: float | None = None) -> None:
        alpha = self.default_alpha if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"{type(self).__name__}: alpha must be a float, got {type(alpha).__name__}")
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"{type(self).__name__}: alpha must be finite and > 0, got {alpha}")
        self.alpha = alpha

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``g'(x)`` elementwise, in ``x``'s dtype (callers pass fp32)."""
        return surrogate_derivative(self.name, x, self.alpha)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Heaviside ``(x >= 0)`` in ``x``'s dtype; gradient ``grad * g'(x)``."""
        return _HeavisideSurrogate.apply(x, self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.alpha == self.alpha  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        # By type only (consistent with __eq__): torch.compile may hash an instance built inside the
        # compiled region before __init__ has set ``alpha``.
        return hash(type(self).__name__)


class _HeavisideSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: SurrogateFunction) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.fn = fn
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_output * ctx.fn.derivative(x), None


def surrogate_derivative(name: str, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The seven surrogate derivatives, in spikingjelly 2.0's arithmetic order (``_ops/surrogate.py``)."""
    if name == "sigmoid":
        s = torch.sigmoid(alpha * x)
        return (1 - s) * s * alpha
    if name == "atan":
        z = x * (math.pi / 2 * alpha)
        return (alpha / 2) / (1 + z * z)
    if name == "piecewise_quadratic":
        return (alpha - alpha * alpha * x.abs()).clamp_min(0)
    if name == "piecewise_exp":
        return (alpha / 2) * torch.exp(-alpha * x.abs())
    if name == "soft_sign":
        z = 1 / alpha + x.abs()
        return 1 / (2 * alpha * z * z)
    if name == "super_spike":
        z = 1 + x.abs()
        return alpha / (z * z)
    if name == "erf":
        z = alpha * x
        return (alpha / math.sqrt(math.pi)) * torch.exp(-z * z)
    raise ValueError(f"surrogate_derivative: unknown surrogate {name!r}; known: {sorted(SURROGATES)}")


class Sigmoid(SurrogateFunction):
    name, default_alpha = "sigmoid", 4.0


class ATan(SurrogateFunction):
    name, default_alpha = "atan", 2.0


class PiecewiseQuadratic(SurrogateFunction):
    name, default_alpha = "piecewise_quadratic", 1.0


class PiecewiseExp(SurrogateFunction):
    name, default_alpha = "piecewise_exp", 1.0


class SoftSign(SurrogateFunction):
    name, default_alpha = "soft_sign", 2.0


class SuperSpike(SurrogateFunction):
    name, default_alpha = "super_spike", 1.0


class Erf(SurrogateFunction):
    name, default_alpha = "erf", 2.0


SURROGATES: dict[str, type[SurrogateFunction]] = {
    cls.name: cls for cls in (Sigmoid, ATan, PiecewiseQuadratic, PiecewiseExp, SoftSign, SuperSpike, Erf)}

# The kernels select a formula by this integer (a tl.constexpr); same numbering as spikingjelly's _ops.
SURROGATE_IDS: dict[str, int] = {name: i for i, name in enumerate(SURROGATES)}

# spikingjelly class name -> our name, for converting spikingjelly surrogate objects.
SPIKINGJELLY_NAMES: dict[str, str] = {cls.__name__: cls.name for cls in SURROGATES.values()}


def get_surrogate(surrogate: str | SurrogateFunction, alpha: float | None = None) -> SurrogateFunction:
    """A surrogate instance from a name (``alpha`` default: the class's) or an instance (returned as is)."""
    if isinstance(surrogate, SurrogateFunction):
        return surrogate
    if not isinstance(surrogate, str):
        raise TypeError(f"surrogate must be a name or a SurrogateFunction, got {type(surrogate).__name__}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate {surrogate!r} has no fused kernel; fused surrogates: {sorted(SURROGATES)}")
    return SURROGATES[surrogate](alpha)
