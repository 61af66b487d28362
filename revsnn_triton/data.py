"""Datasets and augmentation for ``revsnn train``, built from scikit-learn, torchvision and tonic.

Samples come out as float32 tensors in the layout the models take:

- ``digits``: scikit-learn's bundled UCI handwritten digits (offline), ``[1, 8, 8]`` in [0, 1], 10 classes,
  a fixed stratified 80/20 split (the same test set for every run).
- ``cifar10`` / ``cifar100``: torchvision datasets, ``[3, 32, 32]`` normalized; training transforms from
  ``torchvision.transforms.v2`` (random crop with padding, flip, AutoAugment / RandAugment / TrivialAugment,
  random erasing) as the recipe says.
- ``cifar10-dvs`` / ``dvs128-gesture``: tonic datasets, events binned by ``tonic.transforms.ToFrame`` into
  ``T`` frames by event count (``n_event_bins``), ``[T, 2, 128, 128]`` event counts. CIFAR10-DVS has no
  official split: the first 90% of each class train, the rest test (as the original RevSNN code).
- ``synthetic-cifar10``: torchvision ``FakeData`` of CIFAR's shape, for speed/memory runs without the data.

MixUp / CutMix (``torchvision.transforms.v2.MixUp`` / ``CutMix``) act on whole batches: see
:func:`batch_mixer`; the training loop applies it and trains on the resulting soft targets.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import TrainConfig

DATASETS = ("digits", "cifar10", "cifar100", "cifar10-dvs", "dvs128-gesture", "synthetic-cifar10")

# Model used when the config names none.
DEFAULT_MODELS = {
    "digits": "RevSResNet-digits",
    "cifar10": "RevSResNet21",
    "cifar100": "RevSResNet21",
    "synthetic-cifar10": "RevSResNet21",
    "cifar10-dvs": "RevSResNet24",
    "dvs128-gesture": "RevSResNet24",
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_SPLIT_SEED = 0
CIFAR10_DVS_TRAIN_FRACTION = 0.9


class DataError(ValueError):
    """A dataset is unknown, missing, or cannot be read (reported to the user without a traceback)."""


@dataclass
class DataBundle:
    """Train/test datasets plus what the model and loop need to know about them.

    ``sample_shape`` is one sample's shape (without the batch dimension); ``event_frames`` says whether samples
    are ``[T, 2, H, W]`` frame sequences (DVS models) rather than static images.
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    sample_shape: tuple[int, ...]
    event_frames: bool


def default_model(dataset: str) -> str:
    if dataset not in DEFAULT_MODELS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return DEFAULT_MODELS[dataset]


