"""Fused multi-step IF / LIF / PLIF neurons: the Triton kernels, their launchers and their tuning factories.

What the op computes, accepts and keeps is ``revsnn_triton.ops.neuron.spec`` (the only module of the package this
file imports, with the launch-configuration leaf ``revsnn_triton.launch``): kinds and surrogates by the ids it
defines, the neuron layout of every tensor, the save plans and the bytes each launch moves (tested against the
addresses these kernels touch). The formulas, with their order of operations, are those of
``revsnn_triton.ops.neuron.reference``; floating-point contraction is disabled (``enable_fp_fusion=False``) and
divisions are correctly rounded, so the forward rounds exactly as the reference does (spikes, membranes and H
bit-equal) and the backward differs from it only where ``exp`` is evaluated (surrogates), by an ulp or so.

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

from revsnn_triton import launch
from revsnn_triton.ops.neuron.spec import (FORWARD_KERNEL, KIND_IDS, MAX_RECOMPUTE_T, RECOMPUTE_KERNEL, SAVE_PLANS,
                                           SURROGATE_IDS, NeuronConfig, channel_geometry, empty_neuron_layout,
                                           has_neuron_layout, neuron_layout_strides, neuron_perm,
                                           to_neuron_layout)

MAX_DIMS = 3


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
def _load_input(x_ptr, x_cur, mask):
    """One step of ``x`` as fp32."""
    return _to_fp32(tl.load(x_ptr + x_cur, mask=mask, other=0.0))


@triton.jit
def _neuron_input(x, s, b, AFFINE: tl.constexpr):
    """The neuron's input ``y = x * s + b`` (a multiply, then an add: two roundings, no fma) or ``x``."""
    if AFFINE:
        x = x * s + b
    return x


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
    x_ptr, v_init_ptr, q_ptr, scale_ptr, shift_ptr, spikes_ptr, v_final_ptr, h_ptr,
    N, T, stride_t, size1, size2, stride0, stride1, stride2, ch_inner, ch_size,
    tau, v_threshold, v_reset, v_fill,
    KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, NDIMS: tl.constexpr,
    SAVE: tl.constexpr, STORE_SPIKES: tl.constexpr, STORE_V_FINAL: tl.constexpr, V_INIT_CONST: tl.constexpr,
    AFFINE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    x_off = _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS)
    v = _initial_v(v_init_ptr, n, mask, v_fill, V_INIT_CONST, BLOCK)
    s, b = _channel_affine(scale_ptr, shift_ptr, n, mask, ch_inner, ch_size, AFFINE)
    q = 0.0
    if KIND == 2:
        q = tl.load(q_ptr)
    out = n  # int64 running offsets: t * N and t * stride_t can exceed 2^31
    x_cur = x_off
    # `while` rather than `for t in range(T)`: Triton 3.6's interpreter cannot take a runtime loop bound
    # under numpy >= 2.3 (int() of a 1-element array); compiled, both are the same loop.
    t = 0
    while t < T:
        x = _neuron_input(_load_input(x_ptr, x_cur, mask), s, b, AFFINE)
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
    if STORE_V_FINAL:
        tl.store(v_final_ptr + n, v, mask=mask)


