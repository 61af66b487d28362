"""Training memory per image of the model zoo, and its growth with depth.

Memory per image is the slope of the peak allocated memory of one training step (forward, backward and an
SGD-with-momentum step; gradients zeroed, not freed) between two batch sizes: parameters, gradients and optimizer
state exist before each measured step and cancel out; the input batches are allocated before the measurement.
CUDA: ``torch.cuda.max_memory_allocated``; CPU: every allocation of the CPU allocator recorded by the profiler
(:mod:`revsnn_triton.memory`) -- real allocations, never estimates. On the CPU the peak resident memory (RSS) of
the same steps is reported next to it, measured with glibc's malloc mmap threshold fixed (``--mmap-threshold``)
and each model in a fresh process: the heap that one model leaves behind would serve the next one's blocks from
pages already resident.

Defaults: batches 16 and 64 on CUDA, 16 and 32 on the CPU (pairs where activations dominate both peaks; a pair
known to read low is flagged with a warning); each model at its own input size (CIFAR 32x32, DVS 128x128,
digits 8x8). What runs is what is asked: the per-model table (``--models``, default all), the depth sweep only
with ``--sweep``, the ablation only with ``--ablation``.

Output (``--out``, default ``runs/bench/memory-<UTC time>``): ``memory.{csv,json,md}``; with ``--sweep``
``memory_depth.{csv,json,md}`` and ``memory_depth.png`` (memory per image against depth, reversible and
non-reversible side by side); with ``--ablation`` ``memory_ablation.{csv,json,md}`` (each memory option of the zoo
switched, per model of :data:`ABLATION`). Rows are written after every measurement, so an interrupted run keeps
what it had.

    revsnn bench memory --models RevSResNet37 MS-ResNet34           # two models, the device's default batches
    revsnn bench memory --device cpu --ablation --models RevSResNet37
    revsnn bench memory --sweep --cpu-small                         # CPU: tiny widths, the shape against depth
    revsnn bench memory --device cpu --sweep transformer            # only the transformers' depth panel
"""
from __future__ import annotations

import argparse
import datetime as _dt
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from revsnn_triton.memory import (malloc_mmap_threshold, measure_peak_bytes, measure_peak_rss, peak_breakdown,
                                  peak_rss_unavailable, set_malloc_mmap_threshold)
from revsnn_triton.batchnorm import convert_batchnorm
from revsnn_triton.models import create_model, list_models, model_info
from revsnn_triton.suggest import did_you_mean

MiB = float(1 << 20)

# The depth sweep: the zoo's ResNets (layers from the registry), at the zoo's widths and in the narrow family of the
# 1,000-layer model (RevSResNet1001: widths per half 16..128; its counterparts MS-ResNet250/498/998 at 16..128),
# where RevSResNet21 is also measured at the narrow widths ("RevSResNet21-narrow") so that the two reversible points
# differ in depth only.
SWEEP_RESNETS = ("RevSResNet21", "RevSResNet37", "RevSResNet109", "MS-ResNet18", "MS-ResNet34", "MS-ResNet104")
SWEEP_NARROW = ("RevSResNet1001", "MS-ResNet250", "MS-ResNet498", "MS-ResNet998")
NARROW_WIDTHS = {"RevSResNet": (16, 32, 64, 128), "MS-ResNet": (16, 32, 64, 128)}
# The default per-model table: the pairs compared in the README first, so that a run cut short by a time limit
# still has them.
ALL_MODELS = ("RevSResNet37", "MS-ResNet34", "RevSResNet21", "RevSResNet109", "RevSFormer-4-384",
              "Spikingformer-4-384", "MS-ResNet18", "MS-ResNet104", "RevSFormer-2-384", "Spikingformer-2-384",
              "RevSResNet24", "MS-ResNet20", "RevSFormer-2-256", "Spikingformer-2-256")
