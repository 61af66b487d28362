"""The ``revsnn::neuron_*`` custom ops and ``multistep_neuron`` on their CPU path (the chunked backend).

- the op's forward against spikingjelly 2.0's functional multi-step neurons (spikes and final v bit-equal in fp32),
- the hand-written reference backward against ``multistep_autograd`` (gradients by autograd: an independent oracle),
- the per-channel affine input against the explicit ``y = x * scale + shift``,
- save modes, input validation, ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``.

Cases (layouts, special values) come from ``neuron_cases``, shared with the kernel and parity tests.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from revsnn_triton.ops.neuron import cpu as neuron_cpu
from revsnn_triton.ops.neuron import multistep_neuron, neuron_backward, neuron_forward
from revsnn_triton.ops.neuron import op as op_module
from revsnn_triton.ops.neuron.reference import multistep_autograd
from revsnn_triton.surrogate import SURROGATES
from revsnn_triton.testing import assert_close, assert_equal
from revsnn_triton.testing.strategies import LAYOUTS, NeuronCase as Case, make_inputs
from revsnn_triton.testing.strategies import neuron_cases as cases
from neuron_cases import (KERNEL_DEVICE, affine_kwargs, config, explicit_input, kernels_on, make_affine, n_terms,
                          plif_w_term_scale)

sj_functional = pytest.importorskip("spikingjelly.activation_based.functional")
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


GRADS = ("x", "v_init", "w", "scale", "shift")


def run(fn, case: Case, save: str | None = None, device: str = "cpu"):
    """``fn`` (``multistep_neuron`` or ``multistep_autograd``) on the case's inputs; returns spikes, v_final and
    the gradients of ``sum(spikes * grad_s) + sum(v_final * grad_v)`` w.r.t. x, v_init, w, scale and shift
    (None if absent), on CPU."""
    x, v_init, w, grad_s, grad_v = make_inputs(case, device)
    scale, shift = make_affine(case, device)
    inputs = (x, v_init, w, scale, shift)
    leaves = [t.requires_grad_() for t in inputs if t is not None]
    kw = case.kwargs() | ({"save": save} if save else {})
    if scale is not None:
        kw |= dict(scale=scale, shift=shift, channel_dim=case.channel_dim)
    spikes, v = fn(x, v_init, w=w, **kw)
    grads = iter(torch.autograd.grad((spikes.float() * grad_s.float()).sum() + (v * grad_v).sum(), leaves))
    out = [spikes.detach(), v.detach()]
    for t in inputs:
        out.append(next(grads) if t is not None else None)
    return [None if t is None else t.cpu() for t in out]


def _sj(case: Case, x, v, w):
    common = dict(v_threshold=case.v_threshold, v_reset=case.v_reset, detach_reset=case.detach_reset,
                  surrogate_function=getattr(sj_surrogate, type(SURROGATES[case.surrogate]()).__name__)(
                      alpha=case.alpha_value))
    if case.kind == "if":
        return sj_functional.if_multi_step(x, v, **common)[:2]
    if case.kind == "lif":
        return sj_functional.lif_multi_step(x, v, case.tau, case.decay_input, **common)[:2]
    return sj_functional.plif_multi_step(x, v, w, case.decay_input, **common)[:2]


@pytest.mark.parametrize("surrogate", sorted(SURROGATES))
@pytest.mark.parametrize("v_reset", [0.0, None, -0.5])
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_forward_and_gradients_equal_spikingjelly(kind: str, v_reset, surrogate: str) -> None:
    case = Case(kind=kind, v_reset=v_reset, surrogate=surrogate, tau=1.7, v_threshold=0.6, T=5, shape=(4, 9),
                scale=2.0, detach_reset=kind == "lif", decay_input=v_reset != -0.5, w=-0.4)
    ours = run(multistep_neuron, case)
    x, v_init, w, grad_s, grad_v = make_inputs(case)
    leaves = [t.requires_grad_() for t in (x, v_init, w) if t is not None]
    spikes, v = _sj(case, x, v_init, w)
    grads = torch.autograd.grad((spikes * grad_s).sum() + (v * grad_v).sum(), leaves)
    assert_equal(ours[0], spikes.detach(), "spikes vs spikingjelly")
    assert_equal(ours[1], v.detach(), "v_final vs spikingjelly")
    for got, ref, what in zip(ours[2:], grads, ("x", "v_init", "w")):
        assert_close(got, ref, f"grad {what} vs spikingjelly")


# Each example takes ~0.1 s: three times the profile's example count.
@settings(max_examples=3 * settings().max_examples)
@given(case=cases())
@example(case=Case(kind="plif", T=1, shape=(1,), v_reset=None, detach_reset=True, layout="expand"))
@example(case=Case(kind="lif", T=6, shape=(131,), v_threshold=-0.5, v_reset=0.3, dtype=torch.bfloat16,
                   special_frac=0.6, layout="time_inner", surrogate="piecewise_quadratic", alpha=1.0))
def test_explicit_backward_equals_autograd_oracle(case: Case) -> None:
    ours = run(multistep_neuron, case)
    oracle = run(multistep_autograd, case)
    assert_equal(ours[0], oracle[0], "spikes")
    assert_equal(ours[1], oracle[1], "v_final")
    for got, ref, what in zip(ours[2:], oracle[2:], GRADS):
        if ref is None:
            continue
        check_grad(got, ref, case, what)


@given(case=cases(), save=st.sampled_from(["input", "h", "h_bf16"]), chunk=st.sampled_from([1, 2, 5, 16]))
@example(case=Case(kind="plif", T=4, shape=(2, 3, 4), layout="channels_last", w=0.7), save="input", chunk=5)
def test_cpu_path_gives_the_same_bits_chunk_by_chunk(case: Case, save: str, chunk: int) -> None:
    # The CPU path works through the neurons in chunks of cpu.CPU_CHUNK to bound its work space; with tiny
    # chunks (many slices along the outermost neuron dim, in every layout) nothing may change, not even PLIF's
    # grad of w or the affine grads (per-neuron partials, then one sum over the whole tensor).
    whole = run(multistep_neuron, case, save)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(neuron_cpu, "CPU_CHUNK", chunk)
        if chunk == 1 and torch.Size(case.shape).numel() > 1:
            assert len(neuron_cpu._chunks(make_inputs(case)[0])) > 1
        chunked = run(multistep_neuron, case, save)
    for got, ref, what in zip(chunked, whole, ("spikes", "v_final", *(f"grad {g}" for g in GRADS))):
        if ref is not None:
            assert_equal(got, ref, f"{what}, chunks of {chunk}")


def oracle_grad_y(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dL/dy)`` by autograd through the oracle on the neuron's input ``y`` (the explicit affine input, or x)."""
    x, v_init, w, grad_s, grad_v = make_inputs(case)
    y = (explicit_input(case, x) if case.channel_dim is not None else x.float()).requires_grad_()
    spikes, v = multistep_autograd(y, v_init, w=w, **case.kwargs())
    grad_y, = torch.autograd.grad((spikes * grad_s.float()).sum() + (v * grad_v).sum(), [y])
    return x, grad_y


