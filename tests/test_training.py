"""Training loop: exact resume after a killed run, changed settings on resume, divergence stops that keep the
last good checkpoint, mixed precision, output files (permissions, debris, TensorBoard)."""
from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from revsnn_triton.checkpoint import load_checkpoint
from revsnn_triton.cli import main
from revsnn_triton.training import BEST, LAST, TrainingError, is_fixed_point_overflow, train

# Tiny but real: the default RevSResNet-digits on digits, 2 epochs of 3 steps of 16 images.
TINY = dict(epochs=2, batch_size=16, max_steps_per_epoch=3, max_eval_samples=64, memory_report=False,
            progress=False, seed=3)
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


def _kill_mid_epoch_2(out, settings) -> None:
    """Run ``settings`` in a child process and SIGKILL it in the middle of epoch 2 (one more batch fetched)."""
    proc = subprocess.run([sys.executable, "-c", KILLER, str(out), str(STEPS * BATCH + BATCH + 5), repr(settings)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]


def _weights_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in b.items():
        assert torch.equal(a[k], v), k


def test_killed_run_resumed_with_no_other_flag_equals_the_straight_run(tmp_path, capsys):
    killed = tmp_path / "killed"
    _kill_mid_epoch_2(killed, TINY)
    state = load_checkpoint(killed / LAST)  # the last checkpoint is intact and loadable
    assert state["epoch"] == 0 and len(state["history"]) == 1
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1

    # `revsnn train --resume DIR` and nothing else: the run's own settings and folder.
    assert main(["train", "--resume", str(killed)]) == 0
    out = capsys.readouterr().out
    assert "resuming at epoch 2" in out and "with its own settings" in out
    straight = train(out=str(tmp_path / "straight"), **TINY)
    resumed = json.loads((killed / "summary.json").read_text())
    assert resumed["epochs_run"] == 1 and resumed["out_dir"] == str(killed)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    # Same losses, accuracies and learning rates as the uninterrupted run, bit for bit, for every epoch.
    assert _rows(rows) == _rows(straight.history)
    a, b = load_checkpoint(killed / LAST), load_checkpoint(tmp_path / "straight" / LAST)
    _weights_equal(a["model"], b["model"])
    # The resumed epoch did train (the comparison above is not between two frozen models).
    assert any(not torch.equal(state["model"][k], v) for k, v in b["model"].items() if v.is_floating_point())
    assert json.loads((killed / "config.json").read_text())["resume"] == str(killed / LAST)


def test_changed_settings_on_resume_are_the_ones_that_run(tmp_path, capsys):
    run = tmp_path / "run"
    constant = dict(TINY, epochs=1, scheduler="constant", warmup_epochs=0, lr=4e-3)
    train(out=str(run), **constant)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--lr", "0.02", "--set", "weight_decay=0.5"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 1 -> 2" in out and "lr: 0.004 -> 0.02" in out and "weight_decay: 0.01 -> 0.5" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == [4e-3, 0.02]       # the metrics show the lr that ran ...
    groups = load_checkpoint(run / LAST)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.02, 0.02]     # ... and the optimizer used it
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["lr"], recorded["epochs"], recorded["weight_decay"]) == (0.02, 2, 0.5)


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
            logits = self.spoil(logits)
        return logits

    def spoil(self, logits):
        return logits * float("nan") if self.calls >= self.bad_call else logits


class _PoisonedUpdate(_NaNAfter):
    """Stand-in classifier whose ``bad_call``-th training step gets infinite gradients: the loss of that step is
    finite, the update makes the weights NaN, and the epoch ends before another loss is computed."""

    def spoil(self, logits):
        if self.calls == self.bad_call:
            logits.register_hook(lambda grad: grad * float("inf"))
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


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, capsys):
    # The last step of epoch 2 makes the weights NaN after a finite loss: the end-of-epoch check must stop the
    # run before checkpoint_last.pt / checkpoint_best.pt of epoch 1 are replaced.
    from revsnn_triton import training

    monkeypatch.setattr(training, "build_model",
                        lambda cfg, data, name=None: _PoisonedUpdate(data.num_classes, bad_call=2 * STEPS))
    status = main(["train", "--out", str(tmp_path), *_flags(TINY)])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "stopped: the weights became non-finite during epoch 2" in err and "nothing was saved" in err
    assert f"{str(tmp_path / LAST)!r} (end of epoch 1)" in err
    for name in (LAST, BEST):
        state = load_checkpoint(tmp_path / name)
        assert state["epoch"] == 0, name
        assert all(torch.isfinite(v).all() for v in state["model"].values()), name
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1
    assert "stopped: the weights became non-finite" in (tmp_path / "train.log").read_text()


