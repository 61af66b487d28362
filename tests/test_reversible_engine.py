"""The engine's contract in every mode, and what it adds: per-block backward, tensors from outside the sequence,
overflow detection, floor mode (micro-batched recomputation), and errors that name their cause."""
import copy

import pytest
import torch
import torch.nn as nn

from revsnn_triton.batchnorm import SeqBatchNorm, convert_batchnorm
from revsnn_triton.neuron import IFNode, LIFNode
from revsnn_triton.reversible import ReconstructionError, RevBlock, RevSequence, StreamOverflowError
from revsnn_triton.testing import assert_close, assert_equal, record_streams
from revsnn_triton.testing.strategies import input_for, make_sequence
from reversible_cases import DEVICE, CallCounter, check_grads


class Branch(nn.Module):
    """neuron -> conv -> SeqBatchNorm -> neuron -> conv -> SeqBatchNorm [-> dropout] on ``[T, B, C, H, W]``: the
    shape of the zoo's branches, with the BatchNorm layers that floor mode needs."""

    def __init__(self, c: int, dropout: float = 0.0, neuron=IFNode):
        super().__init__()
        self.n1, self.n2 = neuron(step_mode="m"), neuron(step_mode="m")
        self.c1, self.c2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.b1, self.b2 = SeqBatchNorm(c), SeqBatchNorm(c)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        with torch.no_grad():
            for bn in (self.b1, self.b2):
                bn.weight.uniform_(0.5, 2.0)
                bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        T = x.shape[0]
        y = self.b1(self.c1(self.n1(x).flatten(0, 1))).unflatten(0, (T, -1))
        y = self.b2(self.c2(self.n2(y).flatten(0, 1))).unflatten(0, (T, -1))
        return self.drop(y)


def branch_sequence(depth=2, width=3, seed=0, **kw) -> RevSequence:
    torch.manual_seed(seed)
    return RevSequence([RevBlock(Branch(width, **kw), Branch(width, **kw)) for _ in range(depth)])


def run(seq, x, w, seed=7):
    xi = x.clone().to(DEVICE).requires_grad_()
    torch.manual_seed(seed)
    y = seq(xi)
    (y * w).sum().backward()
    return y.detach(), [xi.grad] + [p.grad.clone() for p in seq.parameters()]


def inputs(T=2, B=6, width=3, size=4, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, 2 * width, size, size, generator=g) * scale
    w = torch.randn(x.shape, generator=g)
    return x.to(DEVICE), w.to(DEVICE)


# ------------------------------------------------------------------------------------------- floor mode

@pytest.mark.parametrize("recompute_batch", [1, 2, 4, 5])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_floor_mode_rebuilds_exactly_and_matches_the_default_mode(recompute_batch, dropout):
    """Floor mode: F and G run on micro-batches in forward and backward. Every rebuilt block input is the one the
    forward saw, bit for bit (the guard is on, and the stream hooks compare them), BatchNorm running statistics are
    updated once per step, and the gradients equal those of the default mode within fp32 rounding.

    Why not bit for bit: the batch-wide sums (BatchNorm statistics and their gradients, the weight gradients of
    every layer) are accumulated micro-batch by micro-batch, a different fp32 summation order than one call over
    the whole batch; a rounding difference in a BatchNorm statistic can also move a value across a grid point or a
    spike threshold. Hence the tolerance: that of reversible vs reversible=False (1.5e-5 of the largest gradient),
    and outputs within a few grid steps."""
    x, w = inputs()
    default = branch_sequence(dropout=dropout).to(DEVICE)
    floor = copy.deepcopy(default)
    floor.recompute_batch = recompute_batch
    rec = record_streams(floor)
    y0, g0 = run(default, x, w)
    y1, g1 = run(floor, x, w)
    for i in range(len(floor.blocks)):
        for (f1, f2), (b1, b2) in zip(rec["forward"][i], rec["backward"][i]):
            assert_equal(b1, f1, f"floor block {i} X1 rebuilt")
            assert_equal(b2, f2, f"floor block {i} X2 rebuilt")
    if dropout:
        return  # the micro-batches draw their own dropout masks: another (equally random) network
    assert_close(y1, y0, "floor-mode output", atol=8 * 2.0 ** -16, rtol=0)
    scale = max(float(g.abs().max()) for g in g0)
    for k, (a, b) in enumerate(zip(g1, g0)):
        assert_close(a, b, f"floor-mode gradient {k}", rtol=1.5e-5, atol=1.5e-4 * scale)
    for (name, a), (_, b) in zip(floor.state_dict().items(), default.state_dict().items()):
        if "num_batches" in name:
            assert int(a) == int(b) == 1, name
        elif "running" in name:
            assert_close(a, b, name, rtol=1e-5, atol=1e-6)


