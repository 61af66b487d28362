"""The public testing toolkit (``revsnn_triton.testing``): every check passes on sound sequences, leaves no trace,
and fails, naming the block, on a deliberately broken one:

- float coupling instead of the fixed-point one -> ``assert_invertible``;
- a nondeterministic F (randomness outside torch's RNG; a result that depends on the launch configuration)
  -> ``assert_recompute_deterministic``;
- a BatchNorm of one's own, updated again by the recomputation -> ``assert_batchnorm_updated_once``;
- a surrogate gradient that changes with every call -> ``assert_gradients_match``;
- a branch whose stream overflows -> ``stream_headroom`` (and ``assert_invertible``).
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import find, given

from revsnn_triton.batchnorm import SeqBatchNorm
from revsnn_triton.launch import LaunchConfig
from revsnn_triton.neuron import LIFNode
from revsnn_triton.reversible import RevBlock, RevSequence
from revsnn_triton.runtime import cpu_kernels, interpreter_enabled
from revsnn_triton.testing import (TUNING_EXTREMES, assert_batchnorm_updated_once, assert_equal,
                                   assert_gradients_match, assert_invertible, assert_recompute_deterministic,
                                   check_sequence, forced_launch_config, stream_headroom)
from revsnn_triton.testing import strategies as rst

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------ broken blocks

class FloatCoupling(RevBlock):
    """Adds the branch outputs in float32 arithmetic (``y1 = x1 + F(x2)`` rounded to float32, then put on the
    grid), as float reversible libraries do, instead of adding quantized outputs to the integer stream."""

    def couple(self, stream, run):
        run(self.f, "F", 1, 0, self._adder(stream, 1.0))
        run(self.g, "G", 0, 1, self._adder(stream, 1.0))

    def uncouple(self, stream, run):
        run(self.g, "G", 0, 1, self._adder(stream, -1.0))
        run(self.f, "F", 1, 0, self._adder(stream, -1.0))

    @staticmethod
    def _adder(stream, sign):
        def apply(k, chunk, f, row=None):
            h = stream.half(k, chunk)
            scale = 2.0 ** stream.R
            value = (h.double() / scale if h.dtype == torch.int32 else h.double()).float() + sign * f.float()
            grid = torch.round(value.double() * scale)
            h.copy_(grid.clamp(rst.INT32_MIN, rst.INT32_MAX).to(torch.int32) if h.dtype == torch.int32
                    else grid / scale)
        return apply


class NumpyNoise(nn.Module):
    """Adds noise from a numpy generator: randomness the engine cannot replay."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.rng = np.random.default_rng(0)

    def forward(self, x):
        noise = torch.from_numpy(self.rng.standard_normal(x.shape).astype(np.float32)).to(x.device, x.dtype)
        return self.inner(x) + 0.1 * noise


class OwnBatchNorm(nn.Module):
    """A BatchNorm of one's own (not a torch.nn BatchNorm subclass) on ``[N, C, H, W]``: it updates its running
    statistics in every training call, so also when the backward recomputes it."""

    def __init__(self, channels: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x):
        if self.training:
            mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach(), self.momentum)
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-5)


class _AnnealedSpike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha):
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.alpha * x)
        return grad * ctx.alpha * s * (1 - s), None


class AnnealedNeuron(nn.Module):
    """Spikes at threshold 1 with a sigmoid surrogate that sharpens with every call: a schedule advanced in forward
    (instead of once per optimizer step). The spikes, hence the reconstruction, do not change; the recomputation's
    gradient does."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return _AnnealedSpike.apply(x - 1.0, 1.0 + self.calls)


class Amplify(nn.Module):
    """A branch with a large gain: outputs in (0, gain)."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return self.gain * torch.sigmoid(x)


class Push(nn.Module):
    """A constant branch output."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


class TunedMean(nn.Module):
    """Subtracts the mean computed the way a kernel with a tuned block size would: partial sums per block of the
    launch configuration's ``block_size``, then their sum. A float sum in another order per configuration."""

    def forward(self, x):
        from revsnn_triton import launch
        block = launch.launch_config("user_mean", x.numel(), 1, torch.float32, x.device).block_size
        flat = x.flatten()
        parts = nn.functional.pad(flat, (0, (-flat.numel()) % block)).view(-1, block).sum(1)
        return x - parts.sum() / flat.numel()


