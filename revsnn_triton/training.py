"""The training loop behind ``revsnn train``: single process, or ``torchrun`` + DistributedDataParallel.

``train(config) -> TrainResult``. Per epoch it writes ``metrics.jsonl`` / ``metrics.csv`` / ``curves.png`` and an
atomic ``checkpoint_last.pt`` (plus ``checkpoint_best.pt`` on a new best test accuracy) into ``config.out``; rank 0
alone writes and prints. ``resume`` continues exactly where the checkpoint left off: model, optimizer, scheduler,
RNG states and epoch are restored, and the data order of epoch ``e`` is a function of ``(seed, e)`` only
(``DistributedSampler.set_epoch``), so on the CPU the resumed run reproduces the uninterrupted run's losses.
A run killed mid-epoch loses only that epoch. A non-finite loss stops the run before the parameters are
updated, with :class:`TrainingError` naming the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint as ckpt
from . import schedule
from .config import ConfigError, TrainConfig, make_config
from .data import DataBundle, batch_transforms, build_data, default_model, head_classes
from .fileio import atomic_write, atomic_write_text
from .functional import reset_net

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s",
                  "epoch_time_s")

_NOT_SHARED = ("blocks", "depth", "reversible", "frac_bits", "check")


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the message says why and which checkpoint is good."""


@dataclass
class TrainResult:
    """What a run produced. Accuracies are fractions in [0, 1]; ``memory`` maps model name -> bytes per image
    (training step, slope over two batch sizes) when the memory report ran."""

    out_dir: str
    epochs_run: int
    final_test_acc: float
    best_test_acc: float
    best_epoch: int
    images_per_s: float
    wall_time_s: float
    history: list[dict] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    memory_note: str = ""


# ------------------------------------------------------------------------------------------------ distributed
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1


def _setup_distributed(cfg: TrainConfig) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.device is not None:
        try:
            device = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(f"config: device {cfg.device!r} is not a valid torch device string") from None
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"config: device {cfg.device!r} requested but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.on else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if cfg.sync_bn and info.on and device.type != "cuda":
        raise ConfigError("config: sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
    if device.type == "cpu" and cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    if info.on and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def _all_sum(values: list[float], d: _Dist, device: torch.device) -> list[float]:
    if not d.on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------------- building blocks
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, data: DataBundle, name: str | None = None) -> nn.Module:
    """``create_model`` for the config and dataset (unknown names -> :class:`ConfigError` listing choices)."""
    from .models import create_model, list_models

    name = name or cfg.model or default_model(cfg.dataset)
    if name not in list_models():
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    try:
        return create_model(name, num_classes=head_classes(cfg, data), T=cfg.T, neuron_impl=cfg.neuron_impl,
                            **cfg.model_kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {name!r} could not be built with T={cfg.T}, neuron_impl={cfg.neuron_impl!r}, "
                          f"model_kwargs={cfg.model_kwargs!r}: {exc}") from None


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on biases, norm parameters and other 1-d parameters (e.g. PLIF's w), unless the recipe
    # decays every parameter (decay_bias_and_norm, as torch's optimizers on model.parameters()).
    decay = [p for p in model.parameters() if p.requires_grad and (p.dim() > 1 or cfg.decay_bias_and_norm)]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1 and not cfg.decay_bias_and_norm]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


# ---- learning-rate schedule (revsnn_triton.schedule) ----
def _scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
               ) -> tuple[torch.optim.lr_scheduler.LambdaLR, int]:
    """The run's scheduler (stepped after every optimizer step) and its number of epochs (``epochs`` plus
    ``cooldown_epochs``, as timm)."""
    return schedule.build_scheduler(cfg, optimizer, steps_per_epoch), schedule.total_epochs(cfg)


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.amp == "bf16" else torch.float16)


def _loss_fn(cfg: TrainConfig):
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    return loss


# --------------------------------------------------------------------------------------------------- outputs
def _write_metrics(out: Path, history: list[dict]) -> None:
    """Rewrite metrics.jsonl, metrics.csv and curves.png from the whole history (so a resumed run's files hold
    each epoch exactly once)."""
    atomic_write(out / "metrics.jsonl",
                  lambda f: f.write("".join(json.dumps(row) + "\n" for row in history).encode()))

    def write_csv(f) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        f.write(text.getvalue().encode())
    atomic_write(out / "metrics.csv", write_csv)
    _plot_curves(out / "curves.png", history)


