"""The fixed-point coupling op family: one home for the stream arithmetic of reversible blocks.

Read in this order: :mod:`.spec` (what a stream is, its limits and flags), :mod:`.reference` (the arithmetic in
plain PyTorch: the oracle and the CPU path), ``revsnn_triton/kernels/coupling.py`` (the Triton kernel),
:mod:`.op` (the ``torch.library`` registrations). This module is the validated Python API.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import op as _op
from .spec import (FLAG_COLUMNS, FLOAT32_EXACT, FLOAT_DTYPES, INEXACT, NONFINITE, OVERFLOW, STREAM_DTYPES,
                   check_frac_bits, float32_exact_range, new_flags, representable_range)

__all__ = ["encode", "decode", "couple", "uncouple", "coupling_flags", "encode_ste", "couple_ste",
           "stream_encode_", "stream_couple_", "stream_uncouple_", "stream_to_float_", "stream_decode",
           "check_frac_bits", "representable_range", "float32_exact_range", "new_flags",
           "OVERFLOW", "NONFINITE", "INEXACT", "FLAG_COLUMNS", "FLOAT32_EXACT", "FLOAT_DTYPES", "STREAM_DTYPES"]


def _check_tensor(name: str, t: object, *, dtypes: tuple[torch.dtype, ...], shape=None, device=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    return t


def _check_float_dtype(dtype: object) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype!r}")
    return dtype  # type: ignore[return-value]


def _check_saturate(saturate: object) -> bool:
    if not isinstance(saturate, bool):
        raise TypeError(f"saturate must be a bool, got {type(saturate).__name__}")
    return saturate


def _check_stream(s: object, name: str = "s") -> Tensor:
    return _check_tensor(name, s, dtypes=STREAM_DTYPES)


def _check_flags(flags: object, device: torch.device) -> Optional[Tensor]:
    if flags is None:
        return None
    _check_tensor("flags", flags, dtypes=(torch.int32,), shape=torch.Size([FLAG_COLUMNS]), device=device)
    return flags


# ------------------------------------------------------------------------------------------ functional

def encode(x: Tensor, frac_bits: int, saturate: bool = False) -> Tensor:
    """float ``x`` (any shape; float16/bfloat16/float32/float64) -> int32 ``rint(x * 2**frac_bits)`` (round half to
    even). Non-finite values raise ``ValueError``; so do values outside the int32 grid (``representable_range``)
    unless ``saturate=True``, which clamps them."""
    _check_tensor("x", x, dtypes=FLOAT_DTYPES)
    return _op._encode_op(x, check_frac_bits(frac_bits), _check_saturate(saturate))


def decode(q: Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int32 ``q`` -> ``q * 2**-frac_bits`` in ``dtype`` (rounded once to float32, exact in float64)."""
    _check_tensor("q", q, dtypes=(torch.int32,))
    return _op._decode_op(q, check_frac_bits(frac_bits), _check_float_dtype(dtype))


