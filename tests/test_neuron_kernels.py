"""The fused Triton neuron kernels against the plain-PyTorch reference, and the layering of the neuron family.

On a machine without a GPU the kernels run through Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1`` from
conftest, ``cpu_kernels("triton")``); on a GPU the same tests run the compiled kernels on CUDA tensors, with the
reference on CPU copies of the same inputs.

Exact (bit for bit, any input dtype, since all arithmetic is fp32 on the converted input): spikes, final membrane,
saved fp32 ``H`` and saved bf16 ``H - v_threshold``. Gradients: the tolerance table of ``revsnn_triton.testing``
for the gradient's dtype (the kernels' ``exp``/``sigmoid`` round differently from PyTorch's, by an ulp or so).
Outputs of the launchers are pre-filled with NaN, so an element a kernel fails to write fails the comparison.
The byte plan of the spec is compared with the bytes the interpreted kernels really read and write.
"""
from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings

from revsnn_triton.ops.neuron import multistep_neuron, neuron_backward, neuron_forward
from revsnn_triton.ops.neuron.reference import (decode_saved, encode_saved, initial_membrane,
                                                neuron_backward_reference, neuron_forward_reference)
from revsnn_triton.ops.neuron.spec import (MAX_RECOMPUTE_T, SAVE_PLANS, backward_traffic, empty_neuron_layout,
                                           forward_traffic)
from revsnn_triton.testing import assert_close, assert_equal
from revsnn_triton.testing.strategies import LAYOUTS, SURROGATE_NAMES, NeuronCase as Case, make_inputs
from revsnn_triton.testing.strategies import neuron_cases as cases
from neuron_cases import (KERNEL_DEVICE, affine_kwargs, affine_views, config, kernels_on, make_affine,
                          recorded_accesses)

K = pytest.importorskip("revsnn_triton.kernels.neurons")
# Triton's interpreter evaluates exp() of huge arguments with numpy, which warns about the (intended) inf.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
REPO = Path(__file__).resolve().parents[1]


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.fill_(float("nan"))


def poisoned(x, specs):
    """NaN-filled outputs in the neuron layout of ``x``: one per ``(dtype or None, with_time)``."""
    return tuple(None if d is None else _nan_like(empty_neuron_layout(x, d, w)) for d, w in specs)


def run_launchers(case: Case, device: str, save: str, block_size: int | None = None, *, v_init_const: bool = True,
                  grad_v_final: bool = True, need_grad_v_init: bool = True):
    """Forward and backward launchers on ``device`` with NaN-poisoned outputs; results on CPU.

    Without ``case.random_v_init`` the launchers get ``v_init=None`` (the constant initial state, not read),
    or with ``v_init_const=False`` that state materialized; ``grad_v_final=False`` passes None (zero, not read)
    instead of the random gradient; ``need_grad_v_init=False`` asks for no grad of v_init (returned None)."""
    x, v_init, w, grad_s, grad_v = make_inputs(case, device)
    cfg = config(case, x)
    scale, shift = make_affine(case, device)
    v0 = v_init
    if v_init is None and not v_init_const:
        v0 = initial_membrane(x, case.v_reset)
    q = None if w is None else torch.sigmoid(w.float())
    plan = SAVE_PLANS[save]
    out = poisoned(x, [(x.dtype, True), (torch.float32, False), (plan.saved_dtype, True)])
    kw = dict(block_size=block_size, num_warps=1 if block_size else None)
    fwd = K.neuron_forward(x, v0, q, cfg, save, scale, shift, out=out, **kw)
    assert all(a is b for a, b in zip(fwd, out)), "the launcher must write into the given outputs"
    affine_grad = scale is not None
    bwd_out = poisoned(x, [(x.dtype, True), (torch.float32 if need_grad_v_init else None, False),
                           (torch.float32 if cfg.kind == "plif" else None, False),
                           (torch.float32 if affine_grad else None, False), (torch.float32 if affine_grad else None, False)])
    bwd = K.neuron_backward(grad_s, grad_v if grad_v_final else None, fwd[2], x, v0, q, cfg, save, scale, shift,
                            need_grad_v_init=need_grad_v_init, out=bwd_out, **kw)
    cpu = lambda ts: tuple(None if t is None else t.cpu() for t in ts)  # noqa: E731
    return cpu(fwd), cpu(bwd)


