"""SNNAugmentWide against the policy of the RevSNN DVS recipes, written out here independently of the code:

one op per sample, uniformly from identity, horizontal shear up to 0.3 rad, x shift and y shift up to 5 px,
rotation up to 30 degrees, and a square cutout of 0.1%-11% of the area; magnitudes from 31 evenly spaced bins
with a random sign; nearest interpolation; uncovered pixels 0.
"""
from __future__ import annotations

import collections
import math

import pytest
import torch

from revsnn_triton.augment import SNNAugmentWide

POLICY = {  # op: largest magnitude (None: no magnitude)
    "Identity": None, "ShearX": 0.3, "TranslateX": 5.0, "TranslateY": 5.0, "Rotate": 30.0, "Cutout": None,
}
BINS = 31
CUTOUT_AREA = (0.001, 0.11)


def _line_image(horizontal: bool, size: int = 33, t: int = 2) -> torch.Tensor:
    """[t, 2, size, size] event counts: a line of 3s through the centre, horizontal or vertical."""
    x = torch.zeros(t, 2, size, size)
    c = size // 2
    if horizontal:
        x[:, :, c, 4:size - 4] = 3.0
    else:
        x[:, :, 4:size - 4, c] = 3.0
    return x


def _slope(img: torch.Tensor, dependent: str) -> float:
    """Least-squares slope of the lit pixels of a [H, W] image: dy/dx (dependent='y') or dx/dy."""
    ys, xs = torch.nonzero(img, as_tuple=True)
    ys, xs = ys.double(), xs.double()
    a, b = (xs, ys) if dependent == "y" else (ys, xs)
    a = a - a.mean()
    return float((a * (b - b.mean())).sum() / (a * a).sum())


def test_op_table_is_the_policy():
    aug = SNNAugmentWide()
    table = aug.magnitude_bins()
    assert list(table) == list(POLICY)
    for op, largest in POLICY.items():
        if largest is None:
            assert table[op] is None, op
        else:
            expected = torch.tensor([-largest + 2 * largest * i / (BINS - 1) for i in range(BINS)])
            torch.testing.assert_close(table[op], expected, rtol=0, atol=1e-6)


def test_draws_are_uniform_over_ops_and_cover_the_signed_ranges():
    aug = SNNAugmentWide()
    torch.manual_seed(1)
    draws = [aug.sample() for _ in range(6000)]
    counts = collections.Counter(op for op, _ in draws)
    assert set(counts) == set(POLICY)
    for op, n in counts.items():  # 1000 expected each; 4.5 sigma of a binomial(6000, 1/6) is about 130
        assert 870 <= n <= 1130, (op, n)
    for op, largest in POLICY.items():
        values = torch.tensor([m for o, m in draws if o == op])
        if largest is None:
            assert torch.all(values == 0), op
            continue
        bins = {round(-largest + 2 * largest * i / (BINS - 1), 5) for i in range(BINS)}
        assert {round(v, 5) for v in values.tolist()} <= bins, op
        assert values.min().item() == pytest.approx(-largest) and values.max().item() == pytest.approx(largest)
        assert (values < 0).float().mean().item() == pytest.approx(0.5, abs=0.06)


def test_identity_is_the_input():
    x = torch.rand(3, 2, 16, 16)
    assert torch.equal(SNNAugmentWide().apply(x, "Identity", 0.0), x)


@pytest.mark.parametrize("op, magnitude, shift", [("TranslateX", 5.0, (0, 5)), ("TranslateX", -4.6, (0, -4)),
                                                  ("TranslateY", 3.3, (3, 0)), ("TranslateY", -5.0, (-5, 0))])
def test_translations_shift_whole_pixels_with_zero_fill(op, magnitude, shift):
    x = torch.zeros(2, 2, 20, 20)
    x[:, 0, 7, 9] = 4.0
    x[:, 1, 12, 3] = 1.0
    dy, dx = shift
    expected = torch.zeros_like(x)
    expected[:, 0, 7 + dy, 9 + dx] = 4.0
    if 0 <= 3 + dx < 20:
        expected[:, 1, 12 + dy, 3 + dx] = 1.0
    assert torch.equal(SNNAugmentWide().apply(x, op, magnitude), expected)


@pytest.mark.parametrize("degrees", [30.0, -30.0, 12.0])
def test_rotation_angle_in_degrees_nearest(degrees):
    x = _line_image(horizontal=True)
    y = SNNAugmentWide().apply(x, "Rotate", degrees)
    assert set(torch.unique(y).tolist()) <= {0.0, 3.0}  # nearest: no interpolated counts
    assert torch.equal(y[0], y[1]) and torch.equal(y[0, 0], y[0, 1])  # same for every frame and polarity
    # Image rows grow downwards, so a counter-clockwise rotation by a gives slope dy/dx = -tan(a).
    assert _slope(y[0, 0], "y") == pytest.approx(-math.tan(math.radians(degrees)), abs=0.04)


@pytest.mark.parametrize("radians", [0.3, -0.3, 0.1])
def test_shear_x_magnitude_in_radians(radians):
    x = _line_image(horizontal=False)
    y = SNNAugmentWide().apply(x, "ShearX", radians)
    assert set(torch.unique(y).tolist()) <= {0.0, 3.0}
    # A vertical line leans by tan(shear angle) pixels per row (torchvision: x' = x - tan(s) * y about the centre).
    assert abs(_slope(y[0, 0], "x")) == pytest.approx(math.tan(radians if radians > 0 else -radians), abs=0.04)
    assert math.copysign(1, -_slope(y[0, 0], "x")) == math.copysign(1, radians)


def test_cutout_is_a_square_of_the_policys_area_shared_by_all_frames():
    aug = SNNAugmentWide()
    h = w = 64
    low, high = (round(math.sqrt(a * h * w)) for a in CUTOUT_AREA)  # side after rounding: 2 .. 21
    sides = []
    for seed in range(40):
        torch.manual_seed(seed)
        x = torch.ones(3, 2, h, w)
        y = aug.apply(x, "Cutout", 0.0)
        erased = y == 0
        assert torch.equal(erased, erased[:1, :1].expand_as(erased))  # one box for all frames and channels
        rows, cols = torch.nonzero(erased[0, 0], as_tuple=True)
        side_h, side_w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert side_h == side_w and side_h * side_w == int(erased[0, 0].sum())  # a filled square
        sides.append(side_h)
    assert low <= min(sides) and max(sides) <= high and max(sides) - min(sides) >= 8


def test_forward_keeps_shape_dtype_and_counts_integer():
    aug = SNNAugmentWide()
    x = torch.randint(0, 4, (4, 2, 32, 32)).float()
    for seed in range(12):
        torch.manual_seed(seed)
        y = aug(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert torch.equal(y, y.round()) and y.min() >= 0 and y.max() <= x.max()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_magnitude_bins"):
        SNNAugmentWide(num_magnitude_bins=1)
    with pytest.raises(ValueError, match="fill"):
        SNNAugmentWide(fill=float("inf"))
    with pytest.raises(ValueError, match="unknown op"):
        SNNAugmentWide().apply(torch.zeros(2, 8, 8), "ShearY", 0.1)
    with pytest.raises(ValueError, match="frames must be"):
        SNNAugmentWide().apply(torch.zeros(8, 8), "Rotate", 0.1)
