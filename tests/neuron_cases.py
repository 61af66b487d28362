"""Helpers of the kernel, op and parity tests around one neuron case.

The case itself (``NeuronCase``), its inputs (``make_inputs``: values at the threshold, signed zeros, subnormals and
huge values among the random ones, in every memory layout the op reads in place) and its Hypothesis strategy
(``neuron_cases``) are public: ``revsnn_triton.testing.strategies``. Here: the affine input, the validated
configuration, tolerance bounds, and the memory-access log of the interpreted kernels.
"""
from __future__ import annotations

import collections
import contextlib
import math

import pytest
import torch

from revsnn_triton import runtime
from revsnn_triton.ops.neuron.reference import channel_view, neuron_forward_reference
from revsnn_triton.ops.neuron.spec import NeuronConfig, check_neuron_args
from revsnn_triton.testing.strategies import NeuronCase as Case

# Hypothesis tests cannot take the function-scoped `kernel_device` fixture; same rule as the plugin's.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kernels_on(device: str):
    """Context in which ops on ``device`` run the Triton kernels (the interpreter on CPU tensors)."""
    if device == "cpu":
        if not runtime.interpreter_enabled():
            pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 before triton is imported (see conftest)")
        return runtime.cpu_kernels("triton")
    return contextlib.nullcontext()


def make_affine(case: Case, device: str = "cpu") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(scale, shift)`` fp32 ``[C]`` for ``case.channel_dim`` (with zeros, negatives and exact ones among the
    scales), or ``(None, None)``."""
    if case.channel_dim is None:
        return None, None
    g = torch.Generator().manual_seed(case.seed + 1)
    channels = case.shape[case.channel_dim]
    scale = torch.randn(channels, generator=g) * 1.5
    specials = torch.tensor([0.0, 1.0, -1.0, 0.5, 1e-3, 3.0])
    pick = torch.rand(channels, generator=g) < 0.3
    scale = torch.where(pick, specials[torch.randint(len(specials), (channels,), generator=g)], scale)
    shift = torch.randn(channels, generator=g) * 0.5
    return scale.to(device), shift.to(device)


def affine_kwargs(case: Case, device: str = "cpu") -> dict:
    """``scale``, ``shift``, ``channel_dim`` for ``multistep_neuron`` (empty without an affine input)."""
    if case.channel_dim is None:
        return {}
    scale, shift = make_affine(case, device)
    return dict(scale=scale, shift=shift, channel_dim=case.channel_dim)


def explicit_input(case: Case, x: torch.Tensor) -> torch.Tensor:
    """``y = x * scale[c] + shift[c]`` written out in fp32 (what the fused affine input must equal)."""
    scale, shift = make_affine(case, x.device)
    view = [1] * (x.dim() - 1)
    view[case.channel_dim] = -1
    return x.float() * scale.view(view) + shift.view(view)


def config(case: Case, x: torch.Tensor) -> NeuronConfig:
    """The case's validated configuration, as the op computes it."""
    return check_neuron_args(x, None, tau=case.tau if case.kind == "lif" else None,
                             w=torch.zeros(1, device=x.device) if case.kind == "plif" else None,
                             decay_input=case.decay_input, v_threshold=case.v_threshold, v_reset=case.v_reset,
                             detach_reset=case.detach_reset, surrogate=case.surrogate, alpha=case.alpha_value,
                             **affine_kwargs(case, x.device))


def affine_views(case: Case, cfg: NeuronConfig, x: torch.Tensor):
    """The reference's ``affine`` argument: ``(scale, shift)`` broadcast over x's per-step shape, or None."""
    scale, shift = make_affine(case, x.device)
    if scale is None:
        return None
    return channel_view(scale, cfg.channel_dim, x.shape[1:]), channel_view(shift, cfg.channel_dim, x.shape[1:])