def reference(case: Case, save: str = "h", grad_v_final: bool = True):
    """Forward ``(spikes, v_final, H)`` and backward of the reference on the case's CPU inputs (H as the save mode
    keeps it: bf16-decoded for ``"h_bf16"``)."""
    x, v_init, w, grad_s, grad_v = make_inputs(case, "cpu")
    cfg = config(case, x)
    v0 = initial_membrane(x, case.v_reset) if v_init is None else v_init
    q = None if w is None else torch.sigmoid(w.float()).reshape(())
    affine = affine_views(case, cfg, x)
    spikes, v_final, h = neuron_forward_reference(x, v0, q, cfg, affine=affine)
    h_used, s_used = decode_saved(encode_saved(h, save, cfg.v_threshold), save, cfg.v_threshold) \
        if save == "h_bf16" else (h, None)
    bwd = neuron_backward_reference(grad_s, grad_v if grad_v_final else torch.zeros_like(grad_v), h_used, s_used,
                                    x, v0, q, cfg, affine=affine)
    return (spikes, v_final, h), bwd


def check_gradients(case: Case, bwd, ref_bwd) -> None:
    grad_x, grad_v, w_partial, scale_partial, shift_partial = bwd
    ref_x, ref_v, ref_w, ref_scale, ref_shift = ref_bwd
    assert_close(grad_x, ref_x.to(case.dtype), "grad_x", dtype=case.dtype)
    assert_close(grad_v, ref_v, "grad_v_init", dtype=torch.float32)
    if case.kind == "plif":
        assert_close(w_partial, ref_w, "PLIF w partials", dtype=torch.float32)
    if case.channel_dim is not None:
        assert_close(scale_partial, ref_scale, "scale partials", dtype=torch.float32)
        assert_close(shift_partial, ref_shift, "shift partials", dtype=torch.float32)
    else:
        assert scale_partial is None and shift_partial is None


def check_case(case: Case, device: str) -> None:
    with kernels_on(device):
        (spikes, v_final, h), bwd = run_launchers(case, device, save="h")
    (ref_spikes, ref_v, ref_h), ref_bwd = reference(case)
    assert_equal(spikes, ref_spikes, "spikes")
    assert_equal(v_final, ref_v, "v_final")
    assert_equal(h, ref_h, "saved H")
    check_gradients(case, bwd, ref_bwd)


# Each example takes ~0.1 s: three times the profile's example count.
@settings(max_examples=3 * settings().max_examples)
@given(case=cases())
@example(case=Case(kind="if", T=1, shape=(1,), v_reset=None, surrogate="atan", alpha=2.0))
@example(case=Case(kind="plif", T=6, shape=(131,), layout="expand", v_reset=None, dtype=torch.bfloat16))
@example(case=Case(kind="lif", tau=1.5, T=4, shape=(2, 3, 4), layout="channels_last", v_threshold=0.0,
                   v_reset=-1.0, special_frac=0.6, dtype=torch.float16, surrogate="erf", alpha=2.0))
# Found by Hypothesis: bf16 subnormals (the interpreter's .to(float32) flushed them to zero).
@example(case=Case(kind="if", tau=1.5, decay_input=False, surrogate="atan", alpha=2.0, T=1, shape=(131,),
                   dtype=torch.bfloat16, random_v_init=False, scale=0.3, w=0.0))
# Found by Hypothesis: PLIF without decay_input and an affine input took decay_input's dH/dq.
@example(case=Case(kind="plif", tau=1.5, decay_input=False, surrogate="atan", T=1, shape=(1,), random_v_init=False,
                   scale=0.3, special_frac=0.0, w=0.0, channel_dim=0))
def test_kernels_equal_reference(case: Case) -> None:
    check_case(case, KERNEL_DEVICE)


@pytest.mark.parametrize("name", SURROGATE_NAMES)
@pytest.mark.parametrize("kind", ["if", "lif", "plif"])
def test_every_kind_and_surrogate(kind: str, name: str, kernel_device: str) -> None:
    check_case(Case(kind=kind, surrogate=name, T=3, shape=(37,), v_reset=None if kind == "lif" else 0.0,
                    detach_reset=kind == "if", scale=2.0), kernel_device)


