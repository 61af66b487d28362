"""The ``revsnn`` command: an end-to-end digits run, eval, recipes and overrides, listings, help, run folders,
bench/tune dispatch, and bad input or environment problems (one line, exit status 2, no traceback)."""
from __future__ import annotations

import csv
import json
import re
import os
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
    # What was printed is in the run's log, from the start line and the resolved config to the report.
    log = (out / "train.log").read_text()
    for line in text.splitlines():
        assert line in log
    assert "config: model=\"RevSResNet-digits\"" in log and "epochs=2" in log
    outputs = text.splitlines()[-1]
    assert all(name in outputs for name in ("config.json", "summary.json", "train.log", "checkpoint_best.pt"))

    # `revsnn eval` on the kept best checkpoint measures the accuracy the training reported for it.
    assert main(["eval", str(out)]) == 0
    line = capsys.readouterr().out
    best = max(r["test_acc"] for r in rows)
    assert f"accuracy {100 * best:.2f} %" in line and f"training reported {100 * best:.2f} %" in line
    from revsnn_triton import load_model
    from revsnn_triton.evaluation import evaluate_checkpoint
    assert evaluate_checkpoint(out / "checkpoint_best.pt").test_acc == best
    model = load_model(out / "checkpoint_last.pt")
    assert not model.training and model.train_config.epochs == 2 and model.train_config.model == "RevSResNet-digits"


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
    monkeypatch.setattr(training, "train", lambda request, overwrite: seen.setdefault("cfg", make_config(**request)))
    recipe = tmp_path / "r.toml"
    recipe.write_text('dataset = "digits"\nepochs = 7\nlr = 0.5\nmodel_kwargs = { blocks = [1, 1] }\n')
    assert main(["train", "--config", str(recipe), "--lr", "0.25", "--set", "weight_decay=0.5", "--T", "2"]) == 0
    cfg = seen["cfg"]
    assert (cfg.epochs, cfg.lr, cfg.weight_decay, cfg.T, cfg.model_kwargs) == (7, 0.25, 0.5, 2, {"blocks": [1, 1]})

    # --recompute-batch is model_kwargs.recompute_batch, next to what the recipe's model_kwargs hold
    seen.clear()
    assert main(["train", "--config", str(recipe), "--recompute-batch", "4"]) == 0
    assert seen["cfg"].model_kwargs == {"blocks": [1, 1], "recompute_batch": 4}


def test_recompute_batch_reaches_the_model_and_a_bad_value_is_one_line(tmp_path, capsys):
    status, err = _run(["train", "--recompute-batch", "0", "--out", str(tmp_path), *QUIET], capsys)
    assert status == 2 and "recompute_batch must be None or an int >= 1, got 0" in err and err.count("\n") == 1
    status, err = _run(["train", "--set", "model_kwargs=3", "--recompute-batch", "4", "--out", str(tmp_path), *QUIET],
                       capsys)  # a model_kwargs that is not a mapping is reported, not replaced
    assert status == 2 and "model_kwargs" in err and "mapping" in err and err.count("\n") == 1
    status, err = _run(["train", "--model", "Spikingformer-2-384", "--dataset", "synthetic-cifar10",
                        "--recompute-batch", "4", "--out", str(tmp_path), *QUIET], capsys)
    assert status == 2 and "recompute_batch" in err and err.count("\n") == 1


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


def test_resume_refuses_settings_that_define_the_run(tmp_path, capsys):
    out = tmp_path / "ms"
    assert main(["train", "--model", "MS-ResNet-digits", "--epochs", "2", "--max-steps-per-epoch", "1",
                 "--max-eval-samples", "16", "--out", str(out), *QUIET]) == 0
    capsys.readouterr()
    status, err = _run(["train", "--resume", str(out), "--model", "RevSResNet-digits", "--T", "2", "--epochs", "3"],
                       capsys)
    assert status == 2 and "cannot change in the middle of a run" in err
    assert "model 'MS-ResNet-digits' -> 'RevSResNet-digits'" in err and "T 4 -> 2" in err and "epochs" not in \
        err.split("cannot change")[1].split(".")[0]
    status, err = _run(["train", "--resume", str(out)], capsys)
    assert status == 2 and "already finished epoch 2 of 2" in err and "--epochs" in err


def test_nan_loss_exit_status(tmp_path, capsys, monkeypatch):
    from revsnn_triton import training
    monkeypatch.setattr(training, "_loss_fn", lambda cfg: lambda logits, target: logits.sum() * float("nan"))
    status, err = _run(["train", "--epochs", "1", "--max-steps-per-epoch", "2", "--out", str(tmp_path), *QUIET],
                       capsys)
    assert status == 1 and "loss became nan at epoch 1, step 1" in err and "No checkpoint had been written" in err


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


