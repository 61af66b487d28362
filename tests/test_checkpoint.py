"""Checkpoint files: atomic writes, weights_only loads, clear errors, RNG round trip, damaged contents."""
from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest
import torch

from revsnn_triton.checkpoint import (FORMAT_KEY, CheckpointError, check_training_state, load_checkpoint, rng_state,
                                      save_checkpoint, set_rng_state)


def _state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"epoch": 3, "model": model.state_dict(), "optimizer": opt.state_dict(), "history": [{"a": 1.5}],
            "config": {"model": None, "milestones": [1, 2]}, "rng": rng_state()}


def test_round_trip_with_weights_only(tmp_path):
    state = _state()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, state)
    # The file itself loads with torch's safe loader, and load_checkpoint returns the same content.
    raw = torch.load(path, weights_only=True)
    assert raw[FORMAT_KEY] == 1
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["history"] == [{"a": 1.5}]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def test_rng_state_round_trip(tmp_path):
    save_checkpoint(tmp_path / "ck.pt", {"rng": rng_state()})
    expected = (torch.rand(5), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "ck.pt")["rng"])
    assert torch.equal(torch.rand(5), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 1})

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_rejects_objects_that_weights_only_cannot_load(tmp_path):
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(tmp_path / "ck.pt", {"args": object()})
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(tmp_path / "ck.pt", [1, 2])
    assert not os.listdir(tmp_path)


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, _state())
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a revsnn training checkpoint"):
        load_checkpoint(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({FORMAT_KEY: 99}, newer)
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(newer)


def _training_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    return {"epoch": 0, "model": model.state_dict(), "optimizer": opt.state_dict(), "history": [{"epoch": 1}],
            "best_acc": 0.5, "best_epoch": 1, "rng": rng_state(), "config": {"epochs": 2},
            "model_name": "RevSResNet-digits"}


@pytest.mark.parametrize("damage, words", [
    (lambda s: s.update(model=[1, 2]), "'model' must be a dict of tensors"),
    (lambda s: s.update(epoch="3"), "'epoch' must be an integer"),
    (lambda s: s.update(epoch=True), "'epoch' must be an integer"),
    (lambda s: s.update(optimizer={"state": {}}), "'optimizer' must be an optimizer state_dict"),
    (lambda s: s["rng"].update(torch=s["rng"]["torch"][:100]), "'torch' is not a torch generator state"),
    (lambda s: s["rng"]["python"][1].pop(), "'python' is not a Python random state"),
    (lambda s: s["rng"].pop("numpy"), "RNG state is incomplete"),
    (lambda s: s.pop("history"), "lacks ['history']"),
])
def test_training_state_with_wrong_types_is_reported(tmp_path, damage, words):
    state = _training_state()
    damage(state)
    save_checkpoint(tmp_path / "ck.pt", state)
    loaded = load_checkpoint(tmp_path / "ck.pt")
    with pytest.raises(CheckpointError, match=re.escape(words)) as info:
        check_training_state(loaded, tmp_path / "ck.pt")
    assert str(tmp_path / "ck.pt") in str(info.value)


def test_intact_training_state_passes_and_damaged_rng_changes_nothing(tmp_path):
    state = _training_state()
    check_training_state(state, "x.pt")
    before = torch.get_rng_state()
    broken = dict(state["rng"], numpy=state["rng"]["numpy"][:3])
    with pytest.raises(CheckpointError, match="'numpy' is not a NumPy generator state"):
        set_rng_state(broken)
    assert torch.equal(torch.get_rng_state(), before)


def test_torch_write_failure_is_an_oserror_and_keeps_the_file(tmp_path, monkeypatch):
    # torch's zip writer reports a full disk as a RuntimeError; the caller gets an OSError naming the file.
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"epoch": 1})

    def full_disk(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="PytorchStreamWriter failed writing"):
        save_checkpoint(path, {"epoch": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