@pytest.mark.parametrize("tau", [2.0, 4.0, 64.0, 2.0**100, 1.5])
@pytest.mark.parametrize("decay_input", [True, False])
def test_lif_division_by_a_power_of_two_is_a_bit_identical_multiplication(tau: float, decay_input: bool,
                                                                         kernel_device: str) -> None:
    """For tau = 2^k the kernels multiply by 1/tau instead of dividing (tau=1.5 still divides): spikes, v_final
    and H bit-equal to the reference's division, with subnormal, huge and threshold-exact inputs."""
    check_case(Case(kind="lif", tau=tau, decay_input=decay_input, T=5, shape=(3, 41), special_frac=0.6, scale=3.0,
                    v_reset=-0.25 if decay_input else 0.0, dtype=torch.float32, seed=int(tau) % 97), kernel_device)


def test_saved_bf16_matches_reference_encoding(kernel_device: str) -> None:
    """``h_bf16`` stores round-to-nearest-even ``bf16(H - v_threshold)`` (as ``Tensor.to(bfloat16)``) and
    the backward uses exactly the decoded values (so its gradients equal the reference's on the same data)."""
    case = Case(kind="plif", T=5, shape=(67,), v_reset=None, scale=3.0, special_frac=0.3, layout="time_inner")
    with kernels_on(kernel_device):
        (spikes, _, saved), bwd = run_launchers(case, kernel_device, save="h_bf16")
    (ref_spikes, _, ref_h), ref_bwd = reference(case, save="h_bf16")
    assert_equal(spikes, ref_spikes, "spikes")
    assert_equal(saved, encode_saved(ref_h, "h_bf16", case.v_threshold), "saved bf16 H - v_threshold")
    check_gradients(case, bwd, ref_bwd)


def check_same_gradients(got, expected, what: str) -> None:
    for a, b, name in zip(got, expected, ("grad_x", "grad_v_init", "w partials", "scale partials",
                                          "shift partials")):
        if b is not None:
            assert_equal(a, b, f"{name}: {what}")


# Each example takes ~0.15 s (two forward + backward runs).
@given(case=cases())
@example(case=Case(kind="plif", T=6, shape=(131,), layout="expand", v_reset=None, dtype=torch.bfloat16))
@example(case=Case(kind="plif", T=5, shape=(2, 3, 4), layout="time_inner", decay_input=True, random_v_init=False,
                   special_frac=0.6, dtype=torch.float16, surrogate="piecewise_exp", alpha=1.0))
@example(case=Case(kind="plif", T=4, shape=(2, 3, 4), layout="channels_last", channel_dim=1, dtype=torch.bfloat16))
def test_recompute_backward_equals_saved_h(case: Case) -> None:
    """save="input" (H recomputed in registers by the backward kernel) gives gradients bit-identical to
    save="h" (H written by the forward and read back): same arithmetic in the same order."""
    with kernels_on(KERNEL_DEVICE):
        fwd_h, bwd_h = run_launchers(case, KERNEL_DEVICE, save="h")
        fwd_in, bwd_in = run_launchers(case, KERNEL_DEVICE, save="input")
    assert_equal(fwd_in[0], fwd_h[0], "spikes")
    assert_equal(fwd_in[1], fwd_h[1], "v_final")
    check_same_gradients(bwd_in, bwd_h, "save='input' vs 'h'")


def test_recompute_beyond_register_bound_falls_back(kernel_device: str) -> None:
    """T > MAX_RECOMPUTE_T: the forward kernel re-runs into a transient H; still bit-identical to save="h"."""
    T = MAX_RECOMPUTE_T + 1
    case = Case(kind="plif", T=T, shape=(3, 7), layout="transposed", v_reset=None, scale=2.0, channel_dim=0)
    with kernels_on(kernel_device):
        (_, bwd_h), (_, bwd_in) = (run_launchers(case, kernel_device, save=s) for s in ("h", "input"))
        (_, bwd_short) = run_launchers(Case(kind="plif", T=MAX_RECOMPUTE_T, shape=(3, 7)), kernel_device, "input")
    check_same_gradients(bwd_in, bwd_h, f"T={T}, save='input' vs 'h'")
    assert not torch.isnan(bwd_short[0]).any(), "the longest fused case writes every gradient"