def check_grad(got: torch.Tensor, ref: torch.Tensor, case: Case, what: str) -> None:
    """One gradient against the oracle's: elementwise ones with the dtype's tolerance; those of w, scale and
    shift are sums over every neuron-step (of a channel), compared with the reduction-length tolerance (the
    terms' magnitude from the oracle's dL/dy)."""
    if what in ("x", "v_init"):
        assert_close(got, ref, f"grad {what}", dtype=ref.dtype)
        return
    x, grad_y = oracle_grad_y(case)
    if what == "w":
        _, v_init, w, _, _ = make_inputs(case)
        assert_close(got, ref, "grad w", dtype=torch.float32, reduce_dim=n_terms(x),
                     term_scale=plif_w_term_scale(case, x, v_init, w, grad_y))
        return
    terms = grad_y * x.float() if what == "scale" else grad_y
    per_channel = terms.numel() // terms.shape[1 + case.channel_dim]
    assert_close(got, ref, f"grad {what}", dtype=torch.float32, reduce_dim=per_channel,
                 term_scale=float(terms.abs().max()))


@pytest.mark.parametrize("device_path", ["reference", "kernels"])
@pytest.mark.parametrize("kind", ["lif", "plif"])
def test_save_modes(kind: str, device_path: str) -> None:
    """"input" recomputes the same H, so its gradients equal "h"'s bit for bit. "h_bf16" keeps H - v_threshold
    in bf16 (8-bit mantissa: relative error <= 2^-9 per saved value): the surrogate and reset terms see H that
    much off, which moves each gradient by about (alpha |H - th| + 1) * 2^-9 per step relative, compounding over
    the T=4 steps; we allow 3e-2 relative and 3e-2 x max|grad| absolute (about 4 steps x 4 x 2^-9)."""
    case = Case(kind=kind, T=4, shape=(6, 11), v_reset=None if kind == "plif" else 0.0, scale=2.0,
                surrogate="sigmoid")
    device = KERNEL_DEVICE if device_path == "kernels" else "cpu"
    with kernels_on(device) if device_path == "kernels" else contextlib.nullcontext():
        h, inp, bf16 = [run(multistep_neuron, case, save, device) for save in ("h", "input", "h_bf16")]
    for a, b, what in zip(h, inp, ("spikes", "v_final", *(f"grad {g}" for g in GRADS))):
        if a is not None:
            assert_equal(b, a, f"{what}: save='input' vs 'h'")
    assert_equal(bf16[0], h[0], "spikes with save='h_bf16'")
    assert_equal(bf16[1], h[1], "v_final with save='h_bf16'")
    for a, b, what in zip(h[2:], bf16[2:], (f"grad {g}" for g in GRADS)):
        if a is not None:
            assert_close(b, a, f"{what}: save='h_bf16' vs 'h'", rtol=3e-2, atol=3e-2 * float(a.abs().max()))