def couple(x_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    """int32 ``x_q + quantize(f)`` modulo 2**32; ``f`` float of ``x_q``'s shape. Not differentiable."""
    _check_tensor("x_q", x_q, dtypes=(torch.int32,))
    _check_tensor("f", f, dtypes=FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    return _op._couple_op(x_q, f, check_frac_bits(frac_bits))


def uncouple(y_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    """int32 ``y_q - quantize(f)`` modulo 2**32: ``uncouple(couple(x_q, f), f) == x_q`` for all inputs."""
    _check_tensor("y_q", y_q, dtypes=(torch.int32,))
    _check_tensor("f", f, dtypes=FLOAT_DTYPES, shape=y_q.shape, device=y_q.device)
    return _op._uncouple_op(y_q, f, check_frac_bits(frac_bits))


def coupling_flags(x_q: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    """The flags ``[OVERFLOW, NONFINITE, INEXACT]`` (int32 ``[3]``, 0 or 1) of ``couple(x_q, f)``, on the device,
    without synchronizing."""
    _check_tensor("x_q", x_q, dtypes=(torch.int32,))
    _check_tensor("f", f, dtypes=FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    return _op._coupling_flags_op(x_q, f, check_frac_bits(frac_bits))


def encode_ste(x: Tensor, frac_bits: int, saturate: bool = False) -> tuple[Tensor, Tensor]:
    """``(q, decode(q, x.dtype))`` with ``q = encode(x)``; the float output is differentiable w.r.t. ``x`` with the
    straight-through gradient (identity)."""
    _check_tensor("x", x, dtypes=FLOAT_DTYPES)
    x_r, q = _op._encode_ste_op(x, check_frac_bits(frac_bits), _check_saturate(saturate))
    return q, x_r


def couple_ste(x_q: Tensor, x: Tensor, f: Tensor, frac_bits: int) -> tuple[Tensor, Tensor]:
    """``(y_q, decode(y_q, x.dtype))`` with ``y_q = couple(x_q, f)``. ``x`` is the float carrier of ``x_q`` (its
    values are not read); the float output is differentiable w.r.t. ``x`` and ``f`` with straight-through gradients
    (``grad_x = grad_f = grad_y``)."""
    _check_tensor("x_q", x_q, dtypes=(torch.int32,))
    _check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    _check_tensor("f", f, dtypes=FLOAT_DTYPES, shape=x_q.shape, device=x_q.device)
    y, y_q = _op._couple_ste_op(x_q, x, f, check_frac_bits(frac_bits))
    return y_q, y


# ------------------------------------------------------------------------------------------ stream ops

def stream_encode_(s: Tensor, x: Tensor, frac_bits: int, flags: Optional[Tensor] = None) -> Tensor:
    """Write ``quantize(x)`` into the stream view ``s`` (int32, or float32/float64 storage holding its exact decode)
    in place, and OR the facts about it into ``flags`` (a ``[3]`` int32 row: values beyond the grid as OVERFLOW,
    non-finite values as NONFINITE, ``|q| >= 2**24`` as INEXACT). No synchronization. Returns ``s``."""
    _check_stream(s)
    _check_tensor("x", x, dtypes=FLOAT_DTYPES, shape=s.shape, device=s.device)
    _op._stream_encode_op(s, x, check_frac_bits(frac_bits), _check_flags(flags, s.device))
    return s


def stream_couple_(s: Tensor, f: Tensor, frac_bits: int, flags: Optional[Tensor] = None) -> Tensor:
    """``s += quantize(f)`` in place on a stream view (modulo 2**32), OR-ing the result's flags into ``flags``.
    Returns ``s``."""
    _check_stream(s)
    _check_tensor("f", f, dtypes=FLOAT_DTYPES, shape=s.shape, device=s.device)
    _op._stream_couple_op(s, f, check_frac_bits(frac_bits), _check_flags(flags, s.device))
    return s


def stream_uncouple_(s: Tensor, f: Tensor, frac_bits: int) -> Tensor:
    """``s -= quantize(f)`` in place on a stream view: undoes :func:`stream_couple_` bit for bit. Returns ``s``."""
    _check_stream(s)
    _check_tensor("f", f, dtypes=FLOAT_DTYPES, shape=s.shape, device=s.device)
    _op._stream_uncouple_op(s, f, check_frac_bits(frac_bits))
    return s


def stream_to_float_(s: Tensor, frac_bits: int) -> Tensor:
    """Turn an int32 stream into float32 storage in its own memory (every ``|q| < 2**24``, e.g. checked through
    the INEXACT flag) and return the float32 view of that memory. ``s`` must be contiguous."""
    _check_tensor("s", s, dtypes=(torch.int32,))
    if not s.is_contiguous():
        raise ValueError("stream_to_float_: s must be contiguous")
    _op._stream_to_float_op(s, check_frac_bits(frac_bits))
    return s.view(torch.float32)


def stream_decode(s: Tensor, frac_bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The real values of a stream view (int32 or float storage) in ``dtype``, as a new dense tensor."""
    _check_stream(s)
    return _op._stream_decode_op(s, check_frac_bits(frac_bits), _check_float_dtype(dtype))
