"""Model zoo: parameter counts, forward/backward across neuron implementations, reversible vs ordinary
autograd, shared layers, and bad input.

Every model runs at its full width and depth; CPU time is kept low by small inputs (CIFAR models 8x8 images,
DVS models 16x16 frames, the smallest sizes their pooling allows), T=2 and batch 2.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from revsnn_triton.models import counterpart, create_model, list_models, model_info, register_model
from revsnn_triton.models.base import image_sequence
from revsnn_triton.models.conv import SpikingResidualBranch
from revsnn_triton.models.neurons import NEURON_KINDS, make_neuron, neuron_factory
from revsnn_triton.models.stems import Stem
from revsnn_triton.testing import assert_close, assert_equal


ZOO = ["RevSResNet21", "RevSResNet37", "RevSResNet109", "RevSResNet24", "RevSFormer-2-384", "RevSFormer-4-384",
       "RevSFormer-2-256", "MS-ResNet18", "MS-ResNet34", "MS-ResNet104", "MS-ResNet20", "Spikingformer-2-384",
       "Spikingformer-4-384", "Spikingformer-2-256"]
HEAVY = {"RevSResNet109", "MS-ResNet104"}   # ~70-77M parameters: the slowest to run three times on a CPU

# Published parameter counts in millions (RevSNN paper; Spikingformer paper for Spikingformer-*),
# CIFAR-100 head for the CIFAR ResNets, 10 classes otherwise.
PUBLISHED_M = {
    "RevSResNet21": 11.05, "RevSResNet37": 23.59, "RevSResNet109": 70.08, "MS-ResNet18": 11.22,
    "MS-ResNet34": 21.33, "RevSFormer-2-384": 5.76, "RevSFormer-4-384": 9.32,
    "Spikingformer-2-384": 5.76, "Spikingformer-4-384": 9.32, "Spikingformer-2-256": 2.57,
}
# No published figure for the DVS ResNets; counted by hand from the architecture (conv 3x3 weights c_in*c_out*9,
# BN 2*c, Linear c*k+k):
#  RevSResNet24: stem 2*32*9+64 = 640; stage 1 (half 16, 1 block): 2 branches * (2*16*16*9+2*32) = 9344;
#    down 32->64: 2048+128; stage 2 (half 32, 2 blocks): 4 * (2*32*32*9+2*64) = 74240; down 64->96: 6144+192;
#    stage 3 (half 48, 2 blocks): 4 * (2*48*48*9+2*96) = 166656; head 96*10+10 = 970.        Total 260362.
#  MS-ResNet20: stem 2*16*9+32 = 320; stage 1: 3 * (2*16*16*9+64) = 14016; stage 2: (16*32*9+32*32*9+128) +
#    (16*32+64) + 2 * (2*32*32*9+128) = 51648; stage 3: (32*64*9+64*64*9+256) + (32*64+128) +
#    2 * (2*64*64*9+256) = 205696; head 64*10+10 = 650.                                        Total 272330.
#  RevSResNet1001 (100 classes): stem 3*32*9+64 = 928; per reversible block of half width w 2 branches *
#    (2*w*w*9+2*2w) = 36w^2+8w: 62*9344 + 62*37120 + 63*147968 + 62*590848 = 48835328 (w = 16, 32, 64, 128);
#    downsamples 32->64, 64->128, 128->256: (2048+128) + (8192+256) + (32768+512) = 43904; head 256*100+100 =
#    25700.                                                                                   Total 48905860.
HAND_COUNTED = {"RevSResNet24": 260362, "MS-ResNet20": 272330, "RevSResNet1001": 48905860}
CIFAR100 = {"RevSResNet21", "RevSResNet37", "RevSResNet109", "MS-ResNet18", "MS-ResNet34", "MS-ResNet104",
            "RevSResNet1001"}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count(name: str, **kw) -> int:
    """Parameters of ``name`` built on the meta device (shapes only: no memory, no initialisation cost)."""
    with torch.device("meta"):
        return _params(create_model(name, neuron_impl="torch", **kw))


def test_registry_lists_the_zoo():
    assert set(ZOO) <= set(list_models())


@pytest.mark.parametrize("name", sorted(set(PUBLISHED_M) | set(HAND_COUNTED)))
def test_parameter_count(name):
    kw = {"num_classes": 100} if name in CIFAR100 else {"num_classes": 10}
    n = _count(name, **kw)
    if name in HAND_COUNTED:
        assert n == HAND_COUNTED[name]
    else:
        assert abs(n / 1e6 - PUBLISHED_M[name]) <= 0.005 * PUBLISHED_M[name], f"{name}: {n / 1e6:.3f}M"


def test_every_zoo_model_has_a_parameter_check():
    assert set(ZOO) - set(PUBLISHED_M) - set(HAND_COUNTED) == {"MS-ResNet104", "RevSFormer-2-256"}
    # the two without a published figure share their blocks with checked models; their size follows from
    # the checked depth scaling: MS-ResNet104 = MS-ResNet34 + 64 more basic blocks of known size
    ms34, ms104 = (_count(n, num_classes=100) for n in ("MS-ResNet34", "MS-ResNet104"))
    block = lambda c: 2 * (9 * c * c + 2 * c)  # noqa: E731  (two 3x3 convs + two BNs)
    assert ms104 - ms34 == 4 * block(128) + 26 * block(256) + 5 * block(512)
    # RevSFormer-2-256 equals Spikingformer-2-256 except that its head reads both streams (256 more inputs)
    assert _count("RevSFormer-2-256") - _count("Spikingformer-2-256") == 256 * 10


def test_deep_narrow_ms_resnets_grow_by_whole_blocks():
    # MS-ResNet250/498/998 share widths 16..128; each step adds basic blocks of known size to every stage
    # (block() as above; same stride-1 blocks, so no extra shortcut)
    block = lambda c: 2 * (9 * c * c + 2 * c)  # noqa: E731
    ms250, ms498, ms998 = (_count(n, num_classes=100) for n in ("MS-ResNet250", "MS-ResNet498", "MS-ResNet998"))
    per_stage = sum(block(c) for c in (16, 32, 64, 128))
    assert ms498 - ms250 == 31 * per_stage
    assert ms998 - ms498 == 62 * per_stage + 2 * block(64)


def _inputs(model: nn.Module, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if model.event_input:
        x = (torch.rand(2, model.T, 2, 16, 16, generator=g) > 0.7).float() * 2.0
    else:
        x = torch.rand(2, 3, 8, 8, generator=g) * 4.0 - 1.0     # crosses the thresholds often
    return x.to(device), torch.tensor([1, 3], device=device)


def _loss_and_grads(name: str, neuron_impl: str, device: str, **overrides):
    torch.manual_seed(0)
    model = create_model(name, neuron_impl=neuron_impl, T=2, **overrides).to(device)
    x, y = _inputs(model, device)
    logits = model(x)
    assert logits.shape == (2, model.num_classes) and logits.dtype == torch.float32
    loss = F.cross_entropy(logits, y)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(int(g.count_nonzero()) for g in grads.values()) > 0, "no gradient reached the parameters"
    return loss.detach(), grads


def _assert_grads_close(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys()
    # Gradients of deep networks are sums over T*B*H*W terms taken in a different order by the two sides (and
    # BatchNorm's backward is computed as fused-into-the-neuron sums on one side, as separate sums on the other);
    # fp32 rounding of such sums is relative to the magnitudes that flow through the network, not to each element.
    # So the absolute tolerance is 1e-5 of the largest gradient of all tensors, as the engine's stated
    # reversible-vs-autograd tolerance is (tests/test_reversible.py). Per tensor it would fail on gradients that are
    # zero up to rounding by construction, such as a convolution bias followed by BatchNorm.
    scale = max(float(g.abs().max()) for g in expected.values() if g.numel())
    for k in expected:
        assert_close(actual[k], expected[k], f"{what}: grad {k}", rtol=1e-5, atol=1e-5 * max(scale, 1e-3))


def _impl_cases():
    for name in ZOO:
        marks = [pytest.mark.slow] if name in HEAVY else []
        yield pytest.param(name, id=name, marks=marks)


@pytest.mark.parametrize("name", list(_impl_cases()))
def test_same_loss_and_gradients_across_neuron_impls(name, kernel_device):
    ref_loss, ref_grads = _loss_and_grads(name, "spikingjelly", kernel_device)
    for impl in ("torch", "triton"):
        loss, grads = _loss_and_grads(name, impl, kernel_device)
        assert_close(loss, ref_loss, f"{name} {impl} loss")
        _assert_grads_close(grads, ref_grads, f"{name} {impl} vs spikingjelly")


@pytest.mark.parametrize("name", sorted(HEAVY))
def test_heavy_models_forward_backward(name, kernel_device):
    """The deepest models in the default (non-slow) run: one implementation, forward and backward."""
    _loss_and_grads(name, "triton", kernel_device)


# Each reversible model as registered (the ResNets' last stage keeps its graph by default), and the ResNets with
# every stage on the reversible engine (keep_graph_stages=0).
_REVERSIBLE_CASES = ([pytest.param(n, {}, id=n) for n in ZOO if n.startswith("Rev")]
                     + [pytest.param(n, {"keep_graph_stages": 0}, id=f"{n}-keep_graph_stages=0")
                        for n in ("RevSResNet21", "RevSResNet37", "RevSResNet24")])


@pytest.mark.parametrize("name, overrides", _REVERSIBLE_CASES)
def test_reversible_gradients_equal_ordinary_autograd(name, overrides, kernel_device):
    loss_rev, grads_rev = _loss_and_grads(name, "triton", kernel_device, reversible=True, **overrides)
    loss_ref, grads_ref = _loss_and_grads(name, "triton", kernel_device, reversible=False)
    assert_equal(loss_rev, loss_ref, f"{name} {overrides} loss")       # same quantized forward arithmetic
    _assert_grads_close(grads_rev, grads_ref, f"{name} {overrides} reversible vs reversible=False")


def test_keep_graph_stages_defaults_and_checks():
    def modes(name, **kw):
        return [s.reversible for s in create_model(name, neuron_impl="torch", **kw).stages]

    # the rule blocks[-1] * widths[-1] / 4**(S-1) <= widths[0] / 2: RevSResNet37 2 * 448 / 64 = 14 <= 32
    assert modes("RevSResNet37") == [True, True, True, False]
    assert modes("RevSResNet24") == [True, True, False]                  # 2 * 48 / 16 = 6 <= 8
    assert modes("RevSResNet1001", widths=(2, 2, 2, 2)) == [True] * 4     # 62 * 2 / 64 > 1
    assert modes("RevSResNet37", blocks=(1, 2, 3, 20)) == [True] * 4      # 20 * 448 / 64 = 140 > 32
    assert modes("RevSResNet37", recompute_batch=4) == [True] * 4         # floor mode keeps no graph
    assert modes("RevSResNet37", keep_graph_stages=2) == [True, True, False, False]
    assert modes("RevSResNet37", keep_graph_stages=0) == [True] * 4
    assert modes("RevSResNet37", reversible=False) == [False] * 4
    assert create_model("RevSResNet37", neuron_impl="torch").keep_graph_stages == 1
    for bad in (-1, 5, 1.0, True, "1"):
        with pytest.raises(ValueError, match=r"keep_graph_stages must be None or an int in \[0, 4\]"):
            create_model("RevSResNet37", neuron_impl="torch", keep_graph_stages=bad)


def test_1001_layer_model_at_tiny_width(kernel_device):
    # All 249 reversible blocks (62, 62, 63, 62 per stage) at per-half width 2: the engine's exactness over a
    # thousand layers, at a size the CPU runs in seconds. Without zero_init_last, so that every F and G adds
    # non-zero values to the streams.
    tiny = dict(widths=(2, 2, 2, 2), zero_init_last=False)
    loss_rev, grads_rev = _loss_and_grads("RevSResNet1001", "triton", kernel_device, reversible=True, **tiny)
    loss_ref, grads_ref = _loss_and_grads("RevSResNet1001", "triton", kernel_device, reversible=False, **tiny)
    assert_equal(loss_rev, loss_ref, "RevSResNet1001 loss")
    _assert_grads_close(grads_rev, grads_ref, "RevSResNet1001 reversible vs reversible=False")


# ------------------------------------------------------------------------------------------------ shared layers
def test_zero_init_last_makes_every_residual_branch_start_at_zero():
    deep = create_model("RevSResNet1001", neuron_impl="torch", widths=(2, 2, 2, 2))       # on by default
    ms = create_model("MS-ResNet250", neuron_impl="torch", widths=(2, 2, 2, 2))
    plain = create_model("RevSResNet21", neuron_impl="torch", widths=(2, 2, 2, 2))        # off by default
    for model, zero in ((deep, True), (ms, True), (plain, False)):
        branches = [m for m in model.modules() if isinstance(m, SpikingResidualBranch)]
        assert len(branches) == {deep: 2 * 249, ms: 124, plain: 8}[model]
        for b in branches:
            assert torch.equal(b.conv_bn2.bn.weight, torch.zeros_like(b.conv_bn2.bn.weight) if zero
                               else torch.ones_like(b.conv_bn2.bn.weight))
            assert torch.equal(b.conv_bn1.bn.weight, torch.ones_like(b.conv_bn1.bn.weight))


def test_stem_runs_once_on_an_expanded_input():
    torch.manual_seed(0)
    stem = Stem(3, 8)
    images = torch.randn(4, 3, 8, 8)
    expanded = image_sequence(images, 3)
    assert expanded.stride(0) == 0
    out = stem(expanded)
    assert out.shape == (3, 4, 8, 8, 8) and out.stride(0) == 0      # computed once, repeated by a view
    ref = Stem(3, 8)
    ref.load_state_dict(stem.state_dict())
    ref.conv_bn.bn.reset_running_stats()
    ref_out = ref(expanded.contiguous())                             # the T copies, as the original code does
    assert_close(out, ref_out, "stem output")


@pytest.mark.parametrize("impl", ["spikingjelly", "torch", "triton"])
def test_make_neuron_kinds_and_release_of_state(impl):
    x = torch.rand(3, 2, 5) * 2
    for kind in NEURON_KINDS:
        n = make_neuron(impl, kind, surrogate="atan", alpha=2.0, detach_reset=True)
        assert n.step_mode == "m"
        assert n(x).shape == x.shape
    build = neuron_factory(impl, "lif", tau=1.5)
    wrapped = build(v_threshold=0.5)
    assert wrapped.neuron.v_threshold == 0.5 and wrapped.neuron.tau == 1.5
    wrapped(x)
    assert not isinstance(wrapped.neuron.v, torch.Tensor)          # no membrane tensor kept after the call


def test_make_neuron_rejects_bad_arguments():
    with pytest.raises(ValueError, match="neuron_impl"):
        make_neuron("cuda", "if")
    with pytest.raises(ValueError, match="kind"):
        make_neuron("torch", "izhikevich")
    with pytest.raises(ValueError, match="surrogate"):
        make_neuron("torch", "if", surrogate="relu")
    with pytest.raises(ValueError, match="save="):
        make_neuron("spikingjelly", "if", save="input")


# ---------------------------------------------------------------------------------------------- registry facts
# Layers as the names count them, from the architecture: stem conv + 4 convs per reversible block + 1 per
# downsample + Linear head (RevSResNet); stem conv + 2 convs per basic block + Linear head (MS-ResNet).
LAYERS = {"RevSResNet21": 1 + 4 * 4 + 3 + 1, "RevSResNet37": 1 + 4 * 8 + 3 + 1, "RevSResNet109": 1 + 4 * 26 + 3 + 1,
          "RevSResNet1001": 1 + 4 * (62 + 62 + 63 + 62) + 3 + 1, "RevSResNet24": 1 + 4 * 5 + 2 + 1,
          "MS-ResNet18": 1 + 2 * 8 + 1, "MS-ResNet34": 1 + 2 * 16 + 1, "MS-ResNet104": 1 + 2 * 51 + 1,
          "MS-ResNet20": 1 + 2 * 9 + 1, "MS-ResNet250": 1 + 2 * 124 + 1, "MS-ResNet498": 1 + 2 * 248 + 1,
          "MS-ResNet998": 1 + 2 * 498 + 1}
COUNTERPARTS = {"RevSResNet-digits": "MS-ResNet-digits", "RevSResNet21": "MS-ResNet18", "RevSResNet37": "MS-ResNet34",
                "RevSResNet109": "MS-ResNet104", "RevSResNet1001": "MS-ResNet998", "RevSResNet24": "MS-ResNet20",
                "RevSFormer-2-384": "Spikingformer-2-384", "RevSFormer-4-384": "Spikingformer-4-384",
                "RevSFormer-2-256": "Spikingformer-2-256"}


def _weighted_layers(model: nn.Module) -> int:
    """Convolutions and Linear layers of a built ResNet, without MS-ResNet's 1x1 shortcut convolutions."""
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) and ".shortcut." not in f".{name}."
               for name, m in model.named_modules())


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_count(name):
    assert model_info(name).layers == LAYERS[name]
    assert name.endswith(str(LAYERS[name]))
    # the same count from the built network (tiny widths on the meta device: only the structure matters)
    stages = 3 if name in ("RevSResNet24", "MS-ResNet20") else 4
    with torch.device("meta"):
        model = create_model(name, neuron_impl="torch", widths=(2,) * stages)
    assert _weighted_layers(model) == LAYERS[name]


