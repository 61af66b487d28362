"""Datasets and augmentation: digits, CIFAR transforms (torchvision, timm RandAugment), batch mixing and erasing,
and the event datasets on synthetic files laid out like the real ones (no download):

- CIFAR10-DVS as its ten original archives (``<class>.zip`` of ``<class>/cifar10_<class>_<i>.aedat``, AEDAT 2.0:
  big-endian 32-bit address + timestamp, x in bits 1-7, y in bits 8-14, polarity in bit 0);
- DVS128 Gesture as ``DvsGesture.tar.gz`` (AEDAT 3.1 recordings with ``*_labels.csv`` and the trials lists);
- tonic's preprocessed DVSGesture ``.npy`` files.
"""
from __future__ import annotations

import math
import os
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from revsnn_triton.config import make_config
from revsnn_triton.data import DataError, batch_transforms, build_data, image_transforms, sorted_split_per_class

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# timm's RandAugment op set with inc1 ("increasing" variants), as timm documents it.
TIMM_INCREASING_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


@pytest.fixture
def offline_spikingjelly(monkeypatch):
    """spikingjelly checks the MD5 of the original archives; the synthetic ones only need to exist. Any
    download attempt fails the test."""
    import spikingjelly.datasets.base as sj_base

    monkeypatch.setattr(sj_base, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download a dataset")
    monkeypatch.setattr(sj_base, "download_url", no_download)


# ------------------------------------------------------------------------------------------ synthetic files
def _aedat2(events) -> bytes:
    """CIFAR10-DVS's AEDAT 2.0: ASCII header lines starting with '#', then (address, timestamp) big-endian u32."""
    header = (b"#!AER-DAT2.0\r\n# This is a raw AE data file - do not edit\r\n"
              b"# Data format is int32 address, int32 timestamp (8 bytes total)\r\n")
    words = []
    for x, y, p, t in events:
        words += [(y << 8) | (x << 1) | p, t]
    return header + np.asarray(words, dtype=">u4").tobytes()


def _write_cifar10_dvs(root, per_class: int, reverse: bool, special=None):
    """``<root>/CIFAR10DVS/download/<class>.zip``; members written in ascending or descending index order (the
    extraction then creates the files in that order). ``special`` = (class, index, events) overrides one file."""
    rng = np.random.default_rng(0)
    download = root / "CIFAR10DVS" / "download"
    download.mkdir(parents=True)
    for name in CIFAR10_CLASSES:
        order = range(per_class - 1, -1, -1) if reverse else range(per_class)
        with zipfile.ZipFile(download / f"{name}.zip", "w") as archive:
            for i in order:
                events = [(int(rng.integers(128)), int(rng.integers(128)), int(rng.integers(2)), 10 * k)
                          for k in range(4)]
                if special is not None and special[:2] == (name, i):
                    events = special[2]
                archive.writestr(f"{name}/cifar10_{name}_{i}.aedat", _aedat2(events))
    return root


def _aedat3(events) -> bytes:
    """DVS128 Gesture's AEDAT 3.1: one polarity packet (28-byte header, then 8-byte events, little-endian)."""
    header = b"#!AER-DAT3.1\r\n#Format: RAW\r\n#Source 1: DVS128\r\n#!END-HEADER\r\n"
    n = len(events)
    packet = struct.pack("<HHIIIIII", 1, 1, 8, 4, 0, n, n, n)
    body = b"".join(struct.pack("<II", (x << 17) | (y << 2) | (p << 1) | 1, t) for x, y, p, t in events)
    return header + packet + body


# Recordings: events (x, y, p, t in us) and labelled segments (class 1-11, start, end) of the labels CSV.
GESTURE_TRAIN = {
    "user01_fluorescent": (
        [(1, 1, 0, 50),                                        # before any segment: dropped
         (5, 20, 1, 100), (5, 20, 1, 150), (6, 21, 0, 199),    # segment 1, class 1
         (7, 7, 1, 200), (8, 8, 0, 250),                       # segment 2, class 3 (t = 200 starts it)
         (9, 9, 1, 300), (10, 10, 1, 350), (11, 11, 0, 399),   # segment 3, class 1 again (a repeated label)
         (12, 12, 1, 400)],                                    # t = end of segment 3: dropped
        [(1, 100, 200), (3, 200, 300), (1, 300, 400)]),
}
GESTURE_TEST = {
    "user02_led": ([(3, 4, 0, 10), (3, 4, 1, 20), (2, 2, 1, 120), (2, 3, 1, 130)], [(11, 0, 100), (10, 100, 200)]),
}
# Every class folder must hold a sample in both splits (as in the real set): one more recording each, one event
# per gesture.
ALL_GESTURES = ([(64, 64, 1, 1000 * c + 5) for c in range(1, 12)], [(c, 1000 * c, 1000 * c + 10) for c in range(1, 12)])
GESTURE_TRAIN["user03_natural"] = ALL_GESTURES
GESTURE_TEST["user04_natural"] = ALL_GESTURES


def _write_dvs128_gesture(root):
    """``<root>/DVS128Gesture/download/DvsGesture.tar.gz`` with DvsGesture/ inside, plus the three small files
    spikingjelly also expects next to it."""
    stage = root / "stage" / "DvsGesture"
    stage.mkdir(parents=True)
    for split, recordings in (("train", GESTURE_TRAIN), ("test", GESTURE_TEST)):
        (stage / f"trials_to_{split}.txt").write_text("".join(f"{name}.aedat\n" for name in recordings))
        for name, (events, segments) in recordings.items():
            (stage / f"{name}.aedat").write_bytes(_aedat3(events))
            (stage / f"{name}_labels.csv").write_text(
                "class,startTime_usec,endTime_usec\n" + "".join(f"{c},{a},{b}\n" for c, a, b in segments))
    download = root / "DVS128Gesture" / "download"
    download.mkdir(parents=True)
    with tarfile.open(download / "DvsGesture.tar.gz", "w:gz") as archive:
        archive.add(stage, arcname="DvsGesture")
    for name in ("gesture_mapping.csv", "LICENSE.txt", "README.txt"):
        (download / name).write_text("synthetic\n")
    return root


def _write_tonic_gesture(root, n_files=100, n_events=64, seed=0):
    """tonic's layout: <root>/DVSGesture/ibmGesture{Train,Test}/user<NN>_<lighting>/<label>.npy, [N, 4] x, y, p,
    t; tonic wants at least 100 files per split before it would download."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "DVSGesture")
    for split in ("Train", "Test"):
        folder = os.path.join(base, f"ibmGesture{split}")
        for i in range(n_files):
            user_dir = os.path.join(folder, f"user{i // 11 + 1:02d}_fluorescent")
            os.makedirs(user_dir, exist_ok=True)
            table = np.stack([rng.integers(0, 128, n_events), rng.integers(0, 128, n_events),
                              rng.integers(0, 2, n_events), np.sort(rng.integers(0, 1000, n_events))], axis=1)
            np.save(os.path.join(user_dir, f"{i % 11}.npy"), table.astype(np.int64))
        open(os.path.join(base, f"ibmGesture{split}.tar.gz"), "wb").close()  # the (unused) archive
    return base


def _file_stem(dataset, index):
    """File name (without extension) of sample ``index`` of an EventFrames over a spikingjelly set."""
    base = dataset.base
    if isinstance(base, torch.utils.data.Subset):
        base, index = base.dataset, base.indices[index]
    return os.path.splitext(os.path.basename(base.samples[index][0]))[0]


# -------------------------------------------------------------------------------------------------- digits
def test_digits_split_is_fixed_and_stratified():
    a, b = build_data(make_config()), build_data(make_config(seed=7))
    assert (len(a.train), len(a.test), a.num_classes, a.sample_shape) == (1437, 360, 10, (1, 8, 8))
    # The test split does not depend on the run's seed, and every class is in it.
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert torch.bincount(a.test.tensors[1], minlength=10).min() >= 35
    x = a.train.tensors[0]
    assert x.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_num_classes_widens_the_head_but_never_narrows_it():
    from revsnn_triton.data import head_classes

    data = build_data(make_config())
    assert head_classes(make_config(num_classes=100), data) == 100 and head_classes(make_config(), data) == 10
    with pytest.raises(DataError, match="num_classes 5 is smaller than the 10 classes"):
        build_data(make_config(num_classes=5))


# --------------------------------------------------------------------------------------------------- CIFAR
def test_cifar_missing_without_download_says_where(tmp_path):
    with pytest.raises(DataError) as info:
        build_data(make_config(dataset="cifar100", data_dir=str(tmp_path)))
    msg = str(info.value)
    assert str(tmp_path) in msg and "cifar-100-python" in msg and "--download" in msg
    assert not any(tmp_path.iterdir())  # nothing was downloaded


def _pil_image(seed=0):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def _normalized(img, mean, std):
    return (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) / \
        torch.tensor(std)[:, None, None]


def test_cifar_transformer_transforms_are_the_originals():
    from timm.data.auto_augment import RandAugment as TimmRandAugment

    cfg = make_config("cifar10_revsformer")
    train = image_transforms(cfg, True).transforms
    assert [type(t).__name__ for t in train] == ["RandomHorizontalFlip", "RandAugment", "ToImage", "ToDtype",
                                                 "Normalize"]
    assert isinstance(train[1], TimmRandAugment)
    x = image_transforms(cfg, True)(_pil_image())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    # Evaluation: exactly ToTensor + Normalize with the CIFAR statistics.
    img = _pil_image(1)
    torch.testing.assert_close(image_transforms(cfg, False)(img),
                               _normalized(img, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))


@pytest.mark.parametrize("recipe", ["cifar10_revsformer", "cifar100_revsformer"])
def test_timm_parses_the_recipes_randaugment_string(recipe):
    from PIL import Image

    cfg = make_config(recipe)
    assert cfg.augment == "rand-m9-n1-mstd0.4-inc1"
    ra = image_transforms(cfg, True).transforms[1]
    assert ra.num_layers == 1 and ra.choice_weights is None
    assert [op.name for op in ra.ops] == TIMM_INCREASING_OPS
    for op in ra.ops:
        assert (op.magnitude, op.magnitude_std, op.prob) == (9, 0.4, 0.5), op.name
        # timm's create_transform hyper-parameters: fill with the mean colour, bicubic resampling.
        assert op.kwargs["fillcolor"] == (125, 123, 114) and op.kwargs["resample"] == Image.BICUBIC, op.name


def test_bad_timm_string_is_a_data_error():
    with pytest.raises(DataError, match="timm could not parse"):
        image_transforms(make_config(augment="rand-m9-q3"), True)


def test_cifar_resnet_transforms_use_the_originals_normalization():
    cfg = make_config("cifar10_revsresnet")
    train = [type(t).__name__ for t in image_transforms(cfg, True).transforms]
    assert train == ["RandomCrop", "RandomHorizontalFlip", "ToImage", "ToDtype", "Normalize"]
    img = _pil_image(2)
    torch.testing.assert_close(image_transforms(cfg, False)(img),
                               _normalized(img, (0.4914, 0.4822, 0.4465), (0.557, 0.549, 0.5534)))
    with pytest.raises(DataError, match="std must have 3 values"):
        image_transforms(make_config(std=[0.5]), False)


# -------------------------------------------------------------------------------------------- batch transforms
def test_mixup_soft_labels_and_passthrough():
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8)
    same, labels = batch_transforms(make_config(), 10)(x, y, 0)
    assert same is x and labels is y
    mixed, soft = batch_transforms(make_config(mixup=0.5), 10)(x, y, 0)
    assert soft.shape == (8, 10)
    torch.testing.assert_close(soft.sum(1), torch.ones(8))
    # MixUp: every output is the convex combination its soft label describes (partner = the rolled batch).
    lam = soft[0, 0].item()
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
    frames, soft5 = batch_transforms(make_config(cutmix=1.0), 10)(torch.rand(4, 3, 2, 8, 8), torch.arange(4), 0)
    assert frames.shape == (4, 3, 2, 8, 8) and soft5.shape == (4, 10)
    never = batch_transforms(make_config(mixup=0.5, mixup_prob=0.0), 10)
    same, onehot = never(x, y, 0)
    assert torch.equal(same, x) and torch.equal(onehot, torch.nn.functional.one_hot(y, 10).float())
    late = batch_transforms(make_config(mixup=0.5, mixup_off_epoch=3), 10)
    assert late(x, y, 3)[1] is y and late(x, y, 2)[1].shape == (8, 10)


def test_random_erasing_comes_after_mixup():
    # With erasing after mixing, an erased box is exactly 0; erased before mixing it would hold the partner's
    # pixels. Inputs are positive, so zeros only come from erasing.
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 16, 16) + 0.5, torch.arange(16) % 10
    mixed, soft = batch_transforms(make_config(mixup=0.5, random_erasing=1.0), 10)(x.clone(), y, 0)
    assert soft.shape == (16, 10)
    zeros = (mixed == 0).all(dim=1)  # [B, H, W]: erased pixels, all channels 0
    area = zeros.flatten(1).float().mean(1)
    assert bool((area >= 0.02 - 1e-3).all() and (area <= 1 / 3 + 0.02).all()), area  # timm: 2%-33% per sample
    # Frame sequences: one box per sample for every time step and channel.
    frames, _ = batch_transforms(make_config(random_erasing=1.0), 10)(torch.rand(4, 3, 2, 16, 16) + 0.5,
                                                                      torch.arange(4), 0)
    erased = frames == 0
    assert torch.equal(erased, erased[:, :1, :1].expand_as(erased)) and erased.any()


# ------------------------------------------------------------------------------------------------ CIFAR10-DVS
def test_sorted_split_per_class_is_by_file_name():
    samples = [(f"/d/c{label}/f_{i}.npz", label) for label in (1, 0) for i in (3, 10, 1, 2, 0)]
    train, test = sorted_split_per_class(samples, 0.6)
    # ceil(0.6 * 5) = 3 per class, in sorted name order f_0, f_1, f_10, f_2, f_3.
    assert [samples[i][0] for i in train] == ["/d/c0/f_0.npz", "/d/c0/f_1.npz", "/d/c0/f_10.npz",
                                              "/d/c1/f_0.npz", "/d/c1/f_1.npz", "/d/c1/f_10.npz"]
    assert sorted(samples[i][0] for i in test) == ["/d/c0/f_2.npz", "/d/c0/f_3.npz", "/d/c1/f_2.npz",
                                                   "/d/c1/f_3.npz"]
    with pytest.raises(ValueError, match="fraction"):
        sorted_split_per_class(samples, 1.0)


def test_cifar10_dvs_split_is_sorted_first_90_percent_whatever_the_file_order(tmp_path, offline_spikingjelly):
    per_class, T = 12, 2
    splits = []
    for reverse in (False, True):
        root = _write_cifar10_dvs(tmp_path / ("reversed" if reverse else "ascending"), per_class, reverse)
        data = build_data(make_config(dataset="cifar10-dvs", data_dir=str(root), T=T, augment="none", hflip=False))
        assert data.num_classes == 10 and data.sample_shape == (T, 2, 128, 128) and data.event_frames
        train = [(_file_stem(data.train, i), data.train[i][1]) for i in range(len(data.train))]
        test = [(_file_stem(data.test, i), data.test[i][1]) for i in range(len(data.test))]
        splits.append((train, test))
    assert splits[0] == splits[1]
    train, test = splits[0]
    # Written out independently: per class, sorted names (cifar10_c_0, _1, _10, _11, _2, ...), first ceil(90%).
    cut = math.ceil(0.9 * per_class)
    expected_train, expected_test = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        names = sorted(f"cifar10_{name}_{i}" for i in range(per_class))
        expected_train += [(n, label) for n in names[:cut]]
        expected_test += [(n, label) for n in names[cut:]]
    assert sorted(train) == sorted(expected_train) and sorted(test) == sorted(expected_test)
    assert ("cifar10_bird_9", 2) in test and ("cifar10_bird_11", 2) in train  # sorted as strings, not numbers


def test_cifar10_dvs_frames_orientation_and_polarity(tmp_path, offline_spikingjelly):
    # Raw AEDAT events (x_raw, y_raw, polarity bit, t) of one recording, split into T=2 frames of 2 events.
    events = [(3, 10, 0, 1), (3, 10, 0, 2), (100, 5, 1, 3), (0, 127, 1, 4)]
    root = _write_cifar10_dvs(tmp_path, 10, False, special=("cat", 4, events))
    data = build_data(make_config(dataset="cifar10-dvs", data_dir=str(root), T=2, augment="none", hflip=True))
    index = next(i for i in range(len(data.train)) if _file_stem(data.train, i) == "cifar10_cat_4")
    # Expected frames, by hand from the original's remapping x = 127 - y_raw, y = 127 - x_raw, p = 1 - bit:
    expected = torch.zeros(2, 2, 128, 128)
    expected[0, 1, 124, 117] = 2   # (3, 10, bit 0) twice -> p 1, y 124, x 117
    expected[1, 0, 27, 122] = 1    # (100, 5, bit 1) -> p 0, y 27, x 122
    expected[1, 0, 127, 0] = 1     # (0, 127, bit 1) -> p 0, y 127, x 0
    mirrored = torch.zeros(2, 2, 128, 128)  # the horizontal flip mirrors x: x -> 127 - x
    mirrored[0, 1, 124, 10] = 2
    mirrored[1, 0, 27, 5] = 1
    mirrored[1, 0, 127, 127] = 1
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        x, label = data.train[index]
        assert label == 3  # cat
        if torch.equal(x, expected):
            seen.add("plain")
        elif torch.equal(x, mirrored):
            seen.add("mirrored")
        else:
            raise AssertionError(f"frame {torch.nonzero(x).tolist()} is neither the expected one nor its mirror")
    assert seen == {"plain", "mirrored"}


def test_cifar10_dvs_missing_without_download(tmp_path):
    with pytest.raises(DataError) as info:
        build_data(make_config(dataset="cifar10-dvs", data_dir=str(tmp_path)))
    msg = str(info.value)
    assert os.path.join(str(tmp_path), "CIFAR10DVS", "download") in msg and "airplane.zip" in msg
    assert "--download" in msg and not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- DVS128 Gesture
def test_dvs128_gesture_cuts_every_labelled_segment(tmp_path, offline_spikingjelly):
    T = 2
    data = build_data(make_config(dataset="dvs128-gesture", data_dir=str(_write_dvs128_gesture(tmp_path)), T=T,
                                  augment="none", hflip=False))
    assert data.num_classes == 11 and data.sample_shape == (T, 2, 128, 128)
    # The original's segmentation, by hand: one sample per CSV row (events with start <= t < end), a repeated
    # label becomes a second sample (<recording>_1), labels are the gesture ids minus 1.
    assert (len(data.train), len(data.test)) == (3 + 11, 2 + 11)
    train = sorted((_file_stem(data.train, i), data.train[i][1], int(data.train[i][0].sum()))
                   for i in range(len(data.train)))
    assert train[:3] == [("user01_fluorescent_0", 0, 3), ("user01_fluorescent_0", 2, 2),
                         ("user01_fluorescent_1", 0, 3)]
    assert train[3:] == sorted(("user03_natural_0", c, 1) for c in range(11))
    test = sorted((_file_stem(data.test, i), data.test[i][1], int(data.test[i][0].sum()))
                  for i in range(len(data.test)))
    assert test[:2] == [("user02_led_0", 9, 2), ("user02_led_0", 10, 2)]  # label 10: folder "10", not index 2
    # Frames by event count (T=2), no coordinate remapping: frame[t, p, y, x].
    x, _ = next(data.train[i] for i in range(len(data.train)) if _file_stem(data.train, i) == "user01_fluorescent_0"
                and data.train[i][1] == 0)
    expected = torch.zeros(T, 2, 128, 128)
    expected[0, 1, 20, 5] = 1          # (5, 20, p 1, t 100): the first frame holds N // T = 1 event
    expected[1, 1, 20, 5] = 1          # (5, 20, p 1, t 150)
    expected[1, 0, 21, 6] = 1          # (6, 21, p 0, t 199): the last frame takes the rest
    assert torch.equal(x, expected)


def test_dvs128_gesture_missing_says_it_cannot_be_downloaded(tmp_path):
    for download in (False, True):
        with pytest.raises(DataError) as info:
            build_data(make_config(dataset="dvs128-gesture", data_dir=str(tmp_path), download=download))
        msg = str(info.value)
        assert "cannot be downloaded automatically" in msg and "DvsGesture.tar.gz" in msg
        assert os.path.join(str(tmp_path), "DVS128Gesture", "download") in msg
    assert not any(tmp_path.iterdir())


def test_tonic_dvs_gesture_frames(tmp_path):
    n_files, n_events, T = 100, 64, 4
    _write_tonic_gesture(tmp_path, n_files, n_events)
    cfg = make_config(dataset="dvs128-gesture-tonic", data_dir=str(tmp_path), T=T, hflip=True,
                      augment="snn-augment-wide")
    data = build_data(cfg)
    assert (len(data.train), len(data.test), data.num_classes) == (n_files, n_files, 11)
    assert data.sample_shape == (T, 2, 128, 128) and data.event_frames
    x, label = data.test[0]
    assert x.shape == (T, 2, 128, 128) and x.dtype == torch.float32 and isinstance(label, int)
    # ToFrame by event count: every event lands in exactly one frame (64 events, 4 bins of 16).
    assert x.sum().item() == n_events
    torch.testing.assert_close(x.sum(dim=(1, 2, 3)), torch.full((T,), n_events / T))
    # The frame at (y, x) counts the events at that pixel and polarity, as the raw file says.
    raw = np.load(data.test.base.data[0])
    expected = np.zeros((2, 128, 128))
    np.add.at(expected, (raw[:, 2], raw[:, 1], raw[:, 0]), 1)
    assert np.array_equal(x.sum(0).numpy(), expected)
    xt, _ = data.train[0]
    assert xt.shape == (T, 2, 128, 128)


def test_tonic_missing_without_download(tmp_path):
    with pytest.raises(DataError) as info:
        build_data(make_config(dataset="dvs128-gesture-tonic", data_dir=str(tmp_path)))
    assert os.path.join(str(tmp_path), "DVSGesture") in str(info.value) and "--download" in str(info.value)


def test_event_datasets_refuse_image_settings(tmp_path, offline_spikingjelly):
    root = str(_write_dvs128_gesture(tmp_path))
    with pytest.raises(DataError, match="'snn-augment-wide' or 'none'"):
        build_data(make_config(dataset="dvs128-gesture", data_dir=root, augment="randaugment"))
    with pytest.raises(DataError, match="raw event counts"):
        build_data(make_config(dataset="dvs128-gesture", data_dir=root, std=[0.5, 0.5]))


def test_unknown_dataset_lists_choices():
    with pytest.raises(DataError, match="digits, cifar10, cifar100"):
        build_data(make_config(dataset="mnist"))


def test_train_on_synthetic_dvs_gesture_with_the_recipe(tmp_path, offline_spikingjelly):
    # The shipped DVS128 Gesture recipe end to end with its own settings (RevSResNet24, flip + SNNAugmentWide,
    # MixUp, fp16 autocast with GradScaler) on the synthetic recordings, shortened to one step of two samples.
    from revsnn_triton.checkpoint import load_checkpoint
    from revsnn_triton.cli import main

    _write_dvs128_gesture(tmp_path / "data")
    out = tmp_path / "run"
    status = main(["train", "--config", "dvs128gesture_revsresnet", "--data-dir", str(tmp_path / "data"),
                   "--T", "2", "--epochs", "1", "--set", "cooldown_epochs=0", "--max-steps-per-epoch", "1",
                   "--batch-size", "2", "--workers", "0", "--out", str(out), "--no-progress", "--no-memory-report",
                   "--set", "mixup_prob=1.0"])
    assert status == 0
    state = load_checkpoint(out / "checkpoint_last.pt")
    assert state["model_name"] == "RevSResNet24" and state["config"]["augment"] == "snn-augment-wide"
    assert state["config"]["amp"] == "fp16" and state["scaler"]  # GradScaler state saved with the run
    row = state["history"][0]
    assert torch.isfinite(torch.tensor(row["train_loss"])) and 0.0 <= row["test_acc"] <= 1.0


def _build_in_rank_order(rank: int, world: int, init_file: str, log: str) -> None:
    import time

    import torch.distributed as dist

    from revsnn_triton.data import _rank0_first

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        def build():
            with open(log, "a") as f:
                f.write(f"start {rank}\n")
            time.sleep(0.5 if rank == 0 else 0.0)
            with open(log, "a") as f:
                f.write(f"end {rank}\n")
            return rank
        assert _rank0_first(build) == rank
    finally:
        dist.destroy_process_group()


def test_event_frames_are_prepared_by_rank_0_first(tmp_path):
    # Under torchrun, spikingjelly's one-time conversion must not run in two processes at once.
    import torch.multiprocessing as mp

    log = tmp_path / "log"
    # fork: the children inherit the imported modules (spawning two fresh interpreters costs ~15 s here).
    mp.start_processes(_build_in_rank_order, args=(2, str(tmp_path / "init"), str(log)), nprocs=2, join=True,
                       start_method="fork")
    assert log.read_text().split("\n")[:2] == ["start 0", "end 0"]