# ---------------------------------------------------------------------------------------------- run folders
TINY_RUN = ["--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--max-eval-samples", "16", *QUIET]


def test_existing_run_folder_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_RUN]) == 0
    first = load_checkpoint(out / "checkpoint_last.pt")
    capsys.readouterr()
    status, err = _run(["train", "--out", str(out), *TINY_RUN, "--seed", "1"], capsys)
    assert status == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    kept = load_checkpoint(out / "checkpoint_last.pt")["model"]
    assert all(torch.equal(kept[k], v) for k, v in first["model"].items())
    assert main(["train", "--out", str(out), *TINY_RUN, "--seed", "1", "--overwrite"]) == 0
    second = load_checkpoint(out / "checkpoint_last.pt")
    assert second["config"]["seed"] == 1 and json.loads((out / "config.json").read_text())["seed"] == 1
    assert (out / "train.log").read_text().count("revsnn train: finished") == 1  # the old run's log is gone


def test_default_run_folders_are_unique(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *TINY_RUN]) == 0
    assert main(["train", *TINY_RUN]) == 0  # the same command again (as `make demo` twice) starts a new run
    runs = sorted((tmp_path / "runs" / "train").iterdir())
    # <UTC time>-<model>, with -1 appended when the second run starts within the same second
    assert len(runs) == 2 and all(re.fullmatch(r"\d{8}-\d{6}-RevSResNet-digits(-\d+)?", r.name) for r in runs), runs
    assert all((r / "checkpoint_last.pt").is_file() for r in runs)
    recorded = json.loads((runs[0] / "config.json").read_text())["out"]
    assert recorded in (str(runs[0].relative_to(tmp_path)), str(runs[0]))