TRANSFORMER_SWEEP = (2, 4, 8)
SWEEP_FAMILIES = ("resnet", "transformer")  # --sweep FAMILY ...: the panels of the depth plot
# Input sizes (H = W) other than CIFAR's 32 and the DVS frames' 128.
INPUT_SIZES = {"RevSResNet-digits": 8, "MS-ResNet-digits": 8}

Variants = tuple  # ((variant label or None for the defaults, model overrides), ...)
# An override "batchnorm": "torch" rebuilds the model's BatchNorm layers as torch.nn's (convert_batchnorm): no saved
# statistics, no BatchNorm fused into a neuron.
_RESNET_ABLATION: Variants = (
    (None, {}), ("compact_spikes=False", {"compact_spikes": False}), ("neuron_save=h", {"neuron_save": "h"}),
    ("neuron_save=h_bf16", {"neuron_save": "h_bf16"}), ("spikingjelly neurons", {"neuron_impl": "spikingjelly"}),
    ("torch BatchNorm", {"batchnorm": "torch"}))
_REV_ABLATION: Variants = _RESNET_ABLATION + (
    ("recompute_transitions=False", {"recompute_transitions": False}),
    ("keep_graph_stages=0 (all stages reversible)", {"keep_graph_stages": 0}),
    ("keep_graph_stages=2", {"keep_graph_stages": 2}),
    ("floor mode, recompute_batch=8", {"recompute_batch": 8}), ("floor mode, recompute_batch=4", {"recompute_batch": 4}),
    ("floor mode, recompute_batch=2", {"recompute_batch": 2}))
# model -> its ablation variants (add rows here). The transformers run the tokenizer recomputation modes other than
# their default ("stages" for RevSFormer, False for Spikingformer), so each side shows what each mode buys.
ABLATION: dict[str, Variants] = {
    "RevSResNet37": _REV_ABLATION,
    "MS-ResNet34": _RESNET_ABLATION,
    "RevSFormer-4-384": ((None, {}), ("recompute_tokenizer=True", {"recompute_tokenizer": True}),
                         ("recompute_tokenizer=False", {"recompute_tokenizer": False}),
                         ("transition_batch=4", {"transition_batch": 4}),
                         # torch.nn's BatchNorm cannot be recomputed in micro-batches: the tokenizer in one piece
                         ("torch BatchNorm", {"batchnorm": "torch", "transition_batch": None})),
    "Spikingformer-4-384": ((None, {}), ("recompute_tokenizer=True", {"recompute_tokenizer": True}),
                            ("recompute_tokenizer=stages", {"recompute_tokenizer": "stages"})),
    "RevSResNet24": ((None, {}), ("transition_batch=None", {"transition_batch": None}),
                     ("recompute_transitions=False", {"recompute_transitions": False}),
                     ("keep_graph_stages=0 (all stages reversible)", {"keep_graph_stages": 0})),
}

# Pairs of batch sizes known to read low: (device type, models, smallest batch of a pair that reads right, why).
# Measured on the 2-core CPU machine (fp32, T=4, 32x32, 2026-12-01): RevSResNet21 and RevSResNet37 4.29 / 7.96 /
# 8.50 MiB per image at 2/4, 8/16, 16/32 (peaks 43/52, 73/136, 136/272 MiB). The non-reversible models, the
# transformers and the digits models read the same at every pair.
LOW_READINGS: tuple[tuple[str, tuple[str, ...], int, str], ...] = (
    ("cpu", ("RevSResNet21", "RevSResNet37", "RevSResNet109"), 16,
     "below batch 16 the peak of its CPU step sits on batch-independent buffers (a block's parameter gradients, "
     "oneDNN's weight-gradient work space), not on activations"),
)
DEFAULT_MMAP_THRESHOLD = 128 * 1024