def _flags(settings: dict) -> list[str]:
    """``revsnn train`` flags for a dict of config values."""
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def test_reversible_divergence_stops_cleanly_naming_the_last_good_checkpoint(tmp_path, capsys):
    # A real divergence: one good epoch, then a resume at lr 1e3 drives the reversible streams out of the
    # fixed-point range (the encoder refuses them) during epoch 2.
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *_flags(dict(TINY, epochs=1, scheduler="constant", warmup_epochs=0))]) == 0
    good = load_checkpoint(run / LAST)
    capsys.readouterr()
    status = main(["train", "--resume", str(run), "--epochs", "2", "--lr", "1e3"])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "stopped: values left the fixed-point range of the reversible blocks (frac_bits=16)" in err
    assert "lower the learning rate" in err.lower() and "frac_bits" in err
    assert f"{str(run / LAST)!r} (end of epoch 1)" in err
    kept = load_checkpoint(run / LAST)
    assert kept["epoch"] == 0
    _weights_equal(kept["model"], good["model"])


def test_fixed_point_overflow_before_any_checkpoint(tmp_path, capsys):
    # frac_bits=30 leaves the range [-2, 2]: the first training step's streams leave it.
    status = main(["train", "--out", str(tmp_path), *_flags(dict(TINY, epochs=1, model_kwargs={"frac_bits": 30}))])
    err = capsys.readouterr().err
    assert status == 1 and "Traceback" not in err
    assert "values left the fixed-point range" in err and "(frac_bits=30)" in err
    assert "No checkpoint had been written yet" in err and not (tmp_path / LAST).exists()


def test_fixed_point_overflow_is_told_apart_from_other_errors(monkeypatch):
    from revsnn_triton import reversible
    from revsnn_triton.ops import coupling

    with pytest.raises(ValueError) as engine:
        coupling.encode(torch.tensor([1e6]), 20)   # outside [-2048, 2048]
    assert is_fixed_point_overflow(engine.value)
    with pytest.raises(ValueError) as elsewhere:
        raise ValueError("frac_bits: a user's own check, outside the fixed-point range")
    assert not is_fixed_point_overflow(elsewhere.value)   # not raised inside revsnn_triton
    assert not is_fixed_point_overflow(RuntimeError("fixed-point range"))

    class StreamOverflowError(RuntimeError):
        pass
    monkeypatch.setattr(reversible, "StreamOverflowError", StreamOverflowError, raising=False)
    assert is_fixed_point_overflow(StreamOverflowError("block 3: stream left the range"))


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision(tmp_path, amp):
    # fp16 autocast trains through a gradient scaler (its state is checkpointed and it stepped every batch);
    # bf16 has the range of fp32 and trains without one.
    result = train(out=str(tmp_path), **dict(TINY, epochs=1, max_eval_samples=16, amp=amp))
    assert math.isfinite(result.history[0]["train_loss"])
    scaler = load_checkpoint(tmp_path / LAST)["scaler"]
    if amp == "fp16":
        assert scaler["scale"] > 0 and scaler["_growth_tracker"] == STEPS
    else:
        assert scaler == {}


def test_outputs_follow_the_umask_and_stale_temps_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Debris of writes killed in an earlier attempt at this run, and a file that is not ours.
    debris = [run / ".checkpoint_last.pt.k2j3h4.tmp", run / ".curves.png.a8b9c0.tmp"]
    for path in debris + [run / ".notes.txt.x1.tmp"]:
        path.write_bytes(b"partial")
    previous = os.umask(0o027)
    try:
        train(out=str(run), **dict(TINY, epochs=1, max_eval_samples=16))
    finally:
        os.umask(previous)
    assert not any(p.exists() for p in debris) and (run / ".notes.txt.x1.tmp").exists()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if not p.name.startswith(".")}
    assert set(modes) >= {"config.json", "train.log", "metrics.jsonl", "metrics.csv", "curves.png", LAST, BEST,
                          "summary.json"}
    assert set(modes.values()) == {0o640}, modes


def test_tensorboard_scalars_per_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(out=str(tmp_path), log="tensorboard", **TINY)
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr"} <= set(events.Tags()["scalars"])
    test_acc = events.Scalars("accuracy/test")
    assert [e.step for e in test_acc] == [1, 2]
    assert [e.value for e in test_acc] == pytest.approx([r["test_acc"] for r in result.history])
