"""Training-step time of the model zoo: our neurons against spikingjelly's, eager and ``torch.compile``.

One step = forward, cross-entropy, backward, SGD-with-momentum step, ``zero_grad(set_to_none=False)`` at batch
64 (``--batch``), fp32 unless ``--dtype bf16`` (autocast). The time is the median of CUDA-event timings after a
warm-up (:func:`revsnn_triton.bench.time_ms`), all rows in one run on one GPU. Each ``torch.compile`` case
runs in its own subprocess with a time limit (``--compile-timeout``), so a compilation that does not finish is
reported as a timeout instead of stalling the run (spikingjelly's MS-ResNet34 did not compile in 150 s). Rows are
written after every case. Needs CUDA: without a GPU it prints why and exits with status 2.

    python -m revsnn_triton.bench.train_step --out benchmarks/results
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from revsnn_triton.bench import parse_case, require_cuda, time_ms, write_results
from revsnn_triton.bench.memory import ALL_MODELS, training_step_fn

COLUMNS = ["model", "neuron_impl", "mode", "dtype", "batch", "T", "image", "step_ms", "q20_ms", "q80_ms",
           "vs_ms_resnet34_sj_eager", "status"]
# Cases compiled by default: the pair the step-time target is about, and the transformer pair.
DEFAULT_COMPILE = ("RevSResNet37", "MS-ResNet34")
IMPLS = ("triton", "spikingjelly")


def time_step(name: str, neuron_impl: str, mode: str, dtype: str, batch: int, T: int | None) -> dict:
    """Median step time of one case on the current CUDA device (``mode``: ``"eager"`` or ``"compile"``); ``name`` may
    carry constructor overrides (``RevSResNet37:recompute_batch=16``, see :func:`revsnn_triton.bench.parse_case`)."""
    from revsnn_triton.models import create_model

    device = require_cuda("train_step benchmark")
    torch.manual_seed(0)
    model_name, kw = parse_case(name)
    if T is not None:
        kw["T"] = T
    model = create_model(model_name, neuron_impl=neuron_impl, **kw).to(device).train()
    size = 128 if model.event_input else 32
    step = training_step_fn(model, size, device, dtype, (batch,), compiled=mode == "compile")
    t = time_ms(lambda: step(batch), warmup=200, rep=600)
    return dict(model=name, neuron_impl=neuron_impl, mode=mode, dtype=dtype, batch=batch, T=model.T, image=size,
                step_ms=t.median, q20_ms=t.q20, q80_ms=t.q80, status="ok")


def _in_subprocess(case: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "revsnn_triton.bench.train_step", "--worker", json.dumps(case)]
    base = {k: case[k] for k in ("model", "neuron_impl", "mode", "dtype", "batch")}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(base, status=f"timeout after {timeout:.0f} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return dict(base, status=f"failed: {err[:160]}")
    return json.loads(lines[-1])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="revsnn bench train_step", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--models", nargs="+", default=list(ALL_MODELS))
    p.add_argument("--compile-models", nargs="*", default=list(DEFAULT_COMPILE),
                   help="models also timed under torch.compile (each in a subprocess)")
    p.add_argument("--compile-timeout", type=float, default=150.0,
                   help="seconds per compiled case, compilation included")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--T", type=int, default=None, help="default: each model's (4 CIFAR, 10 DVS)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error(f"--batch must be >= 1, got {args.batch}")
    if args.T is not None and args.T < 1:
        p.error(f"--T must be >= 1, got {args.T}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    require_cuda("train_step benchmark")
    if args.worker:
        case = json.loads(args.worker)
        print(json.dumps(time_step(case["model"], case["neuron_impl"], case["mode"], case["dtype"], case["batch"],
                                   case.get("T"))))
        return 0
    start = time.perf_counter()
    # eager first (every model), then the compiled cases, which may take minutes each to compile
    cases = [(m, impl, "eager") for m in args.models for impl in args.impls]
    cases += [(m, impl, "compile") for m in args.compile_models for impl in args.impls]
    rows: list[dict] = []
    note = ("One step = forward + cross-entropy + backward + SGD momentum step; median of CUDA-event timings. "
            "vs_ms_resnet34_sj_eager: step time relative to MS-ResNet34 with spikingjelly neurons, eager "
            "(the comparison that matters: RevSResNet37 against MS-ResNet34).")
    for name, impl, mode in cases:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"train_step: --budget-s {args.budget_s} reached; results are partial", file=sys.stderr)
            break
        case = dict(model=name, neuron_impl=impl, mode=mode, dtype=args.dtype, batch=args.batch, T=args.T)
        if mode == "compile":
            row = _in_subprocess(case, args.compile_timeout)
        else:
            try:
                row = time_step(name, impl, mode, args.dtype, args.batch, args.T)
            except torch.cuda.OutOfMemoryError:
                row = dict(model=name, neuron_impl=impl, mode=mode, dtype=args.dtype, batch=args.batch,
                           status="out of memory")
            torch.cuda.empty_cache()
        rows.append(row)
        base = next((r["step_ms"] for r in rows if r["model"] == "MS-ResNet34" and r["neuron_impl"] ==
                     "spikingjelly" and r["mode"] == "eager" and r.get("step_ms")), None)
        for r in rows:
            r["vs_ms_resnet34_sj_eager"] = (r["step_ms"] / base) if base and r.get("step_ms") else None
        print(f"{name:>20} {impl:>12} {mode:>7}: {row.get('step_ms', float('nan')):.2f} ms  {row['status']}",
              flush=True)
        write_results(rows, args.out, "train_step", "Training step time", COLUMNS, notes=note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
