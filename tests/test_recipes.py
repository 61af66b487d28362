"""Shipped recipes against the original RevSNN code's settings, and their cards.

ORIGINAL holds the settings as read from the original scripts and configs (cifar10/train_resnet_origin.py,
cifar100/train_resnet_origin.py, cifar{10,100}/configs/revsformer_*.yml with cifar*/train.py and timm 0.6.12,
cifar10-dvs/train*.py and dvs128-gesture/train*.py with the flags of their train.sh), written out here
independently of the recipe files.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from revsnn_triton.config import make_config, shipped_configs
from revsnn_triton.recipes import cards_markdown, format_cards, load_card

_CIFAR_RESNET = dict(T=4, epochs=200, cooldown_epochs=0, batch_size=32, optimizer="sgd", lr=0.1, momentum=0.9,
                     weight_decay=1e-4, decay_bias_and_norm=True, scheduler="multistep", gamma=0.1, warmup_epochs=0,
                     mean=[0.4914, 0.4822, 0.4465], std=[0.557, 0.549, 0.5534], crop_padding=4, hflip=True,
                     augment="none", random_erasing=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, amp="none")
_CIFAR_FORMER = dict(T=4, epochs=300, cooldown_epochs=10, batch_size=64, optimizer="adamw", lr=5e-4,
                     weight_decay=0.06, decay_bias_and_norm=False, scheduler="cosine", scheduler_interval="epoch",
                     warmup_epochs=20, warmup_lr=1e-5, min_lr=1e-5, mean=[0.4914, 0.4822, 0.4465],
                     std=[0.2470, 0.2435, 0.2616], crop_padding=0, hflip=True, augment="rand-m9-n1-mstd0.4-inc1",
                     random_erasing=0.25, mixup=0.5, cutmix=0.0, mixup_prob=1.0, mixup_off_epoch=200,
                     label_smoothing=0.1, amp="none", seed=42)
_DVS = dict(T=10, cooldown_epochs=10, batch_size=16, optimizer="adamw", lr=1e-3, decay_bias_and_norm=False,
            scheduler="cosine", scheduler_interval="epoch", warmup_epochs=10, warmup_lr=1e-5, min_lr=1e-5,
            hflip=True, augment="snn-augment-wide", random_erasing=0.0, mixup=0.5, cutmix=0.0, mixup_prob=0.5,
            mixup_off_epoch=75, label_smoothing=0.1, amp="fp16", seed=2021)
ORIGINAL = {
    "cifar10_revsresnet": dict(_CIFAR_RESNET, model="RevSResNet21", dataset="cifar10", milestones=[100, 150],
                               seed=2020, num_classes=100),
    "cifar100_revsresnet": dict(_CIFAR_RESNET, model="RevSResNet21", dataset="cifar100", milestones=[60, 120, 160],
                                seed=2023),
    "cifar10_revsformer": dict(_CIFAR_FORMER, model="RevSFormer-4-384", dataset="cifar10"),
    "cifar100_revsformer": dict(_CIFAR_FORMER, model="RevSFormer-4-384", dataset="cifar100",
                                model_kwargs={"num_heads": 8}),
    "cifar10dvs_revsresnet": dict(_DVS, model="RevSResNet24", dataset="cifar10-dvs", epochs=96, weight_decay=0.0),
    "cifar10dvs_revsformer": dict(_DVS, model="RevSFormer-2-256", dataset="cifar10-dvs", epochs=96,
                                  weight_decay=0.06),
    "dvs128gesture_revsresnet": dict(_DVS, model="RevSResNet24", dataset="dvs128-gesture", epochs=192,
                                     weight_decay=0.0),
    "dvs128gesture_revsformer": dict(_DVS, model="RevSFormer-2-256", dataset="dvs128-gesture", epochs=192,
                                     weight_decay=0.06),
}
# Published top-1 accuracies (the paper's tables; T=4 on CIFAR).
PAPER = {
    "cifar10_revsresnet": {"RevSResNet21": 94.53, "RevSResNet37": 94.77},
    "cifar100_revsresnet": {"RevSResNet21": 75.46, "RevSResNet37": 76.34},
    "cifar10_revsformer": {"RevSFormer-2-384": 95.29, "RevSFormer-4-384": 95.34},
    "cifar100_revsformer": {"RevSFormer-2-384": 78.04, "RevSFormer-4-384": 79.04},
    "cifar10dvs_revsresnet": {"RevSResNet24 T=10": 75.50, "RevSResNet24 T=16": 76.40},
    "cifar10dvs_revsformer": {"RevSFormer-2-256 T=10": 81.40, "RevSFormer-2-256 T=16": 82.20},
    "dvs128gesture_revsresnet": {"RevSResNet24 T=10": 94.44, "RevSResNet24 T=16": 96.53},
    "dvs128gesture_revsformer": {"RevSFormer-2-256 T=10": 97.22, "RevSFormer-2-256 T=16": 97.57},
}


def _restore_overrides(restore: str) -> dict:
    words = shlex.split(restore)
    assert words and len(words) % 2 == 0 and all(w == "--set" for w in words[::2]), restore
    return {k: yaml.safe_load(v) for k, _, v in (w.partition("=") for w in words[1::2])}


@pytest.mark.parametrize("recipe", sorted(ORIGINAL))
def test_recipe_is_the_original_setting_or_says_why_not(recipe):
    card = load_card(recipe)
    cfg = make_config(recipe).to_dict()
    restored = dict(cfg)
    for difference in card.differences:  # each deliberate difference: one line, and the --set restoring it
        assert "\n" not in difference["text"] and difference["text"]
        overrides = _restore_overrides(difference["restore"])
        assert any(cfg[k] != v for k, v in overrides.items()), difference
        restored = make_config(**{**restored, **overrides}).to_dict()
    mismatches = {k: (restored[k], v) for k, v in ORIGINAL[recipe].items() if restored[k] != v}
    assert not mismatches, mismatches
    # Without the restoring overrides, exactly the keys the card names differ.
    differing = {k for k, v in ORIGINAL[recipe].items() if cfg[k] != v}
    named = {k for d in card.differences for k in _restore_overrides(d["restore"])}
    assert differing == named


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_card_quotes_the_paper(recipe):
    card = load_card(recipe)
    assert card.paper == PAPER[recipe]
    assert card.measured == {}  # nothing has been trained on the real data yet: the card must not claim it


def test_every_shipped_recipe_has_a_card_and_the_verbose_listing_shows_them(capsys):
    from revsnn_triton.cli import main

    names = shipped_configs()
    assert set(ORIGINAL) | {"digits"} == set(names)
    assert main(["train", "--list-configs", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == format_cards().strip()
    for name in names:
        assert f"{name}: {load_card(name).title}" in out
    assert "RevSResNet24 T=10 75.50" in out and "--set num_classes=100" in out
    assert main(["train", "--verbose"]) == 2


def test_docs_hold_the_current_cards():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert cards_markdown() in doc, "docs/recipes.md is stale: regenerate its table with python -m revsnn_triton.recipes"


def test_malformed_card_is_a_config_error(tmp_path):
    from revsnn_triton.config import ConfigError

    path = tmp_path / "mine.yaml"
    path.write_text("recipe:\n  title: x\n  original: y\n  differences: [{text: no restore}]\nlr: 0.1\n")
    with pytest.raises(ConfigError, match="differences"):
        load_card(str(path))
    assert make_config(str(path)).lr == 0.1  # the card is not a setting