# --cpu-small: the zoo's block counts at 1/8 of the widths (transformers: E=48 with 12 heads), so the depth
# dependence is that of the real models while a step costs well under a second on a CPU.
SMALL_OVERRIDES = {
    "RevSResNet": dict(widths=(8, 16, 32, 56)),
    "MS-ResNet": dict(widths=(8, 16, 32, 64)),
    "RevSFormer": dict(embed_dim=48),
    "Spikingformer": dict(embed_dim=48),
}
# The DVS ResNets have three stages.
SMALL_OVERRIDES_BY_NAME = {"RevSResNet24": dict(widths=(2, 4, 6)), "MS-ResNet20": dict(widths=(2, 4, 8))}


@dataclass(frozen=True)
class Case:
    """One model configuration to measure: registry ``name`` plus ``overrides``; ``label`` names it in tables."""
    label: str
    name: str
    family: str          # "resnet" or "transformer" (plot panel)
    reversible: bool
    depth: int | None    # layers (ResNets) or blocks (transformers); None where it has no place in the sweep
    overrides: dict = field(default_factory=dict)


def _family_prefix(name: str) -> str:
    return next(p for p in SMALL_OVERRIDES if name.startswith(p))


def model_case(name: str, small: bool = False) -> Case:
    """The :class:`Case` of a registered zoo model (``small``: tiny widths, see ``SMALL_OVERRIDES``)."""
    prefix = _family_prefix(name)
    overrides = dict(SMALL_OVERRIDES_BY_NAME.get(name, SMALL_OVERRIDES[prefix])) if small and name not in INPUT_SIZES \
        else {}
    reversible = name.startswith("Rev")
    if prefix in ("RevSFormer", "Spikingformer"):
        return Case(name, name, "transformer", reversible, int(name.split("-")[1]), overrides)
    return Case(name, name, "resnet", reversible, model_info(name).layers, overrides)


def depth_sweep_cases(small: bool = False) -> list[Case]:
    """RevSResNet21/37/109 and MS-ResNet18/34/104; the narrow family: RevSResNet21 at the narrow widths,
    RevSResNet1001, MS-ResNet250/498/998; RevSFormer and Spikingformer (E=384) with 2, 4 and 8 blocks."""
    cases = [model_case(n, small) for n in SWEEP_RESNETS]
    narrow = dict(widths=NARROW_WIDTHS["RevSResNet"])
    cases.append(Case("RevSResNet21-narrow", "RevSResNet21", "resnet-narrow", True, model_info("RevSResNet21").layers,
                      narrow))
    cases += [replace(model_case(n, small), family="resnet-narrow") for n in SWEEP_NARROW]
    for prefix in ("RevSFormer", "Spikingformer"):
        for depth in TRANSFORMER_SWEEP:
            overrides = dict(SMALL_OVERRIDES[prefix]) if small else {}
            overrides["depth"] = depth
            dim = overrides.get("embed_dim", 384)
            cases.append(Case(f"{prefix}-{depth}-{dim}", f"{prefix}-2-384", "transformer",
                              prefix == "RevSFormer", depth, overrides))
    return cases


def input_size(name: str, model: nn.Module) -> int:
    """The input height and width a model of the zoo is made for: digits 8, DVS event frames 128, else 32."""
    return INPUT_SIZES.get(name, 128 if model.event_input else 32)


def low_reading_warning(name: str, device_type: str, batch_sizes: Sequence[int]) -> str | None:
    """A one-line warning when memory per image of model ``name`` between ``batch_sizes`` on ``device_type``
    (``"cpu"`` / ``"cuda"``) is known to read low (:data:`LOW_READINGS`), else None."""
    small = min(batch_sizes)
    for device, models, min_batch, why in LOW_READINGS:
        if device == device_type and name in models and small < min_batch:
            pair = "/".join(str(b) for b in sorted(batch_sizes))
            return (f"{name} at {device_type} batches {pair} reads low: {why}; use batches {min_batch} and "
                    f"{2 * min_batch} or larger")
    return None


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
    batchnorm = kw.pop("batchnorm", None)
    if T is not None:
        kw["T"] = T
    model = create_model(case.name, neuron_impl=neuron_impl, **kw)
    if batchnorm is not None:
        model = convert_batchnorm(model, to=batchnorm)
    model = model.to(device).train()
    size = image_size or input_size(case.name, model)
    return model, training_step_fn(model, size, device, dtype, batch_sizes), neuron_impl, size


