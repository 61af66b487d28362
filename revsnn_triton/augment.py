"""Training augmentation for event frames: ``SNNAugmentWide``, the policy of the RevSNN / Spikingformer DVS recipes.

Per sample, one op is drawn uniformly from six and applied to the whole frame sequence (every time step and
polarity channel gets the same geometric change):

==============  ====================================================  =========================================
op              magnitude                                             applied as
==============  ====================================================  =========================================
``Identity``    --                                                    the input unchanged
``ShearX``      one of 31 bins of ``linspace(-0.3, 0.3)`` radians     ``affine(shear=(degrees(m), 0))``
``TranslateX``  one of 31 bins of ``linspace(-5, 5)`` pixels          ``affine(translate=(int(m), 0))``
``TranslateY``  one of 31 bins of ``linspace(-5, 5)`` pixels          ``affine(translate=(0, int(m)))``
``Rotate``      one of 31 bins of ``linspace(-30, 30)`` degrees       ``rotate(m)``
``Cutout``      --                                                    a square of 0.1 %--11 % of the frame area
                                                                      set to ``fill`` (random erasing, ratio 1)
==============  ====================================================  =========================================

A drawn magnitude is negated with probability 1/2 (the bins are symmetric, so the sign flip keeps the
distribution). Geometric ops use nearest-neighbour interpolation, so event counts stay integers, and fill the
uncovered area with ``fill`` (0: no events). The ops are torchvision's functional transforms
(``torchvision.transforms.v2.functional.affine`` / ``rotate``, ``v2.RandomErasing``); random draws use torch's
generator, which DataLoader workers seed per worker.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

OPS = ("Identity", "ShearX", "TranslateX", "TranslateY", "Rotate", "Cutout")
# Largest magnitude of each signed op (radians for shear, pixels for translation, degrees for rotation).
MAX_MAGNITUDE = {"ShearX": 0.3, "TranslateX": 5.0, "TranslateY": 5.0, "Rotate": 30.0}
CUTOUT_AREA = (0.001, 0.11)


class SNNAugmentWide(torch.nn.Module):
    """Draw one op of :data:`OPS` per call and apply it to ``frames`` ``[..., C, H, W]`` (float or integer dtype;
    the output has the input's shape and dtype). ``num_magnitude_bins`` (default 31) sets the resolution of the
    signed ops' magnitudes; ``fill`` is the value of uncovered and erased pixels."""

    def __init__(self, num_magnitude_bins: int = 31, fill: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(num_magnitude_bins, int) and not isinstance(num_magnitude_bins, bool)
                and num_magnitude_bins >= 2):
            raise ValueError(f"SNNAugmentWide: num_magnitude_bins must be an integer >= 2, got {num_magnitude_bins!r}")
        if not (isinstance(fill, (int, float)) and not isinstance(fill, bool) and math.isfinite(fill)):
            raise ValueError(f"SNNAugmentWide: fill must be a finite number, got {fill!r}")
        self.num_magnitude_bins = num_magnitude_bins
        self.fill = float(fill)

    def magnitude_bins(self) -> dict[str, Tensor | None]:
        """Op name -> its magnitude bins (``None`` for the ops without a magnitude)."""
        return {op: (torch.linspace(-MAX_MAGNITUDE[op], MAX_MAGNITUDE[op], self.num_magnitude_bins)
                     if op in MAX_MAGNITUDE else None) for op in OPS}

    def sample(self) -> tuple[str, float]:
        """Draw ``(op, magnitude)`` as :meth:`forward` does (magnitude 0.0 for Identity and Cutout)."""
        op = OPS[int(torch.randint(len(OPS), ()).item())]
        bins = self.magnitude_bins()[op]
        if bins is None:
            return op, 0.0
        magnitude = float(bins[int(torch.randint(len(bins), ()).item())])
        if int(torch.randint(2, ()).item()):
            magnitude = -magnitude
        return op, magnitude

    def apply(self, frames: Tensor, op: str, magnitude: float) -> Tensor:
        """Apply ``op`` with ``magnitude`` (units as in the module docstring) to ``frames`` ``[..., C, H, W]``."""
        from torchvision.transforms import InterpolationMode, v2
        from torchvision.transforms.v2 import functional as F

        if not isinstance(frames, Tensor) or frames.dim() < 3:
            raise ValueError(f"SNNAugmentWide: frames must be a tensor [..., C, H, W], got "
                             f"{type(frames).__name__} of shape {tuple(getattr(frames, 'shape', ()))}")
        if op not in OPS:
            raise ValueError(f"SNNAugmentWide: unknown op {op!r}; choose one of {OPS}")
        nearest, fill = InterpolationMode.NEAREST, [self.fill]
        if op == "Identity":
            return frames
        if op == "ShearX":
            return F.affine(frames, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(magnitude), 0.0],
                            interpolation=nearest, fill=fill)
        if op == "TranslateX":
            return F.affine(frames, angle=0.0, translate=[int(magnitude), 0], scale=1.0, shear=[0.0, 0.0],
                            interpolation=nearest, fill=fill)
        if op == "TranslateY":
            return F.affine(frames, angle=0.0, translate=[0, int(magnitude)], scale=1.0, shear=[0.0, 0.0],
                            interpolation=nearest, fill=fill)
        if op == "Rotate":
            return F.rotate(frames, magnitude, interpolation=nearest, fill=fill)
        return v2.RandomErasing(p=1.0, scale=CUTOUT_AREA, ratio=(1.0, 1.0), value=self.fill)(frames)

    def forward(self, frames: Tensor) -> Tensor:
        op, magnitude = self.sample()
        return self.apply(frames, op, magnitude)

    def extra_repr(self) -> str:
        return f"num_magnitude_bins={self.num_magnitude_bins}, fill={self.fill}"
