"""Parity of our neuron modules with spikingjelly 2.0 (CPU).

Spikes are compared bit for bit, input gradients and PLIF's ``w`` gradient with the fp32 rounding tolerance
(the input dtype's tolerance for bf16/fp16 input gradients, which are rounded to that dtype; the reduction-length
tolerance for ``w``'s, a sum over every neuron-step). Each case makes two consecutive calls without ``reset()``,
so the carried membrane (and the gradient through it) is exercised, and the loss includes the final ``v``.

Reference: spikingjelly's own module in the same step mode for fp32 input. For bf16/fp16 input spikingjelly's
module keeps the membrane in the input dtype, while ours keeps it in fp32 (on purpose, see
``revsnn_triton.neuron``); the reference there is spikingjelly's functional ``*_multi_step`` with an fp32
membrane, which is the same dynamics with an fp32 state. Cases come from ``neuron_cases`` (PLIF modules start
from ``init_tau = case.tau``).
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from revsnn_triton import runtime, surrogate
from revsnn_triton.neuron import IFNode, LIFNode, ParametricLIFNode
from revsnn_triton.testing import assert_close, assert_equal
from revsnn_triton.testing.strategies import SURROGATE_NAMES, NeuronCase as Case, make_inputs
from revsnn_triton.testing.strategies import neuron_cases as cases
from neuron_cases import n_terms, plif_w_term_scale

sj_neuron = pytest.importorskip("spikingjelly.activation_based.neuron")
from spikingjelly.activation_based import functional as sj_functional  # noqa: E402
from spikingjelly.activation_based import surrogate as sj_surrogate  # noqa: E402

LOW_PRECISION = (torch.bfloat16, torch.float16)


def sequence_inputs(case: Case, steps: tuple[int, int]):
    """Inputs of both calls (input dtype), upstream gradients of their spikes (fp32) and of the final v."""
    xs, gs = [], []
    for i, T in enumerate(steps):
        x, _, _, grad_s, grad_v = make_inputs(replace(case, T=T, seed=case.seed + 7919 * i, random_v_init=False))
        xs.append(x)
        gs.append(grad_s.float())
    return xs, gs, grad_v


def make_ours(case: Case, backend: str, step_mode: str, save: str = "h"):
    kw = dict(v_threshold=case.v_threshold, v_reset=case.v_reset, detach_reset=case.detach_reset,
              surrogate_function=surrogate.SURROGATES[case.surrogate](case.alpha_value), step_mode=step_mode,
              backend=backend, save=save)
    if case.kind == "if":
        return IFNode(**kw)
    if case.kind == "lif":
        return LIFNode(tau=case.tau, decay_input=case.decay_input, **kw)
    return ParametricLIFNode(init_tau=case.tau, decay_input=case.decay_input, **kw)


def _sj_surrogate(case: Case):
    return getattr(sj_surrogate, type(surrogate.SURROGATES[case.surrogate]()).__name__)(alpha=case.alpha_value)


def make_spikingjelly(case: Case, step_mode: str):
    kw = dict(v_threshold=float(case.v_threshold), v_reset=None if case.v_reset is None else float(case.v_reset),
              detach_reset=case.detach_reset, surrogate_function=_sj_surrogate(case), step_mode=step_mode)
    if case.kind == "if":
        return sj_neuron.IFNode(**kw)
    if case.kind == "lif":
        return sj_neuron.LIFNode(tau=float(case.tau), decay_input=case.decay_input, **kw)
    return sj_neuron.ParametricLIFNode(init_tau=float(case.tau), decay_input=case.decay_input, **kw)


def _loss(outs, gs, v, gv) -> torch.Tensor:
    return sum((o.float() * g).sum() for o, g in zip(outs, gs)) + (v * gv).sum()


def _grads(loss, xs, w):
    params = xs + ([w] if w is not None else [])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def run_module(node, step_mode: str, xs, gs, gv, device="cpu"):
    """Two calls (in the node's step mode) without reset; returns spikes, final v and gradients, on CPU."""
    node = node.to(device)
    xs = [x.to(device).requires_grad_() for x in xs]
    outs = []
    for x in xs:
        if step_mode == "m":
            outs.append(node(x))
        else:
            outs.append(torch.stack([node(x[t]) for t in range(x.shape[0])]))
    w = getattr(node, "w", None)
    loss = _loss(outs, [g.to(device) for g in gs], node.v, gv.to(device))
    grads = _grads(loss, xs, w)
    return [o.detach().cpu() for o in outs], node.v.detach().cpu(), [g.cpu() for g in grads]


def run_spikingjelly_fp32_state(case: Case, xs, gs, gv):
    """spikingjelly's functional multi-step with an fp32 membrane carried across the two calls."""
    w = None
    if case.kind == "plif":
        w = torch.nn.Parameter(torch.as_tensor(-math.log(case.tau - 1.0)))
    xs = [x.clone().requires_grad_() for x in xs]
    v = torch.full(case.shape, 0.0 if case.v_reset is None else case.v_reset, dtype=torch.float32)
    common = dict(v_threshold=float(case.v_threshold), v_reset=case.v_reset,
                  surrogate_function=_sj_surrogate(case), detach_reset=case.detach_reset)
    outs = []
    for x in xs:
        if case.kind == "if":
            s, v, _ = sj_functional.if_multi_step(x, v, **common)
        elif case.kind == "lif":
            s, v, _ = sj_functional.lif_multi_step(x, v, float(case.tau), case.decay_input, **common)
        else:
            s, v, _ = sj_functional.plif_multi_step(x, v, w, case.decay_input, **common)
        outs.append(s)
    grads = _grads(_loss(outs, gs, v, gv), xs, w)
    return [o.detach() for o in outs], v.detach(), grads


def reference(case: Case, step_mode: str, xs, gs, gv):
    if case.dtype in LOW_PRECISION:
        return run_spikingjelly_fp32_state(case, xs, gs, gv)
    return run_module(make_spikingjelly(case, step_mode), step_mode, xs, gs, gv)


def check_w_grad(case: Case, xs, grads, got: torch.Tensor, ref: torch.Tensor) -> None:
    """PLIF's grad of w: one sum over every neuron-step of both calls, with the reduction-length tolerance
    (term magnitudes bounded from the inputs and input gradients of the two calls run as one sequence: no reset
    between them)."""
    w = torch.as_tensor([-math.log(case.tau - 1.0)])
    x, grad_x = torch.cat(xs), torch.cat(grads)
    scale = plif_w_term_scale(replace(case, T=x.shape[0]), x, None, w, grad_x)
    assert_close(got, ref, "grad of w", dtype=torch.float32, reduce_dim=n_terms(*xs), term_scale=scale)


def check_against_reference(case: Case, backend: str, steps=(3, 2), step_mode: str = "m",
                            device: str = "cpu") -> None:
    xs, gs, gv = sequence_inputs(case, steps)
    ours = make_ours(case, backend, step_mode)
    if case.kind == "plif":  # same starting w, bit for bit (both compute -ln(init_tau - 1) in float64 -> fp32)
        assert_equal(ours.w.detach(), torch.as_tensor(-math.log(case.tau - 1.0)), "initial w")
    spikes, v, grads = run_module(ours, step_mode, xs, gs, gv, device)
    ref_spikes, ref_v, ref_grads = reference(case, step_mode, xs, gs, gv)
    for i, (s, r) in enumerate(zip(spikes, ref_spikes)):
        assert_equal(s, r, f"spikes of call {i}")
    assert_close(v, ref_v, "final v", dtype=torch.float32)
    for i, (g, r) in enumerate(zip(grads[:len(xs)], ref_grads[:len(xs)])):
        assert_close(g, r, f"grad of the input of call {i}", dtype=case.dtype)
    # With |x| ~ 1e30 the membrane stays ~1e29 for a few steps, and w's gradient becomes a sum of +-1e29 terms
    # that cancel: its fp32 value then depends on the summation order (spikingjelly's module and autograd sum
    # over neurons per step, the op per neuron over time), so it is only compared for moderate inputs.
    # The spikes, v and input gradients above are compared in every case.
    if case.kind == "plif" and max(x.float().abs().max().item() for x in xs) < 1e6:
        check_w_grad(case, xs, grads[:len(xs)], grads[-1], ref_grads[-1])


PARITY_CASES = cases(dtypes=(torch.float32, torch.float32, torch.bfloat16, torch.float16), affine=False,
                     layouts=("contiguous",), shapes=((1,), (7,), (13,), (3, 5), (2, 3, 4)),
                     thresholds=st.sampled_from([1.0, 0.5]) | st.floats(0.05, 3.0), max_T=5)
STEPS = st.tuples(st.integers(1, 5), st.integers(1, 4))

# Each example takes a few milliseconds: three times the profile's example count.
_MORE = settings(max_examples=3 * settings().max_examples)


@_MORE
@given(case=PARITY_CASES, steps=STEPS, step_mode=st.sampled_from(["m", "s"]))
@example(case=Case(kind="if", v_reset=None, surrogate="atan", detach_reset=True), steps=(1, 1), step_mode="m")
@example(case=Case(kind="plif", dtype=torch.bfloat16, special_frac=0.5), steps=(1, 3), step_mode="s")
@example(case=Case(kind="lif", tau=1.5, decay_input=False, v_reset=0.3, dtype=torch.float16, scale=30.0),
         steps=(3, 2), step_mode="m")
# Found by Hypothesis: +-1e30 inputs make w's gradient order-dependent (see check_against_reference).
@example(case=Case(kind="plif", tau=4.0, surrogate="atan", scale=0.3, seed=2_147_483_647), steps=(4, 4),
         step_mode="m")
def test_parity_op_backend(case: Case, steps, step_mode: str) -> None:
    """``backend="triton"``: the custom op (its CPU path here)."""
    check_against_reference(case, "triton", steps, step_mode)


@_MORE
@given(case=PARITY_CASES, steps=STEPS, step_mode=st.sampled_from(["m", "s"]))
@example(case=Case(kind="plif", v_reset=-0.5, surrogate="erf"), steps=(1, 1), step_mode="s")
def test_parity_torch_backend(case: Case, steps, step_mode: str) -> None:
    """``backend="torch"``: plain autograd through the Python loop."""
    check_against_reference(case, "torch", steps, step_mode)


@pytest.mark.parametrize("name", SURROGATE_NAMES)
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_parity_every_kind_and_surrogate(kind: str, name: str) -> None:
    """A fixed sweep so that every (neuron, surrogate) pair is covered whatever Hypothesis draws."""
    i = SURROGATE_NAMES.index(name)
    case = Case(kind=kind, surrogate=name, alpha=[None, 0.7, 3.0][i % 3], v_reset=[0.0, None, -0.5][i % 3],
                detach_reset=bool(i % 2), decay_input=bool(i % 3), tau=1.8, v_threshold=0.8,
                shape=(2, 9), scale=2.0, special_frac=0.2, seed=i)
    check_against_reference(case, "triton", steps=(4, 3))
    check_against_reference(case, "torch", steps=(4, 3), step_mode="s")


@pytest.mark.parametrize("save", ["h_bf16", "input"])
def test_save_modes_spikes_equal_spikingjelly(save: str) -> None:
    """Every save mode gives spikingjelly's spikes; "input" also its gradients (it recomputes the forward)."""
    case = Case(kind="plif", shape=(5, 7), v_reset=None, special_frac=0.2)
    xs, gs, gv = sequence_inputs(case, (4, 2))
    spikes, v, grads = run_module(make_ours(case, "triton", "m", save=save), "m", xs, gs, gv)
    ref_spikes, ref_v, ref_grads = reference(case, "m", xs, gs, gv)
    for s, r in zip(spikes, ref_spikes):
        assert_equal(s, r, f"spikes (save={save})")
    assert_close(v, ref_v, "final v")
    if save == "input":
        for g, r in zip(grads[:-1], ref_grads[:-1]):
            assert_close(g, r, "grad of the input (save='input')")


@pytest.mark.parametrize("case,step_mode", [
    (Case(kind="plif", v_reset=None, surrogate="atan", shape=(4, 6), special_frac=0.2), "m"),
    (Case(kind="lif", tau=1.5, v_reset=-0.5, detach_reset=True, dtype=torch.bfloat16, shape=(3, 7), scale=3.0,
          special_frac=0.3, seed=3), "s"),
], ids=["plif-fp32-m", "lif-bf16-s"])
def test_triton_kernels_module_equals_spikingjelly(case: Case, step_mode: str, kernel_device: str) -> None:
    """The module on the Triton kernels (interpreter on CPU, compiled on a GPU) against spikingjelly."""
    steps = (3, 2) if step_mode == "m" else (2, 1)
    if kernel_device == "cpu" and not runtime.interpreter_enabled():
        pytest.skip("no GPU and TRITON_INTERPRET is off: the Triton kernels cannot run here")
    if kernel_device == "cpu":
        with runtime.cpu_kernels("triton"):
            check_against_reference(case, "triton", steps, step_mode, device="cpu")
    else:
        check_against_reference(case, "triton", steps, step_mode, device=kernel_device)