def _plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in history], "s-", label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)


# ------------------------------------------------------------------------------------------------- the loop
def _evaluate(model: nn.Module, loader: DataLoader, cfg: TrainConfig, device: torch.device, d: _Dist
              ) -> tuple[float, float]:
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            reset_net(model)
            with _autocast(cfg, device):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            count += y.numel()
    loss_sum, correct, count = _all_sum([loss_sum, correct, count], d, device)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _loaders(cfg: TrainConfig, data: DataBundle, d: _Dist, device: torch.device
             ) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    # Data order of epoch e depends on (seed, e) only, in every mode (exact resume); each rank takes its share.
    sampler = DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise ConfigError(f"config: batch_size {cfg.batch_size} is larger than the {len(sampler)} training "
                          f"samples each of the {d.world} process(es) gets")
    pin = device.type == "cuda"
    train = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                       num_workers=cfg.workers, pin_memory=pin, persistent_workers=False)
    # Evaluation: rank r takes samples r, r + world, ... (no padding duplicates, so the accuracy is exact).
    n_test = len(data.test) if cfg.max_eval_samples is None else min(len(data.test), cfg.max_eval_samples)
    test_idx = list(range(d.rank, n_test, d.world))
    test = DataLoader(torch.utils.data.Subset(data.test, test_idx), batch_size=cfg.eval_batch_size or
                      2 * cfg.batch_size, shuffle=False, num_workers=cfg.workers, pin_memory=pin)
    return train, sampler, test


