"""The training loop behind ``revsnn train``: single process, or ``torchrun`` + DistributedDataParallel.

``train(config) -> TrainResult``. A run lives in one folder, ``config.out`` (by default a new
``runs/train/<YYYYmmdd-HHMMSS>-<model>``): ``config.json`` (what ran), ``train.log`` (what was printed),
``metrics.jsonl`` / ``metrics.csv`` / ``curves.png``, ``checkpoint_last.pt`` and, on a new best test accuracy,
``checkpoint_best.pt``, then ``summary.json``; with ``log="tensorboard"`` also TensorBoard event files. Every
file is written atomically with the umask's permissions; rank 0 alone writes and prints. A folder that already
holds a run is refused unless the run is resumed or ``overwrite=True``.

The loop, in named steps: resolve the config (for a resume, the checkpoint's own, see
:func:`~revsnn_triton.config.resume_config`) -> claim the run folder -> build data, model and optimizer ->
restore the checkpoint -> per epoch: train, evaluate, check that the model is finite, save -> report.

Resuming continues exactly where the checkpoint left off: model, optimizer, RNG states and epoch are restored,
the learning rate is a function of the config and the step only, and the data order of epoch ``e`` is a
function of ``(seed, e)`` only (``DistributedSampler.set_epoch``), so on the CPU the resumed run reproduces the
uninterrupted one. A run killed mid-epoch loses only that epoch. A run that diverges (a non-finite loss, weights
that became non-finite, values outside a reversible model's fixed-point range) stops with
:class:`TrainingError` before anything non-finite is saved, naming the last good checkpoint.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime
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
from .config import ConfigError, TrainConfig, field_names, make_config, resume_config
from .data import DataBundle, DataError, batch_transforms, build_data, default_model, head_classes
from .evaluation import autocast, evaluate, model_from_config, resolve_device
from .memory import set_malloc_mmap_threshold
from .fileio import atomic_write, atomic_write_text, remove_stale_temps
from .functional import reset_net

LAST = "checkpoint_last.pt"
BEST = "checkpoint_best.pt"
LOG = "train.log"
# Every file a run writes into its folder (TensorBoard's event files aside).
OUTPUT_FILES = ("config.json", LOG, "metrics.jsonl", "metrics.csv", "curves.png", LAST, BEST, "summary.json")
METRIC_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s",
                  "epoch_time_s")
DEFAULT_RUNS = Path("runs") / "train"
# model_kwargs a non-reversible counterpart does not share with its reversible model (memory report).
_NOT_SHARED = ("blocks", "depth", "reversible", "frac_bits", "check")


# Training on the CPU fixes glibc's malloc mmap threshold at this many bytes (see _setup_distributed).
CPU_MMAP_THRESHOLD = 128 * 1024


class TrainingError(RuntimeError):
    """Training stopped (the run diverged); the message says why and which checkpoint is good."""


class OutputError(RuntimeError):
    """An output file of the run could not be written (a full disk, permissions); the message names it and what
    was kept."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: ``run_folder`` and ``last_good`` (the last good checkpoint, or None) say what is kept."""

    def __init__(self, run_folder: str, last_good: str | None):
        super().__init__(run_folder)
        self.run_folder, self.last_good = run_folder, last_good


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


def train(config: TrainConfig | dict | None = None, *, overwrite: bool = False, **overrides: Any) -> TrainResult:
    """Train a model as ``config`` says (a :class:`TrainConfig`, a dict of its fields, or None for the digits
    demo defaults; keyword ``overrides`` win). Returns a :class:`TrainResult`.

    With ``resume`` set, the run continues the checkpoint's run: its config and folder, with the given settings
    that may change mid-run applied (each change is printed) and the others refused. ``overwrite=True`` lets a
    new run replace the run already in ``out``. Raises :class:`ConfigError`,
    :class:`~revsnn_triton.data.DataError`, :class:`~revsnn_triton.checkpoint.CheckpointError`,
    :class:`OutputError` or :class:`TrainingError` with a message meant for the user.
    """
    request = _requested_settings(config, overrides)
    t_start = time.perf_counter()
    if request.get("resume"):
        cfg, changes, resumed = _resume(request)
    else:
        cfg, changes, resumed = make_config(**request), [], None
    d, device = _setup_distributed(cfg)
    try:
        return _run(cfg, d, device, resumed, changes, overwrite, t_start)
    finally:
        if d.on and dist.is_initialized():
            dist.destroy_process_group()


