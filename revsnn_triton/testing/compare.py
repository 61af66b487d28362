"""Comparison helpers: the one tolerance table, bit-exact and tolerance comparisons that report where tensors differ.

Everything that must be exact (spikes in fp32, fixed-point streams, reconstruction) is compared with
:func:`assert_equal` (rtol = atol = 0, bit patterns); results that differ only by floating-point rounding with
:func:`assert_close` and the table's tolerance for their dtype; gradients of a reversible run against ordinary
autograd with :func:`assert_gradients_close` (:func:`grad_tolerance`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["TOLERANCES", "tolerance", "assert_equal", "assert_close", "grad_tolerance", "assert_gradients_close",
           "mismatch_report"]

# (rtol, atol) per dtype for results that differ only by floating-point rounding (reordered sums,
# fused multiply-adds). fp32 follows FlagGems/torch.testing defaults; bf16/fp16 are one or two ulps
# of their 8/11-bit mantissas.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` of the table for ``dtype``."""
    if dtype not in TOLERANCES:
        raise TypeError(f"tolerance: no tolerance defined for dtype {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, what: str) -> str:
    """``"what: N of M elements differ (p%); first at (i, j, ...): a vs b, ..."`` for the mask ``bad``."""
    n_bad = int(bad.sum())
    idx = bad.nonzero()[:5].tolist()
    samples = ", ".join(
        f"{tuple(i)}: {actual[tuple(i)].item()!r} vs {expected[tuple(i)].item()!r}" for i in idx)
    return (f"{what}: {n_bad} of {bad.numel()} elements differ ({100.0 * n_bad / max(bad.numel(), 1):.3g}%); "
            f"first at {samples}")


def bit_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """The elements whose bit patterns differ (same shape and dtype assumed): -0.0 differs from +0.0, NaN payloads
    count, a NaN equals the same NaN."""
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return a.view(int_dtype) != e.view(int_dtype)
    return a != e


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Bit-exact comparison (NaNs equal NaNs); reports how many elements differ and where."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype} != expected {expected.dtype}")
    bad = bit_mismatch(actual, expected)
    if bad.any():
        raise AssertionError(mismatch_report(actual.detach().cpu(), expected.detach().cpu(), bad, what))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor",
                 dtype: torch.dtype | None = None, rtol: float | None = None, atol: float | None = None,
                 reduce_dim: int = 1, term_scale: float = 1.0) -> None:
    """Closeness with the table's tolerance for ``dtype`` (default: ``expected.dtype``).

    For a result that is a sum of ``reduce_dim`` terms of magnitude up to ``term_scale`` (as FlagGems'
    ``reduce_dim``), atol is multiplied by ``reduce_dim * max(term_scale, 1)``: two summation orders (and
    terms that differ by rounding) differ by up to about that, however much the terms cancel in the result."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if isinstance(reduce_dim, bool) or not isinstance(reduce_dim, int) or reduce_dim < 1:
        raise ValueError(f"assert_close: reduce_dim must be an int >= 1, got {reduce_dim!r}")
    if not term_scale >= 0:
        raise ValueError(f"assert_close: term_scale must be >= 0, got {term_scale!r}")
    r, a_ = tolerance(dtype or expected.dtype)
    rtol = r if rtol is None else rtol
    atol = (a_ if atol is None else atol) * reduce_dim * max(float(term_scale), 1.0)
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        raise AssertionError(mismatch_report(a, e, bad, f"{what} (rtol={rtol:g}, atol={atol:g})"))


# Accumulation levels the gradient tolerance allows for: up to 8 blocks x 2 branches, counted as 8 levels of a
# few reordered additions each (see grad_tolerance).
GRADIENT_LEVELS = 8


def grad_tolerance(grads: Sequence[Optional[torch.Tensor]],
                   dtype: torch.dtype | None = None) -> tuple[float, float]:
    """``(rtol, atol)`` for the gradients of a reversible run against ``reversible=False`` (``grads``: the
    expected gradients; ``dtype``: theirs, default the first one's).

    Both runs evaluate the *same* quantized forward: every block input is bit-identical (checked through
    the stream hooks), F and G run the same kernels on it, and the couplings are exact integer
    arithmetic. So the quantization step ``2**-frac_bits`` does not enter the difference at all (it would
    only bound the distance to an unquantized float network: ``2**-(R+1)`` per coupling). What can differ
    is floating-point summation order: autograd accumulates the two gradient contributions of a stream
    half in its own order, our fused step in another (a two-term fp sum is commutative, so on CPU they
    come out bit-identical), and a GPU's backward kernels may reduce in a different order per call
    (atomics). Such reorderings cost a few fp32 ulps per accumulation level; with up to 8 blocks x 2
    branches we allow rtol = 16 * 2**-23 * 8 ~ 1.5e-5 and an atol of the same relative size of the
    largest gradient (for elements that cancel to near zero). float16/bfloat16 gradients get 8 levels of the
    table's rtol for that dtype (one or two of its ulps each)."""
    present = [g for g in grads if g is not None]
    dtype = dtype or (present[0].dtype if present else torch.float32)
    biggest = max((float(g.detach().abs().max()) for g in present if g.numel()), default=0.0)
    if dtype in (torch.float16, torch.bfloat16):
        rtol = GRADIENT_LEVELS * tolerance(dtype)[0]
    else:
        rtol = 16 * 2.0 ** -23 * GRADIENT_LEVELS
    return rtol, rtol * max(biggest, 1e-30)


def assert_gradients_close(got: Sequence[Optional[torch.Tensor]], want: Sequence[Optional[torch.Tensor]],
                           what: str = "gradients", names: Optional[Sequence[str]] = None,
                           exact: bool = False) -> None:
    """Gradients of a reversible run (``got``) against those of ``reversible=False`` (``want``), element by
    element within :func:`grad_tolerance`; with ``exact``, also bit for bit (on a CPU, where every kernel is
    deterministic and both runs hand the branches contiguous gradients, the same operations run in the same order).
    ``names`` label the tensors in the report (default: ``"input grad"``, then ``"param k grad"``); a None
    gradient must be None in both."""
    if len(got) != len(want) or (names is not None and len(names) != len(want)):
        raise ValueError(f"assert_gradients_close: got {len(got)} gradients, want {len(want)}"
                         + ("" if names is None else f", names {len(names)}"))
    rtol, atol = grad_tolerance(want)
    for k, (a, b) in enumerate(zip(got, want)):
        name = names[k] if names is not None else ("input grad" if k == 0 else f"param {k - 1} grad")
        if a is None or b is None:
            if a is not b:
                raise AssertionError(f"{name}, {what}: {'no gradient' if a is None else 'a gradient'} where the "
                                     f"other run has {'one' if a is None else 'none'}")
            continue
        assert_close(a, b, f"{name}, {what}", rtol=rtol, atol=atol)
        if exact:
            assert_equal(a, b, f"{name}, {what}")
