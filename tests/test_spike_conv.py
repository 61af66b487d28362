"""The spike convolution op (``revsnn::spike_conv``): same output and bit-identical gradients as
``conv(pool(x))`` under autograd, 1 byte kept per input spike, autocast, opcheck, compile, bad arguments."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from revsnn_triton.ops.spike_conv import (spike_conv, spike_conv_backward, spike_conv_forward,
                                          spike_conv_reference)
from revsnn_triton.testing import assert_close, assert_equal

POOL_FN = {"avg": F.avg_pool2d, "max": F.max_pool2d}


def _plain(conv: nn.Module, x: torch.Tensor, pool) -> torch.Tensor:
    """``conv(pool(x))`` with torch.nn's own modules: what the op must reproduce."""
    return conv(POOL_FN[pool](x, 3, 2, 1) if pool else x)


@pytest.mark.parametrize("pool,stride,dims", [(None, 1, 2), ("avg", 1, 2), ("max", 1, 2), (None, 2, 2),
                                             (None, 1, 1)])
def test_spike_conv_matches_plain_conv(pool, stride, dims, kernel_device):
    torch.manual_seed(0)
    conv = (nn.Conv2d(6, 5, 1 if pool == "avg" else 3, stride=stride, padding=0 if pool == "avg" else 1,
                      bias=dims == 1) if dims == 2 else nn.Conv1d(6, 5, 1, bias=True)).to(kernel_device)
    shape = (3, 6, 9, 7) if dims == 2 else (3, 6, 11)
    # many ties inside MaxPool windows
    spikes = (torch.rand(shape) > 0.6).float().to(kernel_device).requires_grad_()
    out = spike_conv(spikes, conv, pool=pool)
    ref_in = spikes.detach().clone().requires_grad_()
    ref = _plain(conv, ref_in, pool)
    assert_close(out, ref, "forward")
    assert_equal(spike_conv_reference(spikes, conv.weight, conv.bias, conv.stride, conv.padding, pool), ref,
                 "reference")
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [spikes, conv.weight, conv.bias] if conv.bias is not None else
                                [spikes, conv.weight], g)
    refs = torch.autograd.grad(ref, [ref_in, conv.weight, conv.bias] if conv.bias is not None else
                               [ref_in, conv.weight], g)
    for a, e, what in zip(grads, refs, ("input", "weight", "bias")):
        assert_close(a, e, f"grad {what}")


POOL_BIAS_FROZEN = [(pool, bias, frozen) for pool in (None, "avg", "max")
                    for bias, frozen in ((False, False), (True, False), (True, True))]


def _case(pool, bias, frozen, seed=1):
    torch.manual_seed(seed)
    k = 1 if pool == "avg" else 3
    conv = nn.Conv2d(6, 5, k, padding=k // 2, bias=bias).requires_grad_(not frozen)
    spikes = (torch.rand(3, 6, 9, 7) > 0.6).float().requires_grad_()
    return conv, spikes


@pytest.mark.parametrize("pool,bias,frozen", POOL_BIAS_FROZEN)
def test_spike_conv_gradients_are_bit_identical_to_plain_autograd(pool, bias, frozen):
    # The backward reorders the work to keep fewer input-sized tensors alive (rebuilt spikes, pooled map and
    # input gradients never together); the results must stay exactly those of conv(pool(x)) under autograd.
    conv, spikes = _case(pool, bias, frozen)
    out = spike_conv(spikes, conv, pool=pool)
    ref_in = spikes.detach().clone().requires_grad_()
    ref = _plain(conv, ref_in, pool)
    assert_equal(out, ref, f"forward (pool={pool}, bias={bias})")
    params = [] if frozen else [p for p in conv.parameters()]
    g = torch.randn_like(ref)
    for got, want, what in zip(torch.autograd.grad(out, [spikes, *params], g),
                               torch.autograd.grad(ref, [ref_in, *params], g), ("input", "weight", "bias")):
        assert_equal(got, want, f"grad {what} (pool={pool}, bias={bias}, frozen={frozen})")


def test_spike_conv_weight_gradient_alone():
    # A frozen input (e.g. the first layer's spikes from data) with a trainable conv: only weight/bias grads.
    conv, spikes = _case("max", True, False)
    spikes.requires_grad_(False)
    out = spike_conv(spikes, conv, pool="max")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, list(conv.parameters()), g)
    want = torch.autograd.grad(_plain(conv, spikes, "max"), list(conv.parameters()), g)
    for a, e, what in zip(got, want, ("weight", "bias")):
        assert_equal(a, e, f"grad {what}")


@pytest.mark.parametrize("pool,bias,frozen", POOL_BIAS_FROZEN)
def test_opcheck(pool, bias, frozen):
    conv, spikes = _case(pool, bias, frozen)
    stride, padding = list(conv.stride), list(conv.padding)
    torch.library.opcheck(spike_conv_forward, (spikes, conv.weight, conv.bias, stride, padding, pool,
                                               torch.float32))
    out = spike_conv(spikes, conv, pool=pool)
    grad_out = torch.randn_like(out)
    torch.library.opcheck(spike_conv_backward, (grad_out, spikes.detach() != 0, conv.weight.detach(), stride,
                                                padding, pool, torch.float32, torch.float32, bias, True,
                                                not frozen, bias and not frozen))


def test_spike_conv_keeps_one_byte_per_spike():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    spikes = (torch.rand(2, 4, 8, 8) > 0.5).float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        spike_conv(spikes, conv)
    assert sorted(str(t.dtype) for t in saved) == ["torch.bool", "torch.float32"]   # spikes as bool, weight
    assert any(t.dtype == torch.bool and t.shape == spikes.shape for t in saved)


def test_spike_conv_under_autocast_runs_in_autocast_dtype():
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    spikes = (torch.rand(2, 4, 8, 8) > 0.5).float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = spike_conv(spikes, conv)
        ref = conv(spikes)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out.float(), ref.float(), "bf16 forward", dtype=torch.bfloat16)
    out.float().sum().backward()
    assert spikes.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32


def test_spike_conv_compiles_with_fullgraph():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    spikes = (torch.rand(2, 3, 7, 6) > 0.5).float().requires_grad_()
    compiled = torch.compile(lambda s: spike_conv(s, conv, pool="max"), fullgraph=True)
    out, ref = compiled(spikes), spike_conv(spikes, conv, pool="max")
    assert_equal(out, ref, "compiled forward")
    g = torch.randn_like(ref)
    params = [spikes, conv.weight, conv.bias]
    for got, want, what in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g),
                               ("input", "weight", "bias")):
        assert_equal(got, want, f"compiled grad {what}")


def test_spike_conv_rejects_bad_arguments():
    with pytest.raises(TypeError, match="conv must be"):
        spike_conv(torch.zeros(1, 4, 4, 4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="conv must be"):
        spike_conv(torch.zeros(1, 4, 4, 4), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="conv must be"):
        spike_conv(torch.zeros(1, 4, 4, 4), nn.Conv2d(4, 4, 3, padding="same"))
    with pytest.raises(TypeError, match="floating-point"):
        spike_conv(torch.zeros(1, 4, 4, 4, dtype=torch.int64), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="expected input"):
        spike_conv(torch.zeros(1, 3, 4, 4), nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="pool must be"):
        spike_conv(torch.zeros(1, 4, 4, 4), nn.Conv2d(4, 4, 3), pool="min")
    with pytest.raises(ValueError, match="2-D feature map"):
        spike_conv(torch.zeros(1, 4, 5), nn.Conv1d(4, 4, 1), pool="avg")
