"""'Did you mean ...?' for mistyped names (models, recipes, config keys, benchmarks)."""
from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["did_you_mean"]


def did_you_mean(name: object, choices: Iterable[str], n: int = 3) -> str:
    """``" (did you mean 'X' or 'Y'?)"`` for the choices closest to ``name``, or ``""`` when none is close.

    Case-insensitive; meant to be appended to an error message that already lists or names the choices.
    """
    if not isinstance(name, str):
        return ""
    choices = list(choices)
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.75)
    if not close:
        return ""
    quoted = [repr(lowered[c]) for c in close]
    text = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" (did you mean {text}?)"
