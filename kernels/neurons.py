"""Fused multi-step IF / LIF / PLIF neurons: the Triton kernels, their launchers and their tuning factories.

What the op computes, accepts and keeps is ``revsnn_triton.ops.neuron.spec`` (the only module of the package this
file imports, with the launch-configuration leaf ``revsnn_triton.launch``): kinds and surrogates by the ids it
defines, the neuron layout of every tensor, the save plans and the bytes each launch moves (tested against the
addresses these kernels touch). The formulas, with their order of operations, are those of
``revsnn_triton.ops.neuron.reference``; floating-point contraction is disabled (``enable_fp_fusion=False``) and
the forward's divisions are correctly rounded (or multiplications by an exact ``1 / tau`` where tau is a power
of two), so the forward rounds exactly as the reference does (spikes, membranes and H bit-equal). The backward
differs from the reference by a few ulp: ``exp`` and, compiled, the surrogates' approximate divisions and a
``1 / tau`` rounded once per launch; ``"input"`` and ``"h"`` still run the same backward arithmetic.

Kernels. One forward and one backward kernel serve the three kinds (``KIND`` constexpr) and the seven surrogate
derivatives (``SURROGATE``: constexpr-selected ``@triton.jit`` functions); each program loops over all T time
steps of ``block_size`` neurons, with state and arithmetic in fp32 whatever the input dtype. The backward runs
from the saved H (runtime T), or for ``save="input"`` with ``T <= MAX_RECOMPUTE_T`` recomputes H in registers
(``RECOMPUTE_T == T``: both time loops unrolled, ``H[t]`` the t-th block of a tuple), so H never goes to memory;
longer sequences re-run the forward into a transient H first. Either way the arithmetic is the forward's, so
``"input"`` and ``"h"`` give bit-identical gradients.

Input. The neuron's input is ``x`` in fp32, or with a per-channel affine transform (``AFFINE``)
``y = x * scale[c] + shift[c]`` (a multiply, then an add: two roundings) for the channel ``c`` of each neuron
(``spec.channel_geometry``); ``y`` lives in registers only. Its backward writes ``dL/dx = dL/dy * scale[c]``.

Layouts. ``x [T, *shape]`` is read in place with any strides: the launcher sorts the inner dims by stride, drops
size-1 dims, merges dims that are contiguous with each other and passes up to ``MAX_DIMS`` (size, stride) pairs
plus the time stride (0 for an input repeated over T with ``expand``); only layouts that need more dims are
copied first. Every output is in the neuron layout of ``x``.

Reductions. PLIF's gradient of ``w`` and the affine input's of ``scale`` and ``shift``: the backward kernel
writes, per neuron, the sum over t (in registers, t from T-1 down to 0) of that neuron's terms; the op reduces
these partials with one ``torch.sum``. No atomics, and the result does not depend on the launch configuration.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from revsnn_triton import launch
from revsnn_triton.ops.neuron.spec import (FORWARD_KERNEL, KIND_IDS, MAX_RECOMPUTE_T, RECOMPUTE_KERNEL, SAVE_PLANS,
                                           SURROGATE_IDS, NeuronConfig, channel_geometry, empty_neuron_layout,
                                           has_neuron_layout, neuron_layout_strides, neuron_perm,
                                           to_neuron_layout)

MAX_DIMS = 3
# Register cap of the fused recompute backward (its H[0..T-1] live in registers): with the launch heuristic's
# values per thread, ptxas fits every kind at T <= 16 in 64 registers without spilling (static kernel report,
# sm_90), which keeps half the SM's warps resident.
RECOMPUTE_MAX_REGISTERS = 64


# ------------------------------------------------------------------------------------------------ layouts

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
# COMPILED (not Triton's interpreter): the time loops are `for` loops, whose carried values Triton keeps in
# registers, and the backward's surrogate divisions are div.approx. Triton 3.6's interpreter cannot take a
# runtime loop bound under numpy >= 2.3 (int() of a 1-element array) and has no div.approx, so it runs the
# same step functions in a `while` loop and divides exactly. Per-lane offsets are computed once (int32 unless
# OFF64) and scalar base pointers advance by one step per iteration. V_RESET_ZERO (v_reset is +0.0, the
# default and soft reset's charge): `v - v_reset` is `v` and `spike * v_reset` is +0.0, exactly.

@triton.jit
def _div_rn(x, y, like):
    """Correctly rounded ``x / y`` (as PyTorch divides) in the shape of the block ``like``; ``x`` and ``y`` may
    be scalars. Multiplying by ones broadcasts exactly (keeps -0.0, inf and NaN as they are)."""
    ones = tl.zeros_like(like) + 1.0
    return tl.math.div_rn(x * ones, y * ones)


# The surrogate derivatives run in the backward only, whose results are compared within tolerance: their
# divisions are approximate (div.approx, at most 2 ulp; every denominator here is at least about 1).

@triton.jit
def _fast_div(x, y, COMPILED: tl.constexpr):
    if COMPILED:
        q = libdevice.fast_dividef(x, y)
    else:
        q = x / y
    return q


@triton.jit
def _sg_sigmoid(x, a, b, COMPILED: tl.constexpr):
    e = 1.0 + tl.exp(-(a * x))
    s = _fast_div(tl.full(e.shape, 1.0, tl.float32), e, COMPILED)  # sigmoid(a * x)
    return (1.0 - s) * s * a  # a = alpha


@triton.jit
def _sg_atan(x, a, b, COMPILED: tl.constexpr):
    z = x * b  # b = pi / 2 * alpha
    d = 1.0 + z * z
    return _fast_div(tl.full(d.shape, a, tl.float32), d, COMPILED)  # a = alpha / 2


@triton.jit
def _sg_piecewise_quadratic(x, a, b):
    return tl.maximum(a - b * tl.abs(x), 0.0)  # a = alpha, b = alpha^2


@triton.jit
def _sg_piecewise_exp(x, a, b):
    return a * tl.exp(b * tl.abs(x))  # a = alpha / 2, b = -alpha


@triton.jit
def _sg_soft_sign(x, a, b, COMPILED: tl.constexpr):
    z = a + tl.abs(x)  # a = 1 / alpha
    d = b * z * z  # b = 2 * alpha
    return _fast_div(tl.full(d.shape, 1.0, tl.float32), d, COMPILED)


@triton.jit
def _sg_super_spike(x, a, b, COMPILED: tl.constexpr):
    z = 1.0 + tl.abs(x)
    d = z * z
    return _fast_div(tl.full(d.shape, a, tl.float32), d, COMPILED)  # a = alpha


@triton.jit
def _sg_erf(x, a, b):
    z = b * x  # b = alpha
    return a * tl.exp(-z * z)  # a = alpha / sqrt(pi)


@triton.jit
def _surrogate_grad(x, a, b, SURROGATE: tl.constexpr, COMPILED: tl.constexpr):
    if SURROGATE == 0:
        g = _sg_sigmoid(x, a, b, COMPILED)
    elif SURROGATE == 1:
        g = _sg_atan(x, a, b, COMPILED)
    elif SURROGATE == 2:
        g = _sg_piecewise_quadratic(x, a, b)
    elif SURROGATE == 3:
        g = _sg_piecewise_exp(x, a, b)
    elif SURROGATE == 4:
        g = _sg_soft_sign(x, a, b, COMPILED)
    elif SURROGATE == 5:
        g = _sg_super_spike(x, a, b, COMPILED)
    else:
        g = _sg_erf(x, a, b)
    return g


@triton.jit
def _neurons(N, BLOCK: tl.constexpr, OFF64: tl.constexpr):
    """``(n, mask)``: the neuron indices of this program (int64 only where an offset can reach 2^31)."""
    pid = tl.program_id(0)
    if OFF64:
        n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        n = pid * BLOCK + tl.arange(0, BLOCK)
    return n, n < N


@triton.jit
def _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS: tl.constexpr):
    """Element offset of neuron ``n`` in one step of x, from up to three coalesced (size, stride) dims."""
    if NDIMS == 1:
        off = n * stride2
    elif NDIMS == 2:
        off = (n // size2) * stride1 + (n % size2) * stride2
    else:
        r = n // size2
        off = (r // size1) * stride0 + (r % size1) * stride1 + (n % size2) * stride2
    return off


@triton.jit
def _channel_affine(scale_ptr, shift_ptr, n, mask, ch_inner, ch_size, AFFINE: tl.constexpr):
    """``(scale[c], shift[c])`` of neuron ``n``'s channel ``c = (n // ch_inner) % ch_size``, fp32 blocks;
    unused scalars without ``AFFINE``."""
    if AFFINE:
        c = (n // ch_inner) % ch_size
        s = tl.load(scale_ptr + c, mask=mask, other=1.0)
        b = tl.load(shift_ptr + c, mask=mask, other=0.0)
    else:
        s = 1.0
        b = 0.0
    return s, b


@triton.jit
def _to_fp32(x):
    """Exact conversion to fp32. bf16 goes by its bits (its 16 bits are the high half of the fp32 ones):
    Triton 3.6's interpreter flushes bf16 subnormals to zero in ``.to(tl.float32)``."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _load_input(x_ptr, x_off, mask):
    """One step of ``x`` as fp32."""
    return _to_fp32(tl.load(x_ptr + x_off, mask=mask, other=0.0))


