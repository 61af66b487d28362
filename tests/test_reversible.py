"""The reversible engine: exact reconstruction, gradients equal to ordinary autograd on the same
quantized math, BatchNorm statistics updated once, the exactness guard, and input validation.

The random branches, sequences and inputs come from ``revsnn_triton.testing.strategies``; ``DEVICE``,
``check_grads`` and ``CallCounter`` from ``reversible_cases``, shared with the other ``test_reversible_*`` files.
"""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given

from revsnn_triton.ops import coupling as C
from revsnn_triton.reversible import ReconstructionError, RevBlock, RevSequence
from revsnn_triton.runtime import cpu_kernels
from revsnn_triton.testing import (assert_close, assert_equal, assert_invertible, grad_tolerance,
                                   record_streams)
from revsnn_triton.testing.strategies import engine_cases, input_for, make_branch, make_sequence
from reversible_cases import DEVICE, CallCounter, check_grads

def run_steps(seq: RevSequence, case: dict, steps: int, rec: dict | None = None):
    """``steps`` SGD steps on fresh inputs; returns per-step (output, input grad, param grads, RNG state)."""
    opt = torch.optim.SGD(seq.parameters(), lr=0.05)
    out = []
    for step in range(steps):
        x = input_for(case["kind"], case["T"], case["B"], case["width"], case["size"], case["scale"],
                      case["seed"] + step) + case.get("offset", 0.0)
        x = x.to(DEVICE).requires_grad_()
        w = torch.randn(x.shape, generator=torch.Generator().manual_seed(step)).to(DEVICE)
        torch.manual_seed(1000 + step)  # same dropout masks in both modes
        y = seq(x)
        (y * w).sum().backward()
        out.append((y.detach(), x.grad, [p.grad.clone() for p in seq.parameters()], torch.get_rng_state()))
        opt.step()
        opt.zero_grad(set_to_none=False)
    return out


@given(engine_cases())
# Found by Hypothesis: BatchNorm's CPU backward reduces in a layout-dependent order, and the
# reversible=False run handed it non-contiguous gradients (fixed: the STE coupling's backward makes them
# contiguous, as the engine does).
@example(dict(kind="conv", depth=1, T=1, B=2, width=1, size=2, scale=1e-3, frac_bits=8, neuron="if", bn=True,
              dropout=0.0, seed=0))
def test_reconstruction_exact_and_gradients_match_autograd(case):
    check_engine_case(case)


def check_engine_case(case: dict) -> list:
    """Run ``case`` reversible and with ``reversible=False``; outputs, gradients, every rebuilt block input
    and the BatchNorm statistics must agree (bit for bit on CPU). Returns the reversible run's steps."""
    kw = dict(neuron=case["neuron"], bn=case["bn"], dropout=case["dropout"], frac_bits=case["frac_bits"],
              seed=case["seed"])
    rev = make_sequence(case["kind"], case["depth"], case["width"], **kw).to(DEVICE)
    base = copy.deepcopy(rev)
    base.reversible = False
    rec = record_streams(rev)
    rec_base = record_streams(base)
    got = run_steps(rev, case, 2)
    want = run_steps(base, case, 2)
    for step, ((y, gx, gp, rng), (y0, gx0, gp0, rng0)) in enumerate(zip(got, want)):
        assert_equal(y, y0, f"output, step {step}")
        assert_equal(rng, rng0, f"RNG state after step {step}")
        check_grads([gx, *gp], [gx0, *gp0], f"step {step}")
    # every block input rebuilt in backward is the one the forward saw, bit for bit
    for i in range(case["depth"]):
        assert len(rec["backward"][i]) == len(rec["forward"][i]) == 2
        for (f1, f2), (b1, b2), (o1, o2) in zip(rec["forward"][i], rec["backward"][i], rec_base["forward"][i]):
            assert_equal(b1, f1, f"block {i} X1 rebuilt")
            assert_equal(b2, f2, f"block {i} X2 rebuilt")
            assert_equal(f1, o1, f"block {i} X1 vs reversible=False")
            assert_equal(f2, o2, f"block {i} X2 vs reversible=False")
    # BatchNorm running statistics after the steps: updated once per step, to the same values. They
    # depend on the parameters, hence on the gradients: bit-identical where the gradients are (CPU).
    for (name, a), (_, b) in zip(rev.state_dict().items(), base.state_dict().items()):
        if "num_batches" in name:
            assert int(a) == int(b) == 2, name
        elif "running" in name:
            if DEVICE == "cpu":
                assert_equal(a, b, f"{name} after 2 steps")
            else:
                assert_close(a, b, f"{name} after 2 steps", rtol=grad_tolerance([b])[0], atol=1e-6)
    return got


