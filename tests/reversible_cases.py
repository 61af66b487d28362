"""Helpers of the ``test_reversible*`` files: the device they run on, the gradient comparison against
``reversible=False`` and a deliberately nondeterministic branch. The random branches, sequences and inputs are
public: ``revsnn_triton.testing.strategies``."""
from __future__ import annotations

import torch
import torch.nn as nn

from revsnn_triton.testing import assert_gradients_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_grads(got: list, want: list, what: str) -> None:
    """Reversible vs reversible=False gradients: within :func:`grad_tolerance` everywhere; on CPU,
    where every kernel is deterministic and both runs hand the branches contiguous gradients, the
    same operations run in the same order, so they must be bit-identical."""
    assert_gradients_close(got, want, what, exact=DEVICE == "cpu")


class CallCounter(nn.Module):
    """A deliberately nondeterministic branch: its output depends on how often it was called."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x) + 1e-3 * self.calls
