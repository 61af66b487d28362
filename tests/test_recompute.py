"""Recompute (gradient checkpointing of non-reversible parts): exact gradients, BatchNorm statistics updated
once, RNG and autocast state restored, what the forward keeps, the transformers' ``recompute_tokenizer`` modes,
measured memory, and bad input.

The reference is always the same module run without recomputation (ordinary autograd), from a deep copy with
identical parameters and buffers; results must be bit-identical (the recomputation runs the same ops on the
same input).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from revsnn_triton.bench import memory as bench_memory
from revsnn_triton.memory import measure_memory, memory_per_image
from revsnn_triton.models import create_model
from revsnn_triton.models.base import image_sequence
from revsnn_triton.models.conv import SeqConvBN
from revsnn_triton.models.neurons import CIFAR_TRANSFORMER_NEURON, NeuronFactory, neuron_factory
from revsnn_triton.models.transformer import SpikingTokenizer
from revsnn_triton.recompute import Recompute, recompute
from revsnn_triton.testing import assert_equal


def _neuron() -> NeuronFactory:
    kw = dict(CIFAR_TRANSFORMER_NEURON)
    return neuron_factory("triton", kw.pop("kind"), **kw)


def _tokenizer() -> nn.Module:
    """SpikingTokenizer at E=16 (channels 2, 4, 8, 16, 16), patch 4: BatchNorm and LIF neurons at every stage."""
    return SpikingTokenizer(3, 16, 4, _neuron())


class _DropoutStack(nn.Module):
    """conv -> BN -> dropout -> LIF -> conv -> BN on ``[T, B, 3, H, W]``: randomness inside the recomputed part."""

    def __init__(self):
        super().__init__()
        self.conv_bn1 = SeqConvBN(3, 8, 3, spike_input=False)
        self.drop = nn.Dropout(0.3)
        self.sn = _neuron()()
        self.conv_bn2 = SeqConvBN(8, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_bn2(self.sn(self.drop(self.conv_bn1(x))))


def _images(batch: int = 2, size: int = 16) -> torch.Tensor:
    # magnitudes that make the first neurons fire often
    return (torch.randn(batch, 3, size, size) * 3).requires_grad_(True)


def _step(module: nn.Module, images: torch.Tensor, T: int = 2, seed: int = 1):
    """One forward/backward with a fixed random cotangent: (output, input grad, parameter grads)."""
    x = image_sequence(images, T)           # a stride-0 expand view, as the models pass it
    out = module(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, [images, *params], g)
    return out.detach(), grads[0], grads[1:]


def _assert_same_step(plain: nn.Module, wrapped: nn.Module, images: torch.Tensor):
    out_a, gx_a, gp_a = _step(plain, images)
    out_b, gx_b, gp_b = _step(wrapped, images)
    assert_equal(out_b, out_a, "output")
    assert_equal(gx_b, gx_a, "input gradient")
    names = [n for n, _ in plain.named_parameters()]
    assert len(gp_a) == len(gp_b) == len(names) > 0
    for name, a, b in zip(names, gp_a, gp_b):
        assert a.abs().sum() > 0, f"{name}: zero gradient, the comparison would be vacuous"
        assert_equal(b, a, f"gradient of {name}")
    return out_a


def _assert_same_buffers(a: nn.Module, b: nn.Module):
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())
    assert buffers_a.keys() == buffers_b.keys() and buffers_a
    for name, buf in buffers_a.items():
        assert_equal(buffers_b[name], buf, f"buffer {name}")


# ---------------------------------------------------------------------------------------------- exactness
def test_gradients_equal_plain_module():
    plain = _tokenizer().train()
    wrapped = Recompute(copy.deepcopy(plain))
    out = _assert_same_step(plain, wrapped, _images())
    assert out.shape == (2, 2, 16, 16)   # tokens [T, B, E, N]: BatchNorm output of the last stage


def test_batchnorm_statistics_updated_once():
    plain = _tokenizer().train()
    inner = copy.deepcopy(plain)
    wrapped = Recompute(inner)
    before = {n: b.clone() for n, b in plain.named_buffers()}
    _assert_same_step(plain, wrapped, _images())
    _assert_same_buffers(plain, inner)
    # the forward did update them (one step, not zero)
    assert int(dict(inner.named_buffers())["stem.bn.num_batches_tracked"]) == 1
    assert not torch.equal(dict(inner.named_buffers())["convs.0.bn.running_mean"], before["convs.0.bn.running_mean"])


def test_dropout_rng_restored():
    plain = _DropoutStack().train()
    wrapped = Recompute(copy.deepcopy(plain))
    images = _images()
    torch.manual_seed(123)
    out_a, gx_a, gp_a = _step(plain, images)
    rng_after_plain = torch.get_rng_state()
    torch.manual_seed(123)
    out_b, gx_b, gp_b = _step(wrapped, images)
    # the recomputation draws from a forked generator: the global RNG advances exactly as in the plain step
    assert torch.equal(torch.get_rng_state(), rng_after_plain)
    assert_equal(out_b, out_a, "output")
    assert_equal(gx_b, gx_a, "input gradient")
    for a, b in zip(gp_a, gp_b):
        assert_equal(b, a, "parameter gradient")
    # the dropout mask matters: another seed gives another output
    torch.manual_seed(124)
    assert not torch.equal(_step(plain, images)[0], out_a)


def test_autocast_bf16_equal_plain():
    plain = _tokenizer().train()
    wrapped = Recompute(copy.deepcopy(plain))
    images = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, gx_a, gp_a = _step(plain, images)
        out_b, gx_b, gp_b = _step(wrapped, images)
    assert out_a.dtype == torch.bfloat16
    assert_equal(out_b, out_a, "output")
    assert_equal(gx_b, gx_a, "input gradient")
    for a, b in zip(gp_a, gp_b):
        assert_equal(b, a, "parameter gradient")


def test_autocast_state_of_forward_is_used_in_backward():
    """Backward runs outside the autocast region; the recomputation must still run in bf16 as the forward did."""
    plain = _tokenizer().train()
    wrapped = Recompute(copy.deepcopy(plain))
    images = _images()
    results = []
    for module in (plain, wrapped):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(image_sequence(images, 2))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append(torch.autograd.grad(out, [images, *module.parameters()], g))
    for a, b in zip(*results):
        assert_equal(b, a, "gradient")


# ----------------------------------------------------------------------------------------- what is kept
def test_forward_keeps_only_the_input_view():
    """The only tensor saved for backward is the input itself: the stride-0 expand view, not a copy."""
    module = Recompute(_tokenizer().train())
    images = torch.randn(2, 3, 16, 16)
    x = image_sequence(images, 4)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = module(x)
    assert len(saved) == 1
    (kept,) = saved
    assert kept.data_ptr() == images.data_ptr() and kept.stride() == x.stride() and kept.stride(0) == 0
    assert out.requires_grad
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_input_modified_before_backward_is_an_error():
    module = Recompute(_tokenizer().train())
    images = torch.randn(2, 3, 16, 16)
    out = module(image_sequence(images, 2))
    images.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_no_grad_and_eval_run_plainly():
    module = Recompute(_tokenizer().eval())
    x = image_sequence(torch.randn(2, 3, 16, 16), 2)
    reference = module.module(x)
    with torch.no_grad():
        out = module(x)
    assert not out.requires_grad and out.grad_fn is None
    assert_equal(out, reference.detach(), "no-grad output")
    for p in module.parameters():
        p.requires_grad_(False)
    out = module(x)                       # grad mode on, but nothing requires grad: a plain call
    assert out.grad_fn is None
    assert_equal(out, reference.detach(), "output without trainable inputs")


def test_neuron_state_reset_before_each_call():
    """A stale membrane state left in a neuron must not leak into the forward or the recomputation."""
    plain = _DropoutStack().eval()
    inner = copy.deepcopy(plain)
    wrapped = Recompute(inner)
    images = _images()
    # a neuron left with state (no SequenceNeuron reset): fill it by calling the raw neuron once
    inner.sn.neuron(torch.full((1, 2, 8, 16, 16), 0.9))
    _assert_same_step(plain, wrapped, images)


# -------------------------------------------------------------------------------------------------- models
def _former(recompute_tokenizer: bool | str) -> nn.Module:
    torch.manual_seed(0)
    return create_model("RevSFormer-2-384", embed_dim=48, T=2, recompute_tokenizer=recompute_tokenizer).train()


def test_model_defaults_and_bad_modes():
    assert create_model("RevSFormer-4-384").recompute_tokenizer == "stages"
    assert create_model("Spikingformer-4-384").recompute_tokenizer is False
    assert create_model("RevSFormer-2-384", recompute_tokenizer=False).recompute_tokenizer is False
    assert create_model("Spikingformer-2-384", recompute_tokenizer=True).recompute_tokenizer is True
    with pytest.raises(TypeError, match="recompute_tokenizer"):
        create_model("Spikingformer-2-384", embed_dim=48, recompute_tokenizer=1)
    with pytest.raises(ValueError, match="recompute_tokenizer"):
        create_model("RevSFormer-2-384", embed_dim=48, recompute_tokenizer="stage")


def test_tokenizer_stages_share_the_tokenizer_parameters():
    # recompute(stage, x) differentiates the parameters it finds in the stage: they must be the tokenizer's own
    tokenizer = _tokenizer()
    stages = tokenizer.stages()
    assert len(stages) == 5
    got = [id(p) for stage in stages for p in stage.parameters()]
    assert sorted(got) == sorted(id(p) for p in tokenizer.parameters())
    assert {id(b) for stage in stages for b in stage.buffers()} == {id(b) for b in tokenizer.buffers()}


@pytest.mark.parametrize("mode", [True, "stages"])
def test_revsformer_recompute_modes_identical(mode):
    on, off = _former(mode), _former(False)
    assert on.state_dict().keys() == off.state_dict().keys()
    images = torch.rand(2, 3, 32, 32)
    labels = torch.tensor([3, 7])
    losses, grads = [], []
    for model in (on, off):
        loss = F.cross_entropy(model(images), labels)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert_equal(losses[0], losses[1], "loss")
    names = [n for n, _ in on.named_parameters()]
    tokenizer_grads = 0
    for name, a, b in zip(names, *grads):
        assert_equal(a, b, f"gradient of {name}")
        tokenizer_grads += name.startswith("tokenizer.") and bool(a.abs().sum() > 0)
    assert tokenizer_grads > 0
    _assert_same_buffers(on, off)
    # a checkpoint of one loads into the other (strict), both ways
    fresh_off, fresh_on = _former(False), _former(mode)
    fresh_off.load_state_dict(on.state_dict())
    fresh_on.load_state_dict(off.state_dict())
    for name, tensor in on.state_dict().items():
        assert_equal(fresh_off.state_dict()[name], tensor, name)


def _forward_retained_bytes(model: nn.Module, images: torch.Tensor) -> int:
    kept = []
    use = measure_memory(lambda: kept.append(model(images)), "cpu")
    kept.clear()
    return use.retained_bytes


def test_forward_keeps_no_tokenizer_graph():
    """What the forward leaves allocated for backward (real CPU allocations): with recomputation the tokenizer's
    graph (BatchNorm and neuron inputs, bool spikes at 32x32) is gone. Measured at E=48, T=2, batch 4: 0.19 MiB
    with recomputation (the sequence's output and small bookkeeping) and 3.89 MiB without. Threshold: a quarter."""
    images = torch.rand(4, 3, 32, 32)
    on = _forward_retained_bytes(_former(True), images)
    off = _forward_retained_bytes(_former(False), images)
    assert on < 0.25 * off, (on / 2**20, off / 2**20)


def _per_image(name: str, mode: bool | str, batches: tuple[int, int], **overrides) -> float:
    """Memory per image of a training step: real CPU allocations, slope between ``batches``, 32x32 images."""
    torch.manual_seed(0)
    model = create_model(name, recompute_tokenizer=mode, **overrides).train()
    step = bench_memory.training_step_fn(model, 32, torch.device("cpu"), "fp32", batches)
    return memory_per_image(step, batches, "cpu")


def test_memory_per_image_spikingformer_whole_tokenizer():
    """Spikingformer at E=48, T=2, batches 2/4. Measured: 2.66 MiB/image with the whole tokenizer recomputed,
    3.59 without (-26%): in the non-reversible model the tokenizer's graph otherwise sits under the blocks'
    whole graph. Threshold 0.85: about half the measured margin."""
    on = _per_image("Spikingformer-2-384", True, (2, 4), embed_dim=48, T=2)
    off = _per_image("Spikingformer-2-384", False, (2, 4), embed_dim=48, T=2)
    assert on < 0.85 * off, (on / 2**20, off / 2**20)


def test_memory_per_image_revsformer_stages():
    """RevSFormer-2-384 at full width, T=1, batches 1/2. Measured: 6.87 MiB/image with the tokenizer recomputed
    stage by stage, 9.08 without (-24%); the whole tokenizer recomputed gives no gain here (11.2), because the
    peak is the tokenizer's own backward, which it rebuilds whole. Threshold 0.85: about half the measured margin."""
    stages = _per_image("RevSFormer-2-384", "stages", (1, 2), T=1)
    off = _per_image("RevSFormer-2-384", False, (1, 2), T=1)
    assert stages < 0.85 * off, (stages / 2**20, off / 2**20)


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input():
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        Recompute(lambda x: x)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        recompute("tokenizer", torch.zeros(1))
    module = Recompute(_tokenizer())
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        module([torch.zeros(2, 1, 3, 16, 16)])
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        recompute(nn.Identity(), 3.0)

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x), x

    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(TypeError, match="single torch.Tensor"):
            Recompute(TwoOutputs())(torch.zeros(2, 4))