# ------------------------------------------------------------------ per-channel affine input transform

@pytest.mark.parametrize("path", ["reference", "kernels"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_affine_spikes_equal_explicit_input(kind: str, layout: str, path: str) -> None:
    """Spikes and v_final with scale/shift are bit-identical to the neuron run on y = x * scale + shift written
    out in fp32, in every dtype, save mode and layout (channels_last and expand over T included)."""
    device = KERNEL_DEVICE if path == "kernels" else "cpu"
    for i, dtype in enumerate((torch.float32, torch.bfloat16, torch.float16)):
        save = ("input", "h", "h_bf16")[i]
        case = Case(kind=kind, T=3, shape=(2, 3, 4, 5), layout=layout, dtype=dtype, channel_dim=1, scale=2.0,
                    special_frac=0.3, v_reset=None if kind == "plif" else 0.0, seed=i)
        x, v_init, w, _, _ = make_inputs(case, device)
        with kernels_on(device) if path == "kernels" else contextlib.nullcontext():
            fused = multistep_neuron(x.requires_grad_(), v_init, w=w, **case.kwargs(), save=save,
                                     **affine_kwargs(case, device))
            plain = multistep_neuron(explicit_input(case, x.detach()), v_init, w=w, **case.kwargs(), save=save)
        assert fused[0].dtype == dtype
        assert_equal(fused[0], plain[0].to(dtype), f"spikes, {dtype}, save={save}")
        assert_equal(fused[1], plain[1], f"v_final, {dtype}, save={save}")


@settings(max_examples=2 * settings().max_examples)
@given(case=cases(), save=st.sampled_from(["input", "h", "h_bf16"]), data=st.data())
@example(case=Case(kind="plif", T=4, shape=(2, 3, 5), channel_dim=1, layout="channels_last", w=0.7,
                   dtype=torch.bfloat16), save="input", data=None)
@example(case=Case(kind="lif", T=3, shape=(4,), channel_dim=0, layout="expand", special_frac=0.6), save="h",
         data=None)
def test_affine_gradients_equal_autograd_oracle(case: Case, save: str, data) -> None:
    """grads of x, scale and shift (and v_init, w) through the op's CPU path against autograd through the
    explicit y; spikes bit-equal."""
    if case.channel_dim is None:
        case = replace(case, channel_dim=data.draw(st.integers(-len(case.shape), len(case.shape) - 1)))
    ours = run(multistep_neuron, case, save)
    oracle = run(multistep_autograd, case)
    assert_equal(ours[0], oracle[0], "spikes")
    assert_equal(ours[1], oracle[1], "v_final")
    if save == "h_bf16":
        return  # approximate gradients by design (test_save_modes)
    for got, ref, what in zip(ours[2:], oracle[2:], GRADS):
        if ref is not None:
            check_grad(got, ref, case, what)


def test_affine_grad_x_is_scaled_and_reductions_are_per_channel() -> None:
    """With the neuron's gradient dL/dy known (from the op on the explicit y): grad_x = dL/dy * scale[c] in x's
    dtype, grad_scale[c] = sum(dL/dy * x), grad_shift[c] = sum(dL/dy) over time and the other dims."""
    case = Case(kind="lif", T=4, shape=(3, 4, 5), channel_dim=1, layout="channels_last", scale=2.0,
                dtype=torch.bfloat16, special_frac=0.0)
    x, v_init, w, grad_s, grad_v = make_inputs(case)
    scale, shift = make_affine(case)
    y = explicit_input(case, x).requires_grad_()
    spikes, v = multistep_neuron(y, v_init, **case.kwargs())
    grad_y, = torch.autograd.grad((spikes * grad_s.float()).sum() + (v * grad_v).sum(), [y])
    ours = run(multistep_neuron, case)
    assert_equal(ours[2], (grad_y * scale.view(1, 1, -1, 1)).to(torch.bfloat16), "grad x = dL/dy * scale[c]")
    dims = (0, 1, 3)
    assert_close(ours[5], (grad_y * x.float()).sum(dims), "grad scale", reduce_dim=4 * 3 * 5,
                 term_scale=float((grad_y * x.float()).abs().max()))
    assert_close(ours[6], grad_y.sum(dims), "grad shift", reduce_dim=4 * 3 * 5, term_scale=float(grad_y.abs().max()))


def test_affine_cpu_path_allocates_no_input_sized_temporary() -> None:
    """The CPU path computes y chunk by chunk and step by step, as the kernel does in registers: its peak
    exceeds that of the same call without scale/shift by far less than one fp32 copy of x (forward), and in
    backward by the two per-neuron partial sums only."""
    from revsnn_triton.memory import measure_peak_bytes
    T, B, C, n = 8, 16, 8, 64  # chunks of one batch element: 512 neurons, 1/16 of the tensor
    x = torch.randn(T, B, C, n)
    scale, shift = torch.rand(C) + 0.5, torch.randn(C)
    grad = torch.randn(T, B, C, n)
    full_y = T * x[0].numel() * 4

    def forward(affine: bool):
        kw = dict(scale=scale, shift=shift, channel_dim=1) if affine else {}
        return lambda: multistep_neuron(x, tau=2.0, **kw)

    def backward(affine: bool):
        leaves = [x.clone().requires_grad_()] + ([scale.clone().requires_grad_(), shift.clone().requires_grad_()]
                                                 if affine else [])
        kw = dict(scale=leaves[1], shift=leaves[2], channel_dim=1) if affine else {}
        spikes, _ = multistep_neuron(leaves[0], tau=2.0, save="input", **kw)
        return lambda: torch.autograd.grad(spikes, leaves, grad)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(neuron_cpu, "CPU_CHUNK", 256)
        fwd = [measure_peak_bytes(forward(a), "cpu") for a in (False, True)]
        bwd = [measure_peak_bytes(backward(a), "cpu") for a in (False, True)]
    assert fwd[1] - fwd[0] < full_y / 8, (fwd, full_y)
    partials = 2 * x[0].numel() * 4
    assert bwd[1] - bwd[0] <= partials + full_y / 8, (bwd, partials, full_y)


def test_defaults_and_kinds() -> None:
    """v_init=None starts at v_reset (0 for soft reset); w selects PLIF over tau; IF otherwise."""
    x = torch.tensor([[0.6], [0.6], [0.6]])
    f = lambda value: torch.tensor([value], dtype=torch.float32)  # noqa: E731  (fp32 arithmetic as the neuron)
    s, v = multistep_neuron(x, v_reset=-1.0)  # IF from -1: -0.4, 0.2, 0.8
    assert_equal(s, torch.zeros(3, 1), "IF spikes")
    assert_equal(v, f(-1.0) + 0.6 + 0.6 + 0.6, "IF v_final")
    s, v = multistep_neuron(x, tau=2.0, v_reset=None)  # LIF from 0, no spike
    expected = f(0.0)
    for _ in range(3):
        expected = expected + (f(0.6) - (expected - 0.0)) / 2.0
    assert_equal(v, expected, "LIF v_final")
    w = torch.tensor([0.0])  # sigmoid(0) = 1/2, i.e. tau = 2, and w overrides tau
    s2, v2 = multistep_neuron(x, tau=5.0, w=w, v_reset=None)
    assert_equal(v2, v, "PLIF with w=0 equals LIF with tau=2")


BAD_CALLS = [
    (dict(x_seq=torch.zeros(3, 4), tau=1.0), ValueError, "tau"),
    (dict(x_seq=torch.zeros(3, 4), tau=0.5), ValueError, "tau"),
    (dict(x_seq=torch.zeros(3, 4), tau=float("inf")), ValueError, "tau"),
    (dict(x_seq=torch.zeros(3, 4), tau="2"), TypeError, "tau"),
    (dict(x_seq=torch.zeros(4)), ValueError, "time axis"),
    (dict(x_seq=torch.zeros(0, 4)), ValueError, "T >= 1"),
    (dict(x_seq=torch.zeros(3, 4, dtype=torch.int32)), TypeError, "dtype"),
    (dict(x_seq=torch.zeros(3, 4, dtype=torch.complex64)), TypeError, "dtype"),
    (dict(x_seq=torch.zeros(3, 4, dtype=torch.float64)), TypeError, "dtype"),
    (dict(x_seq=[[1.0]]), TypeError, "x_seq"),
    (dict(x_seq=torch.zeros(3, 4), v_init=torch.zeros(5)), ValueError, "v_init"),
    (dict(x_seq=torch.zeros(3, 4), v_init=torch.zeros(3, 4)), ValueError, "v_init"),
    (dict(x_seq=torch.zeros(3, 4), v_init=torch.zeros(4, dtype=torch.float16)), TypeError, "v_init"),
    (dict(x_seq=torch.zeros(3, 4), v_init=torch.zeros(4, device="meta")), ValueError, "v_init"),
    (dict(x_seq=torch.zeros(3, 4), w=torch.zeros(1, device="meta")), ValueError, "w"),
    (dict(x_seq=torch.zeros(3, 4), w=torch.zeros(2)), ValueError, "w"),
    (dict(x_seq=torch.zeros(3, 4), w=torch.zeros(1, dtype=torch.int64)), TypeError, "w"),
    (dict(x_seq=torch.zeros(3, 4), surrogate="relu"), ValueError, "fused surrogates"),
    (dict(x_seq=torch.zeros(3, 4), surrogate=SURROGATES["atan"]()), TypeError, "surrogate"),
    (dict(x_seq=torch.zeros(3, 4), v_threshold=float("nan")), ValueError, "v_threshold"),
    (dict(x_seq=torch.zeros(3, 4), v_threshold=float("inf")), ValueError, "v_threshold"),
    (dict(x_seq=torch.zeros(3, 4), v_reset=float("-inf")), ValueError, "v_reset"),
    (dict(x_seq=torch.zeros(3, 4), alpha=0.0), ValueError, "alpha"),
    (dict(x_seq=torch.zeros(3, 4), save="all"), ValueError, "save"),
    (dict(x_seq=torch.zeros(3, 4), detach_reset=1), TypeError, "detach_reset"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4), channel_dim=0), ValueError, "shift"),
    (dict(x_seq=torch.zeros(3, 4, 5), shift=torch.ones(4), channel_dim=0), ValueError, "scale"),
    (dict(x_seq=torch.zeros(3, 4, 5), channel_dim=0), ValueError, "channel_dim"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4), shift=torch.ones(4)), ValueError, "channel_dim"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4), shift=torch.ones(4), channel_dim=2), ValueError,
     "channel_dim"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(5), shift=torch.ones(5), channel_dim=-3), ValueError,
     "channel_dim"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4), shift=torch.ones(4), channel_dim=True), TypeError,
     "channel_dim"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4), shift=torch.ones(4), channel_dim=0.0), TypeError,
     "channel_dim"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(5), shift=torch.ones(4), channel_dim=0), ValueError,
     "scale must have shape"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4), shift=torch.ones(1, 4), channel_dim=0), ValueError,
     "shift must have shape"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4, dtype=torch.float16), shift=torch.ones(4),
          channel_dim=0), TypeError, "scale must be float32"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=torch.ones(4), shift=torch.ones(4, device="meta"), channel_dim=0),
     ValueError, "shift is on"),
    (dict(x_seq=torch.zeros(3, 4, 5), scale=[1.0] * 4, shift=torch.ones(4), channel_dim=0), TypeError, "scale"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_CALLS, ids=range(len(BAD_CALLS)))
