"""Datasets and augmentation for ``revsnn train``, built from scikit-learn, torchvision, timm, spikingjelly and tonic.

Samples come out as float32 tensors in the layout the models take:

- ``digits``: scikit-learn's bundled UCI handwritten digits (offline), ``[1, 8, 8]`` in [0, 1], 10 classes,
  a fixed stratified 80/20 split (the same test set for every run).
- ``cifar10`` / ``cifar100``: torchvision datasets, ``[3, 32, 32]`` normalized (``mean`` / ``std`` of the config,
  CIFAR's statistics by default); training transforms as the recipe says: random crop with padding, flip, then
  torchvision's AutoAugment / RandAugment / TrivialAugment or a timm RandAugment string
  (``rand-m9-n1-mstd0.4-inc1``: timm's ``rand_augment_transform`` with bicubic interpolation and the dataset
  mean as fill, as timm's ``create_transform`` builds it).
- ``cifar10-dvs`` / ``dvs128-gesture``: spikingjelly's frame datasets (the RevSNN code's loaders) under
  ``<data_dir>/CIFAR10DVS`` and ``<data_dir>/DVS128Gesture``: ``[T, 2, 128, 128]`` event counts, the events of a
  sample cut into ``T`` frames of equal event count (``split_by="number"``; the last frame takes the remainder),
  frame ``[p, y, x]``. CIFAR10-DVS coordinates as spikingjelly maps them from the original AEDAT files
  (``x = 127 - y_raw``, ``y = 127 - x_raw``, ``p = 1 - p_raw``); its split is the first 90% of each class in
  sorted file-name order for training and the rest (100 per class) for testing, the same on every machine.
  DVS128 Gesture keeps the official trials split and cuts every labelled segment of a recording into a sample,
  repeated labels included (1176 train / 288 test); labels are the gesture ids 0-10. The frames are computed
  once and cached next to the data (``frames_number_<T>_split_by_number``).
- ``dvs128-gesture-tonic``: tonic's preprocessed DVSGesture files under ``<data_dir>/DVSGesture`` (1077 / 264
  samples: tonic's files keep one segment per label and recording), binned into ``T`` frames by tonic's
  ``ToFrame(n_event_bins=T)``.
- ``synthetic-cifar10``: torchvision ``FakeData`` of CIFAR's shape, for speed/memory runs without the data.

Per-sample augmentation runs in the datasets (DataLoader workers); MixUp / CutMix and random erasing act on
whole batches in the training loop (:func:`batch_transforms`), in timm's order: mix first, then erase.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .config import TIMM_RANDAUGMENT_PREFIX, TrainConfig

DATASETS = ("digits", "cifar10", "cifar100", "cifar10-dvs", "dvs128-gesture", "dvs128-gesture-tonic",
            "synthetic-cifar10")

# Model used when the config names none.
DEFAULT_MODELS = {
    "digits": "RevSResNet-digits",
    "cifar10": "RevSResNet21",
    "cifar100": "RevSResNet21",
    "synthetic-cifar10": "RevSResNet21",
    "cifar10-dvs": "RevSResNet24",
    "dvs128-gesture": "RevSResNet24",
    "dvs128-gesture-tonic": "RevSResNet24",
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
DIGITS_SPLIT_SEED = 0
CIFAR10_DVS_TRAIN_FRACTION = 0.9
# timm's RandAugment settings as its create_transform derives them (translation 45% of the image side).
TIMM_TRANSLATE_FRACTION = 0.45
TIMM_INTERPOLATION = "bicubic"


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
        data = _digits()
    elif cfg.dataset in ("cifar10", "cifar100"):
        data = _cifar(cfg)
    elif cfg.dataset == "synthetic-cifar10":
        data = _synthetic_cifar(cfg)
    elif cfg.dataset == "dvs128-gesture-tonic":
        data = _tonic_gesture(cfg)
    else:
        data = _spikingjelly_frames(cfg)
    head_classes(cfg, data)  # a too narrow num_classes fails here, before any model is built
    return data


def head_classes(cfg: TrainConfig, data: DataBundle) -> int:
    """Width of the model's head: ``cfg.num_classes`` if set (at least the dataset's classes), else the
    dataset's number of classes."""
    if cfg.num_classes is None:
        return data.num_classes
    if cfg.num_classes < data.num_classes:
        raise DataError(f"config: num_classes {cfg.num_classes} is smaller than the {data.num_classes} classes of "
                        f"{data.name!r}; leave it null for one output per class")
    return cfg.num_classes


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


# ------------------------------------------------------------------------------------------------------ images
def _normalization(cfg: TrainConfig, channels: int, mean: Sequence[float], std: Sequence[float]):
    mean, std = tuple(cfg.mean or mean), tuple(cfg.std or std)
    for name, value in (("mean", mean), ("std", std)):
        if len(value) != channels:
            raise DataError(f"config: {name} must have {channels} values (one per channel of {cfg.dataset!r}), "
                            f"got {list(value)}")
    return mean, std


