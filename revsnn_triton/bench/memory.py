"""Training memory per image of the model zoo (issue 4), and its growth with depth.

Memory per image is the slope of the peak allocated memory of one training step (forward, backward and an
SGD-with-momentum step; gradients zeroed, not freed) between two batch sizes (DESIGN.md section 5):
parameters, gradients and optimizer state exist before each measured step and cancel out; the input batches
are allocated before the measurement. CUDA: ``torch.cuda.max_memory_allocated``; CPU: every allocation of the
CPU allocator recorded by the profiler (:mod:`revsnn_triton.memory`) -- real allocations, never estimates.

Output (``--out``): ``memory.{csv,json,md}`` (every model, fp32 and bf16 autocast), ``memory_depth.{csv,json,md}``
and ``memory_depth.png`` (memory per image against depth, reversible and non-reversible side by side; ResNets
and transformers in two panels), then ``memory_ablation.{csv,json,md}`` (RevSResNet37 and MS-ResNet34 with each
memory option of the zoo switched, and on spikingjelly's neurons; RevSFormer-4-384 and Spikingformer-4-384 with
each tokenizer recomputation mode). Rows are written after every measurement, so an interrupted run keeps what
it had.

    python -m revsnn_triton.bench.memory --out benchmarks/results            # GPU: every model, 16 vs 64
    python -m revsnn_triton.bench.memory --cpu-small --out /tmp/mem          # CPU: tiny widths, shape of curve
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from revsnn_triton.memory import measure_peak_bytes, peak_breakdown
from revsnn_triton.models import create_model

MiB = float(1 << 20)

RESNET_DEPTHS = {"RevSResNet21": 21, "RevSResNet37": 37, "RevSResNet109": 109,
                 "MS-ResNet18": 18, "MS-ResNet34": 34, "MS-ResNet104": 104}
# The models of the targets first, so that a run cut short by a time limit still has them.
ALL_MODELS = ("RevSResNet37", "MS-ResNet34", "RevSResNet21", "RevSResNet109", "RevSFormer-4-384",
              "Spikingformer-4-384", "MS-ResNet18", "MS-ResNet104", "RevSFormer-2-384", "Spikingformer-2-384",
              "RevSResNet24", "MS-ResNet20", "RevSFormer-2-256", "Spikingformer-2-256")
TRANSFORMER_SWEEP = (2, 4, 8)

Variants = tuple  # ((variant label or None for the defaults, model overrides), ...)
_RESNET_ABLATION: Variants = (
    (None, {}), ("compact_spikes=False", {"compact_spikes": False}), ("neuron_save=h", {"neuron_save": "h"}),
    ("neuron_save=h_bf16", {"neuron_save": "h_bf16"}), ("spikingjelly neurons", {"neuron_impl": "spikingjelly"}))
# model -> its ablation variants. The transformers run the tokenizer recomputation modes other than their default
# ("stages" for RevSFormer, False for Spikingformer), so each side shows what each mode buys.
ABLATION: dict[str, Variants] = {
    "RevSResNet37": _RESNET_ABLATION,
    "MS-ResNet34": _RESNET_ABLATION,
    "RevSFormer-4-384": ((None, {}), ("recompute_tokenizer=True", {"recompute_tokenizer": True}),
                         ("recompute_tokenizer=False", {"recompute_tokenizer": False})),
    "Spikingformer-4-384": ((None, {}), ("recompute_tokenizer=True", {"recompute_tokenizer": True}),
                            ("recompute_tokenizer=stages", {"recompute_tokenizer": "stages"})),
}

# --cpu-small: the zoo's block counts at 1/8 of the widths (transformers: E=48 with 12 heads), so the depth
# dependence is that of the real models while a step costs well under a second on a CPU.
SMALL_OVERRIDES = {
    "RevSResNet": dict(widths=(8, 16, 32, 56)),
    "MS-ResNet": dict(widths=(8, 16, 32, 64)),
    "RevSFormer": dict(embed_dim=48),
    "Spikingformer": dict(embed_dim=48),
}


@dataclass(frozen=True)
class Case:
    """One model configuration to measure: registry ``name`` plus ``overrides``; ``label`` names it in tables."""
    label: str
    name: str
    family: str          # "resnet" or "transformer" (plot panel)
    reversible: bool
    depth: int
    overrides: dict = field(default_factory=dict)


def _family_prefix(name: str) -> str:
    return next(p for p in SMALL_OVERRIDES if name.startswith(p))


def model_case(name: str, small: bool = False) -> Case:
    """The :class:`Case` of a registered zoo model (``small``: tiny widths, see ``SMALL_OVERRIDES``)."""
    prefix = _family_prefix(name)
    overrides = dict(SMALL_OVERRIDES[prefix]) if small else {}
    reversible = name.startswith("Rev")
    if prefix in ("RevSFormer", "Spikingformer"):
        depth = int(name.split("-")[1])
        return Case(name, name, "transformer", reversible, depth, overrides)
    depth = RESNET_DEPTHS.get(name, 24 if name == "RevSResNet24" else 20)
    return Case(name, name, "resnet", reversible, depth, overrides)


def depth_sweep_cases(small: bool = False) -> list[Case]:
    """RevSResNet21/37/109 and MS-ResNet18/34/104; RevSFormer and Spikingformer (E=384) with 2, 4 and 8 blocks."""
    cases = [model_case(n, small) for n in RESNET_DEPTHS]
    for prefix in ("RevSFormer", "Spikingformer"):
        for depth in TRANSFORMER_SWEEP:
            overrides = dict(SMALL_OVERRIDES[prefix]) if small else {}
            overrides["depth"] = depth
            dim = overrides.get("embed_dim", 384)
            cases.append(Case(f"{prefix}-{depth}-{dim}", f"{prefix}-2-384", "transformer",
                              prefix == "RevSFormer", depth, overrides))
    return cases


def _batch(model: nn.Module, batch: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    shape = ((batch, model.T, model.in_channels, image_size, image_size) if model.event_input
             else (batch, model.in_channels, image_size, image_size))
    x = torch.rand(shape, device=device)
    if model.event_input:
        x = (x > 0.8).float()     # event frames: sparse counts
    return x, torch.randint(0, model.num_classes, (batch,), device=device)


def training_step_fn(model: nn.Module, image_size: int, device: torch.device, dtype: str,
                     batch_sizes: Sequence[int], compiled: bool = False) -> Callable[[int], None]:
    """``step(b)``: one training step at batch ``b`` (forward, cross-entropy, backward, SGD momentum step,
    ``zero_grad(set_to_none=False)``). Input batches for ``batch_sizes`` are made here, before any measurement.
    ``dtype``: ``"fp32"`` or ``"bf16"`` (autocast); ``compiled``: run the forward through ``torch.compile``."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batches = {b: _batch(model, b, image_size, device) for b in batch_sizes}
    forward = torch.compile(model) if compiled else model

    def step(b: int) -> None:
        x, y = batches[b]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        # Gradients stay allocated between steps (zeroed, not freed), like the optimizer state: both exist
        # before a measured step begins, so the peak above the start is activations and work space only.
        # (Freed gradients would be re-allocated late in backward, and at small batches the peak would then
        # sit where the gradients are, not where the activations are, flattening the slope.)
        opt.zero_grad(set_to_none=False)

    return step