def test_bad_input_raises(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        multistep_neuron(**kwargs)
    if "save" not in kwargs:  # the autograd oracle validates the same way (it has no `save`)
        with pytest.raises(error, match=match):
            multistep_autograd(**kwargs)


def _op_args(case: Case, save: str, grad: bool):
    x, v_init, w, grad_s, grad_v = make_inputs(case)
    scale, shift = make_affine(case)
    cfg = config(case, x)
    for t in (x, v_init, w, scale, shift):
        if grad and t is not None:
            t.requires_grad_()
    scalars = (cfg.kind, cfg.tau, cfg.decay_input, cfg.v_threshold, cfg.hard_reset, cfg.v_reset, cfg.detach_reset,
               cfg.surrogate, cfg.alpha, save)
    return (x, v_init, w, *scalars, scale, shift, cfg.channel_dim or 0), (grad_s, grad_v)


@pytest.mark.parametrize("save", ["h", "h_bf16", "input"])
@pytest.mark.parametrize("kind,affine", [("if", False), ("plif", False), ("plif", True), ("lif", True)])
def test_opcheck_reference_path(kind: str, affine: bool, save: str) -> None:
    case = Case(kind=kind, T=3, shape=(2, 3, 4), layout="channels_last", v_reset=None if kind == "if" else 0.0,
                channel_dim=1 if affine else None)
    fwd_args, (grad_s, grad_v) = _op_args(case, save, grad=True)
    torch.library.opcheck(neuron_forward, fwd_args)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args)
    saved = neuron_forward(*detached)[2]
    x, v_init, w, *scalars, scale, shift, channel_dim = detached
    torch.library.opcheck(neuron_backward, (grad_s, grad_v, saved, x, v_init, w, *scalars, True, scale, shift,
                                            channel_dim, True))