def _requested_settings(config: TrainConfig | dict | None, overrides: dict) -> dict:
    if config is None:
        base = {}
    elif isinstance(config, TrainConfig):
        base = config.to_dict()
    elif isinstance(config, dict):
        base = dict(config)
    else:
        raise TypeError(f"train: config must be a TrainConfig, a dict or None, got {type(config).__name__}")
    request = {**base, **overrides}
    if request.get("resume") and request.get("out") is None:
        request.pop("out", None)  # None means "the default folder", which for a resume is the run's own
    return request


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
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.on else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if cfg.sync_bn and info.on and device.type != "cuda":
        raise ConfigError("config: sync_bn needs CUDA devices (torch's SyncBatchNorm does not run on the CPU)")
    if device.type == "cpu":
        if cfg.cpu_threads is not None:
            torch.set_num_threads(cfg.cpu_threads)
        # glibc's dynamic mmap threshold keeps freed activations in the heap, so the resident memory of a CPU run
        # grows to 2-3x its allocations; a fixed threshold gives the memory back as it is freed (a no-op off glibc)
        set_malloc_mmap_threshold(CPU_MMAP_THRESHOLD)
    if info.on and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def _all_sum(values: list[float], d: _Dist, device: torch.device) -> list[float]:
    if not d.on:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _from_rank0(value: Any, d: _Dist) -> Any:
    if not d.on:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------------ resume
@dataclass
class _Resumed:
    """The checkpoint a run continues from."""
    path: Path
    state: dict


def _resume(request: dict) -> tuple[TrainConfig, list[str], _Resumed]:
    """The resumed run's config (the checkpoint's own, ``request`` applied), the changes, and the checkpoint."""
    path = Path(request["resume"]).expanduser()
    if path.is_dir():
        path = path / LAST
    state = ckpt.load_checkpoint(path)
    ckpt.check_training_state(state, path)
    saved = dict(state["config"])
    if "out" not in request:  # the run's own folder: where its checkpoint is now
        if saved.get("out") is None or Path(saved["out"]).resolve() != path.parent.resolve():
            saved["out"] = str(path.parent)
    try:
        cfg, changes = resume_config(saved, {**request, "resume": str(path)})
    except ConfigError as exc:
        if "the checkpoint's config" in str(exc):
            raise ckpt.CheckpointError(f"checkpoint {str(path)!r}: {exc}") from None
        raise
    done, total = int(state["epoch"]) + 1, schedule.total_epochs(cfg)
    if done >= total:
        raise ConfigError(f"checkpoint {str(path)!r} already finished epoch {done} of {total} (epochs + "
                          f"cooldown_epochs); pass a larger --epochs to continue training")
    return cfg, changes, _Resumed(path, state)


# -------------------------------------------------------------------------------------------------- run folder
def _claim_run_folder(cfg: TrainConfig, d: _Dist, resumed: _Resumed | None, overwrite: bool) -> TrainConfig:
    """Resolve ``cfg.out`` (a new timestamped folder when None) and check it can take this run: not a file,
    writable, and not holding another run unless this run resumes it or ``overwrite``. Removes the temporary
    files of killed writes there, and with ``overwrite`` the previous run's outputs. Creates nothing."""
    if cfg.out is None:
        cfg = replace(cfg, out=_from_rank0(str(_new_run_folder(cfg)) if d.main else None, d))
    out = Path(cfg.out).expanduser()
    cfg = replace(cfg, out=str(out))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {str(out)!r} is a file; pass --out with a folder")
    anchor = next(p for p in (out, *out.parents) if p.exists())
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder {str(out)!r} is not writable ({str(anchor)!r} does not allow creating "
                          f"files); pass --out with a folder you can write to")
    own = resumed is not None and resumed.path.parent.resolve() == out.resolve()
    held = [name for name in (LAST, BEST) if (out / name).exists()]
    if held and not own and not overwrite:
        raise ConfigError(f"output folder {str(out)!r} already holds a run ({held[0]}); continue it with --resume "
                          f"{str(out)}, start over in it with --overwrite, or choose another --out")
    if d.main and out.is_dir():
        remove_stale_temps(out, list(OUTPUT_FILES))
        if held and not own:  # overwrite: nothing of the previous run may be mistaken for this one's
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
            for events in out.glob("events.out.tfevents.*"):
                events.unlink()
    if cfg.log == "tensorboard":
        _summary_writer_class()
    return cfg


def _new_run_folder(cfg: TrainConfig) -> Path:
    """``runs/train/<YYYYmmdd-HHMMSS>-<model>`` (with ``-1``, ``-2``, ... if it exists)."""
    name = f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.model or default_model(cfg.dataset)}"
    folder, n = DEFAULT_RUNS / name, 0
    while folder.exists():
        n += 1
        folder = DEFAULT_RUNS / f"{name}-{n}"
    return folder


