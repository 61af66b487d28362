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
    """Base class: Heaviside forward, ``derivative(x)`` backward. Subclasses set ``name`` and ``default_alpha``
    and define :meth:`primitive_function`.

    ``spiking`` (spikingjelly's switch, default True): a call returns spikes with the surrogate gradient;
    ``spiking=False`` (or :meth:`set_spiking_mode`) makes a call return the smooth primitive function ``g(x)``
    whose derivative the surrogate is, with its ordinary autograd gradient (to plot it or to train a non-spiking
    relaxation). Neurons need the spiking mode: they refuse a surrogate with ``spiking=False``.
    """

    name: str = ""
    default_alpha: float = 1.0

    def __init__(self, alpha: float | None = None, spiking: bool = True) -> None:
        alpha = self.default_alpha if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"{type(self).__name__}: alpha must be a float, got {type(alpha).__name__}")
        alpha = float(alpha)
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"{type(self).__name__}: alpha must be finite and > 0, got {alpha}")
        self.alpha = alpha
        self.set_spiking_mode(spiking)

    def set_spiking_mode(self, spiking: bool) -> None:
        """``True``: calls return spikes (surrogate gradient); ``False``: the primitive function ``g(x)``."""
        if not isinstance(spiking, bool):
            raise TypeError(f"{type(self).__name__}: spiking must be a bool, got {type(spiking).__name__}")
        self.spiking = spiking

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """``g'(x)`` elementwise, in ``x``'s dtype (callers pass fp32)."""
        return surrogate_derivative(self.name, x, self.alpha)

    @classmethod
    def spiking_function(cls, x: torch.Tensor, alpha: float) -> torch.Tensor:
        """Heaviside ``(x >= 0)`` in ``x``'s dtype, backward ``grad * g'(x)`` (spikingjelly's ``Cls.spiking_function
        (x, alpha)``)."""
        return _HeavisideSurrogate.apply(x, cls(alpha))

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha: float) -> torch.Tensor:
        """The smooth ``g(x)`` with ``g' = derivative``, rising from 0 to 1 (spikingjelly's
        ``Cls.primitive_function(x, alpha)``)."""
        raise NotImplementedError("this surrogate has no primitive function")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Spiking mode: Heaviside ``(x >= 0)`` in ``x``'s dtype, gradient ``grad * g'(x)``; otherwise
        ``primitive_function(x, alpha)``."""
        if self.spiking:
            return _HeavisideSurrogate.apply(x, self)
        return type(self).primitive_function(x, self.alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}" + ("" if self.spiking else ", spiking=False") + ")"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other.alpha == self.alpha  # type: ignore[attr-defined]
                and other.spiking == self.spiking)  # type: ignore[attr-defined]

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

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.sigmoid(alpha * x)


class ATan(SurrogateFunction):
    name, default_alpha = "atan", 2.0

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return 0.5 + torch.atan(x * (math.pi / 2 * alpha)) / math.pi


class PiecewiseQuadratic(SurrogateFunction):
    name, default_alpha = "piecewise_quadratic", 1.0

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha: float) -> torch.Tensor:
        # 0 below -1/alpha, 1 above 1/alpha, a quadratic through 1/2 in between
        inside = 0.5 + alpha * x - (alpha * alpha / 2) * x * x.abs()
        return torch.where(x.abs() <= 1 / alpha, inside, (x > 0).to(x.dtype))


class PiecewiseExp(SurrogateFunction):
    name, default_alpha = "piecewise_exp", 1.0

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha: float) -> torch.Tensor:
        # |x| as a where, not abs(): its derivative at 0 is then 1 and the gradient there alpha / 2, as g'(0)
        half_tail = torch.exp(-alpha * torch.where(x >= 0, x, -x)) / 2
        return torch.where(x >= 0, 1 - half_tail, half_tail)


class SoftSign(SurrogateFunction):
    name, default_alpha = "soft_sign", 2.0

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return 0.5 + 0.5 * torch.nn.functional.softsign(alpha * x)


class SuperSpike(SurrogateFunction):
    """SuperSpike's derivative ``alpha / (1 + |x|)^2`` integrates to ``2 * alpha``, not 1: it has no primitive
    rising from 0 to 1 (spikingjelly defines none either), so it exists in spiking mode only."""
    name, default_alpha = "super_spike", 1.0

    def set_spiking_mode(self, spiking: bool) -> None:
        if spiking is False:
            raise ValueError("SuperSpike: spiking=False is not available (SuperSpike has no primitive function "
                             "rising from 0 to 1); use another surrogate for a non-spiking relaxation")
        super().set_spiking_mode(spiking)


class Erf(SurrogateFunction):
    name, default_alpha = "erf", 2.0

    @staticmethod
    def primitive_function(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.special.erfc(-alpha * x) / 2


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
