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

Input. The neuron's input is ``x`` converted to fp32, or with a per-channel affine transform (``AFFINE``)
``y = x * scale[c] + shift[c]``: a multiply, then an add (two roundings), for the channel ``c`` of each neuron
(:func:`channel_geometry`); ``y`` lives in registers only. Its backward writes ``dL/dx = dL/dy * scale[c]`` and,
per neuron, the partial sums over time of ``dL/dy * x`` and ``dL/dy``, which the caller reduces per channel.

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

PLIF's gradient of ``w`` (and the affine input's of ``scale`` and ``shift``): the backward kernel writes, per
neuron, ``sum_t dL/dH[t] * dH[t]/dq`` (summed over t in registers, t from T-1 down to 0); the caller reduces
these partials with one ``torch.sum``. No atomics, and the result does not depend on the launch configuration.
With the affine input the backward also reads X once per step for ``dL/dy * x`` (``b`` bytes per
neuron-step more, unless it reads X anyway) and writes two fp32 partials per neuron.
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
    SAVE: tl.constexpr, STORE_SPIKES: tl.constexpr, V_INIT_CONST: tl.constexpr, AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
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
        if KIND == 2:  # dH[t]/dq = Y[t] - (V[t-1] - v_reset)
            w_acc = w_acc + grad_h * (_neuron_input(x, s, b, AFFINE) - (v_prev - v_reset))
    elif KIND == 2:  # without decay_input: dH[t]/dq = -(V[t-1] - v_reset)
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


def channel_geometry(x: torch.Tensor, channel_dim: int) -> tuple[int, int]:
    """``(inner, size)`` such that neuron ``n`` of ``x [T, *shape]``, numbered in its neuron layout, belongs to
    channel ``(n // inner) % size`` of dim ``channel_dim`` of ``shape``: ``inner`` is the number of neurons of
    the dims laid out inside that dim."""
    perm = neuron_perm(x)
    if channel_dim not in perm:  # a channel dim of size 1
        return 1, 1
    inner = math.prod(x.shape[1 + d] for d in perm[perm.index(channel_dim) + 1:])
    return inner, x.shape[1 + channel_dim]


def _affine_args(template: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 channel_dim: int, any_ptr: torch.Tensor) -> list:
    """Kernel arguments ``[scale_ptr, shift_ptr, ch_inner, ch_size]`` (pointers stand in when unused)."""
    if scale is None:
        return [any_ptr, any_ptr, 1, 1]
    return [scale, shift, *channel_geometry(template, channel_dim)]