def _make_folder(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"output folder {str(out)!r} could not be created ({exc.strerror or exc}); pass --out "
                          f"with a folder you can write to") from None


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--log tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'revsnn-triton[train]')") from None
    return SummaryWriter


class _RunLog:
    """Prints to stdout (rank 0 only) and writes the same lines to the run's ``train.log`` (appended to when the
    run continues in its own folder)."""

    def __init__(self, path: Path | None, append: bool):
        try:
            self.file = None if path is None else open(path, "a" if append else "w", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"could not write {str(path)!r} ({exc.strerror or exc}); pass --out with a folder you "
                              f"can write to") from None

    def print(self, text: str) -> None:
        if self.file is None:
            return
        print(text, flush=True)
        self.write(text)

    def write(self, text: str) -> None:
        """Into the log only (messages that the caller prints itself)."""
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ------------------------------------------------------------------------------------------------------- data
def _build_data(cfg: TrainConfig) -> DataBundle:
    """:func:`~revsnn_triton.data.build_data`, with a failed download (no network, a server error) turned into a
    :class:`DataError` that names the URL and where to put the files by hand, and no empty folders left."""
    root = Path(cfg.data_dir).expanduser()
    # The folders before a download, to remove the empty ones it leaves if it fails (torchvision and tonic make
    # them before downloading).
    before = _folders(root) if cfg.download else None
    try:
        return build_data(cfg)
    except OSError as exc:  # urllib's URLError / HTTPError, socket timeouts, a full disk while extracting
        url = _failed_url(exc)
        try:
            build_data(replace(cfg, download=False))
            by_hand = ""
        except DataError as missing:
            by_hand = f"; without network: {missing}".replace(", or pass --download", "")
        finally:
            if before is not None:
                _remove_new_empty_folders(root, before)
        reason = getattr(exc, "reason", None) or exc.strerror or exc
        what = "downloading" if cfg.download else "reading"
        raise DataError(f"{what} dataset {cfg.dataset!r} failed ({reason})"
                        + (f" at {url}" if url else "") + by_hand) from None