@pytest.mark.parametrize("save", ["h", "input", "h_bf16"])
@pytest.mark.parametrize("kind", ["lif", "plif"])
def test_skipped_traffic_changes_nothing(kind: str, save: str, kernel_device: str) -> None:
    """The constant initial state not read (v_init=None), a zero grad of v_final not read (None), grad of
    v_init not written: every other result bit-identical to the run that reads / writes them."""
    case = Case(kind=kind, T=4, shape=(5, 23), v_reset=-0.5 if kind == "lif" else None, random_v_init=False,
                scale=2.0, layout="channels_last")
    with kernels_on(kernel_device):
        const = run_launchers(case, kernel_device, save)
        full = run_launchers(case, kernel_device, save, v_init_const=False)
        no_gv = run_launchers(case, kernel_device, save, grad_v_final=False)
        no_gv_init = run_launchers(case, kernel_device, save, need_grad_v_init=False)
    for a, b, what in zip(const[0], full[0], ("spikes", "v_final", "saved")):
        if b is not None:
            assert_equal(a, b, f"{what}: v_init=None vs materialized")
    check_same_gradients(const[1], full[1], "v_init=None vs materialized")
    skip_v_init = lambda grads: (grads[0], None, *grads[2:])  # noqa: E731
    check_same_gradients(skip_v_init(no_gv_init[1]), skip_v_init(const[1]), "grad of v_init not requested")
    assert no_gv_init[1][1] is None
    # grad_v_final=None is the zero gradient: compare with the reference backward given zeros
    x, _, _, _, grad_v = make_inputs(case)
    assert not torch.equal(grad_v, torch.zeros_like(grad_v))
    _, ref_zero = reference(case, save=save if save == "h_bf16" else "h", grad_v_final=False)
    check_gradients(case, no_gv[1], ref_zero)


def test_saved_bf16_rounds_ties_to_even(kernel_device: str) -> None:
    """Halfway cases (low 16 bits exactly 0x8000) round to the even bf16 neighbour, as ``Tensor.to`` does."""
    ulp = 2.0 ** -7  # bf16 spacing in [1, 2)
    ties = torch.tensor([1 + ulp / 2, 1 + 3 * ulp / 2, -(1 + ulp / 2), -(1 + 3 * ulp / 2), 2 ** -130 * 1.5,
                         1 + ulp / 2 + 2 ** -20, 3.0, -0.0])
    x = ties.reshape(1, -1).to(kernel_device)
    cfg = config(Case(kind="if", v_threshold=0.0), x)
    with kernels_on(kernel_device):
        _, _, saved = K.neuron_forward(x, torch.zeros_like(x[0]), None, cfg, "h_bf16")
    expected = ((torch.zeros_like(ties) + ties) - 0.0).to(torch.bfloat16)  # H = 0 + x (so -0.0 becomes +0.0)
    assert_equal(saved.cpu(), expected.reshape(1, -1), "bf16 rounding of H - v_threshold")


def test_bf16_sign_never_flips_spike() -> None:
    """Values just below the threshold whose difference rounds to -0.0 in bf16 still decode as "no spike"."""
    th = 1.0
    h = torch.tensor([th, th - 1e-30, th - 1e-7, th + 1e-7, th - 2.0, th + 2.0, -0.0, 0.0])
    _, spikes = decode_saved(encode_saved(h, "h_bf16", th), "h_bf16", th)
    assert_equal(spikes, (h >= th).float(), "spikes decoded from bf16")