def _step(x, v0, w, scale, shift):
    s, v = multistep_neuron(x, v0, w=w, v_threshold=0.5, v_reset=None, surrogate="atan", alpha=2.0, scale=scale,
                            shift=shift, channel_dim=1)
    return (s * torch.arange(s.shape[-1], dtype=s.dtype, device=s.device)).sum() + v.square().sum()


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_torch_compile_fullgraph_equals_eager(path: str) -> None:
    """One compiled function (forward + backward): Inductor on the CPU reference path (the ~20 s compile); the
    kernels (interpreter on CPU: AOT-autograd only; GPU: Inductor) with dynamic shapes over two input shapes."""
    torch._dynamo.reset()
    device = "cpu" if path == "reference" else KERNEL_DEVICE
    if path == "reference":
        compiled, shapes = torch.compile(_step, fullgraph=True), [(4, 6)]
    else:
        backend = "aot_eager" if device == "cpu" else "inductor"
        compiled, shapes = torch.compile(_step, fullgraph=True, dynamic=True, backend=backend), [(4, 6), (5, 3)]
    for shape in shapes:
        case = Case(kind="plif", T=3, shape=shape, layout="transposed", special_frac=0.0, scale=2.0, channel_dim=1)
        x, v_init, w, _, _ = make_inputs(case, device)
        with kernels_on(device) if path == "kernels" else contextlib.nullcontext():
            results = []
            for fn in (_step, compiled):
                leaves = [t.clone().requires_grad_() for t in (x, v_init, w, *make_affine(case, device))]
                loss = fn(*leaves)
                results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
        for a, b, what in zip(results[1], results[0], ("loss", *(f"grad {g}" for g in GRADS))):
            assert_close(a, b, f"compiled vs eager, shape {shape}: {what}")