@triton.jit
def _neuron_input(x, s, b, AFFINE: tl.constexpr):
    """The neuron's input ``y = x * s + b`` (a multiply, then an add: two roundings, no fma) or ``x``."""
    if AFFINE:
        x = x * s + b
    return x


@triton.jit
def _from_reset(v, v_reset, V_RESET_ZERO: tl.constexpr):
    """``v - v_reset`` (``v`` itself when ``v_reset`` is +0.0: the same bits)."""
    if V_RESET_ZERO:
        d = v
    else:
        d = v - v_reset
    return d


@triton.jit
def _charge(x, v, tau, inv_tau, q, v_reset, KIND: tl.constexpr, DECAY_INPUT: tl.constexpr,
            TAU_POW2: tl.constexpr, V_RESET_ZERO: tl.constexpr):
    """``H[t]``. LIF divides by ``tau`` correctly rounded, as the reference; for a power-of-two ``tau`` the
    multiplication by the exact ``1 / tau`` gives the same bits."""
    if KIND == 0:
        h = v + x
    elif KIND == 1:
        if DECAY_INPUT:
            if TAU_POW2:
                h = v + (x - _from_reset(v, v_reset, V_RESET_ZERO)) * inv_tau
            else:
                h = v + _div_rn(x - _from_reset(v, v_reset, V_RESET_ZERO), tau, x)
        else:
            if TAU_POW2:
                h = v - _from_reset(v, v_reset, V_RESET_ZERO) * inv_tau + x
            else:
                h = v - _div_rn(_from_reset(v, v_reset, V_RESET_ZERO), tau, x) + x
    else:
        if DECAY_INPUT:
            h = v + (x - _from_reset(v, v_reset, V_RESET_ZERO)) * q
        else:
            h = v - _from_reset(v, v_reset, V_RESET_ZERO) * q + x
    return h


