"""Learning-rate schedules of ``revsnn train``, with timm's semantics (the scheduler the RevSNN recipes used).

- ``cosine``: timm's ``CosineLRScheduler`` with one cycle of ``epochs`` and ``warmup_prefix=False``. During the
  first ``warmup_epochs`` the rate rises linearly from ``warmup_lr`` (at t = 0) towards ``lr``; from then on it
  follows ``min_lr + (lr - min_lr) * (1 + cos(pi * t / epochs)) / 2``, the cosine counted from t = 0 (so the
  warmup replaces the cosine's first epochs rather than delaying it). The ``cooldown_epochs`` come **on top** of
  ``epochs`` and hold ``min_lr``: a recipe with ``epochs: 300`` and ``cooldown_epochs: 10`` trains 310 epochs,
  as timm's ``create_scheduler`` does.
- ``multistep``: ``lr * gamma ** (number of milestones <= epoch)``, after the same linear warmup (torch's
  ``MultiStepLR``, stepped once per epoch).
- ``constant``: ``lr`` after the warmup.

``scheduler_interval`` says when the rate changes: ``"epoch"`` holds it for a whole epoch, t being the epoch
index (timm's default, and the original recipes'); ``"step"`` updates it at every optimizer step, t being the
fractional epoch ``step / steps_per_epoch``. Multistep milestones count whole epochs in both.

:func:`build_scheduler` wraps :func:`lr_at` in a ``torch.optim.lr_scheduler.LambdaLR`` that the training loop
steps after every optimizer step; a resumed run starts it at its step count.
"""
from __future__ import annotations

import math

import torch

from .config import TrainConfig


def total_epochs(cfg: TrainConfig) -> int:
    """Number of epochs a run trains: ``epochs`` plus ``cooldown_epochs``."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"total_epochs: cfg must be a TrainConfig, got {type(cfg).__name__}")
    return cfg.epochs + cfg.cooldown_epochs


def lr_at_epoch(cfg: TrainConfig, t: float) -> float:
    """Learning rate at time ``t`` (in epochs, >= 0; fractional under the per-step interval)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"lr_at_epoch: cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
        raise ValueError(f"lr_at_epoch: t must be a finite number of epochs >= 0, got {t!r}")
    if t < cfg.warmup_epochs:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * t / cfg.warmup_epochs
    if cfg.scheduler == "constant":
        return cfg.lr
    if cfg.scheduler == "multistep":
        return cfg.lr * cfg.gamma ** sum(math.floor(t) >= m for m in cfg.milestones)
    if t >= cfg.epochs:  # cooldown
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t / cfg.epochs))


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) with ``steps_per_epoch`` steps per epoch."""
    if not (isinstance(step, int) and step >= 0):
        raise ValueError(f"lr_at: step must be an integer >= 0, got {step!r}")
    if not (isinstance(steps_per_epoch, int) and steps_per_epoch >= 1):
        raise ValueError(f"lr_at: steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}")
    t = step // steps_per_epoch if cfg.scheduler_interval == "epoch" else step / steps_per_epoch
    return lr_at_epoch(cfg, t)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, start_step: int = 0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` giving every parameter group :func:`lr_at`; call ``step()`` after each optimizer step.

    The rate scales ``cfg.lr`` (set as every group's base rate) and depends on the config and the step alone:
    ``start_step`` positions the schedule for a resumed run, which then follows its own (possibly changed)
    config rather than the base rate of a saved optimizer state.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"build_scheduler: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not (isinstance(start_step, int) and start_step >= 0):
        raise ValueError(f"build_scheduler: start_step must be an integer >= 0, got {start_step!r}")
    lr_at(cfg, 0, steps_per_epoch)  # validates the arguments once, with a clear message
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step, steps_per_epoch) / cfg.lr,
                                             last_epoch=start_step - 1)