def test_model_info_and_counterparts():
    assert {n: counterpart(n) for n in list_models() if counterpart(n)} == COUNTERPARTS
    for name in list_models():
        info = model_info(name)
        assert info.name == name and info.reversible == name.startswith("Rev")
        assert info.T in (4, 10) and info.num_classes in (10, 100) and info.dataset and info.input
        if info.reversible:
            other = model_info(info.counterpart)
            assert not other.reversible and other.counterpart is None
            assert (other.dataset, other.input, other.T, other.num_classes) == (info.dataset, info.input, info.T,
                                                                                info.num_classes)
    info = model_info("RevSResNet37")
    assert (info.family, info.dataset, info.input, info.T, info.num_classes, info.layers) == (
        "RevSResNet", "CIFAR-10/100", "images [B, 3, 32, 32]", 4, 100, 37)
    assert info.description.startswith("RevSResNet37 (CIFAR")
    assert model_info("Spikingformer-2-256").input == "event frames [B, T, 2, 128, 128]"
    assert model_info("RevSFormer-2-384").layers is None
    assert info.num_parameters() == _count("RevSResNet37") and info.num_parameters(10) == _count("RevSResNet37",
                                                                                               num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        info.num_parameters(0)


def test_register_model_rejects_bad_facts():
    with pytest.raises(ValueError, match="already registered"):
        register_model("RevSResNet21")(lambda **kw: nn.Identity())
    with pytest.raises(ValueError, match="counterpart"):
        register_model("test-model", counterpart="MS-ResNet18")          # only a reversible model has one
    with pytest.raises(ValueError, match="layers"):
        register_model("test-model", layers=0)
    with pytest.raises(TypeError, match="name"):
        register_model("")
    assert "test-model" not in list_models()


# -------------------------------------------------------------------------------------------------- bad input
def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="RevSResNet37") as info:
        create_model("RevSResNet38")
    assert "MS-ResNet34" in str(info.value)
    assert "did you mean 'RevSResNet37'" in str(info.value)
    for lookup in (model_info, counterpart):
        with pytest.raises(ValueError, match=r"unknown model 'revsresnet21' \(did you mean 'RevSResNet21'"):
            lookup("revsresnet21")


