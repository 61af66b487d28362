"""SeqBatchNorm against torch.nn.BatchNorm2d, convert_batchnorm, and the BatchNorm fused into the following neuron
(batchnorm_neuron): same spikes and gradients as the unfused composition, and a graph that keeps the convolution
output only (the normalized tensor is never stored)."""
import pytest
import torch
import torch.nn as nn

from revsnn_triton.batchnorm import SeqBatchNorm, batchnorm_neuron, convert_batchnorm
from revsnn_triton.neuron import IFNode, LIFNode


def _pair(C=6, seed=0):
    torch.manual_seed(seed)
    ref = nn.BatchNorm2d(C)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = convert_batchnorm(nn.Sequential(nn.BatchNorm2d(C)))[0]
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_seq_batchnorm_matches_torch_in_training_and_eval():
    ref, ours = _pair()
    assert isinstance(ours, SeqBatchNorm)
    x = torch.randn(8, 6, 5, 5) * 3 + 1
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    # x * scale + shift instead of (x - mean) / std * w + b: equal up to a few fp32 roundings of values of order 1
    torch.testing.assert_close(ours(xo), ref(xr), rtol=1e-5, atol=1e-5)
    g = torch.randn(8, 6, 5, 5)
    (ref(xr) * g).sum().backward()
    (ours(xo) * g).sum().backward()
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_convert_batchnorm_round_trip_keeps_parameters():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weight = net[1].weight
    seq = convert_batchnorm(net)
    assert isinstance(seq[1], SeqBatchNorm) and seq[1].weight is weight
    back = convert_batchnorm(seq, to="torch")
    assert not isinstance(back[1], SeqBatchNorm) and back[1].weight is weight
    x = torch.randn(2, 3, 6, 6)
    ref = nn.BatchNorm2d(4)
    ref.load_state_dict(back[1].state_dict())
    torch.testing.assert_close(back(x), ref(net[0](x)))  # torch's own BatchNorm arithmetic again
    with pytest.raises(ValueError, match="to"):
        convert_batchnorm(net, to="tf")


def test_seq_batchnorm_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"\[N, 6, \*\]"):
        SeqBatchNorm(6)(torch.randn(2, 5, 3, 3))


@pytest.mark.parametrize("make", [lambda: IFNode(step_mode="m"), lambda: LIFNode(tau=2.0, step_mode="m")],
                         ids=["IF", "LIF"])
def test_batchnorm_neuron_fused_equals_unfused(make):
    T, B, C = 3, 4, 6
    torch.manual_seed(1)
    x = torch.randn(T * B, C, 5, 5)
    _, bn = _pair(C)
    fused_in, plain_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    neuron = make()
    assert callable(getattr(neuron, "forward_affine", None))
    fused = batchnorm_neuron(bn, neuron, fused_in, T)
    neuron.reset()
    plain = neuron(bn(plain_in).unflatten(0, (T, B)))
    # the fused kernel computes x * scale + shift with the same two fp32 roundings as channel_affine
    assert torch.equal(fused, plain)
    g = torch.randn_like(fused)
    gw_f, gb_f, gx_f = torch.autograd.grad((fused * g).sum(), (bn.weight, bn.bias, fused_in))
    gw_p, gb_p, gx_p = torch.autograd.grad((plain * g).sum(), (bn.weight, bn.bias, plain_in))
    # the scale/shift gradients are channel sums taken in a different order (fused: per program partial sums)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_f, gw_p, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb_f, gb_p, rtol=1e-5, atol=1e-5)


def _saved_bytes(fn):
    """Bytes of the distinct storages the autograd graph saves while ``fn()`` builds it."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_batchnorm_neuron_keeps_only_the_input():
    """The fusion's point: the graph keeps ``x`` (plus [C] vectors and the spikes' state), not the normalized map."""
    T, B, C = 4, 2, 8
    x = torch.randn(T * B, C, 16, 16, requires_grad=True)
    _, bn = _pair(C)
    _, fused = _saved_bytes(lambda: batchnorm_neuron(bn, IFNode(step_mode="m"), x, T))
    _, plain = _saved_bytes(lambda: IFNode(step_mode="m")(bn(x).unflatten(0, (T, B))))
    full = x.numel() * 4
    assert fused < 1.2 * full, (fused, full)
    assert plain > 1.8 * full, (plain, full)  # the unfused composition also keeps the normalized map