def _failed_url(exc: BaseException) -> str | None:
    """The ``url`` argument of the innermost download function in the traceback (torchvision's and tonic's
    ``download_url``), if any."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        url = frame.f_locals.get("url")
        if isinstance(url, str) and url.startswith(("http://", "https://", "ftp://")):
            found = url
    return found


def _folders(root: Path) -> set[Path]:
    """``root``, the folders in it and its ancestors, as far as they exist."""
    inside = {p for p in root.rglob("*") if p.is_dir()} if root.is_dir() else set()
    return inside | {p for p in (root, *root.parents) if p.is_dir()}


def _remove_new_empty_folders(root: Path, before: set[Path]) -> None:
    new = (_folders(root) - before) | {p for p in (root, *root.parents) if p.is_dir() and p not in before}
    for folder in sorted(new, key=lambda p: len(p.parts), reverse=True):  # deepest first
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


# ------------------------------------------------------------------------------------- model and optimization
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, data: DataBundle, name: str | None = None) -> nn.Module:
    """``create_model`` for the config and dataset (unknown names -> :class:`ConfigError` listing choices)."""
    return model_from_config(cfg, head_classes(cfg, data), name)


def _optimizer_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    # No weight decay on biases, norm parameters and other 1-d parameters (e.g. PLIF's w), unless the recipe
    # decays every parameter (decay_bias_and_norm, as torch's optimizers on model.parameters()).
    decay = [p for p in model.parameters() if p.requires_grad and (p.dim() > 1 or cfg.decay_bias_and_norm)]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1 and not cfg.decay_bias_and_norm]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = _optimizer_groups(cfg, model)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _apply_hyperparameters(cfg: TrainConfig, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After loading a checkpoint's optimizer state: the config's weight decay and momentum, not the saved ones
    (they may have changed on resume)."""
    for group, fresh in zip(optimizer.param_groups, _optimizer_groups(cfg, model)):
        group["weight_decay"] = fresh["weight_decay"]
        if "momentum" in group:
            group["momentum"] = cfg.momentum


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, start_step: int = 0
                   ) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's learning-rate schedule (:mod:`revsnn_triton.schedule`, stepped after every optimizer step),
    positioned at ``start_step`` for a resumed run."""
    return schedule.build_scheduler(cfg, optimizer, steps_per_epoch, start_step=start_step)


def _loss_fn(cfg: TrainConfig):
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    return loss


def _loaders(cfg: TrainConfig, data: DataBundle, d: _Dist, device: torch.device
             ) -> tuple[DataLoader, DistributedSampler, DataLoader]:
    # Data order of epoch e depends on (seed, e) only, in every mode (exact resume); each rank takes its share.
    sampler = DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=True)
    if len(sampler) < cfg.batch_size:
        raise ConfigError(f"config: batch_size {cfg.batch_size} is larger than the {len(sampler)} training "
                          f"samples each of the {_plural(d.world, 'process', 'processes')} gets")
    pin = device.type == "cuda"
    train = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                       num_workers=cfg.workers, pin_memory=pin, persistent_workers=False)
    # Evaluation: rank r takes samples r, r + world, ... (no padding duplicates, so the accuracy is exact).
    n_test = len(data.test) if cfg.max_eval_samples is None else min(len(data.test), cfg.max_eval_samples)
    test_idx = list(range(d.rank, n_test, d.world))
    test = DataLoader(torch.utils.data.Subset(data.test, test_idx), batch_size=cfg.eval_batch_size or
                      2 * cfg.batch_size, shuffle=False, num_workers=cfg.workers, pin_memory=pin)
    return train, sampler, test


@dataclass
class _Session:
    """Everything one run trains with."""
    cfg: TrainConfig
    d: _Dist
    device: torch.device
    out: Path
    data: DataBundle
    model_name: str
    raw: nn.Module                # the model itself (checkpoints, evaluation under DDP)
    model: nn.Module              # what the training step calls (DDP and/or compiled wrapper of raw)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    train_loader: DataLoader
    sampler: DistributedSampler
    test_loader: DataLoader
    steps_per_epoch: int
    epochs: int                   # epochs + cooldown_epochs
    num_classes: int              # width of the model's head


@dataclass
class _Progress:
    """Where the run stands: finished epochs and the last checkpoint known to be good."""
    start_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_acc: float = -1.0
    best_epoch: int = -1
    last_good: str | None = None   # "'<path>' (end of epoch N)"


def _build_session(cfg: TrainConfig, data: DataBundle, d: _Dist, device: torch.device,
                   resumed: _Resumed | None) -> tuple[_Session, _Progress]:
    """Model, optimizer, schedule and loaders for ``cfg``, restored from ``resumed`` when given."""
    model_name = cfg.model or default_model(cfg.dataset)
    _seed_everything(cfg.seed)  # identical initial weights on every rank
    raw = build_model(cfg, data, model_name).to(device)
    if cfg.sync_bn and d.on:
        raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    optimizer = _make_optimizer(cfg, raw)
    train_loader, sampler, test_loader = _loaders(cfg, data, d, device)
    steps_per_epoch = len(train_loader) if cfg.max_steps_per_epoch is None else min(
        len(train_loader), cfg.max_steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    if d.rank:
        _seed_everything(cfg.seed + d.rank)  # different augmentation draws per rank
    progress = _Progress() if resumed is None else _restore(resumed, cfg, model_name, raw, optimizer, scaler, d)
    scheduler = make_scheduler(cfg, optimizer, steps_per_epoch, progress.start_epoch * steps_per_epoch)
    model: nn.Module = raw
    if d.on:
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    session = _Session(cfg, d, device, Path(cfg.out), data, model_name, raw, model, optimizer, scheduler, scaler,
                       train_loader, sampler, test_loader, steps_per_epoch, schedule.total_epochs(cfg),
                       head_classes(cfg, data))
    return session, progress


def _restore(resumed: _Resumed, cfg: TrainConfig, model_name: str, raw: nn.Module,
             optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, d: _Dist) -> _Progress:
    state, where = resumed.state, str(resumed.path)
    if state["model_name"] != model_name:
        raise ckpt.CheckpointError(f"checkpoint {where!r} was written for model {state['model_name']!r}, "
                                   f"not {model_name!r}")
    try:
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ckpt.CheckpointError(f"checkpoint {where!r} does not match model {model_name!r} or this "
                                   f"optimizer: {str(exc).splitlines()[0]}") from None
    _apply_hyperparameters(cfg, optimizer, raw)
    rng = state["rng"]
    ckpt.set_rng_state(rng[d.rank] if isinstance(rng, list) and d.rank < len(rng) else
                       rng[0] if isinstance(rng, list) else rng)
    epoch = int(state["epoch"])
    return _Progress(start_epoch=epoch + 1, history=list(state["history"]), best_acc=float(state["best_acc"]),
                     best_epoch=int(state["best_epoch"]), last_good=f"{where!r} (end of epoch {epoch + 1})")


# -------------------------------------------------------------------------------------------------- the loop
def _run(cfg: TrainConfig, d: _Dist, device: torch.device, resumed: _Resumed | None, changes: list[str],
         overwrite: bool, t_start: float) -> TrainResult:
    if cfg.model is None:  # the recorded config names the model that ran
        cfg = replace(cfg, model=default_model(cfg.dataset))
    cfg = _claim_run_folder(cfg, d, resumed, overwrite)
    data = _build_data(cfg)
    session, progress = _build_session(cfg, data, d, device, resumed)
    if d.main:
        _make_folder(session.out)
    continued = resumed is not None and resumed.path.parent.resolve() == session.out.resolve()
    log = _RunLog(session.out / LOG if d.main else None, append=continued)
    try:
        _start(session, progress, log, changes)
        writer = _summary_writer_class()(str(session.out), purge_step=progress.start_epoch + 1) if (
            d.main and cfg.log == "tensorboard") else None
        train_images = train_time = 0.0
        for epoch in range(progress.start_epoch, session.epochs):
            row = _run_epoch(session, progress, epoch)
            train_images += row.pop("_seen")
            train_time += row.pop("_train_time")
            _check_finite(session, progress, epoch, row)
            _save_epoch(session, progress, row)
            log.print(_epoch_line(row, session.epochs))
            if writer is not None:
                _log_scalars(writer, row)
            if d.on:
                dist.barrier()
        if writer is not None:
            writer.close()
        return _finish(session, progress, log, train_images, train_time, t_start)
    except (TrainingError, OutputError) as exc:
        log.write(f"revsnn train: {'stopped' if isinstance(exc, TrainingError) else 'error'}: {exc}")
        raise
    except KeyboardInterrupt:
        log.write(f"revsnn train: interrupted; the last good checkpoint is {progress.last_good or 'none'}")
        raise RunInterrupted(str(session.out), progress.last_good) from None
    finally:
        log.close()


def _start(session: _Session, progress: _Progress, log: _RunLog, changes: list[str]) -> None:
    """Print (and log) what runs, and record it in ``config.json``."""
    cfg, d, data = session.cfg, session.d, session.data
    if not d.main:
        return
    from . import __version__

    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    command = (" ".join(["revsnn", *sys.argv[1:]]) if program in ("revsnn", "__main__.py") else
               " ".join(sys.argv) or "(python API)")
    log.write(f"# revsnn-triton {__version__}, {datetime.now().isoformat(timespec='seconds')}, command: {command}")
    n_params = sum(p.numel() for p in session.raw.parameters())
    resume = f", resuming at epoch {progress.start_epoch + 1}" if cfg.resume else ""
    log.print(f"revsnn train: {session.model_name} ({n_params / 1e6:.3f}M parameters) on {cfg.dataset} "
              f"({len(data.train)} train / {len(data.test)} test), {_plural(d.world, 'process', 'processes')} on "
              f"{session.device}, T={cfg.T}, batch {cfg.batch_size}x{d.world}, {_plural(session.epochs, 'epoch')}, "
              f"amp={cfg.amp}, neurons={cfg.neuron_impl}{resume}")
    if cfg.resume:
        log.print(f"resuming {cfg.resume}" + (": changed " + "; ".join(changes) if changes else
                                               " with its own settings"))
    log.print(format_config(cfg))
    log.print(f"output folder: {session.out}")
    _write_output(session.out / "config.json", progress,
                  lambda p: atomic_write_text(p, json.dumps(cfg.to_dict(), indent=2) + "\n"))


def format_config(cfg: TrainConfig, width: int = 118) -> str:
    """``config: key=value ...`` of every setting, wrapped at ``width`` columns."""
    items = " ".join(f"{name}={json.dumps(getattr(cfg, name))}" for name in field_names())
    return textwrap.fill(items, width=width, initial_indent="config: ", subsequent_indent="        ",
                         break_long_words=False, break_on_hyphens=False)


def _run_epoch(session: _Session, progress: _Progress, epoch: int) -> dict:
    """Train one epoch and evaluate: the epoch's metrics row (plus ``_seen`` / ``_train_time`` of this rank's
    share). A reversible model whose values left the fixed-point range stops the run (:class:`TrainingError`)."""
    cfg, d, device = session.cfg, session.d, session.device
    t0 = time.perf_counter()
    phase = "training"
    try:
        loss_sum, correct, seen = _train_epoch(session, progress, epoch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time = time.perf_counter() - t0
        phase = "evaluation"
        test_loss, test_acc = evaluate(session.raw if d.on else session.model, session.test_loader, device,
                                       cfg.amp, reduce=lambda v: _all_sum(v, d, device))
    except Exception as exc:
        if not is_fixed_point_overflow(exc):
            raise
        raise TrainingError(_divergence_message(exc, session, progress, epoch, phase)) from None
    return {"epoch": epoch + 1, "lr": session.optimizer.param_groups[0]["lr"], "train_loss": loss_sum / seen,
            "train_acc": correct / seen, "test_loss": test_loss, "test_acc": test_acc,
            "images_per_s": seen / train_time, "epoch_time_s": time.perf_counter() - t0,
            "_seen": seen, "_train_time": train_time}


def _train_epoch(session: _Session, progress: _Progress, epoch: int) -> tuple[float, float, float]:
    """One epoch of training steps: ``(loss sum, correct, samples)`` summed over ranks. A non-finite loss stops
    the run before the weights are updated."""
    cfg, d, device, raw, model = session.cfg, session.d, session.device, session.raw, session.model
    optimizer, scaler = session.optimizer, session.scaler
    session.sampler.set_epoch(epoch)
    batch_transform = batch_transforms(cfg, session.num_classes)  # MixUp/CutMix, then random erasing
    loss_fn = _loss_fn(cfg)
    model.train()
    loss_sum = correct = seen = 0.0
    bar = _progress(_take(session.train_loader, session.steps_per_epoch), session.steps_per_epoch,
                    f"epoch {epoch + 1}/{session.epochs}", cfg.progress and d.main)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x, target = batch_transform(x, y, epoch)
        reset_net(raw)
        with autocast(cfg.amp, device):
            logits = model(x)
        loss = loss_fn(logits, target)
        checked = loss.detach().clone()
        if d.on:
            dist.all_reduce(checked)
            checked /= d.world
        value = checked.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"loss became {value} at epoch {epoch + 1}, step {step + 1}; training stopped before updating the "
                f"weights. {_kept(progress)}. Try a lower --lr, --amp none, or gradient clipping "
                f"(--set grad_clip=1.0).")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16: scaled loss; steps with inf/NaN gradients are skipped by the scaler
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
        session.scheduler.step()
        n = y.numel()
        loss_sum += loss.item() * n
        correct += (logits.detach().argmax(dim=1) == y).sum().item()
        seen += n
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
    loss_sum, correct, seen_all = _all_sum([loss_sum, correct, seen], d, device)
    return loss_sum, correct, seen_all


def _check_finite(session: _Session, progress: _Progress, epoch: int, row: dict) -> None:
    """Stop (:class:`TrainingError`) before saving a model whose weights, buffers or test loss are not finite."""
    tensors = [(name, t) for name, t in (*session.raw.named_parameters(), *session.raw.named_buffers())
               if t.is_floating_point()]
    finite = torch.stack([torch.isfinite(t).all() for _, t in tensors]) if tensors else torch.ones(1, dtype=torch.bool)
    if bool(finite.all()) and math.isfinite(row["test_loss"]):
        return
    bad = [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]
    what = (f"the weights became non-finite during epoch {epoch + 1} ({_plural(len(bad), 'tensor')}, e.g. "
            f"{bad[0]!r}; test loss {row['test_loss']})" if bad else
            f"the test loss became {row['test_loss']} in epoch {epoch + 1}")
    raise TrainingError(f"{what}; nothing was saved for this epoch. {_kept(progress)}. Try a lower --lr, --amp "
                        f"none, or gradient clipping (--set grad_clip=1.0).")


def is_fixed_point_overflow(exc: BaseException) -> bool:
    """Whether ``exc`` says that values left a reversible model's fixed-point range (the model diverged): the
    engine's ``StreamOverflowError`` where this version has it, else a ``ValueError`` raised inside
    revsnn_triton whose message is about the fixed-point encoding."""
    from . import reversible

    overflow = getattr(reversible, "StreamOverflowError", None)
    if isinstance(overflow, type) and isinstance(exc, overflow):
        return True
    if not isinstance(exc, ValueError):
        return False
    frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
    raised_here = bool(frames) and frames[-1].f_globals.get("__name__", "").startswith("revsnn_triton")
    message = str(exc)
    return raised_here and any(key in message for key in ("fixed-point range", "frac_bits", "cannot be encoded"))


def _divergence_message(exc: BaseException, session: _Session, progress: _Progress, epoch: int, phase: str) -> str:
    frac_bits = sorted({m.frac_bits for m in session.raw.modules() if isinstance(getattr(m, "frac_bits", None), int)})
    bits = f"frac_bits={frac_bits[0]}" if len(frac_bits) == 1 else "frac_bits"
    smaller = max(1, frac_bits[0] - 4) if len(frac_bits) == 1 else 12
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    detail = detail.replace(" (pass saturate=True to clamp)", "")  # an option of the op, not of a training run
    if "non-finite" in detail:
        what = "non-finite values (NaN or inf) reached the fixed-point encoding"
        remedy = "Lower the learning rate (--lr), or try --amp none or gradient clipping (--set grad_clip=1.0)"
    else:
        what = "values left the fixed-point range"
        remedy = (f"Lower the learning rate (--lr), or start a new run with a smaller frac_bits for a wider range "
                  f"(e.g. --set 'model_kwargs={{frac_bits: {smaller}}}')")
    return (f"{what} of the reversible blocks ({bits}) during epoch {epoch + 1} ({phase}): the model diverged. "
            f"{_kept(progress)}. {remedy}. [{detail[:300]}]")


def _kept(progress: _Progress) -> str:
    return (f"The last good checkpoint is {progress.last_good}" if progress.last_good
            else "No checkpoint had been written yet")


def _save_epoch(session: _Session, progress: _Progress, row: dict) -> None:
    """Record the epoch: history, ``checkpoint_last.pt`` (and ``checkpoint_best.pt`` on a new best), metrics."""
    progress.history.append(row)
    epoch = row["epoch"]
    improved = row["test_acc"] > progress.best_acc
    if improved:
        progress.best_acc, progress.best_epoch = row["test_acc"], epoch
    rngs = _gather_rng(session.d)
    if not session.d.main:
        return
    state = {"epoch": epoch - 1, "model": session.raw.state_dict(), "optimizer": session.optimizer.state_dict(),
             "scheduler": session.scheduler.state_dict(),
             "scaler": session.scaler.state_dict() if session.scaler else {}, "rng": rngs,
             "history": progress.history, "best_acc": progress.best_acc, "best_epoch": progress.best_epoch,
             "model_name": session.model_name, "num_classes": session.num_classes,
             "config": session.cfg.to_dict()}
    out = session.out
    _write_output(out / LAST, progress, lambda p: ckpt.save_checkpoint(p, state))
    progress.last_good = f"{str(out / LAST)!r} (end of epoch {epoch})"
    if improved:
        _write_output(out / BEST, progress, lambda p: ckpt.save_checkpoint(p, state))
    _write_output(out / "metrics.jsonl", progress, lambda p: atomic_write_text(
        p, "".join(json.dumps(r) + "\n" for r in progress.history)))
    _write_output(out / "metrics.csv", progress, lambda p: atomic_write_text(p, _metrics_csv(progress.history)))
    _write_output(out / "curves.png", progress, lambda p: _plot_curves(p, progress.history, session))


def _write_output(path: Path, progress: _Progress, write) -> None:
    try:
        write(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"could not write {str(path)!r} ({reason}); the file there before is unchanged. "
                          f"{_kept(progress)}.") from None


def _metrics_csv(history: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return text.getvalue()


def _plot_curves(path: Path, history: list[dict], session: _Session) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test")
    ax_loss.set_ylabel("cross-entropy loss")
    ax_acc.plot(epochs, [100 * r["train_acc"] for r in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * r["test_acc"] for r in history], "s-", label="test")
    ax_acc.set_ylabel("top-1 accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{session.model_name} on {session.cfg.dataset} ({session.out.name})", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def _log_scalars(writer, row: dict) -> None:
    step = row["epoch"]
    for tag, key in (("loss/train", "train_loss"), ("loss/test", "test_loss"), ("accuracy/train", "train_acc"),
                     ("accuracy/test", "test_acc"), ("lr", "lr"), ("images_per_s", "images_per_s")):
        writer.add_scalar(tag, row[key], step)
    writer.flush()


def _epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%"
            f"  test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:6.2f}%  "
            f"{_rate(row['images_per_s']):>8} img/s  {row['epoch_time_s']:6.1f} s")


def _finish(session: _Session, progress: _Progress, log: _RunLog, train_images: float, train_time: float,
            t_start: float) -> TrainResult:
    """The memory report, ``summary.json`` and the end-of-run report."""
    cfg, d, history = session.cfg, session.d, progress.history
    images_per_s = train_images / train_time if train_time else (history[-1]["images_per_s"] if history else 0.0)
    result = TrainResult(out_dir=str(session.out), epochs_run=session.epochs - progress.start_epoch,
                         final_test_acc=history[-1]["test_acc"] if history else float("nan"),
                         best_test_acc=progress.best_acc, best_epoch=progress.best_epoch, images_per_s=images_per_s,
                         wall_time_s=0.0, history=history)
    if cfg.memory_report and d.main:
        result.memory, result.memory_note = memory_report(cfg, session.data, session.device, session.model_name)
    result.wall_time_s = time.perf_counter() - t_start
    if d.main:
        summary = {k: v for k, v in result.__dict__.items() if k != "history"}
        _write_output(session.out / "summary.json", progress,
                      lambda p: atomic_write_text(p, json.dumps(summary, indent=2) + "\n"))
        log.print(format_report(result, session.model_name, session.device, cfg))
    return result


def _progress(iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, mininterval=0.5)


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


# ------------------------------------------------------------------------------------------------ memory report
def memory_report(cfg: TrainConfig, data: DataBundle, device: torch.device, model_name: str
                  ) -> tuple[dict[str, float], str]:
    """Memory per image of one training step of ``model_name`` and of its non-reversible counterpart (from the
    model registry), measured by :func:`revsnn_triton.bench.memory.measure_case` with freshly built models on
    ``device``, at the run's T, input size, neurons and autocast. Returns ``({name: bytes per image}, note)``;
    a measurement that fails is reported in the note, not raised (the training result stands)."""
    import warnings

    from .bench.memory import Case, measure_case
    from .models import counterpart, model_info

    # The CPU measurement uses the profiler's allocation events; keep its log lines out of the report.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

    other = counterpart(model_name)
    names = [model_name] + ([other] if other else [])
    batch_sizes = (16, 64) if device.type == "cuda" else (8, 32)
    dtype = "bf16" if cfg.amp == "bf16" else "fp32"   # the benchmark's step knows fp32 and bf16 autocast
    shared = {k: v for k, v in cfg.model_kwargs.items() if k not in _NOT_SHARED}
    results: dict[str, float] = {}
    try:
        for name in names:
            extra = {**(cfg.model_kwargs if name == model_name else shared), "num_classes": head_classes(cfg, data)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                info = model_info(name)
                row = measure_case(Case(name, name, info.family, info.reversible, info.layers or 0),
                                   device=device, dtype=dtype, batch_sizes=batch_sizes, T=cfg.T,
                                   image_size=data.sample_shape[-1], neuron_impl=cfg.neuron_impl, extra=extra,
                                   rss=False)  # the report gives allocations only: no extra RSS steps
            results[name] = row["mib_per_image"] * 2**20
    except Exception as exc:  # e.g. out of memory at the larger batch
        return results, f"memory report failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    note = (f"training step (eager, {dtype}{' autocast' if dtype == 'bf16' else ''}), slope of peak allocated "
            f"memory between batch {batch_sizes[0]} and {batch_sizes[1]}, "
            f"{'CUDA max_memory_allocated' if device.type == 'cuda' else 'CPU allocation accounting'}")
    return results, note


# ---------------------------------------------------------------------------------------------------- wording
def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _rate(value: float) -> str:
    """A throughput with three significant digits at most (never ``0.0`` for a slow tiny run)."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def format_report(result: TrainResult, model_name: str, device: torch.device, cfg: TrainConfig) -> str:
    """The short end-of-run report printed by ``revsnn train``."""
    lines = [f"revsnn train: finished {_plural(result.epochs_run, 'epoch')} in {result.wall_time_s:.1f} s",
             f"  test accuracy     {100 * result.final_test_acc:.2f} % (best {100 * result.best_test_acc:.2f} % "
             f"at epoch {result.best_epoch})",
             f"  training speed    {_rate(result.images_per_s)} images/s ({device.type}, amp={cfg.amp})"]
    if result.memory:
        parts = [f"{name} {_fmt_bytes(b)}" for name, b in result.memory.items()]
        line = "  memory per image  " + "  vs  ".join(parts)
        values = list(result.memory.values())
        if len(values) == 2 and values[0] > 0:
            line += f"  (the reversible model needs {values[1] / values[0]:.2f}x less)"
        lines += [line, f"                    ({result.memory_note})"]
    elif result.memory_note:
        lines.append(f"  memory per image  ({result.memory_note})")
    files = ", ".join(name for name in OUTPUT_FILES if name != BEST or result.best_epoch >= 1)
    lines.append(f"  outputs           {result.out_dir}/ ({files}"
                 + (", TensorBoard events" if cfg.log == "tensorboard" else "") + ")")
    return "\n".join(lines)
