"""Training-step time on the CPU, side by side: each round runs one step of every case in turn, in one process
and one thread, so the machine's drifting speed affects all cases alike; the ratios are taken round by round.

One step = forward, cross-entropy, backward, SGD-with-momentum step, ``zero_grad(set_to_none=False)``
(:func:`revsnn_triton.bench.memory.training_step_fn`), fp32 unless ``--dtype bf16``. Cases are zoo models, with
constructor overrides after a colon (``RevSResNet37:recompute_batch=4``); the first case of ``--vs`` is the
reference of the ratios. Writes ``cpu_step.{csv,json,md}``. Wall-clock times of a shared CPU: quote the ratios'
medians, not single times.

    revsnn bench cpu_step --cases RevSResNet37 RevSResNet37:recompute_batch=4 --vs MS-ResNet34 --batch 16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from revsnn_triton.bench import parse_case, write_results
from revsnn_triton.bench.memory import default_out, input_size, training_step_fn
from revsnn_triton.models import create_model

COLUMNS = ["case", "batch", "dtype", "T", "rounds", "step_s_median", "step_s_min", "step_s_max", "reference",
           "ratio_median", "ratio_min", "ratio_max"]


def _step(spec: str, batch: int, dtype: str):
    name, overrides = parse_case(spec)
    torch.manual_seed(0)
    model = create_model(name, **overrides).train()
    return model, training_step_fn(model, input_size(name, model), torch.device("cpu"), dtype, (batch,))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="revsnn bench cpu_step", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n" + __doc__.rstrip().rsplit("\n\n", 1)[1])
    p.add_argument("--cases", nargs="+", required=True, metavar="CASE", help="models to time (NAME[:key=value,...])")
    p.add_argument("--vs", nargs="+", default=[], metavar="CASE",
                   help="reference cases, timed in the same rounds; the first is the ratios' (default: none)")
    p.add_argument("--batch", type=int, default=16, help="images per step (default: 16)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds, after one warm-up round (default: 5)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: under autocast (default: fp32)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/bench/cpu_step-<UTC time>)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.rounds < 1 or args.threads < 1:
        p.error("--batch, --rounds and --threads must be >= 1")
    out = args.out or default_out("cpu_step")
    torch.set_num_threads(args.threads)
    specs = list(dict.fromkeys([*args.cases, *args.vs]))
    try:
        steps = {spec: _step(spec, args.batch, args.dtype) for spec in specs}
    except (ValueError, TypeError) as exc:
        print(f"revsnn bench cpu_step: error: {exc}", file=sys.stderr)
        return 2
    times: dict[str, list[float]] = {spec: [] for spec in specs}
    for r in range(args.rounds + 1):
        for spec in specs:
            _, step = steps[spec]
            t0 = time.perf_counter()
            step(args.batch)
            if r:  # round 0 warms up
                times[spec].append(time.perf_counter() - t0)
        print(f"cpu_step: round {r}/{args.rounds}: " + ", ".join(
            f"{spec} {times[spec][-1]:.2f} s" for spec in specs if times[spec]), flush=True)
    reference = args.vs[0] if args.vs else None
    rows = []
    for spec in specs:
        t = times[spec]
        row = dict(case=spec, batch=args.batch, dtype=args.dtype, T=steps[spec][0].T, rounds=args.rounds,
                   step_s_median=statistics.median(t), step_s_min=min(t), step_s_max=max(t), reference=reference)
        if reference:
            ratios = [a / b for a, b in zip(t, times[reference])]
            row.update(ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        rows.append(row)
    write_results(rows, out, "cpu_step", "Training-step time on the CPU, interleaved", COLUMNS,
                  notes=f"{args.threads} intra-op thread(s); one step of every case per round; ratios per round "
                        f"against {reference}.")
    for row in rows:
        ratio = f"  x{row['ratio_median']:.3f} ({row['ratio_min']:.3f}-{row['ratio_max']:.3f})" if reference else ""
        print(f"{row['case']:>40}: median {row['step_s_median']:.3f} s{ratio}")
    print(f"cpu_step: results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