def _model_and_step(case: Case, device: torch.device, dtype: str, batch_sizes: Sequence[int], T: int | None,
                    image_size: int | None, neuron_impl: str, extra: dict | None):
    """Build ``case`` (seed 0, in training mode) with ``extra`` overrides (``neuron_impl`` among them overrides the
    argument) and its training step: ``(model, step, neuron_impl, image_size)``."""
    torch.manual_seed(0)
    kw = dict(case.overrides, **(extra or {}))
    neuron_impl = kw.pop("neuron_impl", neuron_impl)
    if T is not None:
        kw["T"] = T
    model = create_model(case.name, neuron_impl=neuron_impl, **kw).to(device).train()
    size = image_size or (128 if model.event_input else 32)
    return model, training_step_fn(model, size, device, dtype, batch_sizes), neuron_impl, size


def measure_case(case: Case, *, device: torch.device, dtype: str, batch_sizes: Sequence[int], T: int | None,
                 image_size: int | None, neuron_impl: str = "triton", extra: dict | None = None) -> dict:
    """Build ``case`` and measure its memory per image; returns one result row."""
    small, big = min(batch_sizes), max(batch_sizes)
    model, step, neuron_impl, size = _model_and_step(case, device, dtype, (small, big), T, image_size, neuron_impl,
                                                     extra)
    t0 = time.perf_counter()
    step(small)                                   # warm-up: optimizer state, kernel compilation, caches
    peak_small = measure_peak_bytes(lambda: step(small), device)
    peak_big = measure_peak_bytes(lambda: step(big), device)
    row = dict(model=case.label, family=case.family, reversible=case.reversible, depth=case.depth,
               neuron_impl=neuron_impl, dtype=dtype, T=model.T, image=size, batches=f"{small}/{big}",
               params_M=sum(p.numel() for p in model.parameters()) / 1e6,
               mib_per_image=(peak_big - peak_small) / (big - small) / MiB,
               peak_small_MiB=peak_small / MiB, peak_big_MiB=peak_big / MiB,
               seconds=time.perf_counter() - t0, status="ok")
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