@triton.jit
def _reset(h, spike, v_threshold, v_reset, HARD_RESET: tl.constexpr, V_RESET_ZERO: tl.constexpr):
    if HARD_RESET:
        if V_RESET_ZERO:  # spike * (+0.0) is +0.0 for a 0/1 spike; the sum is kept (it turns -0.0 into +0.0)
            v = 0.0 + (1.0 - spike) * h
        else:
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
def _step(x, v, tau, inv_tau, q, v_threshold, v_reset, KIND: tl.constexpr, DECAY_INPUT: tl.constexpr,
          HARD_RESET: tl.constexpr, TAU_POW2: tl.constexpr, V_RESET_ZERO: tl.constexpr):
    """One time step of the forward recurrence: ``(H, spike as 0/1 fp32, V)`` from input ``x`` and ``V[t-1]``."""
    h = _charge(x, v, tau, inv_tau, q, v_reset, KIND, DECAY_INPUT, TAU_POW2, V_RESET_ZERO)
    spike = (h >= v_threshold).to(tl.float32)
    v = _reset(h, spike, v_threshold, v_reset, HARD_RESET, V_RESET_ZERO)
    return h, spike, v


@triton.jit
def _initial_v(v_init_ptr, n, mask, v_reset, V_INIT_CONST: tl.constexpr, BLOCK: tl.constexpr):
    """``V[-1]``: ``v_reset`` everywhere (the default initial state, nothing read) or loaded from ``v_init``."""
    if V_INIT_CONST:
        v = v_reset * (tl.zeros([BLOCK], dtype=tl.float32) + 1.0)  # x * 1.0 is exact (keeps -0.0)
    else:
        v = tl.load(v_init_ptr + n, mask=mask, other=0.0)
    return v


@triton.jit
def _forward_step(x_ptr, spikes_ptr, h_ptr, x_off, n, mask, v, s, b, q, tau, inv_tau, v_threshold, v_reset,
                  stride_t, N, KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
                  TAU_POW2: tl.constexpr, V_RESET_ZERO: tl.constexpr, SAVE: tl.constexpr,
                  STORE_SPIKES: tl.constexpr, AFFINE: tl.constexpr):
    """Step t: reads ``X[t]``, writes ``S[t]`` (and the saved ``H[t]``); returns ``V[t]`` and the base pointers
    of step t + 1."""
    y = _neuron_input(_load_input(x_ptr, x_off, mask), s, b, AFFINE)
    h, spike, v = _step(y, v, tau, inv_tau, q, v_threshold, v_reset, KIND, DECAY_INPUT, HARD_RESET, TAU_POW2,
                        V_RESET_ZERO)
    if STORE_SPIKES:
        tl.store(spikes_ptr + n, spike.to(spikes_ptr.dtype.element_ty), mask=mask)
    if SAVE == 1:
        tl.store(h_ptr + n, h, mask=mask)
    elif SAVE == 2:
        tl.store(h_ptr + n, _round_bf16_bits(h - v_threshold).to(tl.bfloat16, bitcast=True), mask=mask)
    return v, x_ptr + stride_t, spikes_ptr + N, h_ptr + N


@triton.jit
def _neuron_forward_kernel(
    x_ptr, v_init_ptr, q_ptr, scale_ptr, shift_ptr, spikes_ptr, v_final_ptr, h_ptr,
    N, T, stride_t, size1, size2, stride0, stride1, stride2, ch_inner, ch_size,
    tau, inv_tau, v_threshold, v_reset,
    KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, TAU_POW2: tl.constexpr,
    V_RESET_ZERO: tl.constexpr, NDIMS: tl.constexpr, SAVE: tl.constexpr, STORE_SPIKES: tl.constexpr,
    STORE_V_FINAL: tl.constexpr, V_INIT_CONST: tl.constexpr, AFFINE: tl.constexpr, OFF64: tl.constexpr,
    COMPILED: tl.constexpr, BLOCK: tl.constexpr,
):
    n, mask = _neurons(N, BLOCK, OFF64)
    x_off = _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS)
    v = _initial_v(v_init_ptr, n, mask, v_reset, V_INIT_CONST, BLOCK)
    s, b = _channel_affine(scale_ptr, shift_ptr, n, mask, ch_inner, ch_size, AFFINE)
    q = 0.0
    if KIND == 2:
        q = tl.load(q_ptr)
    if COMPILED:
        for _ in range(T):
            v, x_ptr, spikes_ptr, h_ptr = _forward_step(
                x_ptr, spikes_ptr, h_ptr, x_off, n, mask, v, s, b, q, tau, inv_tau, v_threshold, v_reset,
                stride_t, N, KIND, DECAY_INPUT, HARD_RESET, TAU_POW2, V_RESET_ZERO, SAVE, STORE_SPIKES, AFFINE)
    else:
        t = 0
        while t < T:
            v, x_ptr, spikes_ptr, h_ptr = _forward_step(
                x_ptr, spikes_ptr, h_ptr, x_off, n, mask, v, s, b, q, tau, inv_tau, v_threshold, v_reset,
                stride_t, N, KIND, DECAY_INPUT, HARD_RESET, TAU_POW2, V_RESET_ZERO, SAVE, STORE_SPIKES, AFFINE)
            t += 1
    if STORE_V_FINAL:
        tl.store(v_final_ptr + n, v, mask=mask)


@triton.jit
def _load_saved(h_ptr, n, mask, v_threshold, H_BF16: tl.constexpr):
    """(H, spike as 0/1 fp32) of one step from the saved buffer."""
    if H_BF16:
        d = tl.load(h_ptr + n, mask=mask, other=0.0)
        sign = d.to(tl.int16, bitcast=True) < 0
        h = _to_fp32(d) + v_threshold
        spike = tl.where(sign, 0.0, 1.0)
    else:
        h = tl.load(h_ptr + n, mask=mask, other=0.0)
        spike = (h >= v_threshold).to(tl.float32)
    return h, spike