def conv_branch(width: int, norm: str = "torch") -> nn.Module:
    """IF -> conv3x3 -> BatchNorm (``"torch"``, ``"seq"`` or ``"own"``) on ``[T, B, width, H, W]``."""
    bn = {"torch": nn.BatchNorm2d, "seq": SeqBatchNorm, "own": OwnBatchNorm}[norm](width)
    return nn.Sequential(rst.make_branch("conv", width, bn=False)[0],
                         rst.SeqToANN(nn.Conv2d(width, width, 3, padding=1), bn))


def sequence(depth: int = 3, width: int = 2, seed: int = 0, **kw) -> RevSequence:
    return rst.make_sequence("conv", depth, width, seed=seed, **kw).to(DEVICE)


def conv_input(width: int = 2, scale: float = 3.0, seed: int = 0, T: int = 2, B: int = 2, size: int = 3):
    return rst.input_for("conv", T, B, width, size, scale, seed).to(DEVICE)


# ------------------------------------------------------------------------------ sound sequences pass

@given(rst.sequences(max_depth=3))
def test_every_check_passes_on_random_spiking_sequences(case):
    seq, x = case
    seq, x = seq.to(DEVICE), x.to(DEVICE)
    report = check_sequence(seq, x, runs=2)
    assert report.passed, report.problems
    assert all(report.invertible.blocks.values()) and all(report.deterministic.blocks.values())
    # on the CPU every kernel is deterministic and both runs take the same operations: bit-identical gradients
    assert_gradients_match(seq, x, exact=DEVICE == "cpu")


# (torch.nn BatchNorm needs more than one value per channel)
@given(rst.int32_streams(rst.stream_shapes("conv", width=2, max_size=3).filter(lambda s: s[1] * s[3] * s[4] > 1)))
def test_full_range_streams_invert_exactly(q):
    seq = sequence(depth=2, dropout=0.3)
    result = assert_invertible(seq, q.to(DEVICE))
    assert result.blocks == {0: True, 1: True}


def test_checks_leave_no_trace():
    seq = sequence(dropout=0.3)
    x = conv_input()
    seq(x.requires_grad_()).sum().backward()  # parameter gradients and BatchNorm statistics exist
    x = x.detach()
    state = copy.deepcopy(seq.state_dict())
    grads = [p.grad.clone() for p in seq.parameters()]
    rng = torch.get_rng_state()
    seq.eval()
    seq.blocks[1].train()
    flags = [m.training for m in seq.modules()]
    report = check_sequence(seq, x)
    assert report.passed, report.problems
    assert [m.training for m in seq.modules()] == flags and seq.reversible and seq.check
    for name, v in seq.state_dict().items():
        assert_equal(v, state[name], name)
    for p, g in zip(seq.parameters(), grads):
        assert_equal(p.grad, g, "parameter gradient")
    assert_equal(torch.get_rng_state(), rng, "RNG state")


# ----------------------------------------------------------------------------------- assert_invertible

def test_assert_invertible_catches_float_coupling():
    torch.manual_seed(0)
    blocks = [RevBlock(conv_branch(2), conv_branch(2)), FloatCoupling(conv_branch(2), conv_branch(2))]
    seq = RevSequence(blocks).to(DEVICE)
    q = torch.randint(rst.INT32_MIN, rst.INT32_MAX + 1, (2, 2, 4, 3, 3), dtype=torch.int64).to(torch.int32)
    with pytest.raises(AssertionError, match=r"block 1 \(FloatCoupling\): inverse_fixed does not give back .*"
                                             r"X1 differs, X2 differs.* elements differ"):
        assert_invertible(seq, q.to(DEVICE))
    # float inputs with huge values: float32 cannot hold them with 16 fractional bits; the training path fails too
    x = rst.input_for("conv", 2, 2, 2, 3, 3.0, 0) + 5000.0
    with pytest.raises(AssertionError, match=r"block 1 \(FloatCoupling\).*\n.*block 1 \(FloatCoupling\): the "
                                             r"backward rebuilt its input differently"):
        assert_invertible(seq, x.to(DEVICE))
    # the same branches with the fixed-point coupling invert exactly
    seq.blocks[1] = RevBlock(seq.blocks[1].f, seq.blocks[1].g)
    assert assert_invertible(seq, q.to(DEVICE)).passed
    assert assert_invertible(seq, x.to(DEVICE)).passed