def timm_randaugment(policy: str, mean: Sequence[float], size: int):
    """timm's RandAugment for PIL images from a config string such as ``rand-m9-n1-mstd0.4-inc1``, with the
    hyper-parameters timm's ``create_transform`` gives it: translation up to 45% of ``size`` pixels, fill with
    ``mean`` (in [0, 1], per channel) and bicubic interpolation. Raises :class:`DataError` if timm is missing or
    rejects the string."""
    if not (isinstance(policy, str) and policy.startswith(TIMM_RANDAUGMENT_PREFIX)):
        raise DataError(f"augment: expected a timm RandAugment string starting with {TIMM_RANDAUGMENT_PREFIX!r}, "
                        f"got {policy!r}")
    try:
        from timm.data import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp
    except ModuleNotFoundError:
        raise DataError(f"augment {policy!r} is timm's RandAugment: install timm (`pip install timm`, part of the "
                        "[train] extra)") from None
    hparams = dict(translate_const=int(size * TIMM_TRANSLATE_FRACTION),
                   img_mean=tuple(min(255, round(255 * m)) for m in mean),
                   interpolation=str_to_pil_interp(TIMM_INTERPOLATION))
    try:
        return rand_augment_transform(policy, hparams)
    except (AssertionError, ValueError, KeyError) as exc:
        reason = str(exc) or "an unknown section"
        raise DataError(f"augment {policy!r}: timm could not parse this RandAugment string ({reason}); the form "
                        "is rand-m<magnitude>-n<ops>[-mstd<std>][-inc1]") from None


def image_transforms(cfg: TrainConfig, train: bool, mean=CIFAR_MEAN, std=CIFAR_STD, size: int = 32):
    """PIL image -> normalized float32 ``[3, size, size]``: (training) random crop, flip and the policy of
    ``cfg.augment`` on the PIL image, then ``ToImage``, ``ToDtype(float32, scale=True)`` and ``Normalize``
    with ``cfg.mean`` / ``cfg.std`` (default: ``mean`` / ``std``). Random erasing is not here: it acts on the
    batch (:func:`batch_transforms`)."""
    from torchvision.transforms import v2

    mean, std = _normalization(cfg, 3, mean, std)
    ops: list = []
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
        elif cfg.augment.startswith(TIMM_RANDAUGMENT_PREFIX):
            ops.append(timm_randaugment(cfg.augment, mean, size))
        elif cfg.augment == "snn-augment-wide":
            raise DataError("config: augment 'snn-augment-wide' is for event frames; use autoaugment, "
                            "randaugment, trivialaugment, a timm 'rand-...' string or none for images")
    ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def _cifar(cfg: TrainConfig) -> DataBundle:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    folder = "cifar-10-batches-py" if cfg.dataset == "cifar10" else "cifar-100-python"
    root = os.path.expanduser(cfg.data_dir)
    train_tf, test_tf = image_transforms(cfg, True), image_transforms(cfg, False)
    try:
        train = cls(root, train=True, download=cfg.download, transform=train_tf)
        test = cls(root, train=False, download=cfg.download, transform=test_tf)
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
    """Wrap a dataset of ``[T, 2, H, W]`` frame arrays: float32 tensor + int label, with an optional tensor
    transform (training augmentation) applied to the whole frame sequence and an optional ``labels`` table
    (dataset index of a class -> the label to return)."""

    def __init__(self, base: Dataset, transform: Callable | None = None, labels: Sequence[int] | None = None):
        self.base = base
        self.transform = transform
        self.labels = None if labels is None else list(labels)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        frames, target = self.base[index]
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32)
        if self.transform is not None:
            x = self.transform(x)
        target = int(target)
        return x, (target if self.labels is None else self.labels[target])


def event_augment(cfg: TrainConfig):
    """Training augmentation for frame sequences ``[T, 2, H, W]``: a horizontal flip (``cfg.hflip``, p = 0.5,
    mirrors x) followed by :class:`~revsnn_triton.augment.SNNAugmentWide` (``augment: snn-augment-wide``), the
    same draw for every frame of a sample. None when both are off."""
    from torchvision.transforms import v2

    from .augment import SNNAugmentWide

    if cfg.mean is not None or cfg.std is not None:
        raise DataError(f"config: mean / std normalize images; {cfg.dataset!r} gives raw event counts")
    ops: list = []
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.augment == "snn-augment-wide":
        ops.append(SNNAugmentWide())
    elif cfg.augment != "none":
        raise DataError(f"config: augment {cfg.augment!r} works on RGB images; event datasets take "
                        "'snn-augment-wide' or 'none'")
    return v2.Compose(ops) if ops else None