def train(config: TrainConfig | dict | None = None, **overrides: Any) -> TrainResult:
    """Train a model as ``config`` says (a :class:`TrainConfig`, a dict of its fields, or None for the digits
    demo defaults; keyword ``overrides`` win). Returns a :class:`TrainResult`. Raises :class:`ConfigError`,
    :class:`~revsnn_triton.data.DataError`, :class:`~revsnn_triton.checkpoint.CheckpointError` or
    :class:`TrainingError` with a message meant for the user."""
    if config is None:
        cfg = make_config(**overrides)
    elif isinstance(config, TrainConfig):
        cfg = make_config(**{**config.to_dict(), **overrides})
    elif isinstance(config, dict):
        cfg = make_config(**{**config, **overrides})
    else:
        raise TypeError(f"train: config must be a TrainConfig, a dict or None, got {type(config).__name__}")

    t_start = time.perf_counter()
    d, device = _setup_distributed(cfg)
    try:
        return _train(cfg, d, device, t_start)
    finally:
        if d.on and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, d: _Dist, device: torch.device, t_start: float) -> TrainResult:
    out = Path(cfg.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    data = build_data(cfg)
    model_name = cfg.model or default_model(cfg.dataset)

    _seed_everything(cfg.seed)  # identical initial weights on every rank
    raw = build_model(cfg, data, model_name).to(device)
    if cfg.sync_bn and d.on:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    optimizer = _make_optimizer(cfg, raw)
    train_loader, sampler, test_loader = _loaders(cfg, data, d, device)
    steps_per_epoch = len(train_loader) if cfg.max_steps_per_epoch is None else min(
        len(train_loader), cfg.max_steps_per_epoch)
    scheduler, num_epochs = _scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    if d.rank:
        _seed_everything(cfg.seed + d.rank)  # different augmentation draws per rank

    start_epoch, history, best_acc, best_epoch = 0, [], -1.0, -1
    if cfg.resume:
        state = _load_resume(cfg, model_name)
        try:
            raw.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {cfg.resume!r} does not match model {model_name!r} or this "
                                       f"optimizer: {str(exc).splitlines()[0]}") from None
        start_epoch = int(state["epoch"]) + 1
        history = list(state["history"])
        best_acc, best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        rng = state["rng"]
        ckpt.set_rng_state(rng[d.rank] if isinstance(rng, list) and d.rank < len(rng) else rng)

    model: nn.Module = raw
    if d.on:
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    eval_model = raw if d.on else model
    loss_fn = _loss_fn(cfg)
    batch_transform = batch_transforms(cfg, head_classes(cfg, data))  # MixUp/CutMix, then random erasing

    if d.main:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"revsnn train: {model_name} ({n_params / 1e6:.3f}M parameters) on {cfg.dataset} "
              f"({len(data.train)} train / {len(data.test)} test), {d.world} process(es) on {device}, "
              f"T={cfg.T}, batch {cfg.batch_size}x{d.world}, {num_epochs} epochs, amp={cfg.amp}, "
              f"neurons={cfg.neuron_impl}" + (f", resuming at epoch {start_epoch + 1}" if cfg.resume else ""),
              flush=True)

    train_images = train_time = 0.0
    for epoch in range(start_epoch, num_epochs):
        sampler.set_epoch(epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum = correct = seen = 0.0
        bar = _progress(_take(train_loader, steps_per_epoch), steps_per_epoch,
                        f"epoch {epoch + 1}/{num_epochs}", cfg.progress and d.main)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x, target = batch_transform(x, y, epoch)
            reset_net(raw)
            with _autocast(cfg, device):
                logits = model(x)
            loss = loss_fn(logits, target)
            checked = loss.detach().clone()
            if d.on:
                dist.all_reduce(checked)
                checked /= d.world
            value = checked.item()
            if not math.isfinite(value):
                raise TrainingError(_nan_message(value, epoch, step, out, history))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            n = y.numel()
            loss_sum += loss.item() * n
            correct += (logits.detach().argmax(dim=1) == y).sum().item()
            seen += n
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        epoch_train_time = time.perf_counter() - t0
        loss_sum, correct, seen = _all_sum([loss_sum, correct, seen], d, device)
        train_images += seen
        train_time += epoch_train_time
        test_loss, test_acc = _evaluate(eval_model, test_loader, cfg, device, d)
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "train_loss": loss_sum / seen,
               "train_acc": correct / seen, "test_loss": test_loss, "test_acc": test_acc,
               "images_per_s": seen / epoch_train_time, "epoch_time_s": time.perf_counter() - t0}
        history.append(row)
        improved = test_acc > best_acc
        if improved:
            best_acc, best_epoch = test_acc, epoch + 1
        rngs = _gather_rng(d)
        if d.main:
            state = {"epoch": epoch, "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else {},
                     "rng": rngs, "history": history, "best_acc": best_acc, "best_epoch": best_epoch,
                     "model_name": model_name, "config": cfg.to_dict()}
            ckpt.save_checkpoint(out / LAST, state)
            if improved:
                ckpt.save_checkpoint(out / BEST, state)
            _write_metrics(out, history)
            print(f"epoch {epoch + 1:3d}/{num_epochs}  train loss {row['train_loss']:.4f} acc "
                  f"{100 * row['train_acc']:6.2f}%  test loss {test_loss:.4f} acc {100 * test_acc:6.2f}%  "
                  f"{row['images_per_s']:8.1f} img/s  {row['epoch_time_s']:6.1f} s", flush=True)
        if d.on:
            dist.barrier()

    images_per_s = train_images / train_time if train_time else (history[-1]["images_per_s"] if history else 0.0)
    result = TrainResult(out_dir=str(out), epochs_run=num_epochs - start_epoch,
                         final_test_acc=history[-1]["test_acc"] if history else float("nan"),
                         best_test_acc=best_acc, best_epoch=best_epoch, images_per_s=images_per_s,
                         wall_time_s=0.0, history=history)
    if cfg.memory_report and d.main:
        result.memory, result.memory_note = memory_report(cfg, data, device, model_name)
    result.wall_time_s = time.perf_counter() - t_start
    if d.main:
        summary = {k: v for k, v in result.__dict__.items() if k != "history"}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(format_report(result, model_name, device, cfg))
    return result


def _take(loader: DataLoader, n: int) -> Iterator:
    for i, batch in enumerate(loader):
        if i >= n:
            return
        yield batch


def _gather_rng(d: _Dist) -> Any:
    state = ckpt.rng_state()
    if not d.on:
        return state
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, state)
    return gathered


