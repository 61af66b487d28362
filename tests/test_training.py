"""Training loop: exact resume after a killed run, NaN stop, learning-rate schedule, metrics files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from revsnn_triton.checkpoint import load_checkpoint
from revsnn_triton.training import LAST, TrainingError, train

# Tiny but real: the default RevSResNet-digits on digits, 3 epochs of 3 steps of 16 images.
TINY = dict(epochs=3, batch_size=16, max_steps_per_epoch=3, memory_report=False, progress=False, seed=3)
STEPS, BATCH = 3, 16
COMPARED = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc")

KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from revsnn_triton import training
    from revsnn_triton.data import build_data

    out, kill_after, settings = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])

    class KillAfter(torch.utils.data.Dataset):
        # SIGKILL this process when the training loop asks for sample number kill_after + 1.
        def __init__(self, base):
            self.base, self.fetched = base, 0
        def __len__(self):
            return len(self.base)
        def __getitem__(self, i):
            self.fetched += 1
            if self.fetched > kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.base[i]

    def build(cfg):
        data = build_data(cfg)
        data.train = KillAfter(data.train)
        return data

    training.build_data = build
    training.train(out=out, **settings)
""")


def _rows(history):
    return [{k: row[k] for k in COMPARED} for row in history]


def test_killed_run_resumes_exactly(tmp_path):
    # Killed in the middle of epoch 2 (after 1 finished epoch and one more batch).
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(killed), str(STEPS * BATCH + BATCH + 5), repr(TINY)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    state = load_checkpoint(killed / LAST)  # the last checkpoint is intact and loadable
    assert state["epoch"] == 0 and len(state["history"]) == 1
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1
    assert not [p for p in os.listdir(killed) if p.endswith(".tmp")]

    resumed = train(out=str(killed), resume=str(killed), **TINY)
    straight = train(out=str(tmp_path / "straight"), **TINY)
    assert len(straight.history) == 3 and resumed.epochs_run == 2
    # Same losses, accuracies and learning rates as the uninterrupted run, bit for bit, for every epoch.
    assert _rows(resumed.history) == _rows(straight.history)
    a, b = load_checkpoint(killed / LAST), load_checkpoint(tmp_path / "straight" / LAST)
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    # The resumed epochs did train (the comparison above is not between two frozen models).
    assert any(not torch.equal(state["model"][k], v) for k, v in b["model"].items() if v.is_floating_point())


class _NaNAfter(torch.nn.Module):
    """Stand-in classifier whose logits become NaN from the ``bad_call``-th training forward on."""

    def __init__(self, num_classes: int, bad_call: int):
        super().__init__()
        self.fc = torch.nn.Linear(64, num_classes)
        self.calls, self.bad_call = 0, bad_call

    def forward(self, x):
        logits = self.fc(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.bad_call:
                return logits * float("nan")
        return logits


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from revsnn_triton import training

    monkeypatch.setattr(training, "build_model",
                        lambda cfg, data, name=None: _NaNAfter(data.num_classes, bad_call=STEPS + 2))
    with pytest.raises(TrainingError) as info:
        train(out=str(tmp_path), **TINY)
    msg = str(info.value)
    assert "loss became nan at epoch 2, step 2" in msg and str(tmp_path / LAST) in msg
    state = load_checkpoint(tmp_path / LAST)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values())