def neuron_forward(x: torch.Tensor, v_init: torch.Tensor | None, q: torch.Tensor | None, *, kind: str, tau: float,
                   decay_input: bool, v_threshold: float, hard_reset: bool, v_reset: float, save: str,
                   scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, channel_dim: int = 0,
                   block_size: int | None = None, num_warps: int | None = None, out=None):
    """Multi-step neuron forward.

    ``x [T, *shape]`` fp32/fp16/bf16 (any strides), ``v_init [*shape]`` fp32 or None (the default initial
    state ``v_reset``, which is 0.0 for soft reset: nothing is read), ``q`` a 1-element fp32 tensor
    ``sigmoid(w)`` (PLIF) or None; ``v_reset`` is the hard-reset value (0.0 for soft reset). ``save`` in
    ``"h"``, ``"h_bf16"``, ``"input"``. ``scale``, ``shift``: None, or contiguous fp32 ``[C]`` with
    ``C = shape[channel_dim]``: the neuron's input is then ``x * scale[c] + shift[c]`` (fp32, two roundings).
    Returns ``(spikes [T, *shape] x.dtype, v_final [*shape] fp32, saved)``,
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
                  scale=scale, shift=shift, channel_dim=channel_dim, block_size=block_size, num_warps=num_warps)
    return spikes, v_final, saved


def _forward_into(x, v_init, q, spikes, v_final, saved, *, kind, tau, decay_input, v_threshold, hard_reset,
                  v_reset, save_id, store_spikes, scale, shift, channel_dim, block_size, num_warps):
    n, T, block_size, num_warps, grid = _launch_args("neuron_forward", x, x.dtype, block_size, num_warps)
    if n == 0:
        return
    if v_init is not None:
        v_init = to_neuron_layout(v_init, x, with_time=False)
    affine = _affine_args(x, scale, shift, channel_dim, v_final)
    x, geometry = _x_geometry(x)
    _neuron_forward_kernel[grid](
        x, v_final if v_init is None else v_init, q if q is not None else v_final, affine[0], affine[1],
        spikes if store_spikes else v_final, v_final, saved if save_id else v_final,
        n, T, *geometry[:6], affine[2], affine[3], float(tau), float(v_threshold), float(v_reset), float(v_reset),
        KIND=KIND_IDS[kind], DECAY_INPUT=bool(decay_input), HARD_RESET=bool(hard_reset), NDIMS=geometry[6],
        SAVE=save_id, STORE_SPIKES=store_spikes, V_INIT_CONST=v_init is None, AFFINE=scale is not None,
        BLOCK=block_size, num_warps=num_warps, enable_fp_fusion=False)


def neuron_backward(grad_spikes: torch.Tensor, grad_v_final: torch.Tensor | None, saved: torch.Tensor,
                    x: torch.Tensor | None, v_init: torch.Tensor | None, q: torch.Tensor | None, *, kind: str,
                    tau: float, decay_input: bool, v_threshold: float, hard_reset: bool, v_reset: float,
                    detach_reset: bool, surrogate: str, alpha: float, save: str, need_grad_v_init: bool = True,
                    scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, channel_dim: int = 0,
                    need_grad_affine: bool = True, block_size: int | None = None, num_warps: int | None = None,
                    out=None):
    """Multi-step neuron backward through time.

    ``grad_spikes [T, *shape]`` (spikes' dtype), ``grad_v_final [*shape]`` or None (zero: nothing read);
    ``saved`` from :func:`neuron_forward`; ``x`` is read for ``save="input"``, for PLIF with ``decay_input``
    and for the grad of ``scale``; ``v_init`` (None = the constant default state ``v_reset``) matters for PLIF
    and ``"input"``; ``scale``, ``shift``, ``channel_dim`` as given to the forward.
    ``save="input"`` with ``T <= MAX_RECOMPUTE_T`` runs one kernel that recomputes H in registers; longer
    sequences re-run the forward kernel into a transient fp32 H buffer first. Gradients are bit-identical to
    ``save="h"``'s in both cases.
    Returns ``(grad_x, grad_v_init, w_partial, scale_partial, shift_partial)`` in the neuron layout (of ``x``
    for ``"input"``, else of ``saved``): ``grad_x [T, *shape]`` in grad_spikes' dtype; ``grad_v_init [*shape]``
    fp32, or None when ``need_grad_v_init`` is false (not written); ``w_partial [*shape]`` fp32 per-neuron
    partial sums for PLIF's grad of ``w`` (None otherwise); ``scale_partial``, ``shift_partial [*shape]`` fp32
    per-neuron ``sum_t dL/dY[t] * X[t]`` and ``sum_t dL/dY[t]`` (None without ``scale`` or without
    ``need_grad_affine``). ``out``: optional preallocated tuple of the same five.
    """
    template = x if save == "input" else saved
    recompute = save == "input" and template.shape[0] <= MAX_RECOMPUTE_T  # fused: H in registers
    affine_grad = scale is not None and need_grad_affine
    if save == "input" and not recompute:
        h = empty_neuron_layout(x, torch.float32)
        scratch_v = empty_neuron_layout(x, torch.float32, with_time=False)
        _forward_into(x, v_init, q, None, scratch_v, h, kind=kind, tau=tau, decay_input=decay_input,
                      v_threshold=v_threshold, hard_reset=hard_reset, v_reset=v_reset, save_id=SAVE_IDS["h"],
                      store_spikes=False, scale=scale, shift=shift, channel_dim=channel_dim,
                      block_size=block_size, num_warps=num_warps)
        del scratch_v
    else:
        h = saved  # empty for the fused recompute: the kernel never reads it
    wanted = (True, need_grad_v_init, kind == "plif", affine_grad, affine_grad)
    dtypes = (grad_spikes.dtype,) + (torch.float32,) * 4
    names = ("grad_x", "grad_v_init", "w_partial", "scale_partial", "shift_partial")
    if out is None:
        outs = [empty_neuron_layout(template, d, with_time=i == 0) if want else None
                for i, (want, d) in enumerate(zip(wanted, dtypes))]
    else:
        outs = list(out)
        for i, (want, d, name) in enumerate(zip(wanted, dtypes, names)):
            if want:
                _check_out(f"out[{i}] ({name})", outs[i], template, d, i == 0)
            else:
                outs[i] = None
    grad_x, grad_v_init, w_partial, scale_partial, shift_partial = outs
    grad_spikes = to_neuron_layout(grad_spikes, template, with_time=True)
    if grad_v_final is not None:
        grad_v_final = to_neuron_layout(grad_v_final.float(), template, with_time=False)
    kernel = "neuron_backward_recompute" if recompute else "neuron_backward"
    n, T, block_size, num_warps, grid = _launch_args(kernel, template, grad_spikes.dtype, block_size, num_warps)
    if n == 0:
        return grad_x, grad_v_init, w_partial, scale_partial, shift_partial
    reads_x = recompute or (kind == "plif" and decay_input) or affine_grad
    if v_init is not None and (kind == "plif" or recompute):
        v_init = to_neuron_layout(v_init, template, with_time=False)
    if reads_x:
        x, geometry = _x_geometry(x)
    else:
        geometry = [0, 1, 1, 0, 0, 0, 1]
    sg_a, sg_b = _surrogate_constants(surrogate, alpha)
    any_ptr = grad_x
    affine = _affine_args(template, scale, shift, channel_dim, any_ptr)
    _neuron_backward_kernel[grid](
        grad_spikes, any_ptr if grad_v_final is None else grad_v_final, any_ptr if recompute else h,
        x if reads_x else any_ptr, any_ptr if v_init is None else v_init, any_ptr if q is None else q,
        affine[0], affine[1], grad_x, *(any_ptr if t is None else t for t in outs[1:]),
        n, T, (T - 1) * n, (T - 1) * geometry[0], *geometry[:6], affine[2], affine[3], float(tau),
        float(v_threshold), float(v_reset), float(v_reset), float(sg_a), float(sg_b),
        KIND=KIND_IDS[kind], DECAY_INPUT=bool(decay_input), HARD_RESET=bool(hard_reset),
        DETACH_RESET=bool(detach_reset), SURROGATE=SURROGATE_IDS[surrogate], H_BF16=save == "h_bf16",
        NDIMS=geometry[6], V_INIT_CONST=v_init is None, LOAD_GRAD_V=grad_v_final is not None,
        STORE_GRAD_V_INIT=grad_v_init is not None, AFFINE=scale is not None, AFFINE_GRAD=affine_grad,
        RECOMPUTE_T=T if recompute else 0, BLOCK=block_size, num_warps=num_warps, enable_fp_fusion=False)
    return grad_x, grad_v_init, w_partial, scale_partial, shift_partial