def test_floor_mode_replays_dropout_and_the_guard_still_names_the_block():
    x, w = inputs()
    seq = branch_sequence(dropout=0.5).to(DEVICE)
    seq.recompute_batch = 2
    y, g = run(seq, x, w)  # check=True: a replay with other masks would fail the guard
    assert all(torch.isfinite(t).all() for t in g)
    seq.blocks[1].g = CallCounter(seq.blocks[1].g)
    with pytest.raises(ReconstructionError, match="block 1"):
        run(seq, x, w)


def test_floor_mode_needs_seq_batchnorm():
    blocks = [RevBlock(nn.BatchNorm2d(2), nn.Identity())]
    with pytest.raises(ValueError, match="SeqBatchNorm"):
        RevSequence(blocks, recompute_batch=2)
    converted = RevSequence([RevBlock(convert_batchnorm(nn.BatchNorm2d(2)), nn.Identity())], recompute_batch=2)
    converted(torch.randn(1, 4, 4, 3, 3, requires_grad=True)).sum().backward()
    with pytest.raises(ValueError, match="recompute_batch must be None or an int >= 1"):
        RevSequence(blocks, recompute_batch=0)


def test_floor_mode_memory_scales_with_the_micro_batch():
    """Backward of a wide block at batch 16: in floor mode the recomputed branch graph is that of the micro-batch,
    so the peak drops towards the stream and its gradient (measured: 9.6 -> 5.6 halves of the stream). Threshold:
    floor at most 0.75 of default."""
    from revsnn_triton.memory import measure_peak_bytes

    torch.manual_seed(0)
    x = torch.randn(2, 16, 16, 8, 8).to(DEVICE)
    peaks = {}
    for rb in (None, 2):
        seq = branch_sequence(depth=1, width=8).to(DEVICE)
        seq.recompute_batch = rb
        xi = x.clone().requires_grad_()
        peaks[rb] = measure_peak_bytes(lambda: seq(xi).sum().backward(), DEVICE)
    assert peaks[2] < 0.75 * peaks[None], peaks


# ------------------------------------------------------------------------------- tensors from outside

