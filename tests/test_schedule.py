"""Learning-rate schedules: timm's cosine semantics (cooldown on top of the epochs, per-epoch steps) and the
recipes' effective epochs, checked against timm's and torch's own schedulers."""
from __future__ import annotations

import math

import pytest
import torch

from revsnn_triton.config import ConfigError, make_config
from revsnn_triton.schedule import build_scheduler, lr_at, lr_at_epoch, total_epochs

# Epochs the original RevSNN runs trained: timm's create_scheduler returns epochs + cooldown_epochs.
ORIGINAL_EPOCHS = {"cifar10_revsformer": 310, "cifar100_revsformer": 310, "cifar10dvs_revsresnet": 106,
                   "cifar10dvs_revsformer": 106, "dvs128gesture_revsresnet": 202, "dvs128gesture_revsformer": 202,
                   "cifar10_revsresnet": 200, "cifar100_revsresnet": 200}


@pytest.mark.parametrize("recipe", sorted(ORIGINAL_EPOCHS))
def test_recipes_train_the_original_number_of_epochs(recipe):
    assert total_epochs(make_config(recipe)) == ORIGINAL_EPOCHS[recipe]


@pytest.mark.parametrize("recipe", ["cifar10_revsformer", "cifar10dvs_revsformer", "dvs128gesture_revsresnet"])
def test_cosine_recipes_follow_timms_scheduler_epoch_by_epoch(recipe):
    from timm.scheduler import CosineLRScheduler

    cfg = make_config(recipe)
    steps = 7
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    # The original's construction (timm.scheduler.create_scheduler for sched=cosine), stepped once per epoch.
    reference = CosineLRScheduler(reference_opt, t_initial=cfg.epochs, lr_min=cfg.min_lr, warmup_t=cfg.warmup_epochs,
                                  warmup_lr_init=cfg.warmup_lr, cycle_limit=1, cycle_decay=0.1)
    assert reference.get_cycle_length() + cfg.cooldown_epochs == total_epochs(cfg)
    ours_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    ours = build_scheduler(cfg, ours_opt, steps)
    for epoch in range(total_epochs(cfg)):
        reference.step(epoch)
        expected = reference_opt.param_groups[0]["lr"]
        seen = []
        for _ in range(steps):  # the training loop: optimizer step, then scheduler step
            seen.append(ours_opt.param_groups[0]["lr"])
            ours_opt.step()
            ours.step()
        assert seen == pytest.approx([expected] * steps, rel=1e-12, abs=0), f"epoch {epoch}"
    assert expected == cfg.min_lr  # the last (cooldown) epoch


def test_multistep_recipes_follow_torchs_multisteplr():
    cfg = make_config("cifar100_revsresnet")
    reference_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_opt, milestones=cfg.milestones, gamma=cfg.gamma)
    for epoch in range(total_epochs(cfg)):
        expected = reference_opt.param_groups[0]["lr"]
        assert lr_at(cfg, epoch * 5, 5) == pytest.approx(expected, rel=1e-12)
        assert lr_at(cfg, epoch * 5 + 4, 5) == pytest.approx(expected, rel=1e-12)
        reference_opt.step()
        reference.step()


def test_cosine_formula_by_hand_per_step_and_per_epoch():
    cfg = make_config(epochs=10, lr=1.0, warmup_epochs=2, warmup_lr=0.0, min_lr=0.1, cooldown_epochs=2)
    assert cfg.scheduler_interval == "step" and total_epochs(cfg) == 12
    assert lr_at(cfg, 0, 5) == 0.0
    assert lr_at(cfg, 5, 5) == pytest.approx(0.5)                   # half-way through the warmup
    # From t = 2 the cosine is counted from t = 0 over the 10 epochs: 0.1 + 0.45 * (1 + cos(0.2 pi)).
    assert lr_at(cfg, 10, 5) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)))
    assert lr_at(cfg, 25, 5) == pytest.approx(0.55)                  # t = 5: half-way
    assert lr_at(cfg, 49, 5) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.98 * math.pi)))
    assert lr_at(cfg, 50, 5) == pytest.approx(0.1) and lr_at(cfg, 59, 5) == pytest.approx(0.1)  # cooldown
    per_epoch = make_config(**{**cfg.to_dict(), "scheduler_interval": "epoch"})
    assert [lr_at(per_epoch, s, 5) for s in (0, 4)] == [0.0, 0.0]     # epoch 0 stays at warmup_lr
    assert lr_at(per_epoch, 7, 5) == pytest.approx(0.5) and lr_at(per_epoch, 5 * 5, 5) == pytest.approx(0.55)
    step = make_config(epochs=10, lr=0.1, scheduler="multistep", milestones=[3, 6], gamma=0.1, warmup_epochs=0)
    assert [round(lr_at(step, e * 4 + 1, 4), 6) for e in (0, 2, 3, 5, 6, 9)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert math.isclose(lr_at_epoch(make_config(scheduler="constant", warmup_epochs=0, lr=0.3), 99.5), 0.3)


def test_bad_arguments_are_named():
    cfg = make_config()
    with pytest.raises(ValueError, match="steps_per_epoch"):
        lr_at(cfg, 0, 0)
    with pytest.raises(ValueError, match="step must be"):
        lr_at(cfg, -1, 3)
    with pytest.raises(ValueError, match="t must be"):
        lr_at_epoch(cfg, float("nan"))
    with pytest.raises(ConfigError, match="scheduler_interval"):
        make_config(scheduler_interval="batch")
    with pytest.raises(TypeError, match="optimizer"):
        build_scheduler(cfg, object(), 3)


def test_training_runs_the_cooldown_on_top_of_the_epochs(tmp_path):
    from revsnn_triton.training import train

    result = train(out=str(tmp_path), epochs=1, cooldown_epochs=1, batch_size=16, max_steps_per_epoch=2,
                   max_eval_samples=32, memory_report=False, progress=False, scheduler_interval="epoch",
                   warmup_epochs=0, lr=1e-3, min_lr=1e-5)
    assert result.epochs_run == 2 and [row["epoch"] for row in result.history] == [1, 2]
    # The rate logged after each epoch is the one the next epoch starts with: the cooldown's min_lr.
    assert [row["lr"] for row in result.history] == pytest.approx([1e-5, 1e-5])