@triton.jit
def _load_saved(h_ptr, off, mask, v_threshold, H_BF16: tl.constexpr):
    """(H, spike as 0/1 fp32) of one step from the saved buffer."""
    if H_BF16:
        d = tl.load(h_ptr + off, mask=mask, other=0.0)
        sign = d.to(tl.int16, bitcast=True) < 0
        h = _to_fp32(d) + v_threshold
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
def _reverse_step(grad_s_ptr, grad_x_ptr, x_ptr, out, x_cur, mask, h, spike, v_prev, carry, w_acc, scale_acc,
                  shift_acc, s, b, tau, q, v_threshold, v_reset, sg_a, sg_b, KIND: tl.constexpr,
                  DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
                  SURROGATE: tl.constexpr, AFFINE: tl.constexpr, AFFINE_GRAD: tl.constexpr):
    """Step t of the reverse-time loop, from ``H[t]``, its spike, ``V[t-1]`` (read for PLIF only) and the
    carried ``dL/dV[t]``: writes ``dL/dX[t]``, returns the new carry ``dL/dV[t-1]`` and the accumulators of
    PLIF's ``sum_t dL/dH[t] * dH[t]/dq`` and of the affine partials ``sum_t dL/dY[t] * X[t]``,
    ``sum_t dL/dY[t]``."""
    grad_s = _to_fp32(tl.load(grad_s_ptr + out, mask=mask, other=0.0))
    grad_y, grad_h, carry = _grad_step(h, spike, grad_s, carry, tau, q, v_threshold, v_reset, sg_a, sg_b,
                                       KIND, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE)
    if AFFINE:
        tl.store(grad_x_ptr + out, (grad_y * s).to(grad_x_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_x_ptr + out, grad_y.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if (KIND == 2 and DECAY_INPUT) or AFFINE_GRAD:
        x = _load_input(x_ptr, x_cur, mask)
    if AFFINE_GRAD:
        scale_acc = scale_acc + grad_y * x
        shift_acc = shift_acc + grad_y
    if KIND == 2:
        if DECAY_INPUT:  # dH[t]/dq = Y[t] - (V[t-1] - v_reset)
            w_acc = w_acc + grad_h * (_neuron_input(x, s, b, AFFINE) - (v_prev - v_reset))
        else:  # dH[t]/dq = -(V[t-1] - v_reset)
            w_acc = w_acc + grad_h * -(v_prev - v_reset)
    return carry, w_acc, scale_acc, shift_acc


@triton.jit
def _neuron_backward_kernel(
    grad_s_ptr, grad_v_ptr, h_ptr, x_ptr, v_init_ptr, q_ptr, scale_ptr, shift_ptr,
    grad_x_ptr, grad_v_init_ptr, w_partial_ptr, scale_partial_ptr, shift_partial_ptr,
    N, T, last_out, x_last, stride_t, size1, size2, stride0, stride1, stride2, ch_inner, ch_size,
    tau, v_threshold, v_reset, v_fill, sg_a, sg_b,
    KIND: tl.constexpr, DECAY_INPUT: tl.constexpr, HARD_RESET: tl.constexpr, DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, H_BF16: tl.constexpr, NDIMS: tl.constexpr, V_INIT_CONST: tl.constexpr,
    LOAD_GRAD_V: tl.constexpr, STORE_GRAD_V_INIT: tl.constexpr, AFFINE: tl.constexpr,
    AFFINE_GRAD: tl.constexpr, RECOMPUTE_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """Backward through time, from the saved H (``RECOMPUTE_T == 0``; runtime ``T``), or with H recomputed in
    registers (``RECOMPUTE_T == T``, a compile-time constant: both time loops are unrolled and H[t] is the t-th
    element of a tuple of blocks, so it never goes to memory). With ``AFFINE`` the neuron's input is
    ``Y = X * scale[c] + shift[c]`` and ``dL/dX = dL/dY * scale[c]``; with ``AFFINE_GRAD`` the per-neuron
    partials ``sum_t dL/dY[t] * X[t]`` and ``sum_t dL/dY[t]`` are written (t from T-1 down to 0)."""
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
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
        v_init = _initial_v(v_init_ptr, n, mask, v_fill, V_INIT_CONST, BLOCK)
    x_off = _input_offsets(n, size1, size2, stride0, stride1, stride2, NDIMS)  # unused when X is not read
    s, b = _channel_affine(scale_ptr, shift_ptr, n, mask, ch_inner, ch_size, AFFINE)
    out = n + last_out  # last_out = (T - 1) * N and x_last = (T - 1) * stride_t, from the launcher (int64-safe)
    if RECOMPUTE_T > 0:
        hs = ()
        v = v_init
        x_cur = x_off
        for t in tl.static_range(RECOMPUTE_T):
            y = _neuron_input(_load_input(x_ptr, x_cur, mask), s, b, AFFINE)
            h, spike, v = _step(y, v, tau, q, v_threshold, v_reset, KIND, DECAY_INPUT, HARD_RESET)
            hs = hs + (h,)
            x_cur += stride_t
        x_cur = x_off + x_last
        for t in tl.static_range(RECOMPUTE_T - 1, -1, -1):
            h = hs[t]
            v_prev = v_init
            if KIND == 2 and t > 0:
                h_prev = hs[t - 1]
                v_prev = _reset(h_prev, (h_prev >= v_threshold).to(tl.float32), v_threshold, v_reset, HARD_RESET)
            carry, w_acc, scale_acc, shift_acc = _reverse_step(
                grad_s_ptr, grad_x_ptr, x_ptr, out, x_cur, mask, h, (h >= v_threshold).to(tl.float32), v_prev,
                carry, w_acc, scale_acc, shift_acc, s, b, tau, q, v_threshold, v_reset, sg_a, sg_b,
                KIND, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, AFFINE, AFFINE_GRAD)
            out -= N
            x_cur -= stride_t
    else:
        x_cur = x_off + x_last
        h, spike = _load_saved(h_ptr, out, mask, v_threshold, H_BF16)
        t = T - 1
        while t >= 0:
            h_prev, spike_prev = h, spike  # stand-ins at t == 0, where V[t-1] is v_init
            if t > 0:
                h_prev, spike_prev = _load_saved(h_ptr, out - N, mask, v_threshold, H_BF16)
            v_prev = v_init
            if KIND == 2:
                v_prev = tl.where(t > 0, _reset(h_prev, spike_prev, v_threshold, v_reset, HARD_RESET), v_init)
            carry, w_acc, scale_acc, shift_acc = _reverse_step(
                grad_s_ptr, grad_x_ptr, x_ptr, out, x_cur, mask, h, spike, v_prev,
                carry, w_acc, scale_acc, shift_acc, s, b, tau, q, v_threshold, v_reset, sg_a, sg_b,
                KIND, DECAY_INPUT, HARD_RESET, DETACH_RESET, SURROGATE, AFFINE, AFFINE_GRAD)
            h, spike = h_prev, spike_prev
            out -= N
            x_cur -= stride_t
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


def _config(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device, block_size: int | None,
            num_warps: int | None) -> tuple[int, int, tuple[int]]:
    """``(block_size, num_warps, grid)``: the given values, else :func:`revsnn_triton.launch.launch_config`'s
    (the GPU heuristic's while recording)."""
    if block_size is None or num_warps is None:
        resident = resident_values(kernel, T)
        cfg = (launch.heuristic(n, T, on_gpu=True, resident=resident) if _recording is not None
               else launch.launch_config(kernel, n, T, dtype, device, resident=resident))
        block_size = cfg.block_size if block_size is None else block_size
        num_warps = cfg.num_warps if num_warps is None else num_warps
    launch.LaunchConfig(block_size, num_warps)  # validates
    return block_size, num_warps, (triton.cdiv(n, block_size),)


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
    block_size, num_warps, grid = _config(FORWARD_KERNEL, n, T, x.dtype, x.device, block_size, num_warps)
    if v_init is not None:
        v_init = to_neuron_layout(v_init, x, with_time=False)
    any_ptr = next(t for t in (spikes, saved, v_final) if t is not None)
    affine = _affine_args(x, scale, shift, cfg, any_ptr)
    x, geometry = _x_geometry(x)
    _run(FORWARD_KERNEL, _neuron_forward_kernel, grid,
         x, any_ptr if v_init is None else v_init, any_ptr if q is None else q, affine[0], affine[1],
         any_ptr if spikes is None else spikes, any_ptr if v_final is None else v_final,
         any_ptr if saved is None else saved,
         n, T, *geometry[:6], affine[2], affine[3], float(cfg.tau), float(cfg.v_threshold), float(cfg.v_reset),
         float(cfg.v_reset),
         KIND=KIND_IDS[cfg.kind], DECAY_INPUT=cfg.decay_input, HARD_RESET=cfg.hard_reset, NDIMS=geometry[6],
         SAVE=save_id if saved is not None else 0, STORE_SPIKES=spikes is not None,
         STORE_V_FINAL=v_final is not None, V_INIT_CONST=v_init is None, AFFINE=scale is not None,
         BLOCK=block_size, num_warps=num_warps, enable_fp_fusion=False)


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
    block_size, num_warps, grid = _config(kernel, n, T, grad_spikes.dtype, template.device, block_size, num_warps)
    grad_spikes = to_neuron_layout(grad_spikes, template, with_time=True)
    if grad_v_final is not None:
        grad_v_final = to_neuron_layout(grad_v_final.float(), template, with_time=False)
    reads_x = plan.backward_reads_x(cfg, affine_grad)
    if v_init is not None and (cfg.kind == "plif" or fused):
        v_init = to_neuron_layout(v_init, template, with_time=False)
    geometry = [0, 1, 1, 0, 0, 0, 1]
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
         float(cfg.v_threshold), float(cfg.v_reset), float(cfg.v_reset), float(sg_a), float(sg_b),
         KIND=KIND_IDS[cfg.kind], DECAY_INPUT=cfg.decay_input, HARD_RESET=cfg.hard_reset,
         DETACH_RESET=cfg.detach_reset, SURROGATE=SURROGATE_IDS[cfg.surrogate], H_BF16=save == "h_bf16",
         NDIMS=geometry[6], V_INIT_CONST=v_init is None, LOAD_GRAD_V=grad_v_final is not None,
         STORE_GRAD_V_INIT=outs[1] is not None, AFFINE=scale is not None, AFFINE_GRAD=affine_grad,
         RECOMPUTE_T=T if fused else 0, BLOCK=block_size, num_warps=num_warps, enable_fp_fusion=False)
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
