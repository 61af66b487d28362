"""The ``revsnn`` command: an end-to-end digits run, recipes and overrides, bench/tune dispatch, bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from revsnn_triton.checkpoint import load_checkpoint
from revsnn_triton.cli import main
from revsnn_triton.config import ConfigError, field_names, make_config, shipped_configs

QUIET = ["--no-progress", "--no-memory-report"]


def test_end_to_end_digits(tmp_path, capsys):
    # Tiny settings: 2 epochs (88 steps of 32 images) instead of the demo's 6, no warmup.
    out = tmp_path / "run"
    status = main(["train", "--out", str(out), "--epochs", "2", "--no-progress", "--set", "warmup_epochs=0"])
    assert status == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    # Chance is 10%; two epochs reach about 90% on this machine; the bound leaves room for other BLAS/CPUs and is
    # far below what the full demo reaches (>= 95%).
    assert summary["final_test_acc"] >= 0.7, text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    with open(out / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["test_acc"]) for r in table] == [r["test_acc"] for r in rows]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    last, best = load_checkpoint(out / "checkpoint_last.pt"), load_checkpoint(out / "checkpoint_best.pt")
    assert last["epoch"] == 1 and last["model_name"] == "RevSResNet-digits"
    assert best["best_acc"] == max(r["test_acc"] for r in rows)
    # The report: accuracy, speed, and memory per image of the model and its non-reversible counterpart.
    assert "test accuracy" in text and "images/s" in text
    memory = summary["memory"]
    assert set(memory) == {"RevSResNet-digits", "MS-ResNet-digits"}
    assert 0 < memory["RevSResNet-digits"] < memory["MS-ResNet-digits"], memory
    assert "memory per image  RevSResNet-digits" in text


def test_python_dash_m_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "revsnn_triton", "train", "--list-configs"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "cifar10_revsresnet" in proc.stdout.split()


def test_shipped_recipes_load():
    names = shipped_configs()
    for expected in ("cifar10_revsresnet", "cifar100_revsresnet", "cifar10_revsformer", "cifar100_revsformer",
                     "cifar10dvs_revsresnet", "cifar10dvs_revsformer", "dvs128gesture_revsresnet",
                     "dvs128gesture_revsformer", "digits"):
        assert expected in names
    resnet = make_config("cifar10_revsresnet")
    assert (resnet.optimizer, resnet.lr, resnet.milestones, resnet.epochs) == ("sgd", 0.1, [100, 150], 200)
    assert make_config("cifar100_revsformer").model_kwargs == {"num_heads": 8}
    assert make_config("dvs128gesture_revsresnet").dataset == "dvs128-gesture"
    assert make_config("digits") == make_config(model="RevSResNet-digits")  # the file equals the defaults


def test_flags_override_config_file(tmp_path, monkeypatch):
    seen = {}
    from revsnn_triton import training
    monkeypatch.setattr(training, "train", lambda cfg: seen.setdefault("cfg", cfg))
    recipe = tmp_path / "r.toml"
    recipe.write_text('dataset = "digits"\nepochs = 7\nlr = 0.5\nmodel_kwargs = { blocks = [1, 1] }\n')
    assert main(["train", "--config", str(recipe), "--lr", "0.25", "--set", "weight_decay=0.5", "--T", "2"]) == 0
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.T, cfg.model_kwargs) == (7, 0.25, 0.5, 2, {"blocks": [1, 1]})


def test_bench_and_tune_dispatch(monkeypatch, capsys):
    import types
    calls = []
    fake = types.ModuleType("revsnn_triton.bench.fake_bench")
    fake.main = lambda argv: calls.append(list(argv)) or 0
    monkeypatch.setitem(sys.modules, "revsnn_triton.bench.fake_bench", fake)
    monkeypatch.setattr("revsnn_triton.cli.KNOWN_BENCHMARKS", ("fake_bench",))
    assert main(["bench", "fake_bench", "--rep", "3"]) == 0 and calls == [["--rep", "3"]]
    assert main(["bench"]) == 0 and "fake_bench" in capsys.readouterr().out
    assert main(["bench", "nope"]) == 2 and "unknown benchmark 'nope'" in capsys.readouterr().err
    # A listed benchmark whose module is missing: a clear error, not a traceback.
    monkeypatch.setattr("revsnn_triton.cli.KNOWN_BENCHMARKS", ("not_written_yet",))
    assert main(["bench", "not_written_yet"]) == 2
    assert "revsnn_triton.bench.not_written_yet is not available" in capsys.readouterr().err
    tuning = types.ModuleType("revsnn_triton.tuning")
    tuning.main = lambda argv: calls.append(("tune", list(argv))) or 3
    monkeypatch.setitem(sys.modules, "revsnn_triton.tuning", tuning)
    assert main(["tune", "--list"]) == 3 and calls[-1] == ("tune", ["--list"])


# ------------------------------------------------------------------------------------------------- bad input
def _run(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.err


def test_unknown_model_lists_choices(tmp_path, capsys):
    status, err = _run(["train", "--model", "ResNet50", "--out", str(tmp_path), *QUIET], capsys)
    assert status == 2 and "unknown model 'ResNet50'" in err and "RevSResNet-digits" in err and "RevSResNet37" in err


def test_unknown_dataset_lists_choices(tmp_path, capsys):
    status, err = _run(["train", "--dataset", "imagenet", "--out", str(tmp_path), *QUIET], capsys)
    assert status == 2 and "unknown dataset 'imagenet'" in err and "cifar10-dvs" in err


def test_missing_data_says_where_to_put_it(tmp_path, capsys):
    data = tmp_path / "data"
    status, err = _run(["train", "--dataset", "cifar10", "--data-dir", str(data), "--out", str(tmp_path / "o"),
                        *QUIET], capsys)
    assert status == 2 and str(data) in err and "cifar-10-batches-py" in err and "--download" in err


def test_unknown_config_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 3\nlearning_rate: 0.1\n")
    status, err = _run(["train", "--config", str(recipe), "--out", str(tmp_path)], capsys)
    assert status == 2 and "unknown key(s) 'learning_rate'" in err and "valid keys are" in err
    assert all(name in err for name in field_names())
    status, err = _run(["train", "--set", "lr_max=1", "--out", str(tmp_path)], capsys)
    assert status == 2 and "'lr_max'" in err
    status, err = _run(["train", "--config", "no_such_recipe"], capsys)
    assert status == 2 and "cifar10_revsresnet" in err
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        make_config(optimizer="lion")


def test_corrupt_and_foreign_checkpoints(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    status, err = _run(["train", "--resume", str(bad), "--out", str(tmp_path / "o"), *QUIET], capsys)
    assert status == 2 and "corrupt" in err and str(bad) in err
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 3}, foreign)
    status, err = _run(["train", "--resume", str(foreign), "--out", str(tmp_path / "o"), *QUIET], capsys)
    assert status == 2 and "not a revsnn training checkpoint" in err


def test_checkpoint_of_another_model(tmp_path, capsys):
    out = tmp_path / "ms"
    assert main(["train", "--model", "MS-ResNet-digits", "--epochs", "2", "--max-steps-per-epoch", "1",
                 "--out", str(out), *QUIET]) == 0
    capsys.readouterr()
    status, err = _run(["train", "--resume", str(out), "--epochs", "3", "--out", str(out), *QUIET], capsys)
    assert status == 2 and "written for model 'MS-ResNet-digits', not 'RevSResNet-digits'" in err
    status, err = _run(["train", "--model", "MS-ResNet-digits", "--resume", str(out), "--epochs", "2",
                        "--out", str(out), *QUIET], capsys)
    assert status == 2 and "already finished epoch 2" in err


def test_nan_loss_exit_status(tmp_path, capsys, monkeypatch):
    from revsnn_triton import training
    monkeypatch.setattr(training, "_loss_fn", lambda cfg: lambda logits, target: logits.sum() * float("nan"))
    status, err = _run(["train", "--epochs", "1", "--max-steps-per-epoch", "2", "--out", str(tmp_path), *QUIET],
                       capsys)
    assert status == 1 and "loss became nan at epoch 1, step 1" in err and "no checkpoint had been written" in err


def test_bad_device(capsys):
    status, err = _run(["train", "--device", "gpu0", *QUIET], capsys)
    assert status == 2 and "'gpu0' is not a valid torch device" in err
    if not torch.cuda.is_available():
        status, err = _run(["train", "--device", "cuda", *QUIET], capsys)
        assert status == 2 and "CUDA is not available" in err


def test_sync_bn_on_cpu_under_torchrun(capsys, monkeypatch):
    # As torchrun would set it for 2 processes; the check comes before any process group is created.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    status, err = _run(["train", "--sync-bn", "--device", "cpu", *QUIET], capsys)
    assert status == 2 and "sync_bn needs CUDA" in err


def test_bad_values_and_unknown_command(capsys):
    status, err = _run(["train", "--epochs", "0"], capsys)
    assert status == 2 and "epochs must be an integer >= 1" in err
    status, err = _run(["train", "--amp", "fp8"], capsys)
    assert status == 2 and "invalid choice" in err
    status, err = _run(["fit"], capsys)
    assert status == 2 and "unknown command 'fit'" in err