def plif_w_term_scale(case: Case, x: torch.Tensor, v_init: torch.Tensor | None, w: torch.Tensor,
                      grad_x: torch.Tensor) -> float:
    """An upper bound of the terms ``dL/dH * dH/dq * q (1 - q)`` summed into PLIF's grad of ``w``, for the
    reduction-length tolerance: ``|dL/dH| <= |grad_x| / q`` (``decay_input``; else ``grad_x``) and
    ``|dH/dq| <= |Y| + |V| + |v_reset|`` with ``|V| <= max(|H|, |v_init|, |v_reset| + |v_threshold|)``."""
    x = x.detach().cpu()
    cfg = config(case, x)
    q = torch.sigmoid(w.detach().cpu().float()).reshape(())
    v0 = torch.full(x.shape[1:], cfg.v_reset) if v_init is None else v_init.detach().cpu()
    affine = affine_views(case, cfg, x)
    _, _, h = neuron_forward_reference(x, v0, q, cfg, affine=affine)
    y = x.float() if affine is None else x.float() * affine[0] + affine[1]
    finite_max = lambda t: float(torch.nan_to_num(t.abs(), posinf=0.0).max()) if t.numel() else 0.0  # noqa: E731
    v_max = max(finite_max(h), finite_max(v0), abs(cfg.v_reset) + abs(cfg.v_threshold))
    grad_h = finite_max(grad_x.float()) / (float(q) if cfg.decay_input else 1.0)
    dh_dq = finite_max(y) + v_max + abs(cfg.v_reset)
    return grad_h * dh_dq * float(q * (1 - q))


def n_terms(*tensors: torch.Tensor) -> int:
    """Neuron-steps summed into a parameter's gradient (PLIF's w)."""
    return max(1, sum(math.prod(t.shape) for t in tensors))


# ------------------------------------------------------------------------------ memory accesses

class AccessLog:
    """Bytes the interpreted kernels read and write, by named tensor (its storage's address range), per launch:
    streamed tensors count every access (each pass over them costs its bytes), the broadcast operands
    (``q``, ``scale``, ``shift``) their distinct bytes. Addresses outside every named tensor count as
    ``"h (transient)"`` (the one buffer the launchers allocate themselves)."""

    BROADCAST = ("q", "scale", "shift")

    def __init__(self, tensors: dict[str, torch.Tensor | None]):
        self.spans = []
        for name, t in tensors.items():
            if t is not None and t.numel():
                start = t.untyped_storage().data_ptr()
                self.spans.append((start, start + t.untyped_storage().nbytes(), name))
        self.reads: collections.Counter = collections.Counter()
        self.writes: collections.Counter = collections.Counter()
        self._seen: set = set()
        self.launch = 0

    def account(self, counter, ptrs, mask) -> None:
        import numpy as np
        addrs = ptrs.data.reshape(-1)
        if mask is not None:  # a combined mask (`a & b`) can come as integers: as an index it would pick elements
            addrs = addrs[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape).reshape(-1)]
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        claimed = np.zeros(addrs.shape, dtype=bool)
        for start, end, name in self.spans:
            inside = (addrs >= start) & (addrs < end)
            claimed |= inside
            if name in self.BROADCAST:
                for a in addrs[inside].tolist():
                    if (self.launch, a) not in self._seen:
                        self._seen.add((self.launch, a))
                        counter[name] += size
            else:
                counter[name] += size * int(inside.sum())
        counter["h (transient)"] += size * int((~claimed).sum())

    def plain(self) -> tuple[dict, dict]:
        return ({k: v for k, v in self.reads.items() if v}, {k: v for k, v in self.writes.items() if v})


@contextlib.contextmanager
def recorded_accesses(monkeypatch, tensors: dict):
    """Inside the block, every load and store of the interpreted kernels (and every launch of the neuron
    launchers) is counted in the :class:`AccessLog` it yields."""
    from triton.runtime import interpreter
    log = AccessLog(tensors)
    builder = interpreter.InterpreterBuilder
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store
    load, store = builder.create_load, builder.create_store

    def record_masked_load(self, ptrs, mask, *args):
        log.account(log.reads, ptrs, mask)
        return masked_load(self, ptrs, mask, *args)

    def record_masked_store(self, ptrs, value, mask, *args):
        log.account(log.writes, ptrs, mask)
        return masked_store(self, ptrs, value, mask, *args)

    def record_load(self, ptr, *args):
        log.account(log.reads, ptr, None)
        return load(self, ptr, *args)

    def record_store(self, ptr, value, *args):
        log.account(log.writes, ptr, None)
        return store(self, ptr, value, *args)

    from revsnn_triton.kernels import neurons as K
    run = K._run

    def next_launch(*args, **kwargs):
        log.launch += 1
        return run(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(builder, "create_masked_load", record_masked_load)
        mp.setattr(builder, "create_masked_store", record_masked_store)
        mp.setattr(builder, "create_load", record_load)
        mp.setattr(builder, "create_store", record_store)
        mp.setattr(K, "_run", next_launch)
        yield log