COLUMNS = ["model", "family", "reversible", "depth", "neuron_impl", "dtype", "T", "image", "batches", "params_M",
           "mib_per_image", "peak_small_MiB", "peak_big_MiB", "seconds", "variant", "status"]


def plot_depth(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """One PNG: memory per image against depth; left ResNets, right transformers; reversible vs not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("memory: matplotlib is not installed; no plot drawn", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, family, xlabel in ((axes[0], "resnet", "layers"), (axes[1], "transformer", "transformer blocks")):
        for reversible, style, label in ((True, "o-", "reversible"), (False, "s--", "non-reversible")):
            for dtype in sorted({r["dtype"] for r in rows}):
                pts = sorted((r["depth"], r["mib_per_image"]) for r in rows
                             if r["family"] == family and r["reversible"] == reversible and r["dtype"] == dtype)
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{label} ({dtype})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MiB per image (training step)")
        ax.set_title("RevSResNet vs MS-ResNet" if family == "resnet" else "RevSFormer vs Spikingformer")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def explain(args: argparse.Namespace) -> None:
    """``--explain N``: what is alive at the peak of one CPU training step of each model of ``--models``."""
    lines = ["# What is alive at the peak of a training step", "",
             f"CPU; batch {max(args.batch_sizes)}; fp32; groups of allocations by the innermost three operators "
             f"around them (`revsnn_triton.memory.peak_breakdown`). Command: `python -m revsnn_triton.bench.memory "
             f"{' '.join(sys.argv[1:])}`", ""]
    big = max(args.batch_sizes)
    for name in args.models:
        model, step, _, _ = _model_and_step(model_case(name, args.cpu_small), torch.device("cpu"), "fp32", (big,),
                                            args.T, args.image_size, args.neuron_impl, None)
        step(big)
        peak, rows = peak_breakdown(lambda: step(big), depth=3)
        head = f"{name}: peak {peak / MiB:.1f} MiB above the step's start, batch {big}"
        print(head)
        lines += [f"## {head}", "", "| MiB | share | allocated in |", "|---|---|---|"]
        for ops, nbytes in rows[:args.explain]:
            print(f"  {nbytes / MiB:9.2f} MiB  {ops}")
            lines.append(f"| {nbytes / MiB:.2f} | {nbytes / peak:.0%} | `{ops}` |")
        lines.append("")
        del model, step
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "memory_explain.md").write_text("\n".join(lines))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="revsnn bench memory", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output folder")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--models", nargs="+", default=None, help=f"models of the per-model table (default: all: "
                   f"{' '.join(ALL_MODELS)})")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="default: fp32 bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-sizes", nargs=2, type=int, default=None,
                   help="default 16 64 (CUDA), 2 4 (CPU), 4 8 (--cpu-small)")
    p.add_argument("--T", type=int, default=None, help="time steps (default: each model's: 4 CIFAR, 10 DVS)")
    p.add_argument("--image-size", type=int, default=None, help="default 32 (CIFAR) / 128 (DVS)")
    p.add_argument("--neuron-impl", choices=("triton", "torch", "spikingjelly"), default="triton")
    p.add_argument("--cpu-small", action="store_true",
                   help="CI mode: the depth sweep at 1/8 width, 32x32 inputs, T=2, batches 4 and 8, fp32 "
                   "(the per-model table only with --models; no ablation)")
    p.add_argument("--no-sweep", action="store_true", help="skip the depth sweep")
    p.add_argument("--no-models", action="store_true", help="skip the per-model table")
    p.add_argument("--no-ablation", action="store_true",
                   help="skip the ablation: each model of --ablation-models with each of its memory options "
                   "switched (run last; default on)")
    p.add_argument("--ablation-models", nargs="+", choices=tuple(ABLATION), default=None,
                   help=f"models of the ablation table (default: all: {' '.join(ABLATION)})")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="CPU only: instead of the tables, print for each of --models the N largest groups of "
                   "allocations alive at the peak of a training step at the larger batch size "
                   "(revsnn_triton.memory.peak_breakdown) and write them to memory_explain.md")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cpu = args.device == "cpu"
    if args.explain < 0 or (args.explain and not cpu):
        p.error("--explain N: N >= 1, and only with --device cpu (on CUDA use torch.cuda.memory._snapshot)")
    if args.cpu_small:
        args.T = args.T or 2
        args.image_size = args.image_size or 32
        # the depth sweep already covers the CIFAR models; the per-model table and the ablation only on request
        args.no_models = args.no_models or args.models is None
        args.no_ablation = True
    args.dtypes = args.dtypes or (["fp32"] if cpu else ["fp32", "bf16"])
    # CPU: at batches 2/4 a batch-independent transient (e.g. a conv's work buffer) can hold the small
    # batch's peak; 4/8 keeps the activations on top in --cpu-small (1/8 widths, 32x32)
    args.batch_sizes = args.batch_sizes or ([4, 8] if args.cpu_small else [2, 4] if cpu else [16, 64])
    if min(args.batch_sizes) < 1 or args.batch_sizes[0] == args.batch_sizes[1]:
        p.error(f"--batch-sizes must be two different positive sizes, got {args.batch_sizes}")
    if args.T is not None and args.T < 1:
        p.error(f"--T must be >= 1, got {args.T}")
    args.models = args.models or list(ALL_MODELS)
    args.ablation_models = args.ablation_models or list(ABLATION)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)   # memory, not speed, is measured; a second thread only adds contention
    start = time.perf_counter()
    note = ("Memory per image = (peak(b_big) - peak(b_small)) / (b_big - b_small) of one training step "
            "(forward, backward, SGD momentum step); real allocations "
            + ("(torch.cuda.max_memory_allocated)." if device.type == "cuda" else "(CPU profiler memory events).")
            + (" --cpu-small: 1/8 widths, so only ratios and the shape against depth are meaningful."
               if args.cpu_small else ""))

    def out_of_time() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    measured: dict[tuple, dict] = {}     # (case, dtype, variant) -> row: the sweep reuses the per-model rows

    def run(cases, stem, title, variants_of: Callable[[Case], Variants] = lambda case: ((None, {}),)) -> list[dict]:
        rows: list[dict] = []
        for case in cases:
            for dtype in args.dtypes:
                for variant, extra in variants_of(case):
                    key = (case.label, case.name, tuple(sorted(case.overrides.items())), dtype, variant)
                    if key in measured:
                        rows.append(measured[key])
                        continue
                    if out_of_time():
                        print(f"memory: --budget-s {args.budget_s} reached; {stem} is partial", file=sys.stderr)
                        return rows
                    try:
                        row = measure_case(case, device=device, dtype=dtype, batch_sizes=args.batch_sizes,
                                           T=args.T, image_size=args.image_size, neuron_impl=args.neuron_impl,
                                           extra=extra)
                    except Exception as error:  # one failing case (e.g. out of memory) must not end the run
                        row = dict(model=case.label, family=case.family, reversible=case.reversible,
                                   depth=case.depth, dtype=dtype, mib_per_image=float("nan"),
                                   status=f"{type(error).__name__}: {str(error).splitlines()[0][:150]}")
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    row["variant"] = variant
                    rows.append(row)
                    measured[key] = row
                    print(f"{row['model']:>22} {dtype} {variant or '':>22}: "
                          f"{row['mib_per_image']:.3f} MiB/image  {row['status']}", flush=True)
                    write_results(rows, args.out, stem, title, COLUMNS, notes=note)
        return rows

    from revsnn_triton.bench import write_results
    if args.explain:
        explain(args)
        return 0
    if not args.no_models:
        run([model_case(n, args.cpu_small) for n in args.models], "memory", "Training memory per image")
    if not args.no_sweep:
        rows = run(depth_sweep_cases(args.cpu_small), "memory_depth", "Training memory per image against depth")
        if rows:
            env_dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            png = plot_depth(rows, Path(args.out) / "memory_depth.png",
                             f"Training memory per image against depth ({env_dev}, {args.neuron_impl} neurons)")
            if png:
                print(f"wrote {png}")
    if not args.no_ablation:
        run([model_case(n, args.cpu_small) for n in args.ablation_models], "memory_ablation",
            "Training memory per image: what each option buys (empty variant: the defaults)",
            lambda case: ABLATION[case.name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