def test_assert_invertible_catches_a_nondeterministic_branch_and_overflow():
    seq = sequence()
    seq.blocks[1].g = NumpyNoise(seq.blocks[1].g)
    with pytest.raises(AssertionError, match=r"block 1: inverse_fixed .*\(X1 (equal|differs), X2 differs\)(.|\n)*"
                                             r"block 1: the backward rebuilt its input differently"):
        assert_invertible(seq, conv_input())
    # block 0 (identities) takes x = 2000 to (4000, 6000); block 1's F adds 30000 * sigmoid(6000) to 4000
    seq = RevSequence([RevBlock(nn.Identity(), nn.Identity()), RevBlock(Amplify(30000.0), nn.Identity())])
    x = torch.full((1, 2, 4, 2, 2), 2000.0, device=DEVICE)
    with pytest.raises(AssertionError, match=r"left the fixed-point range: RevSequence block 1: branch F \(Amplify\)"):
        assert_invertible(seq, x)
    # in range, the same sequence is exact
    assert assert_invertible(seq, conv_input()).passed


# ------------------------------------------------------------------------------ assert_gradients_match

def test_assert_gradients_match_catches_a_surrogate_that_changes_per_call():
    torch.manual_seed(0)

    def branch(neuron: nn.Module) -> nn.Module:
        return nn.Sequential(rst.SeqToANN(nn.Conv2d(2, 2, 3, padding=1)), neuron,
                             rst.SeqToANN(nn.Conv2d(2, 2, 3, padding=1)))

    sound = RevSequence([RevBlock(branch(LIFNode(step_mode="m")), branch(LIFNode(step_mode="m")))]).to(DEVICE)
    x = conv_input(scale=2.0) + 1.0
    result = assert_gradients_match(sound, x)
    assert result.details["max"] <= result.details["rtol"]
    broken = copy.deepcopy(sound)
    broken.blocks[0].f[1] = AnnealedNeuron()
    with pytest.raises(AssertionError, match=r"the input gradient differs from reversible=False(.|\n)*the gradient of "
                                             r"block 0 branch F \(blocks\.0\.f\.0\.body\.0\.weight\) differs"):
        assert_gradients_match(broken, x)
    # its reconstruction is exact (the spikes do not change) and its recomputation deterministic: only the
    # gradient check sees it
    assert assert_invertible(broken, x).passed
    assert assert_recompute_deterministic(broken, x).passed


# ------------------------------------------------------------------------ assert_batchnorm_updated_once

@pytest.mark.parametrize("norm", ["torch", "seq"])
def test_batchnorm_layers_are_updated_once(norm):
    torch.manual_seed(0)
    seq = RevSequence([RevBlock(conv_branch(2, norm), conv_branch(2, norm)) for _ in range(2)]).to(DEVICE)
    result = assert_batchnorm_updated_once(seq, conv_input(), steps=3)
    assert result.blocks == {0: True, 1: True} and result.details["buffers"] == 12
    assert int(seq.blocks[0].f[1].body[1].num_batches_tracked) == 0  # the check left the statistics alone


def test_assert_batchnorm_updated_once_catches_a_second_update():
    torch.manual_seed(0)
    seq = RevSequence([RevBlock(conv_branch(2), conv_branch(2)), RevBlock(conv_branch(2), conv_branch(2, "own"))])
    seq = seq.to(DEVICE)
    x = conv_input()
    with pytest.raises(AssertionError, match=r"block 1 branch G \(blocks\.1\.g\.1\.body\.1\.running_mean\) after 3 "
                                             r"steps differs(.|\n)*num_batches_tracked\) after 3 steps differs from "
                                             r"the same steps without recomputation: 6 vs 3"):
        assert_batchnorm_updated_once(seq, x, steps=3)
    # the other checks do not see it: the recomputation normalizes with the batch statistics either way
    report = check_sequence(seq, x)
    assert report.invertible.passed and report.gradients.passed and report.deterministic.passed
    assert report.batchnorm.blocks == {0: True, 1: False}