# ------------------------------------------------------------------ which form the output stream is kept in

def kept_as_float(y: torch.Tensor) -> bool:
    """Whether the reversible forward that made ``y`` kept the float output for backward (instead of the
    int32 halves). ``y.grad_fn`` of a custom autograd Function is its context."""
    return y.grad_fn.call.float_storage


@pytest.mark.parametrize("offset", [0.0, 512.0])
def test_output_kept_as_float_only_when_it_decodes_exactly(offset):
    # float32 decodes the stream exactly iff every |value| < 2**(24 - frac_bits) (256 at frac_bits=16).
    # offset=512 puts every value beyond that (the spiking conv + BN branches add far less than 256):
    # the int32 halves are kept. Either way the engine is exact (check_engine_case).
    case = dict(kind="conv", depth=3, T=2, B=2, width=2, size=3, scale=3.0, frac_bits=16, neuron="if", bn=True,
                dropout=0.0, seed=4, offset=offset)
    steps = check_engine_case(case)
    seq = make_sequence("conv", 3, 2, seed=4)
    y = seq((input_for("conv", 2, 2, 2, 3, 3.0, 0) + offset).requires_grad_())
    big = offset > 0
    assert kept_as_float(y) != big
    for out, *_ in steps:
        assert (float(out.abs().min()) >= 256) == big
        assert (float(out.abs().max()) < 256) != big


def test_output_kept_as_float64_and_never_as_low_precision():
    seq = make_sequence("linear", 2, 3, seed=2, neuron="none", bn=False)
    for dtype, expect in ((torch.float64, True), (torch.bfloat16, False), (torch.float16, False)):
        m = copy.deepcopy(seq).to(dtype)
        base = copy.deepcopy(m)
        base.reversible = False
        x = input_for("linear", 2, 2, 3, 2, 3.0 if dtype == torch.float64 else 1.0, 0).to(dtype)
        if dtype == torch.float64:
            x = x + 1000.0  # beyond float32's exact range (256 at frac_bits=16): float64 still decodes exactly
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xs[0]), base(xs[1])]
        assert kept_as_float(ys[0]) == expect, dtype
        if dtype == torch.float64:
            assert float(ys[0].detach().abs().max()) >= 256  # float32 would not decode this stream exactly
        for y, xi in zip(ys, xs):
            (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)).sum().backward()
        assert_equal(ys[0], ys[1], f"output {dtype}")
        if dtype == torch.float64:  # float64, no neurons: both runs do the same float64 operations
            assert_equal(xs[0].grad, xs[1].grad, "input grad float64")
            for a, b in zip(m.parameters(), base.parameters()):
                assert_equal(a.grad, b.grad, "param grad float64")


def test_output_modified_before_backward_is_an_error():
    seq = make_sequence("conv", 2, 2, seed=5)
    x = input_for("conv", 2, 2, 2, 3, 3.0, 0).requires_grad_()
    y = seq(x)
    assert kept_as_float(y)
    y.mul_(2)  # in place on the saved output: autograd's version counter refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # behind autograd's back (.data): the output checksum of the exactness guard catches it
    for change in (lambda t: t.add_(2.0 ** -16), lambda t: t.fill_(float("nan"))):
        y = seq(x)
        change(y.data)
        with pytest.raises(ReconstructionError, match="RevSequence output"):
            y.sum().backward()