# ------------------------------------------------------------------------------ bad input and environment
def test_output_folder_that_is_a_file_or_not_writable(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    status, err = _run(["train", "--out", str(afile), *TINY_RUN], capsys)
    assert status == 2 and "is a file" in err
    status, err = _run(["train", "--out", str(afile / "run"), *TINY_RUN], capsys)
    assert status == 2 and "not writable" in err
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        status, err = _run(["train", "--out", str(locked / "run"), *TINY_RUN], capsys)
        assert status == 2 and "not writable" in err


@pytest.mark.parametrize("flags, words", [
    (["--seed", "4294967296"], "seed must be an integer in [0, 4294967295]"),
    (["--seed", "-1"], "seed must be an integer in [0, 4294967295]"),
    (["--lr", "1e39"], "lr must be a number > 0 and at most 3.403e+38"),
    (["--device", "meta"], "not 'meta' (meta tensors hold no data)"),
    (["--device", "cuda:99"], "cuda:99"),
])
def test_bad_values_one_line(flags, words, tmp_path, capsys):
    status, err = _run(["train", "--out", str(tmp_path / "o"), *flags, *TINY_RUN], capsys)
    assert status == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_device_backend_missing(capsys, tmp_path):
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    status, err = _run(["train", "--device", "mps", "--out", str(tmp_path / "o"), *TINY_RUN], capsys)
    assert status == 2 and "device 'mps' requested but MPS is not available here" in err


def test_download_without_network_names_the_url_and_leaves_no_folders(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    data = tmp_path / "new" / "data"
    status, err = _run(["train", "--dataset", "cifar10", "--download", "--data-dir", str(data),
                        "--out", str(tmp_path / "o"), *QUIET], capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "downloading dataset 'cifar10' failed" in err and "https://www.cs.toronto.edu/~kriz/cifar-10" in err
    assert "cifar-10-batches-py" in err and str(data) in err
    assert sorted(os.listdir(tmp_path)) == []  # neither data/ nor its new parent nor the output folder


def test_damaged_checkpoint_contents(tmp_path, capsys):
    from revsnn_triton.checkpoint import save_checkpoint
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY_RUN]) == 0
    capsys.readouterr()
    good = load_checkpoint(out / "checkpoint_last.pt")
    good.pop("revsnn_checkpoint")
    for key, value, words in (("model", [1, 2], "'model' must be a dict of tensors"),
                              ("epoch", "0", "'epoch' must be an integer"),
                              ("rng", dict(good["rng"], torch=good["rng"]["torch"][:64]), "RNG state")):
        save_checkpoint(tmp_path / "bad.pt", {**good, key: value})
        status, err = _run(["train", "--resume", str(tmp_path / "bad.pt"), "--epochs", "2"], capsys)
        assert status == 2 and "is damaged" in err and words in err, err


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def full_disk_at_epoch_2(obj, f, *args, **kwargs):
        calls.append(obj.get("epoch"))
        if obj.get("epoch") == 1:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", full_disk_at_epoch_2)
    status, err = _run(["train", "--out", str(out), *TINY_RUN, "--epochs", "2"], capsys)
    monkeypatch.undo()
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert "could not write" in err and "checkpoint_last.pt" in err and "(end of epoch 1)" in err
    kept = load_checkpoint(out / "checkpoint_last.pt")
    assert kept["epoch"] == 0 and all(torch.isfinite(v).all() for v in kept["model"].values())
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


# --------------------------------------------------------------------------------- help, listings, version
def test_help_shows_defaults_and_describes_every_flag(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # argparse wraps at the terminal width
    with pytest.raises(SystemExit):
        from revsnn_triton.cli import _train_parser
        _train_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "(default: 0.004)" in text and "(default: 4)" in text and "(default: none)" in text
    assert "spiking neurons: triton (the fused multi-step kernels" in text
    assert "runs/train/<YYYYmmdd-HHMMSS>-<model>" in text


def test_version_and_fast_top_level_help():
    from revsnn_triton import __version__
    code = ("import sys; from revsnn_triton.cli import main; s1 = main(['--help']); s2 = main(['--version']); "
            "print('TORCH', 'torch' in sys.modules, s1, s2)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"revsnn-triton {__version__}" in proc.stdout and "eval CHECKPOINT" in proc.stdout
    assert "TORCH False 0 0" in proc.stdout   # the top-level help and --version import no torch


@pytest.mark.parametrize("args", [["--help"], ["train", "--list-configs"]])
def test_output_into_a_closed_pipe_has_no_traceback(args):
    # As `revsnn --help | head -0`: the reader is gone before anything is written.
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "revsnn_triton", *args], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_list_models_and_configs_tables(capsys):
    from revsnn_triton.models import create_model
    assert main(["train", "--list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["model", "input", "T", "classes", "parameters"]
    row = next(line for line in lines if line.startswith("RevSResNet-digits "))
    count = sum(p.numel() for p in create_model("RevSResNet-digits").parameters())
    assert row.split()[-1] == f"{count / 1e6:.2f}M" and " 4 " in row and " 10 " in row
    assert main(["train", "--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["recipe", "dataset", "model", "epochs"]
    assert ["digits", "digits", "RevSResNet-digits", "6"] in [line.split() for line in lines]
    assert ["cifar10_revsresnet", "cifar10", "RevSResNet21", "200"] in [line.split() for line in lines]


def test_did_you_mean(capsys):
    status, err = _run(["train", "--config", "cifar10_revsresnt"], capsys)
    assert status == 2 and "did you mean 'cifar10_revsresnet'" in err
    status, err = _run(["train", "--set", "weight_decy=0.1"], capsys)
    assert status == 2 and "did you mean 'weight_decay'" in err
    status, err = _run(["trian"], capsys)
    assert status == 2 and "did you mean 'train'" in err


def test_one_epoch_one_process_wording(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), *TINY_RUN]) == 0
    text = capsys.readouterr().out
    assert "1 process on cpu" in text and ", 1 epoch," in text and "finished 1 epoch in" in text
    assert "epochs," not in text.splitlines()[0] and "process(es)" not in text
    from revsnn_triton.training import _rate
    assert [_rate(v) for v in (0.0123, 3.456, 45.67, 1234.5)] == ["0.0123", "3.46", "45.7", "1234"]


def test_eval_of_a_missing_checkpoint(tmp_path, capsys):
    status, err = _run(["eval", str(tmp_path / "nothing.pt")], capsys)
    assert status == 2 and "does not exist" in err


def test_ctrl_c_names_what_to_resume(tmp_path, capsys, monkeypatch):
    from revsnn_triton import training
    real_epoch = training._train_epoch

    def interrupted_in_epoch_2(session, progress, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(session, progress, epoch)
    monkeypatch.setattr(training, "_train_epoch", interrupted_in_epoch_2)
    status, err = _run(["train", "--out", str(tmp_path), *TINY_RUN, "--epochs", "2"], capsys)
    assert status == 130 and f"--resume {tmp_path}" in err and "(end of epoch 1)" in err
    assert "interrupted" in (tmp_path / "train.log").read_text()