def sorted_split_per_class(samples: Sequence[tuple[str, int]], fraction: float) -> tuple[list[int], list[int]]:
    """Indices ``(train, test)`` of ``samples`` (``(path, label)`` pairs): per class, the first
    ``ceil(fraction * n)`` samples in sorted file-name order train, the rest test. The result depends on the
    file names only, not on the order in which the files were listed or created."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"sorted_split_per_class: fraction must be in (0, 1), got {fraction!r}")
    per_class: dict[int, list[int]] = {}
    for i, (path, label) in enumerate(samples):
        per_class.setdefault(int(label), []).append(i)
    train, test = [], []
    for label in sorted(per_class):
        idx = sorted(per_class[label], key=lambda i: os.path.basename(samples[i][0]))
        cut = math.ceil(len(idx) * fraction)
        train += idx[:cut]
        test += idx[cut:]
    return train, test


_SPIKINGJELLY_SETS = {
    # dataset -> (spikingjelly module, class, folder under data_dir, classes)
    "cifar10-dvs": ("spikingjelly.datasets.cifar10_dvs", "CIFAR10DVS", "CIFAR10DVS", 10),
    "dvs128-gesture": ("spikingjelly.datasets.dvs128_gesture", "DVS128Gesture", "DVS128Gesture", 11),
}


@contextlib.contextmanager
def _one_preprocessing_thread():
    """spikingjelly converts event files in a thread pool, whose threads read them with ``numpy.load``; its header
    parse (``ast.literal_eval``) is not thread-safe on CPython before 3.12 ("SystemError: AST constructor recursion
    depth mismatch", seen here on 3.11.7). There the conversion runs in one thread."""
    if sys.version_info >= (3, 12):
        yield
        return
    from spikingjelly import configure
    previous = configure.max_threads_number_for_datasets_preprocess
    configure.max_threads_number_for_datasets_preprocess = 1
    try:
        yield
    finally:
        configure.max_threads_number_for_datasets_preprocess = previous


def _spikingjelly_frames(cfg: TrainConfig) -> DataBundle:
    module, cls_name, folder, num_classes = _SPIKINGJELLY_SETS[cfg.dataset]
    if importlib.util.find_spec("spikingjelly") is None:
        raise DataError(f"{cfg.dataset}: the frames come from spikingjelly's dataset classes: install spikingjelly "
                        "(`pip install 'spikingjelly>=2.0,<2.1'`)")
    cls = getattr(importlib.import_module(module), cls_name)
    root = Path(os.path.expanduser(cfg.data_dir)) / folder
    _check_spikingjelly_files(cfg, cls, root)
    augment = event_augment(cfg)
    frames = dict(data_type="frame", frames_number=cfg.T, split_by="number")

    def build():
        with _one_preprocessing_thread():
            if cfg.dataset == "cifar10-dvs":
                return (cls(str(root), **frames),)
            return cls(str(root), train=True, **frames), cls(str(root), train=False, **frames)
    try:
        # The first use converts the archives and writes the frames once; under torchrun rank 0 does it alone.
        built = _rank0_first(build)
    except (NotImplementedError, RuntimeError, FileNotFoundError) as exc:  # spikingjelly's and DatasetFolder's
        raise DataError(f"{cfg.dataset}: spikingjelly could not prepare the frames under {str(root)!r}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if cfg.dataset == "cifar10-dvs":
        full = built[0]
        train_idx, test_idx = sorted_split_per_class(full.samples, CIFAR10_DVS_TRAIN_FRACTION)
        train_base, test_base, labels = Subset(full, train_idx), Subset(full, test_idx), None
    else:
        train_base, test_base = built
        labels = [int(name) for name in train_base.classes]  # class folders are the gesture ids "0".."10"
        if [int(name) for name in test_base.classes] != labels:
            raise DataError(f"{cfg.dataset}: the train and test class folders under {str(root)!r} differ")
    if len(train_base) == 0 or len(test_base) == 0:
        raise DataError(f"{cfg.dataset}: no samples found under {str(root)!r} (train {len(train_base)}, test "
                        f"{len(test_base)})")
    h, w = cls.get_H_W()
    return DataBundle(cfg.dataset, EventFrames(train_base, augment, labels), EventFrames(test_base, None, labels),
                      num_classes, (cfg.T, 2, h, w), True)


def _rank0_first(build: Callable):
    """``build()`` on rank 0 first, then on the other ranks of an initialized process group (so that a cache
    is written by one process); plain ``build()`` otherwise."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    if dist.get_rank() != 0:
        dist.barrier()
        return build()
    try:
        return build()
    finally:
        dist.barrier()  # also when rank 0 failed: the others then fail with their own message, not a hang


def _check_spikingjelly_files(cfg: TrainConfig, cls, root: Path) -> None:
    """Fail with a clear message before spikingjelly would download (or refuse) missing files."""
    if (root / "events_np").is_dir():  # converted before, by spikingjelly or by the original code
        return
    download = root / "download"
    missing = [name for name, _, _ in cls.resource_url_md5() if not (download / name).is_file()]
    if not missing:
        return
    if cls.downloadable():
        if cfg.download:
            root.mkdir(parents=True, exist_ok=True)
            return
        raise DataError(_missing(cfg.dataset, str(download), ", ".join(missing) + " (the original archives)"))
    raise DataError(f"dataset {cfg.dataset!r} not found under {str(download)!r}: it cannot be downloaded "
                    f"automatically; download {', '.join(missing)} from IBM's DVS128 Gesture page and put them "
                    f"there (or point --data-dir at a folder whose DVS128Gesture/ spikingjelly has converted)")


def _refuse_download(dataset: str, where: str, what: str):
    def download(self) -> None:
        raise DataError(_missing(dataset, where, what))
    return download


def _tonic_gesture(cfg: TrainConfig) -> DataBundle:
    import tonic

    root = os.path.expanduser(cfg.data_dir)
    base_cls = tonic.datasets.DVSGesture
    what = ("ibmGestureTrain.tar.gz / ibmGestureTest.tar.gz and the extracted ibmGestureTrain/, "
            "ibmGestureTest/ folders (user*_*/<label>.npy)")
    where = os.path.join(root, base_cls.__name__)
    # tonic downloads on construction whenever files are missing: the subclass keeps the class name (tonic
    # derives the folder from it) and turns that download into a clear error unless --download was given.
    cls = base_cls if cfg.download else type(base_cls.__name__, (base_cls,), {
        "download": _refuse_download(cfg.dataset, where, what)})
    sensor_size = base_cls.sensor_size
    to_frames = tonic.transforms.ToFrame(sensor_size=sensor_size, n_event_bins=cfg.T)
    train_base = cls(root, train=True, transform=to_frames)
    test_base = cls(root, train=False, transform=to_frames)
    if len(train_base) == 0 or len(test_base) == 0:
        raise DataError(_missing(cfg.dataset, where, what))
    shape = (cfg.T, sensor_size[2], sensor_size[1], sensor_size[0])
    return DataBundle(cfg.dataset, EventFrames(train_base, event_augment(cfg)), EventFrames(test_base), 11, shape,
                      True)


def _missing(dataset: str, where: str, what: str) -> str:
    return (f"dataset {dataset!r} not found under {where!r}: put {what} there, or pass --download "
            f"(with --data-dir to choose the folder)")


# ---------------------------------------------------------------------------------------------- batch transforms
def _mixer(cfg: TrainConfig, num_classes: int) -> Callable | None:
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


def _eraser(cfg: TrainConfig) -> Callable | None:
    if cfg.random_erasing <= 0:
        return None
    try:
        from timm.data.random_erasing import RandomErasing
    except ModuleNotFoundError:
        raise DataError("random_erasing uses timm's RandomErasing: install timm (`pip install timm`, part of the "
                        "[train] extra)") from None

    def apply(images: torch.Tensor) -> torch.Tensor:
        # timm's batch mode: per sample, with probability p, one box of 2%-33% of the area, aspect 0.3-3.3, set
        # to 0 (the mean after normalization); frame sequences share the box over time steps and channels.
        erase = RandomErasing(probability=cfg.random_erasing, mode="const", device=images.device)
        flat = images.reshape(images.shape[0], -1, *images.shape[-2:]) if images.dim() == 5 else images
        erase(flat)
        return flat.reshape(images.shape)
    return apply


def batch_transforms(cfg: TrainConfig, num_classes: int) -> Callable:
    """``(images, labels, epoch) -> (images, targets)`` for a training batch: MixUp / CutMix (torchvision v2,
    one of them per batch when both are on, with probability ``cfg.mixup_prob``, before epoch
    ``cfg.mixup_off_epoch``) giving soft targets ``[B, num_classes]``, then random erasing (timm's, probability
    ``cfg.random_erasing`` per sample). Without mixing the labels pass through. Images may be ``[B, C, H, W]``
    or frame sequences ``[B, T, C, H, W]``; ``num_classes`` is the width of the model's head."""
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"batch_transforms: num_classes must be an integer >= 2, got {num_classes!r}")
    mix, erase = _mixer(cfg, num_classes), _eraser(cfg)

    def apply(images: torch.Tensor, labels: torch.Tensor, epoch: int):
        targets = labels
        if mix is not None and (cfg.mixup_off_epoch is None or epoch < cfg.mixup_off_epoch):
            images, targets = mix(images, labels)
        if erase is not None:
            images = erase(images)
        return images, targets
    return apply