@triton.jit
def _grad_step(h, spike, grad_s, carry, inv_tau, q, v_threshold, v_reset, sg_a, sg_b, KIND: tl.constexpr,
               DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
               SURROGATE: tl.constexpr, COMPILED: tl.constexpr):
    """One step of the reverse-time recurrence: ``(dL/dY[t], dL/dH[t], dL/dV[t-1])`` from ``H[t]``, its spike,
    ``dL/dS[t]`` (fp32) and the carried ``dL/dV[t]``. LIF's ``/ tau`` is a multiplication by ``1 / tau``
    (rounded once per launch: the same bits as the division for a power-of-two ``tau``)."""
    sg = _surrogate_grad(h - v_threshold, sg_a, sg_b, SURROGATE, COMPILED)
    if HARD_RESET:
        dv_dh = 1.0 - spike
        if not DETACH_RESET:
            dv_dh = dv_dh + (v_reset - h) * sg
    else:
        if DETACH_RESET:
            dv_dh = tl.full(sg.shape, 1.0, tl.float32)
        else:
            dv_dh = 1.0 - v_threshold * sg
    grad_h = grad_s * sg + tl.where(carry == 0, 0.0, carry * dv_dh)  # a zero carry adds nothing, not inf * 0
    if KIND == 0:
        grad_y = grad_h
        carry = grad_h
    elif KIND == 1:
        grad_h_tau = grad_h * inv_tau
        if DECAY_INPUT:
            grad_y = grad_h_tau
        else:
            grad_y = grad_h
        carry = grad_h - grad_h_tau
    else:
        if DECAY_INPUT:
            grad_y = grad_h * q
        else:
            grad_y = grad_h
        carry = grad_h - grad_h * q
    return grad_y, grad_h, carry