# ----------------------------------------------------------------------- assert_recompute_deterministic

def test_assert_recompute_deterministic_catches_a_nondeterministic_branch():
    seq = sequence()
    seq.blocks[2].f = NumpyNoise(seq.blocks[2].f)
    x = conv_input()
    with pytest.raises(AssertionError, match=r"block 2: branch F \(NumpyNoise\) is not deterministic: run 2 differs "
                                             r"from the first run"):
        assert_recompute_deterministic(seq, x)
    result = check_sequence(seq, x).deterministic
    assert result.blocks == {0: True, 1: True, 2: False}
    # a single branch module is checked on its own input
    with pytest.raises(AssertionError, match=r"module \(NumpyNoise\) is not deterministic"):
        assert_recompute_deterministic(seq.blocks[2].f, x[:, :, :2])
    assert assert_recompute_deterministic(seq.blocks[1].f, x[:, :, :2]).passed


def test_assert_recompute_deterministic_tries_the_launch_configs_of_a_tuning_cache():
    branch = TunedMean()
    x = torch.randn(2, 3, 4, 16, 16, device=DEVICE) * torch.logspace(-3, 3, 16, device=DEVICE)
    # run to run it is deterministic ...
    assert assert_recompute_deterministic(branch, x, launch_configs=()).passed
    # ... but its bits depend on the configuration a tuning cache would pick
    with pytest.raises(AssertionError, match=r"with launch config LaunchConfig\(block_size=256, num_warps=2\) "
                                             r"differs .*depends on the launch configuration"):
        assert_recompute_deterministic(branch, x)
    assert TUNING_EXTREMES == (LaunchConfig(256, 2), LaunchConfig(4096, 8))
    with forced_launch_config(LaunchConfig(64, 1)) as launches:
        from revsnn_triton import launch
        assert launch.launch_config("k", 10, 1, torch.float32, "cpu") == LaunchConfig(64, 1)
        assert launch.lookup_config("k", 10, 1, torch.float32, "cpu") == (LaunchConfig(64, 1), "tuned")
    assert launches == [2]
    assert launch.launch_config("k", 10, 1, torch.float32, "cpu") == LaunchConfig(launch.INTERPRETER_BLOCK, 1)