class Scaled(nn.Module):
    """A branch that reads a tensor it does not own: a parent's parameter, or a conditioning tensor."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)
        self.external = None

    def forward(self, x):
        y = self.conv(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return torch.tanh(y) * self.external.reshape(1, 1, -1, 1, 1)


@pytest.mark.parametrize("kind", ["parameter", "conditioning"])
def test_tensors_from_outside_get_the_gradients_of_ordinary_autograd(kind):
    torch.manual_seed(0)
    branches = [Scaled(3) for _ in range(4)]
    seq = RevSequence([RevBlock(branches[0], branches[1]), RevBlock(branches[2], branches[3])]).to(DEVICE)
    base = copy.deepcopy(seq)
    base.reversible = False
    x, w = inputs(B=2)
    parent0, z0 = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    results = []
    for model in (seq, base):
        parent = nn.Parameter(parent0.clone())
        z = z0.clone().requires_grad_()
        external = parent if kind == "parameter" else torch.sigmoid(z) * 2  # computed upstream, requires grad
        for b in model.blocks:
            b.f.external = b.g.external = external
        y, grads = run(model, x, w)
        results.append((y, grads, parent.grad if kind == "parameter" else z.grad))
    (y, g, e), (y0, g0, e0) = results
    assert e is not None, "the tensor from outside got no gradient"
    assert_equal(y, y0, "output")
    check_grads([*g, e], [*g0, e0], "with a tensor from outside")


# ------------------------------------------------------------------------------------------- overflow

class Push(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


@pytest.mark.parametrize("reversible", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_stream_overflow_is_an_error_naming_the_block_and_branch(reversible, grad):
    # two blocks each adding 20000 at frac_bits=16: the second takes the stream past 32768
    seq = RevSequence([RevBlock(Push(20000.0), nn.Identity(), -1), RevBlock(Push(20000.0), nn.Identity(), -1)],
                      reversible=reversible).to(DEVICE)
    x = torch.zeros(1, 2, 4, device=DEVICE, requires_grad=grad)
    with pytest.raises(StreamOverflowError, match=r"block 1: branch F \(Push\).*frac_bits=16.*smaller frac_bits"):
        seq(x)
    assert issubclass(StreamOverflowError, ValueError)
    # one bit less doubles the range: the same network fits at frac_bits=15
    seq.frac_bits = 15
    assert float(seq(x)[0, 0, 0].detach()) == 40000.0


def test_a_branch_output_beyond_the_grid_is_an_overflow_too():
    seq = RevSequence([RevBlock(Push(1e9), nn.Identity(), -1)])
    with pytest.raises(StreamOverflowError, match="block 0: branch F"):
        seq(torch.zeros(1, 2, 4, requires_grad=True))


# ------------------------------------------------------------------------------- errors with their cause

class InplaceFirst(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.lin = nn.Linear(c, c)

    def forward(self, x):
        return self.lin(self.relu(x))


def test_branch_with_an_inplace_op_on_its_input_works_as_without_the_engine():
    torch.manual_seed(0)
    seq = RevSequence([RevBlock(InplaceFirst(2), InplaceFirst(2), -1) for _ in range(2)])
    base = copy.deepcopy(seq)
    base.reversible = False
    x = torch.randn(2, 3, 4)
    w = torch.randn(2, 3, 4)
    y, g = run(seq, x, w)
    y0, g0 = run(base, x, w)
    assert_equal(y, y0, "output")
    check_grads(g, g0, "in-place branch")


@pytest.mark.parametrize("check", [True, False])
def test_parameter_changed_between_forward_and_backward_is_named(check):
    seq = make_sequence("conv", 2, 2)
    seq.check = check
    y = seq(input_for("conv", 1, 2, 2, 2, 1.0, 0).requires_grad_())
    with torch.no_grad():
        seq.blocks[1].f[1].body[0].weight.add_(1.0)  # an optimizer step before backward
    with pytest.raises(ReconstructionError, match=r"block 1: blocks\.1\.f\.1\.body\.0\.weight was modified in place"):
        y.sum().backward()


def test_train_eval_switch_after_forward_recomputes_in_the_forward_mode():
    x, w = inputs(B=4)
    seq = branch_sequence(dropout=0.3).to(DEVICE)
    seq.check = False
    base = copy.deepcopy(seq)
    torch.manual_seed(3)
    xi = x.clone().requires_grad_()
    y = seq(xi)
    seq.eval()  # switched before backward: the recomputation must still be the training-mode forward
    (y * w).sum().backward()
    base.reversible = False
    y0, g0 = run(base, x, w, seed=3)
    assert_equal(y.detach(), y0, "output")
    check_grads([xi.grad] + [p.grad for p in seq.parameters()], g0, "after a mode switch")


@pytest.mark.parametrize("reversible", [True, False])
def test_zero_size_batch(reversible):
    seq = branch_sequence(depth=1).to(DEVICE)
    seq.reversible = reversible
    x = torch.zeros(2, 0, 6, 4, 4, device=DEVICE, requires_grad=True)
    y = seq(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_lif_branches_with_seq_batchnorm_match_autograd_bit_for_bit():
    x, w = inputs(B=3)
    seq = branch_sequence(neuron=lambda step_mode: LIFNode(tau=2.0, step_mode=step_mode)).to(DEVICE)
    base = copy.deepcopy(seq)
    base.reversible = False
    y, g = run(seq, x, w)
    y0, g0 = run(base, x, w)
    assert_equal(y, y0, "output")
    check_grads(g, g0, "LIF + SeqBatchNorm")


def test_if_neuron_with_hard_reset_gives_spikingjelly_s_finite_gradient_at_minus_inf():
    spikingjelly = pytest.importorskip("spikingjelly.activation_based.neuron")
    x = torch.tensor([[-float("inf"), 0.5, 1.5]], requires_grad=True)
    spikingjelly.IFNode(step_mode="m")(x).sum().backward()
    want = x.grad.clone()
    assert torch.isfinite(want).all()
    for backend in ("triton", "torch"):
        x.grad = None
        IFNode(step_mode="m", backend=backend)(x).sum().backward()
        assert_equal(x.grad, want, f"IF gradient at -inf ({backend})")
