"""Comparison helpers shared by the tests and the benchmarks.

One tolerance table, per dtype, in one place. Everything that must be exact (spikes in fp32,
fixed-point streams, reconstruction) is compared with :func:`assert_equal` (rtol = atol = 0).
"""
from __future__ import annotations

import torch

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
    if dtype not in TOLERANCES:
        raise TypeError(f"tolerance: no tolerance defined for dtype {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def _describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, what: str) -> str:
    n_bad = int(bad.sum())
    idx = bad.nonzero()[:5].tolist()
    samples = ", ".join(
        f"{tuple(i)}: {actual[tuple(i)].item()!r} vs {expected[tuple(i)].item()!r}" for i in idx)
    return (f"{what}: {n_bad} of {bad.numel()} elements differ ({100.0 * n_bad / max(bad.numel(), 1):.3g}%); "
            f"first at {samples}")


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "tensor") -> None:
    """Bit-exact comparison (NaNs equal NaNs); reports how many elements differ and where."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    if actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: dtype {actual.dtype} != expected {expected.dtype}")
    a, e = actual.detach().cpu(), expected.detach().cpu()
    if a.is_floating_point():
        # Compare bit patterns so that -0.0 vs +0.0 and NaN payloads count as differences.
        int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        bad = a.view(int_dtype) != e.view(int_dtype)
    else:
        bad = a != e
    if bad.any():
        raise AssertionError(_describe_mismatch(a, e, bad, what))


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
        raise AssertionError(_describe_mismatch(a, e, bad, f"{what} (rtol={rtol:g}, atol={atol:g})"))
