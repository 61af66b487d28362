"""Training checkpoints: atomic writes, ``weights_only`` loads, and the RNG state needed for exact resumes.

A checkpoint is a dict holding only tensors and primitive containers (dict/list/tuple of str, int, float,
bool, None), so that it loads with ``torch.load(weights_only=True)``: model/optimizer/scheduler state dicts,
the epoch, the metric history, the config and the RNG states (torch CPU and CUDA, NumPy, Python ``random``).
``FORMAT_KEY`` marks files written by this module; anything else is reported as a foreign checkpoint.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .fileio import atomic_write

FORMAT_KEY = "revsnn_checkpoint"
FORMAT_VERSION = 1

_PRIMITIVES = (str, int, float, bool, type(None))


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not a revsnn training checkpoint."""


def _check_serialisable(obj: Any, where: str) -> None:
    if isinstance(obj, (torch.Tensor, *_PRIMITIVES, torch.Size)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, _PRIMITIVES):
                raise TypeError(f"save_checkpoint: key {k!r} at {where} must be a str/int/float/bool/None")
            _check_serialisable(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_serialisable(v, f"{where}[{i}]")
        return
    raise TypeError(f"save_checkpoint: {where} is a {type(obj).__name__}; a checkpoint may hold only tensors "
                    "and dict/list/tuple of str, int, float, bool, None (so it loads with weights_only=True)")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    ``state`` must be a dict of tensors and primitive containers (checked before anything is written); the
    format marker is added. A failed write (e.g. a full disk) raises ``OSError`` and leaves the previous file at
    ``path`` intact, as does a crash while writing.
    """
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    _check_serialisable(state, "state")
    path = Path(path)
    payload = {FORMAT_KEY: FORMAT_VERSION, **state}
    try:
        atomic_write(path, lambda f: torch.save(payload, f))
    except RuntimeError as exc:  # torch's zip writer reports a failed write as "[enforce fail at ...] ... failed"
        raise OSError(f"writing {str(path)!r} failed: {str(exc).strip().splitlines()[0]}") from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises :class:`CheckpointError` (with the path and what is wrong) when the file is missing, unreadable,
    corrupt, or not a revsnn checkpoint (e.g. a bare ``state_dict`` or another program's file).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError,
            AttributeError, KeyError, IndexError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a PyTorch file that loads with "
                              f"weights_only=True ({first_line})") from None
    if not isinstance(data, dict) or data.get(FORMAT_KEY) is None:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a revsnn training checkpoint (no "
                              f"{FORMAT_KEY!r} marker; it holds a {type(data).__name__})")
    if data[FORMAT_KEY] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {data[FORMAT_KEY]!r}; this version of "
                              f"revsnn_triton reads version {FORMAT_VERSION}")
    return data


# What each entry of a training checkpoint must be; the model and optimizer states are checked by load_state_dict.
_TRAINING_KEYS = {"epoch": "an integer >= 0", "model": "a dict of tensors (a state_dict)",
                  "optimizer": "an optimizer state_dict (a dict with 'state' and 'param_groups')",
                  "history": "a list of per-epoch dicts", "best_acc": "a number", "best_epoch": "an integer",
                  "rng": "the RNG states (a dict, or one per process)", "config": "a dict of config values",
                  "model_name": "a model name"}


def check_training_state(state: dict, path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``state`` (from :func:`load_checkpoint`) holds every entry of a
    training checkpoint with the right type, RNG states included (so a resume fails before anything changes)."""
    where = str(path)
    missing = sorted(set(_TRAINING_KEYS) - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {where!r} lacks {missing}: not a training checkpoint")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    model, opt, rng = state["model"], state["optimizer"], state["rng"]
    valid = {
        "epoch": is_int(state["epoch"]) and state["epoch"] >= 0,
        "model": isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in model.items()),
        "optimizer": isinstance(opt, dict) and isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list),
        "history": isinstance(state["history"], list) and all(isinstance(r, dict) for r in state["history"]),
        "best_acc": isinstance(state["best_acc"], (int, float)) and not isinstance(state["best_acc"], bool),
        "best_epoch": is_int(state["best_epoch"]),
        "rng": isinstance(rng, dict) or (isinstance(rng, list) and len(rng) > 0),
        "config": isinstance(state["config"], dict),
        "model_name": isinstance(state["model_name"], str) and bool(state["model_name"]),
    }
    for key, ok in valid.items():
        if not ok:
            raise CheckpointError(f"checkpoint {where!r} is damaged: {key!r} must be {_TRAINING_KEYS[key]}, got "
                                  f"{type(state[key]).__name__}")
    for i, one in enumerate(rng if isinstance(rng, list) else [rng]):
        problem = _rng_problem(one)
        if problem:
            suffix = f" (process {i})" if isinstance(rng, list) else ""
            raise CheckpointError(f"checkpoint {where!r} is damaged: its RNG state{suffix} {problem}")


def _rng_problem(state: Any) -> str | None:
    """What is wrong with a state from :func:`rng_state`, or None (checked against the live generators)."""
    if not isinstance(state, dict) or not {"torch", "numpy", "python"} <= set(state):
        return "is incomplete (needs 'torch', 'numpy' and 'python')"
    t = state["torch"]
    if not (isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == torch.get_rng_state().shape):
        return "'torch' is not a torch generator state"
    np_state = state["numpy"]
    if not (isinstance(np_state, list) and len(np_state) == 5 and isinstance(np_state[0], str)
            and isinstance(np_state[1], torch.Tensor) and np_state[1].shape == (624,)
            and all(isinstance(v, (int, float)) for v in np_state[2:])):
        return "'numpy' is not a NumPy generator state"
    py = state["python"]
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[1], list) and len(py[1]) == 625
            and all(isinstance(v, int) for v in py[1])):
        return "'python' is not a Python random state"
    return None


def rng_state() -> dict:
    """All RNG states a training run draws from, as tensors and primitives (checkpoint-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    """Restore the states returned by :func:`rng_state` (:class:`CheckpointError` for a damaged one, before any
    generator changes)."""
    problem = _rng_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint's RNG state {problem}")
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