@pytest.mark.parametrize("save", ["h", "input", "h_bf16"])
def test_launch_configs_bit_identical(save: str, kernel_device: str) -> None:
    case = Case(kind="plif", T=4, shape=(5, 41), layout="transposed", v_reset=None, scale=2.0, channel_dim=1)
    results = []
    with kernels_on(kernel_device):
        for block in (32, 64, 128):
            results.append(run_launchers(case, kernel_device, save=save, block_size=block))
    (fwd0, bwd0) = results[0]
    for block, (fwd, bwd) in zip((64, 128), results[1:]):
        for a, b, what in zip(fwd + bwd, fwd0 + bwd0, ("spikes", "v_final", "saved", "grad_x", "grad_v_init",
                                                       "w partials", "scale partials", "shift partials")):
            if b is not None:
                assert_equal(a, b, f"{what} with block {block} vs 32")


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: dims of size > 1, by decreasing stride, have strides of a packed array."""
    step = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride != step:
            return False
        step *= size
    return True


@pytest.mark.parametrize("layout", LAYOUTS)
def test_outputs_keep_dense_layout(layout: str, kernel_device: str) -> None:
    """Outputs are dense, time outermost, inner dims in x's stride order: channels_last stays channels_last."""
    case = Case(T=2, shape=(2, 3, 4, 5), layout=layout)
    x, _, _, _, _ = make_inputs(case, kernel_device)
    with kernels_on(kernel_device):
        spikes, v = multistep_neuron(x, tau=2.0)
    assert _is_dense(spikes) and _is_dense(v)
    assert spikes.stride(0) == v.numel()
    if layout in ("contiguous", "expand", "sliced", "time_inner"):
        assert spikes.is_contiguous() and v.is_contiguous()
    if layout == "channels_last":
        assert spikes[0].is_contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        assert spikes.stride()[1:] == x.stride()[1:]


def test_expand_reads_in_place(kernel_device: str) -> None:
    """A time stride of 0 is passed to the kernel as is: no copy of the expanded input."""
    x = torch.randn(1, 50, device=kernel_device).expand(4, 50)
    _, geometry = K._x_geometry(x)
    assert geometry[0] == 0 and geometry[6] == 1  # time stride 0, one dim
    with kernels_on(kernel_device):
        spikes, _ = multistep_neuron(x, tau=2.0)
    ref, _ = multistep_neuron(x.cpu().contiguous(), tau=2.0)
    assert_equal(spikes.cpu(), ref, "spikes of an expanded input")


@pytest.mark.parametrize("kind", ["if", "plif"])
def test_zero_neurons(kind: str, kernel_device: str) -> None:
    x = torch.zeros(3, 0, 4, device=kernel_device, requires_grad=True)
    w = torch.zeros(1, device=kernel_device, requires_grad=True) if kind == "plif" else None
    with kernels_on(kernel_device):
        spikes, v = multistep_neuron(x, w=w)
        spikes.sum().backward()
    assert spikes.shape == (3, 0, 4) and v.shape == (0, 4) and x.grad.shape == x.shape
    if w is not None:
        assert_equal(w.grad, torch.zeros(1, device=kernel_device), "grad w of no neurons")


def test_many_dims_fall_back_to_copy() -> None:
    """Strides that need more than MAX_DIMS dims after coalescing are copied into the neuron layout first."""
    base = torch.randn(2, 3, 5, 7, 11, 13)[:, ::2, :, ::2, :, ::2]  # 5 dims that cannot merge
    assert K.coalesced_dims(base) is None
    x, geometry = K._x_geometry(base)
    assert x.is_contiguous() and geometry[6] == 1


@pytest.mark.parametrize("save", ["h", "h_bf16", "input"])
@pytest.mark.parametrize("affine", [False, True])
def test_op_gradients_equal_reference(save: str, affine: bool, kernel_device: str) -> None:
    """Autograd through ``multistep_neuron`` with the kernels vs with the CPU backend, for x, v_init and w,
    and scale and shift (sums over 4 x 3 steps and neurons per channel)."""
    case = Case(kind="plif", T=4, shape=(3, 29), v_reset=-0.5, surrogate="soft_sign", alpha=2.0,
                layout="channels_last" if kernel_device == "cpu" else "transposed", scale=2.0,
                channel_dim=-1 if affine else None)

    def run(device: str, kernels: bool):
        x, v_init, w, grad_s, grad_v = make_inputs(case, device)
        kw = affine_kwargs(case, device)
        leaves = [x, v_init, w] + [kw[k] for k in ("scale", "shift") if k in kw]
        for t in leaves:
            t.requires_grad_()
        with kernels_on(device) if kernels else contextlib.nullcontext():
            spikes, v = multistep_neuron(x, v_init, w=w, **case.kwargs(), save=save, **kw)
            grads = torch.autograd.grad((spikes * grad_s).sum() + (v * grad_v).sum(), leaves)
        return [t.detach().cpu() for t in (spikes, v, *grads)]

    got, ref = run(kernel_device, kernels=True), run("cpu", kernels=False)
    assert_equal(got[0], ref[0], "spikes")
    assert_equal(got[1], ref[1], "v_final")
    for a, b, what in zip(got[2:], ref[2:], ("x", "v_init", "w", "scale", "shift")):
        assert_close(a, b, f"grad {what}", reduce_dim=1 if what in ("x", "v_init") else 12)


