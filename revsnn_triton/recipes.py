"""Recipe cards: what each shipped recipe reproduces, the paper's accuracy, ours, and where it deliberately differs.

A shipped recipe (``revsnn_triton/configs/<name>.yaml``) carries its card under the top-level ``recipe`` key,
which the config loader skips::

    recipe:
      title: RevSResNet on CIFAR-10
      original: cifar10/train_resnet_origin.py      # files of the original RevSNN code the settings come from
      paper: {RevSResNet21: 94.53, RevSResNet37: 94.77}   # top-1 %, as published
      measured: null                                # ours on the real data: null, or {model: {top1: .., how: ..}}
      differences:                                  # deliberate, each with the --set that restores the original
        - {text: "...", restore: "--set num_classes=100"}
      notes: ["..."]                                # equivalent implementations worth knowing

``revsnn train --list-configs --verbose`` prints :func:`format_cards`; ``python -m revsnn_triton.recipes``
prints :func:`cards_markdown`, the table kept in ``docs/recipes.md``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import yaml

from .config import RECIPE_CARD_KEY, ConfigError, resolve_config_path, shipped_configs

ORIGINAL_REPOSITORY = "github.com/mi804/RevSNN"


@dataclass
class RecipeCard:
    """One recipe's card (see the module docstring); ``settings`` are the recipe's own keys and values."""

    name: str
    title: str
    original: str
    paper: dict[str, float] = field(default_factory=dict)
    measured: dict[str, dict] = field(default_factory=dict)
    differences: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


def load_card(name: str) -> RecipeCard:
    """The card of shipped recipe ``name`` (or of a recipe file). Raises :class:`ConfigError` if it has none or
    the card is malformed."""
    path = resolve_config_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"recipe {str(path)!r} could not be read: {exc}") from None
    card = data.pop(RECIPE_CARD_KEY, None) if isinstance(data, dict) else None
    if not isinstance(card, dict):
        raise ConfigError(f"recipe {str(path)!r} has no '{RECIPE_CARD_KEY}:' card")
    where = f"recipe {str(path)!r}, card"
    for key in ("title", "original"):
        if not isinstance(card.get(key), str) or not card[key]:
            raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    paper, measured = card.get("paper") or {}, card.get("measured") or {}
    differences, notes = card.get("differences") or [], card.get("notes") or []
    if not (isinstance(paper, dict) and all(isinstance(v, (int, float)) for v in paper.values())):
        raise ConfigError(f"{where}: 'paper' must map model names to top-1 accuracies in %")
    if not (isinstance(measured, dict) and all(isinstance(v, dict) and {"top1", "how"} <= set(v)
                                               for v in measured.values())):
        raise ConfigError(f"{where}: 'measured' must be null or map model names to {{top1: ..., how: ...}}")
    if not (isinstance(differences, list) and all(isinstance(d, dict) and isinstance(d.get("text"), str) and
                                                  isinstance(d.get("restore"), str) for d in differences)):
        raise ConfigError(f"{where}: 'differences' must be a list of {{text: ..., restore: '--set ...'}}")
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        raise ConfigError(f"{where}: 'notes' must be a list of strings")
    return RecipeCard(path.stem, card["title"], card["original"], dict(paper), dict(measured), list(differences),
                      list(notes), data)


def shipped_cards() -> list[RecipeCard]:
    """Cards of every shipped recipe, by name."""
    return [load_card(name) for name in shipped_configs()]


def _measured_text(card: RecipeCard) -> str:
    if not card.measured:
        return "none on the real data yet"
    return "; ".join(f"{model} {m['top1']:.2f} % top-1 ({m['how']})" for model, m in card.measured.items())


def format_cards(cards: list[RecipeCard] | None = None) -> str:
    """Plain-text cards, one block per recipe (``revsnn train --list-configs --verbose``)."""
    cards = shipped_cards() if cards is None else cards
    blocks = []
    for card in cards:
        lines = [f"{card.name}: {card.title}",
                 f"  original:  {card.original}" + (f" ({ORIGINAL_REPOSITORY})" if card.paper else "")]
        if card.paper:
            lines.append("  paper:     " + ", ".join(f"{m} {a:.2f}" for m, a in card.paper.items()) + " (top-1 %)")
        lines.append(f"  measured:  {_measured_text(card)}")
        if card.differences:
            lines.append("  differs from the original:")
            lines += [f"    - {d['text']}; the original: {d['restore']}" for d in card.differences]
        elif card.paper:
            lines.append("  differs from the original: nothing deliberate")
        lines += [f"  note: {n}" for n in card.notes]
        blocks.append("\n".join(lines))
    blocks.append("Every setting not listed as a difference is the original code's; docs/recipes.md in the "
                  "repository compares them setting by setting.")
    return "\n\n".join(blocks)


def cards_markdown(cards: list[RecipeCard] | None = None) -> str:
    """The recipe table of ``docs/recipes.md``: recipe, paper accuracy, ours, deliberate differences."""
    cards = shipped_cards() if cards is None else cards
    rows = ["| recipe | reproduces | paper top-1 % | ours | deliberate differences (`--set` restoring the original) |",
            "|---|---|---|---|---|"]
    for card in cards:
        paper = "<br>".join(f"{m}: {a:.2f}" for m, a in card.paper.items()) or "--"
        diffs = "<br>".join(f"{d['text']} (`{d['restore']}`)" for d in card.differences) or "none"
        reproduces = f"{card.title}: `{card.original}`" if card.paper else card.title
        rows.append(f"| `{card.name}` | {reproduces} | {paper} | {_measured_text(card)} | {diffs} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m revsnn_triton.recipes [--text]``: the cards as the markdown table (default) or as text."""
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["--text"]):
        print("usage: python -m revsnn_triton.recipes [--text]", file=sys.stderr)
        return 2
    print(format_cards() if argv else cards_markdown(), end="" if not argv else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