def build_data(cfg: TrainConfig) -> DataBundle:
    """Datasets for ``cfg.dataset`` (see the module docstring). Raises :class:`DataError` for an unknown name or
    missing files (saying where to put them, or to pass ``--download``)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"build_data: cfg must be a TrainConfig, got {type(cfg).__name__}")
    if cfg.dataset not in DATASETS:
        raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of: {', '.join(DATASETS)}")
    if cfg.dataset == "digits":
        return _digits()
    if cfg.dataset in ("cifar10", "cifar100"):
        return _cifar(cfg)
    if cfg.dataset == "synthetic-cifar10":
        return _synthetic_cifar(cfg)
    return _events(cfg)


# ----------------------------------------------------------------------------------------------------- digits
def _digits() -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=DIGITS_SPLIT_SEED)
    train = TensorDataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long())
    test = TensorDataset(torch.from_numpy(x_te), torch.from_numpy(y_te).long())
    return DataBundle("digits", train, test, 10, (1, 8, 8), False)


# ------------------------------------------------------------------------------------------------------ CIFAR
def image_transforms(cfg: TrainConfig, train: bool, mean=CIFAR_MEAN, std=CIFAR_STD, size: int = 32):
    """torchvision v2 pipeline: PIL/uint8 image -> normalized float32 ``[3, size, size]``."""
    from torchvision.transforms import v2

    ops: list = [v2.ToImage()]
    if train:
        if cfg.crop_padding:
            ops.append(v2.RandomCrop(size, padding=cfg.crop_padding))
        if cfg.hflip:
            ops.append(v2.RandomHorizontalFlip())
        if cfg.augment == "autoaugment":
            ops.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
        elif cfg.augment == "randaugment":
            ops.append(v2.RandAugment(num_ops=1, magnitude=cfg.augment_magnitude))
        elif cfg.augment == "trivialaugment":
            ops.append(v2.TrivialAugmentWide())
        elif cfg.augment == "event-geometric":
            raise DataError("config: augment 'event-geometric' is for event datasets; use autoaugment, "
                            "randaugment, trivialaugment or none for images")
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if train and cfg.random_erasing > 0:
        ops.append(v2.RandomErasing(p=cfg.random_erasing, value=0))
    return v2.Compose(ops)


def _cifar(cfg: TrainConfig) -> DataBundle:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
    root = os.path.expanduser(cfg.data_dir)
    try:
        train = cls(root, train=True, download=cfg.download, transform=image_transforms(cfg, True))
        test = cls(root, train=False, download=cfg.download, transform=image_transforms(cfg, False))
    except RuntimeError as exc:
        if "not found" in str(exc).lower() or "corrupted" in str(exc).lower():
            raise DataError(_missing(cfg.dataset, root, f"the extracted {folder!r} folder of the official "
                                                        "archive")) from None
        raise
    return DataBundle(cfg.dataset, train, test, 10 if cfg.dataset == "cifar10" else 100, (3, 32, 32), False)


def _synthetic_cifar(cfg: TrainConfig) -> DataBundle:
    import torchvision

    def fake(n: int, seed: int, train: bool):
        return torchvision.datasets.FakeData(size=n, image_size=(3, 32, 32), num_classes=10,
                                             transform=image_transforms(cfg, train), random_offset=seed)
    return DataBundle(cfg.dataset, fake(5120, 0, True), fake(1024, 10**6, False), 10, (3, 32, 32), False)


# ----------------------------------------------------------------------------------------------------- events
class EventFrames(Dataset):
    """Wrap a tonic dataset whose transform yields ``[T, 2, H, W]`` frames: float32 tensor + int label, with an
    optional tensor transform (training augmentation) applied to the whole frame sequence."""

    def __init__(self, base: Dataset, transform: Callable | None = None):
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        frames, target = self.base[index]
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(target)


def event_augment(cfg: TrainConfig):
    """Training augmentation for frame sequences ``[T, 2, H, W]`` from torchvision v2 geometric ops (one of
    shear / translate / rotate / erase per sample, same for all frames), after an optional flip."""
    from torchvision.transforms import v2

    ops: list = []
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.augment == "event-geometric":
        m = cfg.augment_magnitude / 30.0
        ops.append(v2.RandomChoice([
            v2.RandomAffine(degrees=0, shear=(-30 * m, 30 * m, 0, 0)),
            v2.RandomAffine(degrees=0, shear=(0, 0, -30 * m, 30 * m)),
            v2.RandomAffine(degrees=0, translate=(0.5 * m, 0.5 * m)),
            v2.RandomRotation(30 * m),
            v2.RandomErasing(p=1.0, scale=(0.02, 0.1 + 0.2 * m), value=0),
        ]))
    elif cfg.augment != "none":
        raise DataError(f"config: augment {cfg.augment!r} works on RGB images; event datasets take "
                        "'event-geometric' or 'none'")
    return v2.Compose(ops) if ops else None


def _refuse_download(dataset: str, where: str, what: str):
    def download(self) -> None:
        raise DataError(_missing(dataset, where, what))
    return download


def _events(cfg: TrainConfig) -> DataBundle:
    import tonic

    root = os.path.expanduser(cfg.data_dir)
    if cfg.dataset == "cifar10-dvs":
        base_cls, num_classes = tonic.datasets.CIFAR10DVS, 10
        what = "CIFAR10DVS.zip and its extracted class folders (airplane/ ... truck/ with .aedat4 files)"
        if importlib.util.find_spec("aedat") is None:
            raise DataError("cifar10-dvs: tonic reads its .aedat4 files with the 'aedat' package; "
                            "install it with `pip install aedat`")
    else:
        base_cls, num_classes = tonic.datasets.DVSGesture, 11
        what = ("ibmGestureTrain.tar.gz / ibmGestureTest.tar.gz and the extracted ibmGestureTrain/, "
                "ibmGestureTest/ folders (user*_*/<label>.npy)")
    where = os.path.join(root, base_cls.__name__)
    # tonic downloads on construction whenever files are missing: the subclass keeps the class name (tonic
    # derives the folder from it) and turns that download into a clear error unless --download was given.
    cls = base_cls if cfg.download else type(base_cls.__name__, (base_cls,), {
        "download": _refuse_download(cfg.dataset, where, what)})
    sensor_size = base_cls.sensor_size
    to_frames = tonic.transforms.ToFrame(sensor_size=sensor_size, n_event_bins=cfg.T)
    if cfg.dataset == "cifar10-dvs":
        full = cls(root, transform=to_frames)
        train_idx, test_idx = _split_per_class(full.targets, num_classes, CIFAR10_DVS_TRAIN_FRACTION)
        train_base, test_base = Subset(full, train_idx), Subset(full, test_idx)
    else:
        train_base = cls(root, train=True, transform=to_frames)
        test_base = cls(root, train=False, transform=to_frames)
    if len(train_base) == 0 or len(test_base) == 0:
        raise DataError(_missing(cfg.dataset, where, what))
    shape = (cfg.T, sensor_size[2], sensor_size[1], sensor_size[0])
    return DataBundle(cfg.dataset, EventFrames(train_base, event_augment(cfg)), EventFrames(test_base), num_classes,
                      shape, True)


def _split_per_class(targets, num_classes: int, fraction: float) -> tuple[list[int], list[int]]:
    per_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, t in enumerate(targets):
        per_class[int(t)].append(i)
    train, test = [], []
    for idx in per_class:
        cut = int(np.ceil(len(idx) * fraction))
        train += idx[:cut]
        test += idx[cut:]
    return train, test


def _missing(dataset: str, where: str, what: str) -> str:
    return (f"dataset {dataset!r} not found under {where!r}: put {what} there, or pass --download "
            f"(with --data-dir to choose the folder)")


# ------------------------------------------------------------------------------------------------- batch mixing
def batch_mixer(cfg: TrainConfig, num_classes: int) -> Callable | None:
    """``(images, labels) -> (images, soft_labels [B, num_classes])`` with torchvision v2 MixUp and/or CutMix
    (one of them per batch when both are on), applied with probability ``cfg.mixup_prob``; None when off.
    Images may be ``[B, C, H, W]`` or frame sequences ``[B, T, C, H, W]`` (mixing is per sample)."""
    from torchvision.transforms import v2

    choices = []
    if cfg.mixup > 0:
        choices.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        choices.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not choices:
        return None
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def apply(images: torch.Tensor, labels: torch.Tensor):
        if cfg.mixup_prob < 1.0 and torch.rand(()).item() >= cfg.mixup_prob:
            return images, torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
        if images.dim() == 5:  # [B, T, C, H, W]: mix the flattened frames, CutMix boxes shared over T
            b, t, c, h, w = images.shape
            mixed, soft = mix(images.reshape(b, t * c, h, w), labels)
            return mixed.reshape(b, t, c, h, w), soft
        return mix(images, labels)
    return apply
