"""Functional helpers that act on whole networks."""
from __future__ import annotations

import torch.nn as nn


def reset_net(net: nn.Module) -> None:
    """Reset the state of every stateful module in ``net`` (ours and spikingjelly's).

    Any submodule with a callable ``reset()`` method is reset, as spikingjelly's ``functional.reset_net`` does.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"reset_net: net must be a torch.nn.Module, got {type(net).__name__}")
    for module in net.modules():
        reset = getattr(module, "reset", None)
        if callable(reset):
            reset()