@pytest.mark.parametrize("kind,decay_input,save,with_v_init,affine,per_step,per_neuron,const", [
    ("lif", True, "h", False, False, 4, 0, 0),          # fp32 H only
    ("lif", True, "h_bf16", False, False, 2, 0, 0),     # bf16 H - v_threshold only
    ("lif", True, "input", False, False, 2, 0, 0),      # x (bf16 here), nothing else (v_init=None: not materialized)
    ("lif", True, "input", True, False, 2, 4, 0),       # x and the given v_init (fp32)
    ("plif", True, "h", False, False, 4 + 2, 0, 4),     # H, x (for dH/dq), w
    ("plif", False, "h", True, False, 4, 4, 4),         # H, v_init, w (dH/dq does not involve x)
    ("plif", True, "input", False, False, 2, 0, 4),     # x, w
    ("lif", True, "input", False, True, 2, 0, 2 * 40),  # x and the two [C] vectors (C = 10), no y
    ("if", True, "h", False, True, 4 + 2, 0, 2 * 40),   # H, x (for the grad of scale), the two vectors
])
def test_bytes_saved_for_backward(kind, decay_input, save, with_v_init, affine, per_step, per_neuron,
                                  const) -> None:
    """What autograd really keeps (storages counted through saved-tensor hooks), per save mode, bf16 input."""
    T, n = 4, 1000
    x = torch.randn(T, 10, n // 10).to(torch.bfloat16).requires_grad_()
    w = torch.zeros(1, requires_grad=True) if kind == "plif" else None
    v_init = torch.zeros(10, n // 10) if with_v_init else None
    kw = dict(scale=torch.ones(10, requires_grad=True), shift=torch.zeros(10, requires_grad=True),
              channel_dim=0) if affine else {}
    saved = {}

    def pack(t: torch.Tensor):
        if t.numel():
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        multistep_neuron(x, v_init, tau=None if kind == "if" else 2.0, w=w, decay_input=decay_input, save=save, **kw)
    assert sum(saved.values()) == per_step * T * n + per_neuron * n + const, saved


@pytest.mark.parametrize("grad_mode", ["no_grad", "no_leaf_requires_grad", "training"])
def test_nothing_saved_without_autograd(grad_mode: str, monkeypatch) -> None:
    """Inference (and the reversible engine's graph-free forward) never writes H: the op gets save="input"."""
    seen = []
    original = op_module.neuron_forward

    def spy(*args):
        seen.append(args[12])  # save
        return original(*args)

    monkeypatch.setattr(op_module, "neuron_forward", spy)
    x = torch.randn(3, 8, requires_grad=grad_mode != "no_leaf_requires_grad")
    with torch.no_grad() if grad_mode == "no_grad" else contextlib.nullcontext():
        spikes, v = op_module.multistep_neuron(x, tau=2.0, save="h")
    ref, ref_v = multistep_autograd(x.detach(), tau=2.0)
    assert_equal(spikes.detach(), ref, "spikes")
    assert_equal(v.detach(), ref_v, "v_final")
    assert seen == (["h"] if grad_mode == "training" else ["input"])


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_unused_outputs_are_not_materialized(path: str, monkeypatch) -> None:
    """Autograd hands the backward None for an unused v_final (not zeros: the kernel then reads nothing) and it
    asks for no grad of a v_init that does not require one; the gradients equal those of explicit zero
    gradients. Only v_final used: spikes' gradient is zero."""
    calls = []
    original = op_module.neuron_backward

    def spy(*args):
        calls.append((args[1] is None, args[16]))  # grad_v_final is None, need_grad_v_init
        return original(*args)

    monkeypatch.setattr(op_module, "neuron_backward", spy)
    case = Case(kind="plif", T=3, shape=(4, 9), v_reset=None, scale=2.0)
    device = KERNEL_DEVICE if path == "kernels" else "cpu"
    x, v_init, w, grad_s, _ = make_inputs(case, device)
    results = []
    with kernels_on(device) if path == "kernels" else contextlib.nullcontext():
        for v_grad, use_v in ((False, False), (True, True), (False, "only")):
            leaves = [x.clone().requires_grad_(), v_init.clone().requires_grad_(v_grad), w.clone().requires_grad_()]
            spikes, v = multistep_neuron(leaves[0], leaves[1], w=leaves[2], **case.kwargs(), save="input")
            loss = (spikes * grad_s).sum() if use_v != "only" else (v * 0).sum() + v.sum()
            if use_v is True:
                loss = loss + (v * 0).sum()
            wrt = [t for t in leaves if t.requires_grad]
            results.append(dict(zip([id(t) for t in wrt], torch.autograd.grad(loss, wrt))) | {"leaves": leaves})
    assert calls == [(True, False), (False, True), (False, False)]
    none_run, zeros_run, only_v = results
    for i in (0, 2):
        assert_equal(none_run[id(none_run["leaves"][i])], zeros_run[id(zeros_run["leaves"][i])],
                     "grad with v_final unused vs zero grad of v_final")
    assert only_v[id(only_v["leaves"][2])].abs().sum() > 0