def _load_resume(cfg: TrainConfig, model_name: str) -> dict:
    path = Path(cfg.resume)
    if path.is_dir():
        path = path / LAST
    state = ckpt.load_checkpoint(path)
    missing = {"epoch", "model", "optimizer", "scheduler", "rng", "history", "best_acc", "best_epoch"} - set(state)
    if missing:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} lacks {sorted(missing)}: not a training checkpoint")
    if state.get("model_name") != model_name:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} was written for model {state.get('model_name')!r}, "
                                   f"not {model_name!r}")
    if int(state["epoch"]) + 1 >= schedule.total_epochs(cfg):
        raise ConfigError(f"checkpoint {str(path)!r} already finished epoch {int(state['epoch']) + 1} of "
                          f"{schedule.total_epochs(cfg)} (epochs + cooldown_epochs); pass a larger --epochs to "
                          f"continue training")
    return state


def _nan_message(value: float, epoch: int, step: int, out: Path, history: list[dict]) -> str:
    last = out / LAST
    kept = (f"the last good checkpoint is {str(last)!r} (end of epoch {history[-1]['epoch']})" if history
            else "no checkpoint had been written yet")
    return (f"loss became {value} at epoch {epoch + 1}, step {step + 1}; training stopped before updating the "
            f"weights. {kept}. Try a lower --lr, --amp none, or gradient clipping (grad_clip in the config).")


# ------------------------------------------------------------------------------------------------ memory report
def memory_report(cfg: TrainConfig, data: DataBundle, device: torch.device, model_name: str
                  ) -> tuple[dict[str, float], str]:
    """Memory per image of one training step (forward + backward) of ``model_name`` and of its non-reversible
    counterpart (``revsnn_triton.models.counterpart``), measured by ``revsnn_triton.memory.memory_per_image``
    with freshly built models on ``device``. Returns ``({name: bytes per image}, note)``."""
    import warnings

    from .memory import memory_per_image
    from .models import counterpart

    # The CPU measurement uses the profiler's allocation events; keep its log lines out of the report.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

    names = [model_name] + [n for n in [counterpart(model_name)] if n]
    batch_sizes = (16, 64) if device.type == "cuda" else (8, 32)
    results: dict[str, float] = {}
    for name in names:
        torch.manual_seed(cfg.seed)
        if name == model_name:
            model = build_model(cfg, data, name)
        else:  # the counterpart: same settings except depth and the reversible engine's own options
            kwargs = {k: v for k, v in cfg.model_kwargs.items() if k not in _NOT_SHARED}
            model = build_model(make_config(**{**cfg.to_dict(), "model_kwargs": kwargs}), data, name)
        model = model.to(device).train()
        loss_fn = _loss_fn(cfg)

        def step(batch_size: int, model=model) -> None:
            x = torch.rand(batch_size, *data.sample_shape, device=device)
            y = torch.randint(0, data.num_classes, (batch_size,), device=device)
            reset_net(model)
            with _autocast(cfg, device):
                logits = model(x)
            loss_fn(logits, y).backward()
            model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[name] = float(memory_per_image(step, batch_sizes, device))
        del model
    note = (f"training step (eager, amp={cfg.amp}), slope of peak allocated memory between batch {batch_sizes[0]} "
            f"and {batch_sizes[1]}, {'CUDA max_memory_allocated' if device.type == 'cuda' else 'CPU allocation accounting'}")
    return results, note


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_report(result: TrainResult, model_name: str, device: torch.device, cfg: TrainConfig) -> str:
    """The short end-of-run report printed by ``revsnn train``."""
    lines = [f"revsnn train: finished {result.epochs_run} epoch(s) in {result.wall_time_s:.1f} s",
             f"  test accuracy     {100 * result.final_test_acc:.2f} % (best {100 * result.best_test_acc:.2f} % "
             f"at epoch {result.best_epoch})",
             f"  training speed    {result.images_per_s:.1f} images/s ({device.type}, amp={cfg.amp})"]
    if result.memory:
        parts = [f"{name} {_fmt_bytes(b)}" for name, b in result.memory.items()]
        line = "  memory per image  " + "  vs  ".join(parts)
        values = list(result.memory.values())
        if len(values) == 2 and values[0] > 0:
            line += f"  (the reversible model needs {values[1] / values[0]:.2f}x less)"
        lines += [line, f"                    ({result.memory_note})"]
    lines.append(f"  outputs           {result.out_dir}/ (metrics.jsonl, metrics.csv, curves.png, {LAST}, {BEST})")
    return "\n".join(lines)