@pytest.mark.parametrize("affine", [False, True])
def test_opcheck_kernel_path(affine: bool, kernel_device: str) -> None:
    case = Case(kind="plif", T=3, shape=(5, 7), layout="transposed", channel_dim=0 if affine else None)
    x, v_init, w, grad_s, grad_v = make_inputs(case, kernel_device)
    scale, shift = make_affine(case, kernel_device)
    cfg = config(case, x)
    scalars = (cfg.kind, cfg.tau, cfg.decay_input, cfg.v_threshold, cfg.hard_reset, cfg.v_reset, cfg.detach_reset,
               cfg.surrogate, cfg.alpha)
    channel_dim = cfg.channel_dim or 0
    with kernels_on(kernel_device):
        for save in ("h", "input"):
            req = [t.requires_grad_() if t is not None else None for t in (x, w, scale, shift)]
            torch.library.opcheck(neuron_forward, (req[0], v_init, req[1], *scalars, save, req[2], req[3],
                                                   channel_dim))
            det = [t.detach() if t is not None else None for t in (x, w, scale, shift)]
            saved = neuron_forward(det[0], v_init, det[1], *scalars, save, det[2], det[3], channel_dim)[2]
            torch.library.opcheck(neuron_backward, (grad_s, grad_v, saved, det[0], v_init, det[1], *scalars, save,
                                                    True, det[2], det[3], channel_dim, True))


# ------------------------------------------------------------------------- the byte plan vs real accesses

BYTE_PLAN_CASES = [
    # kind, decay_input, save, T, dtype, affine, v_init given, store v_final, grad_v_final given, grad v_init
    ("lif", True, "input", 4, torch.float32, False, False, False, False, False),  # the benchmark's call
    ("lif", True, "input", 4, torch.bfloat16, False, False, True, False, False),
    ("lif", True, "h", 4, torch.float32, False, True, True, True, True),
    ("lif", True, "h_bf16", 3, torch.bfloat16, False, False, True, False, False),
    ("plif", True, "input", 3, torch.float32, False, True, True, True, True),
    ("plif", False, "h", 3, torch.float16, False, True, False, False, True),
    ("if", True, "input", 4, torch.bfloat16, True, False, False, False, False),  # affine input, fused backward
    ("plif", True, "h", 3, torch.float32, True, True, True, True, False),
    ("lif", True, "input", MAX_RECOMPUTE_T + 1, torch.float32, True, True, False, False, True),  # transient H
]


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="counts accesses through Triton's interpreter")
@pytest.mark.parametrize("kind,decay_input,save,T,dtype,affine,given_v_init,store_v_final,given_grad_v,"
                         "grad_v_init", BYTE_PLAN_CASES)
