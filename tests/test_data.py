"""Datasets: digits, torchvision transforms and batch mixing, tonic event data on a synthetic DVS128 Gesture."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from revsnn_triton.config import make_config
from revsnn_triton.data import DataError, batch_mixer, build_data, image_transforms

# DVS128 Gesture layout as tonic expects it: <root>/DVSGesture/<archive> plus the extracted folders
# ibmGesture{Train,Test}/user<NN>_<lighting>/<label>.npy, each an [N, 4] int array of x, y, p, t (ms).
# tonic checks for at least 100 .npy files per split before it would download.
N_FILES, N_EVENTS, T = 100, 64, 4


def _write_dvs_gesture(root, seed=0):
    import tonic

    rng = np.random.default_rng(seed)
    base = os.path.join(root, "DVSGesture")
    for split in ("Train", "Test"):
        folder = os.path.join(base, f"ibmGesture{split}")
        for i in range(N_FILES):
            user_dir = os.path.join(folder, f"user{i // 11 + 1:02d}_fluorescent")
            os.makedirs(user_dir, exist_ok=True)
            events = tonic.io.make_structured_array(
                rng.integers(0, 128, N_EVENTS), rng.integers(0, 128, N_EVENTS), rng.integers(0, 2, N_EVENTS),
                np.sort(rng.integers(0, 1000, N_EVENTS)),
                dtype=np.dtype([("x", np.int16), ("y", np.int16), ("p", np.int16), ("t", np.int64)]))
            table = np.stack([events["x"], events["y"], events["p"], events["t"]], axis=1).astype(np.int64)
            np.save(os.path.join(user_dir, f"{i % 11}.npy"), table)
        open(os.path.join(base, f"ibmGesture{split}.tar.gz"), "wb").close()  # the (unused) archive
    return base


def test_digits_split_is_fixed_and_stratified():
    a, b = build_data(make_config()), build_data(make_config(seed=7))
    assert (len(a.train), len(a.test), a.num_classes, a.sample_shape) == (1437, 360, 10, (1, 8, 8))
    # The test split does not depend on the run's seed, and every class is in it.
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.bincount(a.test.tensors[1], minlength=10).min() >= 35
    x = a.train.tensors[0]
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_cifar_missing_without_download_says_where(tmp_path):
    with pytest.raises(DataError) as info:
        build_data(make_config(dataset="cifar100", data_dir=str(tmp_path)))
    msg = str(info.value)
    assert str(tmp_path) in msg and "cifar-100-python" in msg and "--download" in msg
    assert not any(tmp_path.iterdir())  # nothing was downloaded


def test_image_transforms_from_the_recipe():
    from PIL import Image

    cfg = make_config("cifar10_revsformer")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    names = [type(t).__name__ for t in image_transforms(cfg, True).transforms]
    assert names == ["ToImage", "RandomHorizontalFlip", "RandAugment", "ToDtype", "Normalize", "RandomErasing"]
    x = image_transforms(cfg, False)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # Evaluation transform: exactly ToTensor + Normalize with the CIFAR statistics.
    ref = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 -
           torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]) / torch.tensor([0.2470, 0.2435, 0.2616])[:, None, None]
    torch.testing.assert_close(x, ref)
    resnet = [type(t).__name__ for t in image_transforms(make_config("cifar10_revsresnet"), True).transforms]
    assert resnet == ["ToImage", "RandomCrop", "RandomHorizontalFlip", "ToDtype", "Normalize"]


def test_batch_mixer_soft_labels():
    torch.manual_seed(0)
    assert batch_mixer(make_config(), 10) is None
    mix = batch_mixer(make_config(mixup=0.5), 10)
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8)
    mixed, soft = mix(x, y)
    assert soft.shape == (8, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    # MixUp: every output is the convex combination its soft label describes (partner = the rolled batch).
    lam = soft[0, 0].item()
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    frames, soft5 = batch_mixer(make_config(cutmix=1.0), 10)(torch.rand(4, 3, 2, 8, 8), torch.arange(4))
    assert frames.shape == (4, 3, 2, 8, 8) and soft5.shape == (4, 10)
    never = batch_mixer(make_config(mixup=0.5, mixup_prob=0.0), 10)
    same, onehot = never(x, y)
    assert torch.equal(same, x) and torch.equal(onehot, torch.nn.functional.one_hot(y, 10).float())


def test_tonic_dvs_gesture_frames(tmp_path):
    _write_dvs_gesture(tmp_path)
    cfg = make_config(dataset="dvs128-gesture", data_dir=str(tmp_path), T=T, hflip=True, augment="event-geometric")
    data = build_data(cfg)
    assert (len(data.train), len(data.test), data.num_classes) == (N_FILES, N_FILES, 11)
    assert data.sample_shape == (T, 2, 128, 128) and data.event_frames
    x, label = data.test[0]
    assert x.shape == (T, 2, 128, 128) and x.dtype == torch.float32 and isinstance(label, int)
    # ToFrame by event count: every event lands in exactly one frame (64 events, 4 bins of 16).
    assert x.sum().item() == N_EVENTS
    torch.testing.assert_close(x.sum(dim=(1, 2, 3)), torch.full((T,), N_EVENTS / T))
    # The frame at (y, x) counts the events at that pixel and polarity, as the raw file says.
    raw = np.load(data.test.base.data[0])
    expected = np.zeros((2, 128, 128))
    np.add.at(expected, (raw[:, 2], raw[:, 1], raw[:, 0]), 1)
    assert np.array_equal(x.sum(0).numpy(), expected)
    xt, _ = data.train[0]
    assert xt.shape == (T, 2, 128, 128)


def test_tonic_missing_without_download(tmp_path):
    with pytest.raises(DataError) as info:
        build_data(make_config(dataset="dvs128-gesture", data_dir=str(tmp_path)))
    assert os.path.join(str(tmp_path), "DVSGesture") in str(info.value) and "--download" in str(info.value)


@pytest.mark.skipif(importlib.util.find_spec("aedat") is not None, reason="aedat is installed")
def test_cifar10_dvs_needs_aedat(tmp_path):
    with pytest.raises(DataError, match="pip install aedat"):
        build_data(make_config(dataset="cifar10-dvs", data_dir=str(tmp_path)))


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="digits, cifar10, cifar100"):
        build_data(make_config(dataset="mnist"))


def test_train_on_synthetic_dvs_gesture_with_the_recipe(tmp_path):
    # The shipped DVS128 Gesture recipe end to end (RevSResNet24, flips, geometric augmentation, MixUp) on the
    # synthetic files, shortened to two steps of two samples and 6 test samples; fp32 (bf16 autocast is slow on CPUs without bf16
    # units, and the recipe's amp setting is a GPU choice).
    from revsnn_triton.checkpoint import load_checkpoint
    from revsnn_triton.cli import main

    _write_dvs_gesture(tmp_path / "data")
    out = tmp_path / "run"
    status = main(["train", "--config", "dvs128gesture_revsresnet", "--data-dir", str(tmp_path / "data"),
                   "--T", str(T), "--epochs", "1", "--max-steps-per-epoch", "2", "--batch-size", "2",
                   "--max-eval-samples", "6", "--workers", "0", "--out", str(out), "--no-progress", "--no-memory-report",
                   "--amp", "none", "--set", "mixup_prob=1.0"])
    assert status == 0
    state = load_checkpoint(out / "checkpoint_last.pt")
    assert state["model_name"] == "RevSResNet24" and state["config"]["augment"] == "event-geometric"
    row = state["history"][0]
    assert torch.isfinite(torch.tensor(row["train_loss"])) and 0.0 <= row["test_acc"] <= 1.0
