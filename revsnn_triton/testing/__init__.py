"""Testing toolkit for reversible spiking networks: your own blocks, and this library's own tests.

Checks (:mod:`.checks`): :func:`assert_invertible` (exact round trip on the fixed-point grid, and the engine's
reconstruction in backward), :func:`assert_gradients_match` (reversible vs ``reversible=False``),
:func:`assert_batchnorm_updated_once`, :func:`assert_recompute_deterministic` (also across launch configurations)
and :func:`stream_headroom`; :func:`check_sequence` / :func:`check_model` run them all (``revsnn check``).
Comparisons (:mod:`.compare`): the tolerance table (:data:`TOLERANCES`, :func:`tolerance`), :func:`assert_equal`
(bit patterns), :func:`assert_close`, :func:`assert_gradients_close`. Hypothesis strategies:
:mod:`revsnn_triton.testing.strategies`. The pytest plugin (fixtures ``kernel_device`` and ``triton_kernels``,
the Triton interpreter on a machine without a GPU, the Hypothesis profiles ``revsnn-ci`` and ``revsnn-long``):
:mod:`revsnn_triton.testing.plugin`.

Names load on first use, so that the pytest plugin can import this package before torch.
"""
import importlib

_EXPORTS = {name: ".compare" for name in (
    "TOLERANCES", "tolerance", "assert_equal", "assert_close", "grad_tolerance", "assert_gradients_close",
    "mismatch_report")}
_EXPORTS.update({name: ".checks" for name in (
    "CheckResult", "BlockHeadroom", "Headroom", "SequenceReport", "TUNING_EXTREMES", "assert_invertible",
    "assert_gradients_match", "assert_batchnorm_updated_once", "assert_recompute_deterministic", "stream_headroom",
    "check_sequence", "check_model", "record_streams", "StreamRecord", "forced_launch_config")})
_SUBMODULES = ("checks", "compare", "strategies", "plugin")

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