@pytest.mark.skipif(DEVICE == "cpu" and not interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_forced_launch_configs_reach_the_neuron_kernels():
    seq = sequence(depth=1, neuron="lif")
    context = cpu_kernels("triton") if DEVICE == "cpu" else torch.no_grad()
    with context:
        result = assert_recompute_deterministic(seq, conv_input(), runs=2)
    # 2 branches x 2 forced configurations x 2 runs, one LIF forward launch each
    assert result.details["launches"] == 8 and result.blocks == {0: True}


# ------------------------------------------------------------------------------------- stream_headroom

def test_stream_headroom_measures_the_largest_value_per_block():
    # F adds 1000, G(y1) = y1: block 0 leaves (1000, 1000), block 1 (2000, 3000), from x = 0
    seq = RevSequence([RevBlock(Push(1000.0), nn.Identity()) for _ in range(2)]).to(DEVICE)
    x = torch.zeros(1, 2, 4, 2, 2, device=DEVICE)
    room = stream_headroom(seq, x)
    assert room.limit == 32768.0 and room.input_max_abs == 0.0 and room.overflow is None
    assert [b.max_abs for b in room.blocks] == [1000.0, 3000.0]
    assert [b.bits for b in room.blocks] == [math.log2(32768 / 1000), math.log2(32768 / 3000)]
    assert room.min_bits == math.log2(32768 / 3000)
    # one fractional bit less doubles the range: one bit more headroom
    seq.frac_bits = 15
    assert stream_headroom(seq, x).min_bits == math.log2(65536 / 3000)


def test_stream_headroom_reports_an_overflowing_branch():
    # F adds 10000: block 1 leaves (20000, 30000), block 2's G takes X2 to 60000 > 32768
    seq = RevSequence([RevBlock(Push(10000.0), nn.Identity()) for _ in range(3)]).to(DEVICE)
    x = torch.zeros(1, 2, 4, 2, 2, device=DEVICE)
    room = stream_headroom(seq, x)
    assert room.overflow_block == 2 and "block 2: branch G (Identity)" in room.overflow
    assert [b.max_abs for b in room.blocks] == [10000.0, 30000.0, None]
    assert room.min_bits == float("-inf")
    report = check_sequence(seq, x)
    assert not report.passed and any("stream headroom: RevSequence block 2: branch G" in p for p in report.problems)
    assert "overflow" in report.table().splitlines()[-1]
    with pytest.raises(AssertionError, match="block 2: branch G"):
        assert_invertible(seq, x)
    # at frac_bits=14 (range 131072) it fits, with log2(131072 / 60000) bits to spare
    seq.frac_bits = 14
    assert stream_headroom(seq, x).min_bits == math.log2(131072 / 60000)
    assert check_sequence(seq, x, min_headroom_bits=1.0).passed
    assert check_sequence(seq, x, min_headroom_bits=1.2).problems == [
        "stream headroom: block 2 keeps 1.1 bits, fewer than the 1.2 asked for (lower frac_bits)"]


# ------------------------------------------------------------------------------------------- strategies

def test_strategies_reach_the_special_values():
    find(rst.stream_shapes("conv"), lambda s: s[0] == 1)  # T = 1
    find(rst.stream_shapes("tokens", width=3), lambda s: s[0] == 1 and s[-1] == 6)
    find(rst.int32_streams((64,)), lambda q: bool((q == rst.INT32_MIN).any() & (q == rst.INT32_MAX).any()))
    values = rst.stream_values((256,), threshold=0.5)
    find(values, lambda x: bool((x == 0.5).any() & (x == -0.5).any()))
    find(values, lambda x: bool((torch.signbit(x) & (x == 0)).any()))       # -0.0
    find(values, lambda x: bool(((x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)).any()))  # subnormals
    find(values, lambda x: bool((x.abs() == 8192.0).any()))                  # huge: a quarter of the range
    find(rst.neuron_modules(kinds=("lif",)), lambda n: isinstance(n, LIFNode) and n.v_reset is None)


@given(rst.stream_values(rst.stream_shapes("conv"), frac_bits=20))
def test_stream_values_stay_inside_the_grid(x):
    lo, hi = -2048.0, 2048.0  # representable_range(20)
    assert x.dtype == torch.float32 and bool(((x >= lo / 4) & (x <= hi / 4)).all())


# ----------------------------------------------------------------------------------------- bad input

def test_bad_arguments_are_clear_errors():
    seq = sequence(depth=1)
    x = conv_input()
    with pytest.raises(TypeError, match="assert_invertible: seq must be a RevSequence or a RevBlock, got Sequential"):
        assert_invertible(nn.Sequential(), x)
    with pytest.raises(TypeError, match="assert_gradients_match: x must be a float tensor, got torch.int32"):
        assert_gradients_match(seq, x.to(torch.int32))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        stream_headroom(seq, [1.0])
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        assert_batchnorm_updated_once(seq, x, steps=0)
    with pytest.raises(ValueError, match="runs must be an int >= 2, got 1"):
        assert_recompute_deterministic(seq, x, runs=1)
    with pytest.raises(TypeError, match="launch_configs must hold"):
        assert_recompute_deterministic(seq, x, launch_configs=[(256, 2)])
    with pytest.raises(ValueError, match="rtol must be None or a number >= 0"):
        assert_gradients_match(seq, x, rtol=-1.0)
    with pytest.raises(ValueError, match="odd size 3 along split_dim=2"):
        assert_invertible(seq, x[:, :, :3])
    with pytest.raises(ValueError, match="non-finite"):
        assert_invertible(seq, torch.full_like(x, float("nan")))
    from revsnn_triton.testing import check_model
    with pytest.raises(ValueError, match="Sequential has no RevSequence to check"):
        check_model(nn.Sequential(nn.Linear(2, 2)), torch.zeros(1, 2))
    skips = nn.Module()
    skips.unused = seq
    skips.forward = lambda x: x  # a model whose forward does not call its sequence
    with pytest.raises(ValueError, match="the forward on the example input did not call unused"):
        check_model(skips, x)
    # a single block is checked as a one-block sequence
    assert assert_invertible(seq.blocks[0], x).blocks == {0: True}