def measure_case(case: Case, *, device: torch.device, dtype: str, batch_sizes: Sequence[int], T: int | None,
                 image_size: int | None, neuron_impl: str = "triton", extra: dict | None = None,
                 rss: bool | None = None) -> dict:
    """Build ``case`` and measure its memory per image; returns one result row (keys: :data:`COLUMNS`).

    ``image_size`` None: the model's own (:func:`input_size`). ``rss`` (CPU only): also the peak resident memory
    of the same two steps (two more, unprofiled runs); None (default) = when this process has a fixed malloc
    mmap threshold (:func:`revsnn_triton.memory.set_malloc_mmap_threshold`), without which RSS reads high.
    ``warning`` holds :func:`low_reading_warning` for the pair, or None."""
    small, big = min(batch_sizes), max(batch_sizes)
    model, step, neuron_impl, size = _model_and_step(case, device, dtype, (small, big), T, image_size, neuron_impl,
                                                     extra)
    t0 = time.perf_counter()
    step(small)                                   # warm-up: optimizer state, kernel compilation, caches
    if rss is None:
        rss = device.type == "cpu" and malloc_mmap_threshold() is not None
    rss_small = rss_big = None
    if rss and device.type == "cpu":  # before the profiler runs, whose many small records fragment the heap
        rss_small, rss_big = measure_peak_rss(lambda: step(small)), measure_peak_rss(lambda: step(big))
    peak_small = measure_peak_bytes(lambda: step(small), device)
    reserved_small = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    peak_big = measure_peak_bytes(lambda: step(big), device)
    reserved_big = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    row = dict(model=case.label, family=case.family, reversible=case.reversible, depth=case.depth,
               neuron_impl=neuron_impl, dtype=dtype, T=model.T, image=size, batches=f"{small}/{big}",
               params_M=sum(p.numel() for p in model.parameters()) / 1e6,
               mib_per_image=(peak_big - peak_small) / (big - small) / MiB,
               peak_small_MiB=peak_small / MiB, peak_big_MiB=peak_big / MiB)
    if reserved_small is not None:  # CUDA: the caching allocator's reserved memory too (what nvidia-smi sees)
        row.update(reserved_mib_per_image=(reserved_big - reserved_small) / (big - small) / MiB,
                   reserved_big_MiB=reserved_big / MiB)
    if rss_small is not None and rss_big is not None:
        row.update(rss_mib_per_image=(rss_big - rss_small) / (big - small) / MiB,
                   peak_rss_small_MiB=rss_small / MiB, peak_rss_big_MiB=rss_big / MiB)
    # the known low readings are those of the zoo's models as registered (not of smaller widths or depths)
    warning = None if case.overrides else low_reading_warning(case.name, device.type, (small, big))
    row.update(seconds=time.perf_counter() - t0, warning=warning, status="ok")
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


COLUMNS = ["model", "family", "reversible", "depth", "neuron_impl", "dtype", "T", "image", "batches", "params_M",
           "mib_per_image", "peak_small_MiB", "peak_big_MiB", "rss_mib_per_image", "peak_rss_small_MiB",
           "peak_rss_big_MiB", "reserved_mib_per_image", "reserved_big_MiB", "seconds", "variant", "warning", "status"]