@triton.jit
def _reverse_step(grad_s_ptr, grad_x_ptr, x_ptr, n, x_off, mask, h, spike, v_prev, carry, w_acc, scale_acc,
                  shift_acc, s, b, inv_tau, q, v_threshold, v_reset, sg_a, sg_b, KIND: tl.constexpr,
                  DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
                  SURROGATE: tl.constexpr, AFFINE: tl.constexpr, AFFINE_GRAD: tl.constexpr,
                  V_RESET_ZERO: tl.constexpr, COMPILED: tl.constexpr):
    """Step t of the reverse-time loop (base pointers at step t), from ``H[t]``, its spike, ``V[t-1]`` (read for
    PLIF only) and the carried ``dL/dV[t]``: writes ``dL/dX[t]``, returns the new carry ``dL/dV[t-1]`` and the
    accumulators of PLIF's ``sum_t dL/dH[t] * dH[t]/dq`` and of the affine partials ``sum_t dL/dY[t] * X[t]``,
    ``sum_t dL/dY[t]``."""
    grad_s = _to_fp32(tl.load(grad_s_ptr + n, mask=mask, other=0.0))
    grad_y, grad_h, carry = _grad_step(h, spike, grad_s, carry, inv_tau, q, v_threshold, v_reset, sg_a, sg_b,
                                       KIND, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, COMPILED)
    if AFFINE:
        tl.store(grad_x_ptr + n, (grad_y * s).to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_x_ptr + n, grad_y.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if (KIND == 2 and DECAY_INPUT) or AFFINE_GRAD:
        x = _load_input(x_ptr, x_off, mask)
    if AFFINE_GRAD:
        scale_acc = scale_acc + grad_y * x
        shift_acc = shift_acc + grad_y
    if KIND == 2:
        if DECAY_INPUT:  # dH[t]/dq = Y[t] - (V[t-1] - v_reset)
            w_acc = w_acc + grad_h * (_neuron_input(x, s, b, AFFINE) - _from_reset(v_prev, v_reset, V_RESET_ZERO))
        else:  # dH[t]/dq = -(V[t-1] - v_reset)
            w_acc = w_acc + grad_h * -_from_reset(v_prev, v_reset, V_RESET_ZERO)
    return carry, w_acc, scale_acc, shift_acc


@triton.jit
def _saved_reverse_step(t, h_ptr, grad_s_ptr, grad_x_ptr, x_ptr, n, x_off, mask, h, spike, v_init, carry, w_acc,
                        scale_acc, shift_acc, s, b, inv_tau, q, v_threshold, v_reset, sg_a, sg_b, stride_t, N,
                        KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr,
                        DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr, H_BF16: tl.constexpr,
                        AFFINE: tl.constexpr, AFFINE_GRAD: tl.constexpr, V_RESET_ZERO: tl.constexpr,
                        COMPILED: tl.constexpr):
    """Step t of the backward from the saved H: also reads ``H[t-1]`` (nothing at t = 0), PLIF's ``V[t-1]`` and
    the next step's H, and returns the base pointers of step t - 1."""
    h_prev, spike_prev = _load_saved(h_ptr - N, n, mask & (t > 0), v_threshold, H_BF16)
    v_prev = v_init
    if KIND == 2:
        v_prev = tl.where(t > 0, _reset(h_prev, spike_prev, v_threshold, v_reset, HARD_RESET, V_RESET_ZERO), v_init)
    carry, w_acc, scale_acc, shift_acc = _reverse_step(
        grad_s_ptr, grad_x_ptr, x_ptr, n, x_off, mask, h, spike, v_prev, carry, w_acc, scale_acc, shift_acc, s, b,
        inv_tau, q, v_threshold, v_reset, sg_a, sg_b, KIND, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE,
        AFFINE, AFFINE_GRAD, V_RESET_ZERO, COMPILED)
    return (carry, w_acc, scale_acc, shift_acc, h_prev, spike_prev, h_ptr - N, grad_s_ptr - N, grad_x_ptr - N,
            x_ptr - stride_t)


@triton.jit
def _neuron_backward_kernel(
    grad_s_ptr, grad_v_ptr, h_ptr, x_ptr, v_init_ptr, q_ptr, scale_ptr, shift_ptr,
    grad_x_ptr, grad_v_init_ptr, w_partial_ptr, scale_partial_ptr, shift_partial_ptr,
    N, T, last_out, x_last, stride_t, size1, size2, stride0, stride1, stride2, ch_inner, ch_size,
    tau, inv_tau, v_threshold, v_reset, sg_a, sg_b,
    KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
    TAU_POW2: tl.constexpr, V_RESET_ZERO: tl.constexpr, SURROGATE: tl.constexpr, H_BF16: tl.constexpr,
    NDIMS: tl.constexpr, V_INIT_CONST: tl.constexpr, LOAD_GRAD_V: tl.constexpr, STORE_GRAD_V_INIT: tl.constexpr,
    AFFINE: tl.constexpr, AFFINE_GRAD: tl.constexpr, OFF64: tl.constexpr, COMPILED: tl.constexpr,
    RECOMPUTE_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward through time, from the saved H (``RECOMPUTE_T == 0``; runtime ``T``), or with H recomputed in
    registers (``RECOMPUTE_T == T``, a compile-time constant: both time loops are unrolled and H[t] is the t-th
    element of a tuple of blocks, so it never goes to memory). With ``AFFINE`` the neuron's input is
    ``Y = X * scale[c] + shift[c]`` and ``dL/dX = dL/dY * scale[c]``; with ``AFFINE_GRAD`` the per-neuron
    partials ``sum_t dL/dY[t] * X[t]`` and ``sum_t dL/dY[t]`` are written (t from T-1 down to 0)."""
    n, mask = _neurons(N, BLOCK, OFF64)
    if LOAD_GRAD_V:
        carry = tl.load(grad_v_ptr + n, mask=mask, other=0.0)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    q = 0.0
    w_acc = tl.zeros([BLOCK], dtype=tl.float32)
    scale_acc = tl.zeros([BLOCK], dtype=tl.float32)
    shift_acc = tl.zeros([BLOCK], dtype=tl.float32)
    v_init = tl.zeros([BLOCK], dtype=tl.float32)
    if KIND == 2:
        q = tl.load(q_ptr)
    if KIND == 2 or RECOMPUTE_T > 0:
        v_init = _initial_v(v_init_ptr, n, mask, v_reset, V_INIT_CONST, BLOCK)
    x_off = _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS)  # unused when X is not read
    s, b = _channel_affine(scale_ptr, shift_ptr, n, mask, ch_inner, ch_size, AFFINE)
    grad_s_ptr += last_out  # last_out = (T - 1) * N and x_last = (T - 1) * stride_t, from the launcher
    grad_x_ptr += last_out
    if RECOMPUTE_T > 0:
        hs = ()
        v = v_init
        for t in tl.static_range(RECOMPUTE_T):
            y = _neuron_input(_load_input(x_ptr, x_off, mask), s, b, AFFINE)
            h, spike, v = _step(y, v, tau, inv_tau, q, v_threshold, v_reset, KIND, DECAY_INPUT, HARD_RESET, TAU_POW2,
                                V_RESET_ZERO)
            hs = hs + (h,)
            x_ptr += stride_t
        for t in tl.static_range(RECOMPUTE_T - 1, -1, -1):
            x_ptr -= stride_t
            h = hs[t]
            v_prev = v_init
            if KIND == 2 and t > 0:
                h_prev = hs[t - 1]
                v_prev = _reset(h_prev, (h_prev >= v_threshold).to(tl.float32), v_threshold, v_reset, HARD_RESET,
                                V_RESET_ZERO)
            carry, w_acc, scale_acc, shift_acc = _reverse_step(
                grad_s_ptr, grad_x_ptr, x_ptr, n, x_off, mask, h, (h >= v_threshold).to(tl.float32), v_prev, carry,
                w_acc, scale_acc, shift_acc, s, b, inv_tau, q, v_threshold, v_reset, sg_a, sg_b, KIND, DECAY_INPUT,
                HARD_RESET, DETACH_RESET, SURROGATE, AFFINE, AFFINE_GRAD, V_RESET_ZERO, COMPILED)
            grad_s_ptr -= N
            grad_x_ptr -= N
    else:
        h_ptr += last_out
        x_ptr += x_last
        h, spike = _load_saved(h_ptr, n, mask, v_threshold, H_BF16)
        if COMPILED:
            for i in range(T):
                (carry, w_acc, scale_acc, shift_acc, h, spike, h_ptr, grad_s_ptr, grad_x_ptr,
                 x_ptr) = _saved_reverse_step(
                    T - 1 - i, h_ptr, grad_s_ptr, grad_x_ptr, x_ptr, n, x_off, mask, h, spike, v_init, carry, w_acc,
                    scale_acc, shift_acc, s, b, inv_tau, q, v_threshold, v_reset, sg_a, sg_b, stride_t, N, KIND,
                    DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, H_BF16, AFFINE, AFFINE_GRAD, V_RESET_ZERO,
                    COMPILED)
        else:
            t = T - 1
            while t >= 0:
                (carry, w_acc, scale_acc, shift_acc, h, spike, h_ptr, grad_s_ptr, grad_x_ptr,
                 x_ptr) = _saved_reverse_step(
                    t, h_ptr, grad_s_ptr, grad_x_ptr, x_ptr, n, x_off, mask, h, spike, v_init, carry, w_acc,
                    scale_acc, shift_acc, s, b, inv_tau, q, v_threshold, v_reset, sg_a, sg_b, stride_t, N, KIND,
                    DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, H_BF16, AFFINE, AFFINE_GRAD, V_RESET_ZERO,
                    COMPILED)
                t -= 1
    if STORE_GRAD_V_INIT:
        tl.store(grad_v_init_ptr + n, carry, mask=mask)
    if KIND == 2:
        tl.store(w_partial_ptr + n, w_acc, mask=mask)
    if AFFINE_GRAD:
        tl.store(scale_partial_ptr + n, scale_acc, mask=mask)
        tl.store(shift_partial_ptr + n, shift_acc, mask=mask)


# ---------------------------------------------------------------------------------------------- launchers

@dataclass
class Launch:
    """One kernel launch as the launchers issue it: ``kernel[grid](*args, **kwargs)``."""
    kernel: object
    grid: tuple[int]
    args: tuple
    kwargs: dict
    name: str  # the launch-configuration name (spec.KERNELS)


_recording: list[Launch] | None = None


@contextlib.contextmanager
def record_launches() -> Iterator[list[Launch]]:
    """Inside the block the launchers record their launches (with the configuration the GPU heuristic picks)
    instead of running them: the static report compiles exactly these. Tensors may be on the meta device."""
    global _recording
    previous, _recording = _recording, []
    try:
        yield _recording
    finally:
        _recording = previous


def _run(name: str, kernel, grid, *args, **kwargs) -> None:
    if _recording is not None:
        _recording.append(Launch(kernel, grid, args, kwargs, name))
    else:
        kernel[grid](*args, **kwargs)


def resident_values(kernel: str, T: int) -> int:
    """Values per neuron a kernel keeps in registers: T for the fused recompute backward (its H[0..T-1])."""
    return T if kernel == RECOMPUTE_KERNEL else 1


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


def _config(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device, tensors,
            block_size: int | None, num_warps: int | None) -> tuple[int, int, tuple[int]]:
    """``(block_size, num_warps, grid)``: the given values, else :func:`revsnn_triton.launch.launch_config`'s
    (the GPU heuristic's while recording) for the widest of the ``tensors`` the launch streams."""
    if block_size is None or num_warps is None:
        resident = resident_values(kernel, T)
        widest = max(t.element_size() for t in tensors if t is not None)
        cfg = (launch.heuristic(n, T, on_gpu=True, resident=resident, element_size=widest)
               if _recording is not None else
               launch.launch_config(kernel, n, T, dtype, device, resident=resident, element_size=widest))
        block_size = cfg.block_size if block_size is None else block_size
        num_warps = cfg.num_warps if num_warps is None else num_warps
    launch.LaunchConfig(block_size, num_warps)  # validates
    return block_size, num_warps, (triton.cdiv(n, block_size),)


def _x_geometry(x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """``x`` (copied into the neuron layout if its strides need more than MAX_DIMS dims) and the kernel's
    layout arguments ``[stride_t, size1, size2, stride0, stride1, stride2]`` plus ``NDIMS`` and the span of one
    step (its largest element offset + 1)."""
    dims = coalesced_dims(x)
    if dims is None:
        x = to_neuron_layout(x, x, with_time=True)
        dims = coalesced_dims(x)
        assert dims is not None
    ndims = len(dims)
    padded = [(1, 0)] * (MAX_DIMS - ndims) + dims
    (_, s0), (n1, s1), (n2, s2) = padded
    span = 1 + sum((size - 1) * abs(stride) for size, stride in dims)
    return x, [x.stride(0), n1, n2, s0, s1, s2, ndims, span]


_INT32_LIMIT = 2**31


def _loop_args(cfg: NeuronConfig, n: int, block_size: int, x_span: int) -> dict:
    """The constexprs every launch shares: compiled or interpreted, offset width, LIF's division by a
    power-of-two tau, a +0.0 reset value."""
    mantissa, exponent = math.frexp(cfg.tau)  # tau = 2^k with 1/tau a normal fp32: x * (1/tau) == x / tau
    return dict(TAU_POW2=cfg.kind == "lif" and mantissa == 0.5 and exponent <= 127,
                V_RESET_ZERO=math.copysign(1.0, cfg.v_reset) == 1.0 and cfg.v_reset == 0.0,
                OFF64=n + block_size >= _INT32_LIMIT or x_span >= _INT32_LIMIT,
                COMPILED=not triton.knobs.runtime.interpret)


def _check_out(name: str, t: torch.Tensor, template: torch.Tensor, dtype: torch.dtype, with_time: bool) -> None:
    shape = tuple(template.shape) if with_time else tuple(template.shape[1:])
    if (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype
            or t.device != template.device or not has_neuron_layout(t, template, with_time)):
        got = (f"shape {tuple(t.shape)}, dtype {t.dtype}, strides {tuple(t.stride())}"
               if isinstance(t, torch.Tensor) else repr(t))
        raise ValueError(f"{name}: expected shape {shape}, dtype {dtype}, device {template.device} in the neuron "
                         f"layout (strides {neuron_layout_strides(template, with_time)}); got {got}")


def _outputs(out, wanted: list[tuple[str, torch.dtype | None, bool]], template: torch.Tensor) -> list:
    """Preallocated outputs (checked) or new ones, in the neuron layout of ``template``: one per
    ``(name, dtype or None = not wanted, with_time)``."""
    if out is None:
        return [None if d is None else empty_neuron_layout(template, d, w) for _, d, w in wanted]
    if len(out) != len(wanted):
        raise ValueError(f"out: expected {len(wanted)} tensors ({', '.join(n for n, _, _ in wanted)}), got {len(out)}")
    for i, (name, d, w) in enumerate(wanted):
        if d is not None:
            _check_out(f"out[{i}] ({name})", out[i], template, d, w)
    return [None if d is None else t for t, (_, d, _) in zip(out, wanted)]


def _affine_args(template: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 cfg: NeuronConfig, any_ptr: torch.Tensor) -> list:
    """Kernel arguments ``[scale_ptr, shift_ptr, ch_inner, ch_size]`` (pointers stand in when unused)."""
    if scale is None:
        return [any_ptr, any_ptr, 1, 1]
    return [scale, shift, *channel_geometry(template, cfg.channel_dim)]


def neuron_forward(x: torch.Tensor, v_init: torch.Tensor | None, q: torch.Tensor | None, cfg: NeuronConfig,
                   save: str, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, *,
                   store_v_final: bool = True, block_size: int | None = None, num_warps: int | None = None,
                   out=None):
    """Multi-step neuron forward.

    ``x [T, *shape]`` fp32/fp16/bf16 (any strides), ``v_init [*shape]`` fp32 or None (the default initial
    state ``cfg.v_reset``, which is 0.0 for soft reset: nothing is read), ``q`` a 1-element fp32 tensor
    ``sigmoid(w)`` (PLIF) or None; ``save`` a key of ``spec.SAVE_PLANS``; ``scale``, ``shift``: None, or
    contiguous fp32 ``[C]`` with ``C = shape[cfg.channel_dim]``: the neuron's input is then
    ``x * scale[c] + shift[c]`` (fp32, two roundings). Returns ``(spikes [T, *shape] x.dtype, v_final [*shape]
    fp32 or None without store_v_final, saved or None)``, all in the neuron layout of ``x``: ``saved`` is the
    plan's tensor (fp32 ``H``, bf16 ``H - v_threshold``). ``out``: optional preallocated
    ``(spikes, v_final, saved)`` in that layout (None where not produced; the tests poison them).
    """
    plan = SAVE_PLANS[save]
    spikes, v_final, saved = _outputs(out, [("spikes", x.dtype, True),
                                            ("v_final", torch.float32 if store_v_final else None, False),
                                            ("saved", plan.saved_dtype, True)], x)
    _forward_into(x, v_init, q, cfg, spikes, v_final, saved, plan.forward_save_id, scale, shift,
                  block_size=block_size, num_warps=num_warps)
    return spikes, v_final, saved


def _forward_into(x, v_init, q, cfg: NeuronConfig, spikes, v_final, saved, save_id: int, scale, shift, *,
                  block_size, num_warps) -> None:
    """Launch the forward kernel; ``spikes``, ``v_final`` and ``saved`` (for ``save_id``) are written where not
    None."""
    n, T = x[0].numel(), x.shape[0]
    if n == 0:
        return
    block_size, num_warps, grid = _config(FORWARD_KERNEL, n, T, x.dtype, x.device,
                                          (x, v_init, spikes, v_final, saved), block_size, num_warps)
    if v_init is not None:
        v_init = to_neuron_layout(v_init, x, with_time=False)
    any_ptr = next(t for t in (spikes, saved, v_final) if t is not None)
    affine = _affine_args(x, scale, shift, cfg, any_ptr)
    x, geometry = _x_geometry(x)
    _run(FORWARD_KERNEL, _neuron_forward_kernel, grid,
         x, any_ptr if v_init is None else v_init, any_ptr if q is None else q, affine[0], affine[1],
         any_ptr if spikes is None else spikes, any_ptr if v_final is None else v_final,
         any_ptr if saved is None else saved,
         n, T, *geometry[:6], affine[2], affine[3], float(cfg.tau), 1.0 / cfg.tau, float(cfg.v_threshold),
         float(cfg.v_reset),
         KIND=KIND_IDS[cfg.kind], DECAY_INPUT=cfg.decay_input, HARD_RESET=cfg.hard_reset, NDIMS=geometry[6],
         SAVE=save_id if saved is not None else 0, STORE_SPIKES=spikes is not None,
         STORE_V_FINAL=v_final is not None, V_INIT_CONST=v_init is None, AFFINE=scale is not None,
         **_loop_args(cfg, n, block_size, geometry[7]), BLOCK=block_size, num_warps=num_warps,
         enable_fp_fusion=False)


def neuron_backward(grad_spikes: torch.Tensor, grad_v_final: torch.Tensor | None, saved: torch.Tensor | None,
                    x: torch.Tensor | None, v_init: torch.Tensor | None, q: torch.Tensor | None, cfg: NeuronConfig,
                    save: str, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, *,
                    need_grad_v_init: bool = True, need_grad_affine: bool = True, block_size: int | None = None,
                    num_warps: int | None = None, out=None):
    """Multi-step neuron backward through time.

    ``grad_spikes [T, *shape]`` (spikes' dtype), ``grad_v_final [*shape]`` or None (zero: nothing read);
    ``saved`` from :func:`neuron_forward` (None for ``"input"``); ``x`` is read for ``save="input"``, for PLIF
    with ``decay_input`` and for the grad of ``scale``; ``v_init`` (None = the constant default state
    ``v_reset``) matters for PLIF and ``"input"``; ``scale``, ``shift`` as given to the forward.
    ``save="input"`` with ``T <= MAX_RECOMPUTE_T`` runs one kernel that recomputes H in registers; longer
    sequences re-run the forward kernel into a transient fp32 H buffer first. Gradients are bit-identical to
    ``save="h"``'s in both cases.
    Returns ``(grad_x, grad_v_init, w_partial, scale_partial, shift_partial)`` in the neuron layout (of ``x``
    for ``"input"``, else of ``saved``): ``grad_x [T, *shape]`` in grad_spikes' dtype; ``grad_v_init [*shape]``
    fp32, or None when ``need_grad_v_init`` is false (not written); ``w_partial [*shape]`` fp32 per-neuron
    partial sums for PLIF's grad of ``w`` (None otherwise); ``scale_partial``, ``shift_partial [*shape]`` fp32
    per-neuron ``sum_t dL/dY[t] * X[t]`` and ``sum_t dL/dY[t]`` (None without ``scale`` or without
    ``need_grad_affine``). ``out``: optional preallocated tuple of the same five (None where not produced).
    """
    plan = SAVE_PLANS[save]
    template = x if plan.recomputes else saved
    n, T = template[0].numel(), template.shape[0]
    kernel = plan.backward_kernel(T)
    fused = kernel == RECOMPUTE_KERNEL
    affine_grad = cfg.affine and need_grad_affine
    per_neuron = lambda want: torch.float32 if want else None  # noqa: E731
    outs = _outputs(out, [("grad_x", grad_spikes.dtype, True), ("grad_v_init", per_neuron(need_grad_v_init), False),
                          ("w_partial", per_neuron(cfg.kind == "plif"), False),
                          ("scale_partial", per_neuron(affine_grad), False),
                          ("shift_partial", per_neuron(affine_grad), False)], template)
    if n == 0:
        return tuple(outs)
    if plan.recomputes and not fused:  # re-run the forward into a transient H, then the backward from it
        saved = empty_neuron_layout(x, torch.float32)
        _forward_into(x, v_init, q, cfg, None, None, saved, SAVE_PLANS["h"].forward_save_id, scale, shift,
                      block_size=block_size, num_warps=num_warps)
    grad_x = outs[0]
    grad_spikes = to_neuron_layout(grad_spikes, template, with_time=True)
    if grad_v_final is not None:
        grad_v_final = to_neuron_layout(grad_v_final.float(), template, with_time=False)
    reads_x = plan.backward_reads_x(cfg, affine_grad)
    if v_init is not None and (cfg.kind == "plif" or fused):
        v_init = to_neuron_layout(v_init, template, with_time=False)
    block_size, num_warps, grid = _config(
        kernel, n, T, grad_spikes.dtype, template.device,
        (grad_spikes, grad_v_final, None if fused else saved, x if reads_x else None,
         v_init if (cfg.kind == "plif" or fused) else None, *outs), block_size, num_warps)
    geometry = [0, 1, 1, 0, 0, 0, 1, 1]
    if reads_x:
        x, geometry = _x_geometry(x)
    sg_a, sg_b = _surrogate_constants(cfg.surrogate, cfg.alpha)
    any_ptr = grad_x
    affine = _affine_args(template, scale, shift, cfg, any_ptr)
    _run(kernel, _neuron_backward_kernel, grid,
         grad_spikes, any_ptr if grad_v_final is None else grad_v_final, any_ptr if fused else saved,
         x if reads_x else any_ptr, any_ptr if v_init is None else v_init, any_ptr if q is None else q,
         affine[0], affine[1], grad_x, *(any_ptr if t is None else t for t in outs[1:]),
         n, T, (T - 1) * n, (T - 1) * geometry[0], *geometry[:6], affine[2], affine[3], float(cfg.tau),
         1.0 / cfg.tau, float(cfg.v_threshold), float(cfg.v_reset), float(sg_a), float(sg_b),
         KIND=KIND_IDS[cfg.kind], DECAY_INPUT=cfg.decay_input, HARD_RESET=cfg.hard_reset,
         DETACH_RESET=cfg.detach_reset, SURROGATE=SURROGATE_IDS[cfg.surrogate], H_BF16=save == "h_bf16",
         NDIMS=geometry[6], V_INIT_CONST=v_init is None, LOAD_GRAD_V=grad_v_final is not None,
         STORE_GRAD_V_INIT=outs[1] is not None, AFFINE=scale is not None, AFFINE_GRAD=affine_grad,
         **_loop_args(cfg, n, block_size, geometry[7]), RECOMPUTE_T=T if fused else 0, BLOCK=block_size,
         num_warps=num_warps, enable_fp_fusion=False,
         **({"maxnreg": RECOMPUTE_MAX_REGISTERS} if fused and not triton.knobs.runtime.interpret else {}))
    return tuple(outs)


# ------------------------------------------------------------------------------------------------- tuning
# The launch configuration of a kernel is tuned on the benchmark's neuron (LIF tau=2, hard reset,
# detach_reset, ATan); the winner serves every neuron kind and save mode of that kernel (the cache key has no
# kind or save mode: the memory traffic per neuron-step, which decides the best block, is similar).

TUNING_NEURON = NeuronConfig(kind="lif", tau=2.0, decay_input=True, v_threshold=1.0, hard_reset=True, v_reset=0.0,
                             detach_reset=True, surrogate="atan", alpha=2.0)


def _tune_forward(T: int, n: int, dtype: torch.dtype, device: torch.device):
    x = (torch.rand(T, n, device=device) * 4 - 1).to(dtype)
    v_init = torch.zeros(n, device=device)
    out = (torch.empty_like(x), torch.empty_like(v_init), torch.empty(T, n, device=device))

    def run(block_size: int, num_warps: int):
        return neuron_forward(x, v_init, None, TUNING_NEURON, "h", block_size=block_size, num_warps=num_warps,
                              out=out)
    return run


def _tune_backward(T: int, n: int, dtype: torch.dtype, device: torch.device):
    x = (torch.rand(T, n, device=device) * 4 - 1).to(dtype)
    _, _, saved = neuron_forward(x, torch.zeros(n, device=device), None, TUNING_NEURON, "h")
    grad_s = torch.randn(T, n, device=device).to(dtype)
    grad_v = torch.zeros(n, device=device)
    out = (torch.empty_like(grad_s), torch.empty_like(grad_v), None, None, None)

    def run(block_size: int, num_warps: int):
        return neuron_backward(grad_s, grad_v, saved, None, None, None, TUNING_NEURON, "h", block_size=block_size,
                               num_warps=num_warps, out=out)
    return run


def _tune_backward_recompute(T: int, n: int, dtype: torch.dtype, device: torch.device):
    if T > MAX_RECOMPUTE_T:
        raise ValueError(f"{RECOMPUTE_KERNEL} runs for T <= {MAX_RECOMPUTE_T} only, got T={T}")
    x = (torch.rand(T, n, device=device) * 4 - 1).to(dtype)
    grad_s = torch.randn(T, n, device=device).to(dtype)
    out = (torch.empty_like(grad_s), None, None, None, None)

    def run(block_size: int, num_warps: int):  # as the benchmark's call: no v_init, v_final unused
        return neuron_backward(grad_s, None, None, x, None, None, TUNING_NEURON, "input", need_grad_v_init=False,
                               block_size=block_size, num_warps=num_warps, out=out)
    return run


def tunable_kernels() -> list[launch.TunableKernel]:
    """The neuron kernels ``revsnn tune`` measures, by the names the launchers pass to ``launch_config``."""
    return [launch.TunableKernel(FORWARD_KERNEL, _tune_forward),
            launch.TunableKernel(SAVE_PLANS["h"].backward_kernel(1), _tune_backward),
            launch.TunableKernel(RECOMPUTE_KERNEL, _tune_backward_recompute, lambda T: T)]