def test_byte_plan_matches_kernel_accesses(kind, decay_input, save, T, dtype, affine, given_v_init, store_v_final,
                                           given_grad_v, grad_v_init, monkeypatch) -> None:
    """The spec's byte plan (what the benchmark's bandwidth fractions are computed from) equals, tensor by
    tensor, the bytes the kernels read and write: an unused store (v_final nobody reads), a second pass over x
    or a missed read would all show here."""
    case = Case(kind=kind, decay_input=decay_input, T=T, shape=(4, 37), dtype=dtype, random_v_init=given_v_init,
                channel_dim=1 if affine else None, v_reset=None if kind == "plif" else 0.0)
    x, v_init, w, grad_s, grad_v = make_inputs(case)
    scale, shift = make_affine(case)
    cfg = config(case, x)
    q = None if w is None else torch.sigmoid(w.float())
    n, C = x[0].numel(), case.shape[1]
    plan = SAVE_PLANS[save]
    spikes, v_final, saved = poisoned(x, [(dtype, True), (torch.float32 if store_v_final else None, False),
                                          (plan.saved_dtype, True)])
    tensors = dict(x=x, v_init=v_init, q=q, scale=scale, shift=shift, spikes=spikes, v_final=v_final, saved=saved)
    with kernels_on("cpu"), recorded_accesses(monkeypatch, tensors) as log:
        K.neuron_forward(x, v_init, q, cfg, save, scale, shift, store_v_final=store_v_final,
                         out=(spikes, v_final, saved))
    expected = forward_traffic(save, cfg, T, n, dtype, channels=C, v_init_given=given_v_init,
                               store_v_final=store_v_final)
    assert log.plain() == (expected.reads, expected.writes), "forward"

    outs = poisoned(x, [(dtype, True), (torch.float32 if grad_v_init else None, False),
                        (torch.float32 if kind == "plif" else None, False),
                        (torch.float32 if affine else None, False), (torch.float32 if affine else None, False)])
    names = ("grad_x", "grad_v_init", "w_partial", "scale_partial", "shift_partial")
    tensors = dict(grad_spikes=grad_s, grad_v_final=grad_v if given_grad_v else None, saved=saved, x=x,
                   v_init=v_init, q=q, scale=scale, shift=shift, **dict(zip(names, outs)))
    with kernels_on("cpu"), recorded_accesses(monkeypatch, tensors) as log:
        K.neuron_backward(grad_s, grad_v if given_grad_v else None, saved, x, v_init, q, cfg, save, scale, shift,
                          need_grad_v_init=grad_v_init, out=outs)
    expected = backward_traffic(save, cfg, T, n, dtype, channels=C, v_init_given=given_v_init,
                                grad_v_final_given=given_grad_v, need_grad_v_init=grad_v_init)
    assert log.plain() == (expected.reads, expected.writes), "backward"


# ------------------------------------------------------------------------------------------- layering

def _module_imports(path: Path) -> set[str]:
    """Every module a file imports, at any level (``from . import x`` resolved inside the package)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}: relative import of {node.module}")
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((REPO / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_kernels_import_only_their_spec_and_the_launch_leaf(path: Path) -> None:
    """``kernels/`` imports nothing of the package above it but an op family's spec and the launch-config leaf."""
    ours = {m for m in _module_imports(path) if m.startswith("revsnn_triton")}
    allowed = {"revsnn_triton", "revsnn_triton.launch"}
    assert all(m in allowed or (m.startswith("revsnn_triton.ops.") and m.endswith(".spec")) for m in ours), ours
    if "revsnn_triton" in ours:  # `from revsnn_triton import launch` only
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "revsnn_triton"
                 for a in n.names}
        assert names <= {"launch"}, names


def test_leaves_import_no_layer_above_them() -> None:
    """The spec and the launch-config leaf import nothing of the package; the neuron family's CPU path and op
    import the kernels only inside functions (on first use), never at module level."""
    for leaf in ("revsnn_triton/ops/neuron/spec.py", "revsnn_triton/launch.py"):
        assert not {m for m in _module_imports(REPO / leaf) if m.startswith("revsnn_triton")}, leaf
    for module in ("revsnn_triton/ops/neuron/op.py", "revsnn_triton/ops/neuron/cpu.py",
                   "revsnn_triton/ops/neuron/reference.py"):
        tree = ast.parse((REPO / module).read_text())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)} | {
            a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.startswith(("triton", "revsnn_triton.kernels")) for m in top), (module, top)


def test_neuron_family_imports_no_triton() -> None:
    """Importing the package and reaching the neuron op, modules, tuner and benchmarks loads no triton module
    (a fresh interpreter, no GPU needed), and a call on CPU tensors never loads the kernel file: the kernels
    load on first use. (The reversible engine imports torch._dynamo, which imports triton, and so does the
    first call of any custom op with autograd, inside torch.)"""
    import os
    import subprocess
    import sys
    probe = ("import sys, torch, revsnn_triton\n"
             "revsnn_triton.multistep_neuron, revsnn_triton.IFNode, revsnn_triton.surrogate\n"
             "import revsnn_triton.ops.neuron, revsnn_triton.tuning, revsnn_triton.launch\n"
             "import revsnn_triton.bench.neurons, revsnn_triton.bench.static\n"
             "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('triton.')))\n"
             "x = torch.randn(3, 4, requires_grad=True)\n"
             "s, v = revsnn_triton.multistep_neuron(x, tau=2.0)\n"
             "s.sum().backward()\n"
             "print('revsnn_triton.kernels.neurons' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "REVSNN_CPU_KERNELS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-2:] == ["[]", "False"], out.stdout
