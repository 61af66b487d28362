"""Trained models: load one for inference, evaluate it on its test split (``revsnn eval``).

:func:`load_model` rebuilds the model a training checkpoint was written for (``checkpoint_last.pt`` or
``checkpoint_best.pt`` of a ``revsnn train`` run folder) and returns it in eval mode with the run's
:class:`~revsnn_triton.config.TrainConfig` as ``model.train_config``::

    model = revsnn_triton.load_model("runs/train/20261201-093000-RevSResNet-digits/checkpoint_best.pt")
    revsnn_triton.functional.reset_net(model)   # spiking state: reset before each new input
    with torch.no_grad():
        logits = model(images)                  # [B, num_classes]

:func:`evaluate_checkpoint` measures its test loss and top-1 accuracy as the training loop does (the same
:func:`evaluate`). The device and autocast helpers here are shared with :mod:`revsnn_triton.training`.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import ConfigError, TrainConfig, make_config
from .functional import reset_net

__all__ = ["load_model", "evaluate", "evaluate_checkpoint", "EvalResult", "resolve_device", "model_from_config"]

_DEVICE_BACKENDS = ("cuda", "mps", "xpu")


def resolve_device(spec: str | None) -> torch.device:
    """``spec`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"xpu"``; None: CUDA when available, else the
    CPU) -> a device that exists on this machine, or :class:`ConfigError` saying why not."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {spec!r} is not a valid torch device string (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "cpu":
        return device
    if device.type not in _DEVICE_BACKENDS:
        raise ConfigError(f"device {spec!r}: models train and run on cpu, cuda, mps or xpu devices, not "
                          f"{device.type!r}" + (" (meta tensors hold no data)" if device.type == "meta" else ""))
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        name = "CUDA" if device.type == "cuda" else device.type.upper()
        raise ConfigError(f"device {spec!r} requested but {name} is not available here")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ConfigError(f"device {spec!r}: this machine has {count} {device.type} device(s)")
    return device


def autocast(amp: str, device: torch.device):
    """Autocast context for the ``amp`` setting (``"none"``, ``"bf16"``, ``"fp16"``)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def model_from_config(cfg: TrainConfig, num_classes: int | None, name: str | None = None) -> nn.Module:
    """``create_model`` with the config's model, T, neuron implementation and ``model_kwargs`` (``num_classes``
    None: the model's default). Raises :class:`ConfigError` for an unknown name or arguments the model rejects."""
    from .data import default_model
    from .models import create_model, list_models

    name = name or cfg.model or default_model(cfg.dataset)
    kwargs = dict(cfg.model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return create_model(name, T=cfg.T, neuron_impl=cfg.neuron_impl, **kwargs)
    except (TypeError, ValueError) as exc:
        if name not in list_models():  # the registry's own message, with its choices
            raise ConfigError(str(exc).removeprefix("create_model: ")) from None
        raise ConfigError(f"model {name!r} could not be built with T={cfg.T}, neuron_impl={cfg.neuron_impl!r}, "
                          f"model_kwargs={cfg.model_kwargs!r}: {exc}") from None


def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none",
             reduce: Callable[[list[float]], list[float]] | None = None) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy (a fraction) of ``model`` over ``loader``'s ``(x, y)`` batches, in
    eval mode without gradients; spiking state is reset before each batch. ``reduce`` sums the
    ``[loss_sum, correct, count]`` totals over processes (distributed evaluation)."""
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            reset_net(model)
            with autocast(amp, device):
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            count += y.numel()
    if reduce is not None:
        loss_sum, correct, count = reduce([loss_sum, correct, count])
    return loss_sum / max(count, 1), correct / max(count, 1)


def _read_checkpoint(path: str | os.PathLike) -> tuple[dict, Path, TrainConfig]:
    """A training checkpoint (a run folder: its best checkpoint, else its last), its path and its config."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_model: path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_best.pt" if (path / "checkpoint_best.pt").is_file() else path / "checkpoint_last.pt"
    state = ckpt.load_checkpoint(path)
    ckpt.check_training_state(state, path)
    try:
        cfg = make_config(**state["config"])
    except ConfigError as exc:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} holds a config this version cannot use: {exc}") from None
    return state, path, cfg


def _model_of(state: dict, path: Path, cfg: TrainConfig, device: torch.device) -> nn.Module:
    model = model_from_config(cfg, state.get("num_classes"), state["model_name"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"checkpoint {str(path)!r} does not match model {state['model_name']!r}: "
                                   f"{str(exc).splitlines()[0]}") from None
    model.train_config = cfg
    return model.to(device).eval()


def load_model(path: str | os.PathLike, device: str | torch.device | None = "cpu") -> nn.Module:
    """The trained model of a ``revsnn train`` checkpoint (a file, or a run folder: its ``checkpoint_best.pt``),
    on ``device`` (None: CUDA when available), in eval mode, with the run's config as ``model.train_config``.

    Raises :class:`~revsnn_triton.checkpoint.CheckpointError` for a missing, corrupt or foreign file, and
    :class:`~revsnn_triton.config.ConfigError` for a device this machine lacks.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    state, path, cfg = _read_checkpoint(path)
    return _model_of(state, path, cfg, device)


@dataclass
class EvalResult:
    """What ``revsnn eval`` measured: ``test_acc`` (a fraction) and ``test_loss`` over ``samples`` test samples,
    next to what the training reported for the checkpoint's epoch (``reported_acc``, on ``reported_samples``:
    None when the training evaluated the whole test split)."""

    checkpoint: str
    model_name: str
    dataset: str
    epoch: int
    samples: int
    test_loss: float
    test_acc: float
    reported_acc: float
    reported_samples: int | None


def evaluate_checkpoint(path: str | os.PathLike, *, data_dir: str | None = None, device: str | None = None,
                        batch_size: int | None = None, max_samples: int | None = None) -> EvalResult:
    """Evaluate a training checkpoint on its dataset's test split (the whole split unless ``max_samples``), with
    the run's config except for ``data_dir``, ``device`` and ``batch_size``."""
    from torch.utils.data import DataLoader, Subset

    from .data import build_data

    for name, value in (("batch_size", batch_size), ("max_samples", max_samples)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"evaluate_checkpoint: {name} must be an integer >= 1 or None, got {value!r}")
    target = resolve_device(device)
    state, resolved, cfg = _read_checkpoint(path)
    model = _model_of(state, resolved, cfg, target)
    cfg = replace(cfg, data_dir=data_dir if data_dir is not None else cfg.data_dir, download=False, device=device)
    data = build_data(cfg)
    n = len(data.test) if max_samples is None else min(len(data.test), max_samples)
    loader = DataLoader(Subset(data.test, range(n)), batch_size=batch_size or cfg.eval_batch_size or
                        2 * cfg.batch_size, shuffle=False, num_workers=cfg.workers)
    loss, acc = evaluate(model, loader, target, cfg.amp)
    row = next((r for r in state["history"] if r.get("epoch") == state["epoch"] + 1), {})
    return EvalResult(checkpoint=str(resolved), model_name=state["model_name"], dataset=cfg.dataset,
                      epoch=state["epoch"] + 1, samples=n, test_loss=loss, test_acc=acc,
                      reported_acc=float(row.get("test_acc", math.nan)), reported_samples=cfg.max_eval_samples)


def format_eval(result: EvalResult) -> str:
    """The line ``revsnn eval`` prints."""
    reported = "" if math.isnan(result.reported_acc) else (
        f"; training reported {100 * result.reported_acc:.2f} %" +
        ("" if result.reported_samples is None else f" on its first {result.reported_samples} test samples"))
    return (f"revsnn eval: {result.model_name} ({result.checkpoint}, end of epoch {result.epoch}) on the "
            f"{result.dataset} test split ({result.samples} samples): accuracy {100 * result.test_acc:.2f} %, "
            f"loss {result.test_loss:.4f}{reported}")

