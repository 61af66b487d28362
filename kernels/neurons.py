"""Fused multi-step IF / LIF / PLIF neurons: Triton kernels and their launchers.

One kernel family for the three neuron kinds (``KIND`` constexpr: 0 IF, 1 LIF, 2 PLIF), forward and backward,
each looping over all T time steps inside the kernel; one program per block of ``block_size`` neurons. State
and arithmetic are fp32 whatever the input dtype; spikes are written in the input dtype. The formulas (and their
order of operations, so that fp32 spikes and membranes are bit-equal to spikingjelly 2.0) are those of
``revsnn_triton.ops.neuron_reference``; the seven surrogate derivatives are constexpr-selected ``@triton.jit``
functions with the formulas of ``revsnn_triton.surrogate``. Floating-point contraction is disabled
(``enable_fp_fusion=False``) and divisions are correctly rounded (``div_rn``), so the forward rounds exactly
as the PyTorch reference does (spikes, membranes and H bit-equal); the backward differs from it only where
``exp`` is evaluated (surrogates), by an ulp or so.

Layouts. ``x [T, *shape]`` is read in place with any strides: the launcher sorts the inner dims by stride,
drops size-1 dims, merges dims that are contiguous with each other and passes up to ``MAX_DIMS`` (size, stride)
pairs plus the time stride (0 for an input repeated over T with ``expand``); only layouts that need more dims
are copied first. All outputs are dense in the *neuron layout* of ``x`` (:func:`empty_neuron_layout`): time
outermost, inner dims in ``x``'s stride order (so ``channels_last`` stays ``channels_last``), which makes
offset ``t * N + n`` for neuron ``n`` of step ``t``. ``v_init`` and the incoming gradients are copied into that
layout when they are not in it already (for ``v_init`` and ``grad_v_final`` that is N floats).

What the forward keeps for backward (``save``), in bytes per neuron-step, besides a reference to ``x`` where
it is needed (``save="input"``, and PLIF with ``decay_input``; it costs nothing extra when ``x`` is kept alive
anyway, and an expanded ``x`` holds only one step) and ``v_init`` when one is given (N floats, PLIF and
``"input"``):

- ``"h"``: 4 bytes, fp32 ``H``. Exact gradients.
- ``"h_bf16"``: 2 bytes, ``H - v_threshold`` rounded to nearest-even bf16. Spikes in backward come from its sign
  bit, so the reset gradient's spike mask is exact; the surrogate and ``v_reset - H`` terms see ``H`` with a
  relative error up to 2^-9 of ``|H - v_threshold|``: gradients are approximate.
- ``"input"``: 0 bytes. For ``T <= MAX_RECOMPUTE_T`` the backward kernel re-runs the forward recurrence on
  ``x`` in registers (``T`` is then a compile-time constant, both time loops are unrolled and ``H[t]`` is the
  t-th block of a tuple), then runs the reverse-time recurrence: H never goes to memory. Longer sequences re-run
  the forward kernel into a transient fp32 ``H`` buffer (4 bytes per neuron-step, freed after the backward)
  first. Either way the arithmetic is the forward's, so the gradients are bit-identical to ``"h"``'s.

Traffic per call, bytes per neuron-step with ``b`` the input's element size (2 or 4), for the common case of
a constant initial state (``v_init=None``: filled from ``v_reset``, not read), an unused ``v_final`` (its zero
gradient is not read) and no grad of ``v_init`` (not written); each of these otherwise adds 4 bytes per neuron
(not per step), as does writing ``v_final``:

============  =====================  ==============================  ===========
``save``      forward                backward                        total
============  =====================  ==============================  ===========
``"h"``       X, S, H: ``2b + 4``    dS, H, dX: ``2b + 4``           ``4b + 8``
``"h_bf16"``  X, S, H: ``2b + 2``    dS, H, dX: ``2b + 2``           ``4b + 4``
``"input"``   X, S: ``2b``           dS, X, dX: ``3b``               ``5b``
============  =====================  ==============================  ===========

``"input"`` is the 5-pass floor (fp32: 20 bytes vs 24 for ``"h"``; bf16: 10 vs 16). For
``T > MAX_RECOMPUTE_T`` its backward costs ``b + 4`` (re-run) plus ``2b + 4`` more. PLIF with ``decay_input``
also reads X in backward with ``"h"``/``"h_bf16"`` (``b`` more) and again with ``"input"`` (``b`` more).

PLIF's gradient of ``w``: the backward kernel writes, per neuron, ``sum_t dL/dH[t] * dH[t]/dq`` (summed over t
in registers, t from T-1 down to 0); the caller reduces these partials with one ``torch.sum``. No atomics, and
the result does not depend on the launch configuration.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from revsnn_triton.surrogate import SURROGATE_IDS

MAX_DIMS = 3
KIND_IDS = {"if": 0, "lif": 1, "plif": 2}
SAVE_IDS = {"none": 0, "h": 1, "h_bf16": 2}
# Longest sequence whose save="input" backward recomputes H in registers (T unrolled: one compiled variant per T).
MAX_RECOMPUTE_T = 32


# ------------------------------------------------------------------------------------------------ layouts

def neuron_perm(x: torch.Tensor) -> list[int]:
    """Inner dims of ``x [T, *shape]`` (numbered from 0 over ``shape``) from outermost to innermost in memory:
    sorted by decreasing stride, ties by dim index; size-1 dims are left out (their stride is irrelevant)."""
    dims = [d for d in range(x.dim() - 1) if x.shape[d + 1] != 1]
    return sorted(dims, key=lambda d: -x.stride(d + 1))


def neuron_layout_strides(x: torch.Tensor, with_time: bool) -> list[int]:
    """Strides of the dense neuron layout of ``x``: time outermost (``with_time``), inner dims in
    :func:`neuron_perm` order, size-1 dims stride 1. Applied to a tensor already in it, gives it back."""
    shape = list(x.shape[1:])
    strides = [1] * len(shape)
    step = 1
    for d in reversed(neuron_perm(x)):
        strides[d] = step
        step *= shape[d]
    return [step] + strides if with_time else strides


def empty_neuron_layout(x: torch.Tensor, dtype: torch.dtype, with_time: bool = True) -> torch.Tensor:
    """An uninitialized tensor in the neuron layout of ``x``: ``[T, *shape]`` (or ``[*shape]``), ``dtype``."""
    shape = list(x.shape) if with_time else list(x.shape[1:])
    return torch.empty_strided(shape, neuron_layout_strides(x, with_time), dtype=dtype, device=x.device)


def has_neuron_layout(t: torch.Tensor, template: torch.Tensor, with_time: bool) -> bool:
    """Whether ``t`` is laid out as :func:`empty_neuron_layout` would make it (strides of size-1 dims ignored)."""
    expected = neuron_layout_strides(template, with_time)
    return all(size == 1 or stride == e for size, stride, e in zip(t.shape, t.stride(), expected))


def to_neuron_layout(t: torch.Tensor, template: torch.Tensor, with_time: bool) -> torch.Tensor:
    """``t`` itself if it already has the neuron layout of ``template``, else a copy in it."""
    if has_neuron_layout(t, template, with_time):
        return t
    out = empty_neuron_layout(template, t.dtype, with_time)
    out.copy_(t)
    return out


def coalesced_dims(x: torch.Tensor) -> list[tuple[int, int]] | None:
    """``x``'s inner dims as at most :data:`MAX_DIMS` (size, stride) pairs, outermost first, enumerating the
    neurons in the neuron-layout order; None if more are needed."""
    dims: list[tuple[int, int]] = []
    for d in neuron_perm(x):
        size, stride = x.shape[d + 1], x.stride(d + 1)
        if dims and dims[-1][1] == stride * size:
            dims[-1] = (dims[-1][0] * size, stride)
        else:
            dims.append((size, stride))
    if not dims:
        dims = [(1, 0)]
    return dims if len(dims) <= MAX_DIMS else None


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _div_rn(x, y, like):
    """Correctly rounded ``x / y`` (as PyTorch divides) in the shape of the block ``like``; ``x`` and ``y`` may
    be scalars. Multiplying by ones broadcasts exactly (keeps -0.0, inf and NaN as they are)."""
    ones = tl.zeros_like(like) + 1.0
    return tl.math.div_rn(x * ones, y * ones)


@triton.jit
def _sg_sigmoid(x, a, b):
    e = 1.0 + tl.exp(-(a * x))
    s = _div_rn(1.0, e, e)  # sigmoid(a * x)
    return (1.0 - s) * s * a  # a = alpha


@triton.jit
def _sg_atan(x, a, b):
    z = x * b  # b = pi / 2 * alpha
    return _div_rn(a, 1.0 + z * z, z)  # a = alpha / 2


@triton.jit
def _sg_piecewise_quadratic(x, a, b):
    return tl.maximum(a - b * tl.abs(x), 0.0)  # a = alpha, b = alpha^2


@triton.jit
def _sg_piecewise_exp(x, a, b):
    return a * tl.exp(b * tl.abs(x))  # a = alpha / 2, b = -alpha


@triton.jit
def _sg_soft_sign(x, a, b):
    z = a + tl.abs(x)  # a = 1 / alpha
    return _div_rn(1.0, b * z * z, z)  # b = 2 * alpha


@triton.jit
def _sg_super_spike(x, a, b):
    z = 1.0 + tl.abs(x)
    return _div_rn(a, z * z, z)  # a = alpha


@triton.jit
def _sg_erf(x, a, b):
    z = b * x  # b = alpha
    return a * tl.exp(-z * z)  # a = alpha / sqrt(pi)


@triton.jit
def _surrogate_grad(x, a, b, SURROGATE: tl.constexpr):
    if SURROGATE == 0:
        g = _sg_sigmoid(x, a, b)
    elif SURROGATE == 1:
        g = _sg_atan(x, a, b)
    elif SURROGATE == 2:
        g = _sg_piecewise_quadratic(x, a, b)
    elif SURROGATE == 3:
        g = _sg_piecewise_exp(x, a, b)
    elif SURROGATE == 4:
        g = _sg_soft_sign(x, a, b)
    elif SURROGATE == 5:
        g = _sg_super_spike(x, a, b)
    else:
        g = _sg_erf(x, a, b)
    return g


@triton.jit
def _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS: tl.constexpr):
    """Element offset (int64) of neuron ``n`` in x's step 0, from up to three coalesced (size, stride) dims."""
    n = n.to(tl.int64)
    if NDIMS == 1:
        off = n * stride2
    elif NDIMS == 2:
        off = (n // size2) * stride1 + (n % size2) * stride2
    else:
        r = n // size2
        off = (r // size1) * stride0 + (r % size1) * stride1 + (n % size2) * stride2
    return off


@triton.jit
def _charge(x, v, tau, q, v_reset, KIND: tl.constexpr, DECAY_INPUT: tl.constexpr):
    if KIND == 0:
        h = v + x
    elif KIND == 1:
        if DECAY_INPUT:
            h = v + _div_rn(x - (v - v_reset), tau, x)
        else:
            h = v - _div_rn(v - v_reset, tau, x) + x
    else:
        if DECAY_INPUT:
            h = v + (x - (v - v_reset)) * q
        else:
            h = v - (v - v_reset) * q + x
    return h


@triton.jit
def _reset(h, spike, v_threshold, v_reset, HARD_RESET: tl.constexpr):
    if HARD_RESET:
        v = spike * v_reset + (1.0 - spike) * h
    else:
        v = h - spike * v_threshold
    return v


@triton.jit
def _round_bf16_bits(x):
    """fp32 -> bf16 bits (uint16), round to nearest even; written out so the interpreter rounds as the GPU does."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16)


@triton.jit
def _step(x, v, tau, q, v_threshold, v_reset, KIND: tl.constexpr, DECAY_INPUT: tl.constexpr,
          HARD_RESET: tl.constexpr):
    """One time step of the forward recurrence: ``(H, spike as 0/1 fp32, V)`` from input ``x`` and ``V[t-1]``."""
    h = _charge(x, v, tau, q, v_reset, KIND, DECAY_INPUT)
    spike = (h >= v_threshold).to(tl.float32)
    v = _reset(h, spike, v_threshold, v_reset, HARD_RESET)
    return h, spike, v


@triton.jit
def _initial_v(v_init_ptr, n, mask, v_fill, V_INIT_CONST: tl.constexpr, BLOCK: tl.constexpr):
    """``V[-1]``: ``v_fill`` everywhere (the default initial state, nothing read) or loaded from ``v_init``."""
    if V_INIT_CONST:
        v = v_fill * (tl.zeros([BLOCK], dtype=tl.float32) + 1.0)  # x * 1.0 is exact (keeps -0.0)
    else:
        v = tl.load(v_init_ptr + n, mask=mask, other=0.0)
    return v


@triton.jit
def _neuron_forward_kernel(
    x_ptr, v_init_ptr, q_ptr, spikes_ptr, v_final_ptr, h_ptr,
    N, T, stride_t, size1, size2, stride0, stride1, stride2,
    tau, v_threshold, v_reset, v_fill,
    KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, NDIMS: tl.constexpr,
    SAVE: tl.constexpr, STORE_SPIKES: tl.constexpr, V_INIT_CONST: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    x_off = _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS)
    v = _initial_v(v_init_ptr, n, mask, v_fill, V_INIT_CONST, BLOCK)
    q = 0.0
    if KIND == 2:
        q = tl.load(q_ptr)
    out = n  # int64 running offsets: t * N and t * stride_t can exceed 2^31
    x_cur = x_off
    # `while` rather than `for t in range(T)`: Triton 3.6's interpreter cannot take a runtime loop bound
    # under numpy >= 2.3 (int() of a 1-element array); compiled, both are the same loop.
    t = 0
    while t < T:
        x = tl.load(x_ptr + x_cur, mask=mask, other=0.0).to(tl.float32)
        h, spike, v = _step(x, v, tau, q, v_threshold, v_reset, KIND, DECAY_INPUT, HARD_RESET)
        if STORE_SPIKES:
            tl.store(spikes_ptr + out, spike.to(spikes_ptr.dtype.element_ty), mask=mask)
        if SAVE == 1:
            tl.store(h_ptr + out, h, mask=mask)
        elif SAVE == 2:
            tl.store(h_ptr + out, _round_bf16_bits(h - v_threshold).to(tl.bfloat16, bitcast=True), mask=mask)
        out += N
        x_cur += stride_t
        t += 1
    tl.store(v_final_ptr + n, v, mask=mask)


@triton.jit
def _load_saved(h_ptr, off, mask, v_threshold, H_BF16: tl.constexpr):
    """(H, spike as 0/1 fp32) of one step from the saved buffer."""
    if H_BF16:
        d = tl.load(h_ptr + off, mask=mask, other=0.0)
        sign = d.to(tl.int16, bitcast=True) < 0
        h = d.to(tl.float32) + v_threshold
        spike = tl.where(sign, 0.0, 1.0)
    else:
        h = tl.load(h_ptr + off, mask=mask, other=0.0)
        spike = (h >= v_threshold).to(tl.float32)
    return h, spike


@triton.jit
def _grad_step(h, spike, grad_s, carry, tau, q, v_threshold, v_reset, sg_a, sg_b, KIND: tl.constexpr,
               DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
               SURROGATE: tl.constexpr):
    """One step of the reverse-time recurrence: ``(dL/dX[t], dL/dH[t], dL/dV[t-1])`` from ``H[t]``, its spike,
    ``dL/dS[t]`` (fp32) and the carried ``dL/dV[t]``."""
    sg = _surrogate_grad(h - v_threshold, sg_a, sg_b, SURROGATE)
    if HARD_RESET:
        dv_dh = 1.0 - spike
        if not DETACH_RESET:
            dv_dh = dv_dh + (v_reset - h) * sg
    else:
        if DETACH_RESET:
            dv_dh = tl.full(sg.shape, 1.0, tl.float32)
        else:
            dv_dh = 1.0 - v_threshold * sg
    grad_h = grad_s * sg + carry * dv_dh
    if KIND == 0:
        grad_x = grad_h
        carry = grad_h
    elif KIND == 1:
        grad_h_tau = _div_rn(grad_h, tau, grad_h)
        if DECAY_INPUT:
            grad_x = grad_h_tau
        else:
            grad_x = grad_h
        carry = grad_h - grad_h_tau
    else:
        if DECAY_INPUT:
            grad_x = grad_h * q
        else:
            grad_x = grad_h
        carry = grad_h - grad_h * q
    return grad_x, grad_h, carry


@triton.jit
def _dh_dq(x_ptr, x_cur, mask, v_prev, v_reset, DECAY_INPUT: tl.constexpr):
    """PLIF: ``dH[t]/dq = X[t] - (V[t-1] - v_reset)`` (``decay_input``) or ``-(V[t-1] - v_reset)``."""
    if DECAY_INPUT:
        x = tl.load(x_ptr + x_cur, mask=mask, other=0.0).to(tl.float32)
        d = x - (v_prev - v_reset)
    else:
        d = -(v_prev - v_reset)
    return d


@triton.jit
def _neuron_backward_kernel(
    grad_s_ptr, grad_v_ptr, h_ptr, x_ptr, v_init_ptr, q_ptr, grad_x_ptr, grad_v_init_ptr, w_partial_ptr,
    N, T, last_out, x_last, stride_t, size1, size2, stride0, stride1, stride2,
    tau, v_threshold, v_reset, v_fill, sg_a, sg_b,
    KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, H_BF16: tl.constexpr, NDIMS: tl.constexpr, V_INIT_CONST: tl.constexpr,
    LOAD_GRAD_V: tl.constexpr, STORE_GRAD_V_INIT: tl.constexpr, RECOMPUTE_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward through time, from the saved H (``RECOMPUTE_T == 0``; runtime ``T``), or with H recomputed in
    registers (``RECOMPUTE_T == T``, a compile-time constant: both time loops are unrolled and H[t] is the t-th
    element of a tuple of blocks, so it never goes to memory)."""
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    if LOAD_GRAD_V:
        carry = tl.load(grad_v_ptr + n, mask=mask, other=0.0)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    q = 0.0
    w_acc = tl.zeros([BLOCK], dtype=tl.float32)
    v_init = tl.zeros([BLOCK], dtype=tl.float32)
    x_off = n
    if KIND == 2:
        q = tl.load(q_ptr)
    if KIND == 2 or RECOMPUTE_T > 0:
        v_init = _initial_v(v_init_ptr, n, mask, v_fill, V_INIT_CONST, BLOCK)
        x_off = _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS)
    out = n + last_out  # last_out = (T - 1) * N and x_last = (T - 1) * stride_t, from the launcher (int64-safe)
    if RECOMPUTE_T > 0:
        hs = ()
        v = v_init
        x_cur = x_off
        for t in tl.static_range(RECOMPUTE_T):
            x = tl.load(x_ptr + x_cur, mask=mask, other=0.0).to(tl.float32)
            h, spike, v = _step(x, v, tau, q, v_threshold, v_reset, KIND, DECAY_INPUT, HARD_RESET)
            hs = hs + (h,)
            x_cur += stride_t
        x_cur = x_off + x_last
        for t in tl.static_range(RECOMPUTE_T - 1, -1, -1):
            h = hs[t]
            spike = (h >= v_threshold).to(tl.float32)
            grad_s = tl.load(grad_s_ptr + out, mask=mask, other=0.0).to(tl.float32)
            grad_x, grad_h, carry = _grad_step(h, spike, grad_s, carry, tau, q, v_threshold, v_reset, sg_a, sg_b,
                                               KIND, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE)
            tl.store(grad_x_ptr + out, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
            if KIND == 2:
                if t > 0:
                    h_prev = hs[t - 1]
                    v_prev = _reset(h_prev, (h_prev >= v_threshold).to(tl.float32), v_threshold, v_reset,
                                    HARD_RESET)
                else:
                    v_prev = v_init
                w_acc = w_acc + grad_h * _dh_dq(x_ptr, x_cur, mask, v_prev, v_reset, DECAY_INPUT)
            out -= N
            x_cur -= stride_t
    else:
        x_cur = x_off + x_last
        h, spike = _load_saved(h_ptr, out, mask, v_threshold, H_BF16)
        t = T - 1
        while t >= 0:
            grad_s = tl.load(grad_s_ptr + out, mask=mask, other=0.0).to(tl.float32)
            grad_x, grad_h, carry = _grad_step(h, spike, grad_s, carry, tau, q, v_threshold, v_reset, sg_a, sg_b,
                                               KIND, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE)
            tl.store(grad_x_ptr + out, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
            if t > 0:
                h, spike = _load_saved(h_ptr, out - N, mask, v_threshold, H_BF16)
            if KIND == 2:
                v_prev = tl.where(t > 0, _reset(h, spike, v_threshold, v_reset, HARD_RESET), v_init)
                w_acc = w_acc + grad_h * _dh_dq(x_ptr, x_cur, mask, v_prev, v_reset, DECAY_INPUT)
            out -= N
            x_cur -= stride_t
            t -= 1
    if STORE_GRAD_V_INIT:
        tl.store(grad_v_init_ptr + n, carry, mask=mask)
    if KIND == 2:
        tl.store(w_partial_ptr + n, w_acc, mask=mask)


# ---------------------------------------------------------------------------------------------- launchers

def _surrogate_constants(surrogate: str, alpha: float) -> tuple[float, float]:
    """The two scalars each surrogate formula takes, computed in double as spikingjelly's Python code does."""
    return {
        "sigmoid": (alpha, 0.0),
        "atan": (alpha / 2, math.pi / 2 * alpha),
        "piecewise_quadratic": (alpha, alpha * alpha),
        "piecewise_exp": (alpha / 2, -alpha),
        "soft_sign": (1 / alpha, 2 * alpha),
        "super_spike": (alpha, 0.0),
        "erf": (alpha / math.sqrt(math.pi), alpha),
    }[surrogate]


def _default_config(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    try:
        from revsnn_triton import tuning
        cfg = tuning.launch_config(kernel, n, T, dtype, device)
        return cfg.block_size, cfg.num_warps
    except Exception:  # a missing or unreadable tuning cache must never fail a launch
        if device.type != "cuda":
            return 128, 1
        return (1024, 4) if n >= 512 * 1024 else (256, 2)


def _check_config(block_size: int, num_warps: int) -> None:
    for name, value, lo, hi in (("block_size", block_size, 16, 1 << 16), ("num_warps", num_warps, 1, 32)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not lo <= value <= hi or value & (value - 1):
            raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value}")


def _x_geometry(x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``x`` (copied into the neuron layout if its strides need more than MAX_DIMS dims) and the kernel's
    layout arguments ``[stride_t, size1, size2, stride0, stride1, stride2]`` plus ``NDIMS``."""
    dims = coalesced_dims(x)
    if dims is None:
        x = to_neuron_layout(x, x, with_time=True)
        dims = coalesced_dims(x)
        assert dims is not None
    ndims = len(dims)
    padded = [(1, 0)] * (MAX_DIMS - ndims) + dims
    (_, s0), (n1, s1), (n2, s2) = padded
    return x, [x.stride(0), n1, n2, s0, s1, s2, ndims]


def _launch_args(kernel: str, x: torch.Tensor, dtype: torch.dtype, block_size: int | None,
                 num_warps: int | None):
    n, T = x[0].numel(), x.shape[0]
    if block_size is None or num_warps is None:
        b, w = _default_config(kernel, n, T, dtype, x.device)
        block_size = b if block_size is None else block_size
        num_warps = w if num_warps is None else num_warps
    _check_config(block_size, num_warps)
    return n, T, block_size, num_warps, (triton.cdiv(n, block_size),)


def _check_out(name: str, t: torch.Tensor, template: torch.Tensor, dtype: torch.dtype, with_time: bool) -> None:
    shape = tuple(template.shape) if with_time else tuple(template.shape[1:])
    if (tuple(t.shape) != shape or t.dtype != dtype or t.device != template.device
            or not has_neuron_layout(t, template, with_time)):
        raise ValueError(f"{name}: expected shape {shape}, dtype {dtype}, device {template.device} in the neuron "
                         f"layout (strides {neuron_layout_strides(template, with_time)}); got shape "
                         f"{tuple(t.shape)}, dtype {t.dtype}, strides {tuple(t.stride())}")


def neuron_forward(x: torch.Tensor, v_init: torch.Tensor | None, q: torch.Tensor | None, *, kind: str, tau: float,
                   decay_input: bool, v_threshold: float, hard_reset: bool, v_reset: float, save: str,
                   block_size: int | None = None, num_warps: int | None = None, out=None):
    """Multi-step neuron forward.

    ``x [T, *shape]`` fp32/fp16/bf16 (any strides), ``v_init [*shape]`` fp32 or None (the default initial
    state ``v_reset``, which is 0.0 for soft reset: nothing is read), ``q`` a 1-element fp32 tensor
    ``sigmoid(w)`` (PLIF) or None; ``v_reset`` is the hard-reset value (0.0 for soft reset). ``save`` in
    ``"h"``, ``"h_bf16"``, ``"input"``. Returns ``(spikes [T, *shape] x.dtype, v_final [*shape] fp32, saved)``,
    all in the neuron layout of ``x``: ``saved`` is fp32 ``H``, bf16 ``H - v_threshold``, or an empty tensor.
    ``out``: optional preallocated ``(spikes, v_final, saved)`` in that layout (the tests poison them).
    """
    saved_dtype = {"h": torch.float32, "h_bf16": torch.bfloat16, "input": torch.float32}[save]
    if out is None:
        spikes = empty_neuron_layout(x, x.dtype)
        v_final = empty_neuron_layout(x, torch.float32, with_time=False)
        saved = empty_neuron_layout(x, saved_dtype) if save != "input" else x.new_empty(0, dtype=torch.float32)
    else:
        spikes, v_final, saved = out
        _check_out("out[0] (spikes)", spikes, x, x.dtype, True)
        _check_out("out[1] (v_final)", v_final, x, torch.float32, False)
        if save != "input":
            _check_out("out[2] (saved)", saved, x, saved_dtype, True)
    _forward_into(x, v_init, q, spikes, v_final, saved, kind=kind, tau=tau, decay_input=decay_input,
                  v_threshold=v_threshold, hard_reset=hard_reset, v_reset=v_reset,
                  save_id=SAVE_IDS["none" if save == "input" else save], store_spikes=True,
                  block_size=block_size, num_warps=num_warps)
    return spikes, v_final, saved


def _forward_into(x, v_init, q, spikes, v_final, saved, *, kind, tau, decay_input, v_threshold, hard_reset,
                  v_reset, save_id, store_spikes, block_size, num_warps):
    n, T, block_size, num_warps, grid = _launch_args("neuron_forward", x, x.dtype, block_size, num_warps)
    if n == 0:
        return
    if v_init is not None:
        v_init = to_neuron_layout(v_init, x, with_time=False)
    x, geometry = _x_geometry(x)
    _neuron_forward_kernel[grid](
        x, v_final if v_init is None else v_init, q if q is not None else v_final,
        spikes if store_spikes else v_final, v_final, saved if save_id else v_final,
        n, T, *geometry[:6], float(tau), float(v_threshold), float(v_reset), float(v_reset),
        KIND=KIND_IDS[kind], DECAY_INPUT=bool(decay_input), HARD_RESET=bool(hard_reset), NDIMS=geometry[6],
        SAVE=save_id, STORE_SPIKES=store_spikes, V_INIT_CONST=v_init is None, BLOCK=block_size,
        num_warps=num_warps, enable_fp_fusion=False)


def neuron_backward(grad_spikes: torch.Tensor, grad_v_final: torch.Tensor | None, saved: torch.Tensor,
                    x: torch.Tensor | None, v_init: torch.Tensor | None, q: torch.Tensor | None, *, kind: str,
                    tau: float, decay_input: bool, v_threshold: float, hard_reset: bool, v_reset: float,
                    detach_reset: bool, surrogate: str, alpha: float, save: str, need_grad_v_init: bool = True,
                    block_size: int | None = None, num_warps: int | None = None, out=None):
    """Multi-step neuron backward through time.

    ``grad_spikes [T, *shape]`` (spikes' dtype), ``grad_v_final [*shape]`` or None (zero: nothing read);
    ``saved`` from :func:`neuron_forward`; ``x`` is read for ``save="input"`` and for PLIF with ``decay_input``;
    ``v_init`` (None = the constant default state ``v_reset``) matters for PLIF and ``"input"``.
    ``save="input"`` with ``T <= MAX_RECOMPUTE_T`` runs one kernel that recomputes H in registers; longer
    sequences re-run the forward kernel into a transient fp32 H buffer first. Gradients are bit-identical to
    ``save="h"``'s in both cases.
    Returns ``(grad_x [T, *shape] in grad_spikes' dtype, grad_v_init [*shape] fp32 or None when
    ``need_grad_v_init`` is false (not written), w_partial)`` in the neuron layout (of ``x`` for ``"input"``,
    else of ``saved``); ``w_partial [*shape]`` fp32 per-neuron partial sums for PLIF's grad of ``w`` (None
    otherwise). ``out``: optional preallocated ``(grad_x, grad_v_init, w_partial)``.
    """
    template = x if save == "input" else saved
    recompute = save == "input" and template.shape[0] <= MAX_RECOMPUTE_T  # fused: H in registers
    if save == "input" and not recompute:
        h = empty_neuron_layout(x, torch.float32)
        scratch_v = empty_neuron_layout(x, torch.float32, with_time=False)
        _forward_into(x, v_init, q, None, scratch_v, h, kind=kind, tau=tau, decay_input=decay_input,
                      v_threshold=v_threshold, hard_reset=hard_reset, v_reset=v_reset, save_id=SAVE_IDS["h"],
                      store_spikes=False, block_size=block_size, num_warps=num_warps)
        del scratch_v
    else:
        h = saved  # empty for the fused recompute: the kernel never reads it
    if out is None:
        grad_x = empty_neuron_layout(template, grad_spikes.dtype)
        grad_v_init = empty_neuron_layout(template, torch.float32, with_time=False) if need_grad_v_init else None
        w_partial = empty_neuron_layout(template, torch.float32, with_time=False) if kind == "plif" else None
    else:
        grad_x, grad_v_init, w_partial = out
        _check_out("out[0] (grad_x)", grad_x, template, grad_spikes.dtype, True)
        if need_grad_v_init:
            _check_out("out[1] (grad_v_init)", grad_v_init, template, torch.float32, False)
        else:
            grad_v_init = None
        if kind == "plif":
            _check_out("out[2] (w_partial)", w_partial, template, torch.float32, False)
    grad_spikes = to_neuron_layout(grad_spikes, template, with_time=True)
    if grad_v_final is not None:
        grad_v_final = to_neuron_layout(grad_v_final.float(), template, with_time=False)
    kernel = "neuron_backward_recompute" if recompute else "neuron_backward"
    n, T, block_size, num_warps, grid = _launch_args(kernel, template, grad_spikes.dtype, block_size, num_warps)
    if n == 0:
        return grad_x, grad_v_init, w_partial
    reads_x = recompute or (kind == "plif" and decay_input)  # PLIF: dH/dq = X - (V[t-1] - v_reset)
    if v_init is not None and (kind == "plif" or recompute):
        v_init = to_neuron_layout(v_init, template, with_time=False)
    if reads_x:
        x, geometry = _x_geometry(x)
    else:
        geometry = [0, 1, 1, 0, 0, 0, 1]
    sg_a, sg_b = _surrogate_constants(surrogate, alpha)
    any_ptr = grad_x
    _neuron_backward_kernel[grid](
        grad_spikes, any_ptr if grad_v_final is None else grad_v_final, any_ptr if recompute else h,
        x if reads_x else any_ptr, any_ptr if v_init is None else v_init, any_ptr if q is None else q,
        grad_x, any_ptr if grad_v_init is None else grad_v_init, any_ptr if w_partial is None else w_partial,
        n, T, (T - 1) * n, (T - 1) * geometry[0], *geometry[:6], float(tau), float(v_threshold), float(v_reset),
        float(v_reset), float(sg_a), float(sg_b),
        KIND=KIND_IDS[kind], DECAY_INPUT=bool(decay_input), HARD_RESET=bool(hard_reset),
        DETACH_RESET=bool(detach_reset), SURROGATE=SURROGATE_IDS[surrogate], H_BF16=save == "h_bf16",
        NDIMS=geometry[6], V_INIT_CONST=v_init is None, LOAD_GRAD_V=grad_v_final is not None,
        STORE_GRAD_V_INIT=grad_v_init is not None, RECOMPUTE_T=T if recompute else 0, BLOCK=block_size, num_warps=num_warps, enable_fp_fusion=False)
    return grad_x, grad_v_init, w_partial