@given(engine_cases())
def test_inverse_fixed_inverts_forward_fixed(case):
    seq = make_sequence(case["kind"], case["depth"], case["width"], neuron=case["neuron"], bn=case["bn"],
                        dropout=case["dropout"], frac_bits=case["frac_bits"], seed=case["seed"]).to(DEVICE)
    if case["dropout"]:
        seq.eval()  # dropout draws different masks in the reverse order; BatchNorm in train mode is fine
    g = torch.Generator().manual_seed(case["seed"])
    shape = input_for(case["kind"], case["T"], case["B"], case["width"], case["size"], 1.0, 0).shape
    q = torch.randint(-2 ** 31, 2 ** 31, shape, dtype=torch.int64, generator=g).to(torch.int32).to(DEVICE)
    y = seq.forward_fixed(q)
    assert y.dtype == torch.int32 and y.shape == q.shape
    assert not torch.equal(y, q)
    after_forward = copy.deepcopy(seq.state_dict())
    assert_equal(seq.inverse_fixed(y), q, "inverse_fixed(forward_fixed(q))")
    assert assert_invertible(seq, q).passed  # block by block, with the public toolkit
    for name, v in seq.state_dict().items():  # the inverse leaves running statistics alone
        assert_equal(v, after_forward[name], f"{name} after inverse_fixed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_float_inverse_is_exact(kind, dtype):
    # our neurons take float32/16/bf16 only: the float64 case uses non-spiking branches
    neuron = "if" if dtype == torch.float32 else "none"
    seq = make_sequence(kind, 4, 3, seed=7, neuron=neuron).to(DEVICE, dtype).eval()
    x = input_for(kind, 2, 2, 3, 4, 3.0, 1).to(DEVICE, dtype)
    with torch.no_grad():
        y = seq(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert float(y.abs().max()) < 2.0 ** (24 - seq.frac_bits)  # the documented float32 range
    assert_equal(seq.inverse(y), seq.decode(seq.encode(x), dtype), "inverse(seq(x))")


def test_parameters_only_and_shared_branch():
    # input without grad: parameter gradients still arrive; a branch module used by two blocks gets the sum.
    torch.manual_seed(0)
    shared = make_branch("conv", 2, bn=False)
    blocks = [RevBlock(shared, make_branch("conv", 2, bn=False)), RevBlock(make_branch("conv", 2, bn=False), shared)]
    rev = RevSequence(blocks).to(DEVICE)
    base = copy.deepcopy(rev)
    base.reversible = False
    x = input_for("conv", 2, 2, 2, 3, 3.0, 0).to(DEVICE)
    for m in (rev, base):
        m(x).square().sum().backward()
    for (name, a), b in zip(rev.named_parameters(), base.parameters()):
        assert a.grad is not None, name
        # A shared module's gradient sums three or more contributions, in autograd's order in one run
        # and in block order in the other: fp32 reordering only.
        rtol, atol = grad_tolerance([b.grad])
        assert_close(a.grad, b.grad, f"{name} grad", rtol=rtol, atol=atol)


@pytest.mark.parametrize("neuron", ["none", "if"])
def test_triton_interpreter_engine_equals_reference_engine(neuron):
    """The whole engine with the coupling ops on their Triton kernels (interpreter on CPU) against the
    plain-PyTorch reference path."""
    seq = make_sequence("conv", 2, 2, dropout=0.3, seed=3, neuron=neuron)
    x = input_for("conv", 2, 2, 2, 3, 3.0, 2)
    results = []
    for choice in ("torch", "triton"):
        m = copy.deepcopy(seq).to(DEVICE)
        xi = x.clone().to(DEVICE).requires_grad_()
        with cpu_kernels(choice if DEVICE == "cpu" else "torch"):
            torch.manual_seed(5)
            y = m(xi)
            y.sin().sum().backward()  # check=True: the guard verifies exact reconstruction on this path too
        results.append((y.detach(), [xi.grad] + [p.grad for p in m.parameters()]))
    (y, grads), (y1, grads1) = results
    assert_equal(y1, y, "output")
    if neuron == "none":
        for a, b in zip(grads1, grads):
            assert_equal(a, b, "gradient")
    else:
        # The neurons' Triton backward equals their reference only within fp32 rounding (their own tests);
        # sums that cancel (BatchNorm bias) carry that error at the scale of the largest gradient.
        scale = max(float(g.abs().max()) for g in grads)
        for a, b in zip(grads1, grads):
            assert_close(a, b, "gradient", atol=1e-5 * scale)


def test_backward_copies_a_held_output_and_reuses_an_unheld_one():
    from revsnn_triton.memory import measure_memory

    seq = make_sequence("conv", 3, 2, seed=6)
    x = input_for("conv", 2, 2, 2, 3, 3.0, 0).requires_grad_()
    w = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    # held by the caller: backward works on a copy; the output, and a second backward (retain_graph), are unaffected
    y = seq(x)
    assert kept_as_float(y)
    before = y.detach().clone()
    loss = (y * w).sum()
    held = measure_memory(lambda: loss.backward(retain_graph=True), "cpu").peak_bytes
    assert_equal(y.detach(), before, "output after backward")
    first = x.grad.clone()
    x.grad = None
    loss.backward()
    assert_equal(x.grad, first, "input grad of a second backward")
    assert_equal(y.detach(), before, "output after the second backward")
    # held by nothing (the multiplication by w does not save its input): the stream is rebuilt in the output's own
    # memory, so backward allocates one stream less; the gradients are the same
    x.grad = None
    loss = (seq(x) * w).sum()
    unheld = measure_memory(lambda: loss.backward(retain_graph=True), "cpu").peak_bytes
    assert_equal(x.grad, first, "input grad, output memory reused")
    assert held - unheld >= x.numel() * 4, (held, unheld)
    # ... after which a second backward through the same graph is refused, clearly
    with pytest.raises(ReconstructionError, match="second backward"):
        loss.backward()
    # a failing backward (nondeterministic branch) leaves a held output intact
    seq.blocks[1].f = CallCounter(seq.blocks[1].f)
    y = seq(x)
    before = y.detach().clone()
    with pytest.raises(ReconstructionError, match="block 1"):
        y.sum().backward()
    assert_equal(y.detach(), before, "output after a failed backward")


# ------------------------------------------------------------------------------------------- guard

@pytest.mark.parametrize("which", ["F", "G"])
def test_guard_names_the_nondeterministic_block(which):
    seq = make_sequence("conv", 4, 2, seed=1).to(DEVICE)
    block = seq.blocks[2]
    if which == "F":
        block.f = CallCounter(block.f)
    else:
        block.g = CallCounter(block.g)
    x = input_for("conv", 2, 2, 2, 3, 3.0, 0).to(DEVICE).requires_grad_()
    with pytest.raises(ReconstructionError, match=rf"block 2: .*branch {which} \(CallCounter\)"):
        seq(x).sum().backward()


def test_guard_silent_over_1000_steps_and_active():
    # Tiny non-spiking branches keep 1,000 steps cheap (the spiking branches run under the guard in the
    # property tests above); dropout exercises the RNG replay on every step.
    torch.manual_seed(0)
    blocks = [RevBlock(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.2)), nn.Sequential(nn.Linear(2, 2), nn.Tanh()),
                       split_dim=-1) for _ in range(2)]
    seq = RevSequence(blocks).to(DEVICE)
    opt = torch.optim.SGD(seq.parameters(), lr=0.01)
    steps = 0
    for step in range(1000):
        x = (torch.randn(2, 1, 4, device=DEVICE) * 2).requires_grad_()
        loss = seq(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        steps += 1
    assert steps == 1000 and torch.isfinite(loss)
    seq.blocks[1].f = CallCounter(seq.blocks[1].f)
    with pytest.raises(ReconstructionError, match="block 1"):
        seq(torch.randn(2, 1, 4, device=DEVICE, requires_grad=True)).sum().backward()


# -------------------------------------------------------------------------------------- bad input

def test_bad_inputs_are_clear_errors():
    seq = make_sequence("conv", 2, 2).to(DEVICE)
    good = input_for("conv", 1, 1, 2, 2, 1.0, 0).to(DEVICE)
    for bad, msg in ((float("nan"), "non-finite"), (float("inf"), "non-finite"), (1e6, "outside the fixed-point")):
        x = good.clone()
        x[0, 0, 1, 0, 0] = bad
        with pytest.raises(ValueError, match=msg):
            seq(x)
    with pytest.raises(ValueError, match="odd size 3 along split_dim=2"):
        seq(torch.zeros(1, 1, 3, 2, 2, device=DEVICE))
    with pytest.raises(TypeError, match="floating"):
        seq(torch.zeros(1, 1, 4, 2, 2, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        seq([1.0])
    shrink = RevSequence([RevBlock(nn.Conv2d(1, 1, 2), nn.Identity(), split_dim=1)])
    with pytest.raises(ValueError, match=r"block 0: F \(Conv2d\) maps .* F and G must keep the shape"):
        shrink(torch.zeros(1, 2, 4, 4))
    class ToDouble(nn.Module):
        def forward(self, x):
            return x.double()
    retype = RevSequence([RevBlock(nn.Identity(), ToDouble())])
    with pytest.raises(ValueError, match=r"block 0: G \(ToDouble\) .*torch.float64"):
        retype(torch.zeros(1, 1, 4, 2))
    for fb in (0, 31, -1):
        with pytest.raises(ValueError, match=r"frac_bits must be in \[1, 30\]"):
            RevSequence([RevBlock(nn.Identity(), nn.Identity())], frac_bits=fb)
    with pytest.raises(TypeError, match="frac_bits must be an int"):
        RevSequence([RevBlock(nn.Identity(), nn.Identity())], frac_bits=16.0)
    with pytest.raises(TypeError, match=r"blocks\[1\] must be a RevBlock"):
        RevSequence([RevBlock(nn.Identity(), nn.Identity()), nn.Identity()])
    with pytest.raises(ValueError, match="must not be empty"):
        RevSequence([])
    with pytest.raises(ValueError, match="same split_dim"):
        RevSequence([RevBlock(nn.Identity(), nn.Identity(), 2), RevBlock(nn.Identity(), nn.Identity(), -1)])
    with pytest.raises(TypeError, match="f must be a torch.nn.Module"):
        RevBlock(lambda x: x, nn.Identity())
    with pytest.raises(TypeError, match="reversible must be a bool"):
        RevSequence([RevBlock(nn.Identity(), nn.Identity())], reversible=1)
    with pytest.raises(RuntimeError, match="run by a RevSequence"):
        RevBlock(nn.Identity(), nn.Identity())(torch.zeros(2))
    with pytest.raises(TypeError, match="int32"):
        seq.forward_fixed(good)
    with pytest.raises(ValueError, match="split_dim=2 is out of range"):
        seq(torch.zeros(4, device=DEVICE))
    # reversible=False validates the same way
    seq.reversible = False
    with pytest.raises(ValueError, match="non-finite"):
        seq(torch.full_like(good, float("nan")))
    assert C.representable_range(16)[0] == -32768.0


class Blowup(nn.Module):
    def forward(self, x):
        return x * float("inf")


@pytest.mark.parametrize("reversible", [True, False])
def test_non_finite_branch_output_makes_the_output_nan(reversible):
    # the stream cannot carry NaN/inf (they would silently quantize to 0 / saturate): the output is NaN,
    # so the loss shows the divergence; a healthy forward is untouched
    seq = RevSequence([RevBlock(nn.Identity(), nn.Identity(), -1), RevBlock(Blowup(), nn.Identity(), -1)],
                      reversible=reversible)
    x = torch.randn(2, 3, 4, device=DEVICE, requires_grad=True)
    y = seq(x)
    assert torch.isnan(y).all()
    if reversible:
        assert not kept_as_float(y)  # a NaN output cannot re-encode the stream: the int32 halves are kept
    y.sum().backward()  # still differentiable (gradients are whatever the NaN loss gives)
    ok = RevSequence([RevBlock(nn.Identity(), nn.Tanh(), -1)], reversible=reversible)
    assert torch.isfinite(ok(x)).all()


def test_double_backward_is_refused():
    seq = make_sequence("linear", 1, 2, neuron="none", bn=False)
    x = input_for("linear", 1, 2, 2, 2, 1.0, 0).to(DEVICE).requires_grad_()
    (g,) = torch.autograd.grad(seq(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        g.sum().backward()