def plot_depth(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """One PNG: memory per image against depth; left ResNets, right transformers; reversible vs not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("memory: matplotlib is not installed; no plot drawn", file=sys.stderr)
        return None
    panels = [(f, x, t) for f, x, t in (
        ("resnet", "layers", "RevSResNet vs MS-ResNet (the zoo's widths)"),
        ("resnet-narrow", "layers", "narrow: RevSResNet21/1001 vs MS-ResNet250/498/998 (widths 16-128)"),
        ("transformer", "transformer blocks", "RevSFormer vs Spikingformer")) if any(r.get("family") == f for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (family, xlabel, panel_title) in zip(axes[0], panels):
        for reversible, style, label in ((True, "o-", "reversible"), (False, "s--", "non-reversible")):
            for dtype in sorted({r["dtype"] for r in rows}):
                pts = sorted((r["depth"], r["mib_per_image"]) for r in rows
                             if r.get("family") == family and r["reversible"] == reversible and r["dtype"] == dtype
                             and r.get("status") == "ok")
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{label} ({dtype})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("MiB per image (training step)")
        ax.set_title(panel_title, fontsize=9)
        if family == "resnet-narrow":
            ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:  # every case of the panel failed
            ax.text(0.5, 0.5, "no successful measurement", ha="center", va="center", transform=ax.transAxes)
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
             f"around them (`revsnn_triton.memory.peak_breakdown`). Command: `revsnn bench memory "
             f"{' '.join(args.argv)}`", ""]
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


def default_out(benchmark: str = "memory") -> Path:
    """``runs/bench/<benchmark>-<UTC date and time>`` under the current directory (``runs/`` is git-ignored)."""
    return Path("runs", "bench", f"{benchmark}-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="revsnn bench memory", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + __doc__.rstrip().rsplit("\n\n", 1)[1])
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: runs/bench/memory-<UTC time> under the current directory)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available, else cpu")
    p.add_argument("--models", nargs="+", default=None, metavar="MODEL",
                   help="models of the per-model table (default: " + " ".join(ALL_MODELS) + "); with --ablation "
                   "or --sweep alone, no per-model table")
    p.add_argument("--sweep", nargs="*", choices=SWEEP_FAMILIES, default=None, metavar="FAMILY",
                   help="also measure the depth sweep (resnet: RevSResNet21/37/109 vs MS-ResNet18/34/104 and the "
                   "narrow family up to RevSResNet1001 and MS-ResNet998; transformer: RevSFormer vs Spikingformer "
                   f"with {'/'.join(map(str, TRANSFORMER_SWEEP))} blocks; default: both) and plot memory per image "
                   "against depth")
    p.add_argument("--ablation", action="store_true",
                   help="also measure the ablation: each model of --models that has variants (default: "
                   + " ".join(ABLATION) + ") with each memory option switched")
    p.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=None,
                   help="default: fp32 bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--batch-sizes", nargs=2, type=int, default=None, metavar=("SMALL", "BIG"),
                   help="the two batch sizes of the slope (default: 16 64 on CUDA, 16 32 on the CPU, 4 8 with "
                   "--cpu-small)")
    p.add_argument("--T", type=int, default=None, help="time steps (default: each model's: 4 CIFAR, 10 DVS)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height and width (default: each model's own: 32 CIFAR, 128 DVS, 8 digits)")
    p.add_argument("--neuron-impl", choices=("triton", "torch", "spikingjelly"), default="triton",
                   help="neurons of every model (default: triton, our fused op)")
    p.add_argument("--mmap-threshold", type=int, default=DEFAULT_MMAP_THRESHOLD, metavar="BYTES",
                   help="CPU: fix glibc's malloc mmap threshold at BYTES before measuring, so that peak RSS follows "
                   "the allocations (default: 131072); 0: leave glibc's dynamic threshold and report no RSS")
    p.add_argument("--cpu-small", action="store_true",
                   help="CI mode: 1/8 widths, T=2, 32x32 inputs, batches 4 and 8, fp32 (only ratios and the shape "
                   "against depth mean something)")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new measurements after this")
    p.add_argument("--explain", type=int, default=0, metavar="N",
                   help="CPU only: instead of the tables, print for each of --models the N largest groups of "
                   "allocations alive at the peak of a training step at the larger batch size "
                   "(revsnn_triton.memory.peak_breakdown) and write them to memory_explain.md")
    args = p.parse_args(argv)
    args.argv = argv
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    cpu = args.device == "cpu"
    if args.explain < 0 or (args.explain and not cpu):
        p.error("--explain N: N >= 1, and only with --device cpu (on CUDA use torch.cuda.memory._snapshot)")
    known = list_models()
    for name in args.models or ():
        if name not in known:
            p.error(f"--models: unknown model {name!r}{did_you_mean(name, known)}; choose from: {' '.join(known)}")
    if args.ablation and args.models:
        missing = [n for n in args.models if n not in ABLATION]
        if missing == args.models:
            p.error(f"--ablation: no ablation variants for {' '.join(missing)}; models with variants: "
                    f"{' '.join(ABLATION)}")
    if args.sweep is not None:
        args.sweep = list(dict.fromkeys(args.sweep or SWEEP_FAMILIES))
    args.table = args.models is not None or not (args.sweep or args.ablation)
    args.ablation_models = [n for n in (args.models or ABLATION) if n in ABLATION]
    args.models = args.models or list(ALL_MODELS)
    if args.cpu_small:
        args.T = args.T or 2
        args.image_size = args.image_size or 32
    args.dtypes = args.dtypes or (["fp32"] if cpu else ["fp32", "bf16"])
    args.batch_sizes = args.batch_sizes or ([4, 8] if args.cpu_small else [16, 32] if cpu else [16, 64])
    if min(args.batch_sizes) < 1 or args.batch_sizes[0] == args.batch_sizes[1]:
        p.error(f"--batch-sizes must be two different positive sizes, got {args.batch_sizes}")
    if args.T is not None and args.T < 1:
        p.error(f"--T must be >= 1, got {args.T}")
    if args.image_size is not None and args.image_size < 1:
        p.error(f"--image-size must be >= 1, got {args.image_size}")
    if args.mmap_threshold < 0:
        p.error(f"--mmap-threshold must be >= 0, got {args.mmap_threshold}")
    args.out = args.out or default_out()
    return args


def _measure_in_child(mmap_threshold: int, kwargs: dict) -> dict:
    torch.set_num_threads(1)
    set_malloc_mmap_threshold(mmap_threshold)
    return measure_case(**kwargs)


def measure_case_isolated(mmap_threshold: int, **kwargs) -> dict:
    """:func:`measure_case` in a fresh (spawned) process whose malloc mmap threshold is fixed at ``mmap_threshold``
    bytes: its peak RSS is the model's own, not served from heap pages an earlier model left resident. Errors of
    the measurement are raised here."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_in_child, mmap_threshold, kwargs).result()


def _prepare_rss(mmap_threshold: int) -> tuple[bool, str]:
    """CPU: fix the malloc mmap threshold (before any model is built). Returns (measure RSS?, what it means)."""
    if mmap_threshold == 0:
        return False, "peak RSS not measured (--mmap-threshold 0: glibc's dynamic threshold makes RSS read 2-3x high)"
    if not set_malloc_mmap_threshold(mmap_threshold):
        return False, "peak RSS not measured: the C library is not glibc, so its mmap threshold cannot be fixed"
    reason = peak_rss_unavailable()
    if reason is not None:
        return False, f"peak RSS not measured: {reason}"
    return True, (f"peak RSS: the resident-memory high-water mark of the process during each step, glibc malloc "
                  f"mmap threshold fixed at {mmap_threshold} bytes")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    device = torch.device(args.device)
    with_rss, rss_note = False, ""
    if device.type == "cpu":
        torch.set_num_threads(1)   # memory, not speed, is measured; a second thread only adds contention
        with_rss, rss_note = _prepare_rss(args.mmap_threshold)
        print(f"memory: {rss_note}", flush=True)
    print(f"memory: results go to {args.out}", flush=True)
    start = time.perf_counter()
    note = ("Memory per image = (peak(b_big) - peak(b_small)) / (b_big - b_small) of one training step "
            "(forward, backward, SGD momentum step); real allocations "
            + ("(torch.cuda.max_memory_allocated)." if device.type == "cuda" else "(CPU profiler memory events).")
            + (f" {rss_note[0].upper()}{rss_note[1:]}." if rss_note else "")
            + (" --cpu-small: 1/8 widths, so only ratios and the shape against depth are meaningful."
               if args.cpu_small else ""))

    def out_of_time() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    measured: dict[tuple, dict] = {}     # (case, dtype, variant) -> row: the sweep reuses the per-model rows
    warned: set[str] = set()

    def run(cases, stem, title, variants_of: Callable[[Case], Variants] = lambda case: ((None, {}),)) -> list[dict]:
        rows: list[dict] = []
        for case in cases:
            warning = None if case.overrides else low_reading_warning(case.name, device.type, args.batch_sizes)
            if warning and warning not in warned:
                warned.add(warning)
                print(f"memory: warning: {warning}", file=sys.stderr, flush=True)
            for dtype in args.dtypes:
                for variant, extra in variants_of(case):
                    key = (case.label, case.name, tuple(sorted(case.overrides.items())), dtype, variant)
                    if key in measured:
                        rows.append(measured[key])
                        continue
                    if out_of_time():
                        print(f"memory: --budget-s {args.budget_s} reached; {stem} is partial", file=sys.stderr)
                        return rows
                    kwargs = dict(case=case, device=device, dtype=dtype, batch_sizes=args.batch_sizes, T=args.T,
                                  image_size=args.image_size, neuron_impl=args.neuron_impl, extra=extra,
                                  rss=with_rss)
                    try:
                        row = (measure_case_isolated(args.mmap_threshold, **kwargs) if with_rss
                               else measure_case(**kwargs))
                    except Exception as error:  # one failing case (e.g. out of memory) must not end the run
                        row = dict(model=case.label, family=case.family, reversible=case.reversible,
                                   depth=case.depth, dtype=dtype, mib_per_image=float("nan"),
                                   status=f"{type(error).__name__}: {str(error).splitlines()[0][:150]}")
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    row["variant"] = variant
                    rows.append(row)
                    measured[key] = row
                    rss = row.get("rss_mib_per_image")
                    rss = f"  (peak RSS {rss:.3f})" if rss is not None else ""
                    print(f"{row['model']:>22} {dtype} {variant or '':>22}: "
                          f"{row['mib_per_image']:.3f} MiB/image{rss}  {row['status']}", flush=True)
                    write_results(rows, args.out, stem, title, COLUMNS, notes=note)
        return rows

    from revsnn_triton.bench import write_results
    if args.explain:
        explain(args)
        print(f"memory: wrote {Path(args.out) / 'memory_explain.md'}")
        return 0
    if args.table:
        run([model_case(n, args.cpu_small) for n in args.models], "memory", "Training memory per image")
    if args.sweep:
        cases = [c for c in depth_sweep_cases(args.cpu_small) if c.family.split("-")[0] in args.sweep]
        rows = run(cases, "memory_depth", "Training memory per image against depth")
        if rows:
            env_dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            png = plot_depth(rows, Path(args.out) / "memory_depth.png",
                             f"Training memory per image against depth ({env_dev}, {args.neuron_impl} neurons)")
            if png:
                print(f"wrote {png}")
    if args.ablation:
        run([model_case(n, args.cpu_small) for n in args.ablation_models], "memory_ablation",
            "Training memory per image: what each option buys (empty variant: the defaults)",
            lambda case: ABLATION[case.name])
    print(f"memory: results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
