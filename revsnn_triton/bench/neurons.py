"""Neuron benchmark: multi-step LIF forward and forward+backward on one GPU.

Providers, all on the same inputs of each case:

- ``revsnn[<save>]``: our fused op (``revsnn_triton.ops.neuron.multistep_neuron``), once per save mode
  (``h``: fp32 H kept for backward, ``h_bf16``: bf16 H, ``input``: nothing extra, recompute in backward);
- ``spikingjelly-triton`` / ``spikingjelly-torch``: spikingjelly 2.0's ``LIFNode(step_mode='m')`` with its
  implementation forced through ``SJ_LIF_CUDA_IMPLEMENTATION``, which spikingjelly reads at import time,
  so each runs in a subprocess of this script (``--worker``); the implementation spikingjelly reports
  having bound (``neuron_implementation``) is recorded;
- ``torch.compile-loop``: ``torch.compile`` of the plain PyTorch loop of the reference
  (``revsnn_triton.ops.neuron.reference.multistep_autograd``).

Neuron: LIF tau=2, v_threshold=1, hard reset to 0, detach_reset, ATan(alpha=2), the configuration of the
reference figures in ``benchmarks/README.md``. Timing: ``triton.testing.do_bench`` medians with 20/80
percentiles, L2 flushed before each repetition. The device-to-device copy bandwidth is measured in the same
run; every figure is also given as a fraction of it, counting bytes read plus written (see
:func:`traffic_bytes`).

Run: ``python -m revsnn_triton.bench.neurons [--out DIR]`` (or ``python benchmarks/bench_neurons.py``,
``revsnn bench neurons``). Without a CUDA GPU it prints why and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from revsnn_triton.bench import copy_bandwidth, environment, require_cuda, time_ms, write_results
from revsnn_triton.ops.neuron.spec import (SAVE_MODES, SAVE_PLANS, NeuronConfig, backward_traffic,
                                           forward_traffic)

# Neuron of every case.
TAU, V_TH, V_RESET, ALPHA = 2.0, 1.0, 0.0, 2.0
NEURON = NeuronConfig(kind="lif", tau=TAU, decay_input=True, v_threshold=V_TH, hard_reset=True, v_reset=V_RESET,
                      detach_reset=True, surrogate="atan", alpha=ALPHA)
PASSES = ("forward", "forward+backward")


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    n: int  # neurons per time step
    dtype: torch.dtype


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

CASES = {
    "T4-8.39M-fp32": Case("T4-8.39M-fp32", 4, 64 * 128 * 32 * 32, torch.float32),
    "T4-8.39M-bf16": Case("T4-8.39M-bf16", 4, 64 * 128 * 32 * 32, torch.bfloat16),
    "T16-4.19M-fp32": Case("T16-4.19M-fp32", 16, 32 * 128 * 32 * 32, torch.float32),
}

PROVIDERS = tuple(f"revsnn[{m}]" for m in SAVE_MODES) + (
    "spikingjelly-triton", "spikingjelly-torch", "torch.compile-loop")
SJ_ENV = "SJ_LIF_CUDA_IMPLEMENTATION"

# Targets for our kernels (one H100): (case, pass) -> upper bound in ms.
TARGET_MS = {
    ("T4-8.39M-fp32", "forward+backward"): 0.25,
    ("T4-8.39M-bf16", "forward+backward"): 0.13,
    ("T16-4.19M-fp32", "forward+backward"): 0.50,
}
TARGET_FORWARD_FRACTION = 0.85  # forward alone, of the measured copy bandwidth (bytes read + written)

# Reference figures (one H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0, measured 2026-11-27): medians in ms.
REFERENCE_MS = {
    ("T4-8.39M-fp32", "spikingjelly-triton", "forward"): 0.180,
    ("T4-8.39M-fp32", "spikingjelly-triton", "forward+backward"): 0.868,
    ("T4-8.39M-fp32", "spikingjelly-torch", "forward"): 1.319,
    ("T4-8.39M-fp32", "spikingjelly-torch", "forward+backward"): 3.180,
    ("T4-8.39M-fp32", "torch.compile-loop", "forward"): 0.096,
    ("T4-8.39M-fp32", "torch.compile-loop", "forward+backward"): 0.683,
    ("T4-8.39M-fp32", "revsnn[h]", "forward"): 0.145,  # "a plain hand-written Triton kernel saving H"
    ("T4-8.39M-fp32", "revsnn[h]", "forward+backward"): 0.284,
    ("T4-8.39M-bf16", "torch.compile-loop", "forward"): 0.065,
    ("T4-8.39M-bf16", "torch.compile-loop", "forward+backward"): 0.311,
    ("T16-4.19M-fp32", "torch.compile-loop", "forward+backward"): 3.25,
    ("T16-4.19M-fp32", "spikingjelly-triton", "forward"): 0.308,
    ("T16-4.19M-fp32", "spikingjelly-triton", "forward+backward"): 0.834,
}

COLUMNS = ["case", "T", "neurons", "dtype", "provider", "pass", "status", "median_ms", "q20_ms", "q80_ms",
           "bytes", "bytes_basis", "GBps", "frac_copy_bw", "reference_ms", "target", "meets_target", "detail"]


def traffic_bytes(case: Case, pass_: str, save: str | None) -> int:
    """Bytes read plus written in device memory by one call of the benchmark's neuron (``v_init=None``, only the
    spikes used downstream: ``v_final`` is not written, no grad of it flows, ``v_init`` needs none).

    ``save=None``: the minimum any implementation must move, the basis for the other providers (whose
    kernels we do not count): forward reads X and writes S; backward reads dS and X (to recompute) and writes
    dX: 5 passes. ``save`` a mode of our op: what its kernels move, from the byte plan of
    ``revsnn_triton.ops.neuron.spec`` (checked against the addresses the kernels touch by the tests)."""
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    if save not in (None, *SAVE_MODES):
        raise ValueError(f"save must be None or one of {SAVE_MODES}, got {save!r}")
    fwd = forward_traffic("input" if save is None else save, NEURON, case.T, case.n, case.dtype,
                          store_v_final=False)
    if pass_ == "forward":
        return fwd.total
    if save is None:  # the floor: dS, X, dX
        return fwd.total + 3 * case.T * case.n * torch.empty((), dtype=case.dtype).element_size()
    return fwd.total + backward_traffic(save, NEURON, case.T, case.n, case.dtype).total


def _inputs(case: Case, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input that crosses the threshold often (uniform in [-1, 3)) and an upstream gradient of spikes."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.rand(case.T, case.n, device=device, generator=g) * 4 - 1).to(case.dtype)
    grad = torch.randn(case.T, case.n, device=device, generator=g).to(case.dtype)
    return x.requires_grad_(True), grad


def _timed_passes(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad: torch.Tensor,
                  warmup: int, rep: int) -> dict[str, object]:
    """Time ``forward(x) -> spikes`` alone (with autograd recording, as in training) and followed by
    ``spikes.backward(grad)``."""
    def fwd_bwd():
        forward(x).backward(grad)
    return {"forward": time_ms(lambda: forward(x), warmup=warmup, rep=rep),
            "forward+backward": time_ms(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=[x])}


def _ours(save: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from revsnn_triton.ops.neuron import multistep_neuron

    def forward(x):
        return multistep_neuron(x, None, tau=TAU, v_threshold=V_TH, v_reset=V_RESET, detach_reset=True,
                                surrogate="atan", alpha=ALPHA, save=save, need_v_final=False)[0]
    return forward


def _compiled_loop() -> Callable[[torch.Tensor], torch.Tensor]:
    from revsnn_triton.ops.neuron.reference import multistep_autograd

    def loop(x):
        return multistep_autograd(x, None, tau=TAU, v_threshold=V_TH, v_reset=V_RESET, detach_reset=True,
                                  surrogate="atan", alpha=ALPHA)[0]
    return torch.compile(loop, dynamic=False)


def _spikingjelly(device: torch.device) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    from spikingjelly.activation_based import neuron, surrogate
    from spikingjelly.activation_based.functional.neuron import neuron_implementation

    node = neuron.LIFNode(tau=TAU, v_threshold=V_TH, v_reset=V_RESET, detach_reset=True,
                          surrogate_function=surrogate.ATan(alpha=ALPHA), step_mode="m")

    def forward(x):
        node.reset()
        return node(x)
    return forward, str(neuron_implementation("lif", device)["implementation"])


def _measure(provider: str, cases: Sequence[Case], device: torch.device, warmup: int, rep: int) -> list[dict]:
    """Rows (without bandwidth fractions) of one provider over ``cases``, in this process."""
    rows = []
    detail = ""
    try:
        if provider.startswith("revsnn["):
            forward = _ours(provider[len("revsnn["):-1])
            detail = None  # per case: the launch configurations used
        elif provider == "torch.compile-loop":
            forward = _compiled_loop()
        elif provider.startswith("spikingjelly-"):
            forward, bound = _spikingjelly(device)
            detail = f"spikingjelly bound implementation={bound}"
        else:
            raise ValueError(f"unknown provider {provider!r}; known: {PROVIDERS}")
    except Exception as exc:  # record the failure for every case rather than lose the other providers
        return [_row(c, provider, p, status=_error(exc)) for c in cases for p in PASSES]
    for case in cases:
        if provider.startswith("revsnn["):
            detail = _launch_detail(case, device, provider[len("revsnn["):-1])
        x, grad = _inputs(case, device)
        try:
            timings = _timed_passes(forward, x, grad, warmup, rep)
        except Exception as exc:  # e.g. spikingjelly refusing bf16 on its Triton path: an error row
            rows += [_row(case, provider, p, status=_error(exc), detail=detail) for p in PASSES]
        else:
            rows += [_row(case, provider, p, status="ok", timing=timings[p], detail=detail) for p in PASSES]
        del x, grad
        torch.cuda.empty_cache()
    return rows


def _error(exc: BaseException) -> str:
    """A one-line status for a failed measurement."""
    first = next((line for line in str(exc).splitlines() if line.strip()), "")
    return f"error: {type(exc).__name__}: {first[:300]}"


def _launch_detail(case: Case, device: torch.device, save: str) -> str:
    """The launch configurations our kernels use for ``case`` and where they come from."""
    from revsnn_triton.kernels.neurons import resident_values
    from revsnn_triton.launch import lookup_config
    from revsnn_triton.ops.neuron.spec import FORWARD_KERNEL
    parts = []
    for kernel in (FORWARD_KERNEL, SAVE_PLANS[save].backward_kernel(case.T)):
        cfg, source = lookup_config(kernel, case.n, case.T, case.dtype, device,
                                    resident=resident_values(kernel, case.T))
        parts.append(f"{kernel.removeprefix('neuron_')} {cfg.block_size}/{cfg.num_warps} warps ({source})")
    return "; ".join(parts)


def _row(case: Case, provider: str, pass_: str, status: str, timing=None, detail: str = "") -> dict:
    row = {"case": case.name, "T": case.T, "neurons": case.n, "dtype": DTYPE_NAMES[case.dtype],
           "provider": provider, "pass": pass_, "status": status, "detail": detail}
    if timing is not None:
        row.update(median_ms=timing.median, q20_ms=timing.q20, q80_ms=timing.q80)
    return row


def _run_worker(provider: str, case_names: Sequence[str], warmup: int, rep: int, timeout: float) -> list[dict]:
    """Run one spikingjelly provider in a subprocess with its implementation forced."""
    impl = provider.removeprefix("spikingjelly-")
    cases = [CASES[c] for c in case_names]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "revsnn_triton.bench.neurons", "--worker", provider, "--worker-out", str(out),
               "--warmup", str(warmup), "--rep", str(rep), *[a for c in case_names for a in ("--case", c)]]
        env = dict(os.environ, **{SJ_ENV: impl})
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            return [_row(c, provider, p, status=f"error: timed out after {timeout:.0f} s") for c in cases
                    for p in PASSES]
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            return [_row(c, provider, p, status=f"error: worker exit {proc.returncode}: {tail[0]}") for c in cases
                    for p in PASSES]
        return json.loads(out.read_text())


def _finish(row: dict, bandwidth: float) -> dict:
    """Add bytes, achieved bandwidth, its fraction of the copy bandwidth, the reference and the target."""
    case = CASES[row["case"]]
    provider, pass_ = row["provider"], row["pass"]
    save = provider[len("revsnn["):-1] if provider.startswith("revsnn[") else None
    nbytes = traffic_bytes(case, pass_, save)
    row["bytes"] = nbytes
    row["bytes_basis"] = "kernel traffic" if save else "minimum traffic"
    row["reference_ms"] = REFERENCE_MS.get((case.name, provider, pass_))
    if save:
        if (case.name, pass_) in TARGET_MS:
            row["target"] = f"<= {TARGET_MS[(case.name, pass_)]} ms"
        elif pass_ == "forward":
            row["target"] = f">= {TARGET_FORWARD_FRACTION:.0%} copy bw"
    if row.get("median_ms"):
        row["GBps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
        row["frac_copy_bw"] = nbytes / (row["median_ms"] * 1e-3) / bandwidth
        if save and (case.name, pass_) in TARGET_MS:
            row["meets_target"] = "yes" if row["median_ms"] <= TARGET_MS[(case.name, pass_)] else "no"
        elif save and pass_ == "forward":
            row["meets_target"] = "yes" if row["frac_copy_bw"] >= TARGET_FORWARD_FRACTION else "no"
    return row


def plot(rows: Sequence[dict], path: str | os.PathLike, title: str) -> Path | None:
    """Grouped bar chart (one panel per pass, cases on x, one bar per provider) of the median times,
    with 20/80 percentile whiskers. Returns the path, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    cases = list(dict.fromkeys(r["case"] for r in rows if r["case"] in CASES))
    providers = list(dict.fromkeys(r["provider"] for r in rows if r["case"] in CASES))
    fig, axes = plt.subplots(1, len(PASSES), figsize=(6 * len(PASSES), 4.5))
    width = 0.8 / max(len(providers), 1)
    for ax, pass_ in zip(axes, PASSES):
        for i, prov in enumerate(providers):
            med, lo, hi = [], [], []
            for c in cases:
                r = next((r for r in rows if r["case"] == c and r["provider"] == prov and r["pass"] == pass_), {})
                m = r.get("median_ms")
                med.append(m if m else float("nan"))  # failed or unsupported: no bar
                lo.append(m - r["q20_ms"] if m else 0.0)
                hi.append(r["q80_ms"] - m if m else 0.0)
            xs = [k + (i - (len(providers) - 1) / 2) * width for k in range(len(cases))]
            ax.bar(xs, med, width, yerr=[lo, hi], label=prov, capsize=2)
        for k, c in enumerate(cases):
            if (c, pass_) in TARGET_MS:
                ax.hlines(TARGET_MS[(c, pass_)], k - 0.4, k + 0.4, colors="k", linestyles="--")
        ax.set_xticks(range(len(cases)), cases)
        ax.set_ylabel("median ms (log)")
        ax.set_yscale("log")
        ax.set_title(f"{pass_} (dashed: target)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print_table(rows: Sequence[dict], bandwidth: float) -> None:
    print(f"device copy bandwidth: {bandwidth / 1e12:.3f} TB/s (read + write; reference H100: 3.00 TB/s)")
    print(f"{'case':15s} {'provider':20s} {'pass':17s} {'median ms':>10s} {'q20-q80':>15s} {'of copy bw':>10s} "
          f"{'ref ms':>7s}  target")
    for r in rows:
        if r["case"] not in CASES:
            continue
        if r.get("median_ms"):
            fig = (f"{r['median_ms']:10.4f} {r['q20_ms']:7.4f}-{r['q80_ms']:<7.4f} {r['frac_copy_bw']:10.1%}")
        else:
            fig = f"{r['status'][:36]:>36s}"
        ref = f"{r['reference_ms']:7.3f}" if r.get("reference_ms") else " " * 7
        tgt = f"{r.get('target') or ''} {('-> ' + r['meets_target']) if r.get('meets_target') else ''}"
        print(f"{r['case']:15s} {r['provider']:20s} {r['pass']:17s} {fig} {ref}  {tgt}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revsnn bench neurons", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.add_argument("--stem", default="neurons", help="file name stem of the results (default neurons)")
    p.add_argument("--case", action="append", dest="cases", choices=sorted(CASES),
                   help="case to run (repeatable; default all)")
    p.add_argument("--provider", action="append", dest="providers", choices=PROVIDERS,
                   help="provider to run (repeatable; default all)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms (default 25)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms (default 100)")
    p.add_argument("--worker-timeout", type=float, default=240.0,
                   help="seconds allowed to each spikingjelly subprocess (default 240)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--worker", choices=[q for q in PROVIDERS if q.startswith("spikingjelly-")],
                   help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = require_cuda("revsnn bench neurons")
    case_names = args.cases or list(CASES)
    cases = [CASES[c] for c in case_names]
    if args.warmup < 1 or args.rep < 1:
        raise SystemExit("--warmup and --rep must be >= 1 (milliseconds)")

    if args.worker:
        if not args.worker_out:
            raise SystemExit("--worker needs --worker-out")
        rows = _measure(args.worker, cases, device, args.warmup, args.rep)
        Path(args.worker_out).write_text(json.dumps(rows, default=str))
        return 0

    bandwidth, copy_timing = copy_bandwidth(device)
    rows: list[dict] = [{"case": "device-copy", "provider": "torch copy_", "pass": "copy", "status": "ok",
                         "median_ms": copy_timing.median, "q20_ms": copy_timing.q20, "q80_ms": copy_timing.q80,
                         "bytes": 2 * (1 << 30), "bytes_basis": "read + write", "GBps": bandwidth / 1e9,
                         "frac_copy_bw": 1.0, "detail": "1 GiB fp32 buffer"}]
    for provider in args.providers or PROVIDERS:
        print(f"... {provider}", file=sys.stderr, flush=True)
        if provider.startswith("spikingjelly-"):
            new = _run_worker(provider, case_names, args.warmup, args.rep, args.worker_timeout)
        else:
            new = _measure(provider, cases, device, args.warmup, args.rep)
        rows += [_finish(r, bandwidth) for r in new]

    env = environment()
    title = "Multi-step LIF neuron (tau=2, hard reset, detach_reset, ATan): forward and forward+backward"
    notes = (f"Device copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write). `bytes`: bytes read + written "
             "per call; `kernel traffic` counts what our op's kernels move in that save mode (the byte plan of "
             "`revsnn_triton.ops.neuron.spec`), `minimum traffic` what any implementation must move "
             "(X, S; backward dS, X, dX: 5 passes), since the other providers' kernels are not counted. "
             "`reference_ms`: figures measured on one H100 80GB HBM3 on 2026-11-27 (see benchmarks/README.md); "
             "for `revsnn[h]` it is a plain hand-written Triton kernel saving H. The targets apply to our op.")
    paths = write_results(rows, args.out, args.stem, title, columns=COLUMNS, env=env, notes=notes)
    _print_table(rows, bandwidth)
    if not args.no_plot:
        png = plot(rows, Path(args.out) / f"{args.stem}.png", f"{title}\n{env['device']}, {env['date_utc']}")
        if png:
            paths["png"] = png
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