@pytest.mark.parametrize("name", ["RevSResNet21", "MS-ResNet18", "RevSFormer-2-384", "Spikingformer-2-384"])
def test_bad_image_input(name):
    model = create_model(name, neuron_impl="torch", T=1, **({"widths": (4, 4, 4, 4)} if "ResNet" in name
                                                               else {"embed_dim": 24}))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        model(torch.rand(2, 4, 32, 32))                 # channels
    with pytest.raises(ValueError, match="expected images"):
        model(torch.rand(3, 32, 32))                    # no batch axis
    with pytest.raises(ValueError, match="spatial size"):
        model(torch.rand(2, 3, 2, 2))                   # too small for the pooling
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.int64))


@pytest.mark.parametrize("name", ["RevSResNet24", "MS-ResNet20", "RevSFormer-2-256", "Spikingformer-2-256"])
def test_bad_event_input(name):
    model = create_model(name, neuron_impl="torch", T=3)
    with pytest.raises(ValueError, match=r"expected event frames \[B, T=3, 2, H, W\]"):
        model(torch.rand(2, 4, 2, 32, 32))              # T of the data differs from the model's
    with pytest.raises(ValueError, match="expected event frames"):
        model(torch.rand(2, 3, 3, 32, 32))              # channels
    with pytest.raises(ValueError, match="expected event frames"):
        model(torch.rand(2, 3, 32, 32))                 # an image batch


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("T", [0, -1, 2.0])
def test_bad_T(name, T):
    with pytest.raises(ValueError, match="T must be an integer >= 1"):
        create_model(name, neuron_impl="torch", T=T)


def test_bad_config_overrides():
    with pytest.raises(ValueError, match="widths and blocks"):
        create_model("RevSResNet21", neuron_impl="torch", blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="num_heads"):
        create_model("RevSFormer-2-384", neuron_impl="torch", embed_dim=100)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("MS-ResNet18", neuron_impl="torch", num_classes=0)
    with pytest.raises(ValueError, match="neuron_impl"):
        create_model("MS-ResNet18", neuron_impl="cupy")


@pytest.mark.parametrize("name,overrides", [("RevSResNet21", {"widths": (4, 8, 8, 8)}),
                                            ("MS-ResNet18", {"widths": (4, 8, 8, 8)}),
                                            ("RevSFormer-2-384", {"embed_dim": 48}),
                                            ("Spikingformer-2-384", {"embed_dim": 48})])
def test_bf16_autocast_training_step(name, overrides, kernel_device):
    torch.manual_seed(0)
    model = create_model(name, neuron_impl="triton", T=2, **overrides).to(kernel_device)
    x, y = _inputs(model, kernel_device)
    with torch.autocast(torch.device(kernel_device).type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    assert torch.isfinite(loss)
    for k, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), k
