"""Training configuration: one flat dataclass, loaded from YAML/TOML recipes and overridden by flags.

A recipe file is a flat mapping of :class:`TrainConfig` field names to values (``model_kwargs`` is the only
nested mapping: extra keyword arguments for the model factory). Unknown keys are an error that lists the valid
ones. Shipped recipes live in ``revsnn_triton/configs/*.yaml``; ``--config NAME`` accepts either a path or the
stem of a shipped recipe (e.g. ``cifar10_revsresnet``).

A resumed run keeps its checkpoint's config: :func:`resume_config` applies the settings that may change in the
middle of a run (:data:`MUTABLE_ON_RESUME`) and refuses the others.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .suggest import did_you_mean

try:  # Python 3.11+; on 3.10 the tomli backport (same API) if installed
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - depends on the interpreter
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "multistep", "constant")
SCHEDULER_INTERVALS = ("step", "epoch")
AMP_MODES = ("none", "bf16", "fp16")
# Per-sample training augmentation: torchvision's image policies, the event-frame policy SNNAugmentWide, or a
# timm RandAugment string (``rand-m9-n1-mstd0.4-inc1``; parsed by timm when the data is built).
AUGMENTATIONS = ("none", "autoaugment", "randaugment", "trivialaugment", "snn-augment-wide")
TIMM_RANDAUGMENT_PREFIX = "rand-"
# Top-level key of a recipe file that holds its card (paper accuracy, deliberate differences), not a setting.
RECIPE_CARD_KEY = "recipe"
NEURON_IMPLS = ("triton", "spikingjelly", "torch")
LOGGERS = ("none", "tensorboard")
SEED_MAX = 2**32 - 1        # NumPy's seed range; torch and Python accept it too
FLOAT32_MAX = 3.4028234663852886e38

# Settings a resumed run may change (the rest define the run: model, data, batch, optimizer, seed, ...).
MUTABLE_ON_RESUME = frozenset({
    "epochs", "lr", "min_lr", "warmup_lr", "warmup_epochs", "cooldown_epochs", "milestones", "gamma",
    "weight_decay", "momentum", "grad_clip", "label_smoothing", "mixup_off_epoch", "eval_batch_size",
    "max_eval_samples", "amp", "compile", "device", "workers", "cpu_threads", "sync_bn", "data_dir", "download",
    "out", "log", "memory_report", "progress"})


class ConfigError(ValueError):
    """A configuration value or file is invalid (reported to the user without a traceback)."""


@dataclass
class TrainConfig:
    """Everything a training run needs. The defaults are the offline digits demo recipe.

    ``batch_size`` is per process (with ``torchrun`` the global batch is ``batch_size * world_size``).
    ``model=None`` picks the dataset's default model; ``num_classes`` widens its head beyond the dataset's
    classes (null: as many outputs as classes). ``lr`` is the peak learning rate; the schedules follow timm
    (see :mod:`revsnn_triton.schedule`): ``warmup_epochs`` ramp linearly from ``warmup_lr``, cosine decays to
    ``min_lr`` over ``epochs``, and ``cooldown_epochs`` are trained on top of ``epochs`` at ``min_lr``;
    ``scheduler_interval`` is ``"epoch"`` (rate fixed within an epoch, as timm) or ``"step"``.
    ``decay_bias_and_norm`` applies ``weight_decay`` to biases and normalization parameters too (torch's plain
    optimizers); by default they are not decayed (timm's ``filter_bias_and_bn``). ``mean`` / ``std`` override
    the dataset's normalization. ``random_erasing`` acts on the batch after MixUp/CutMix, as timm's loader does.
    ``cpu_threads``: torch's intra-op threads when training on the CPU
    (1 by default: the small digits model gains nothing from more, and one thread per process avoids the severe
    slowdowns of oversubscribed cores on busy machines and under ``torchrun``); null keeps torch's default.
    ``max_steps_per_epoch`` / ``max_eval_samples`` shorten epochs and evaluation (smoke tests, benchmarks); the
    evaluation then uses the first ``max_eval_samples`` test samples. ``out=None`` writes into a new folder
    ``runs/train/<YYYYmmdd-HHMMSS>-<model>`` (the recorded config holds the folder used). ``log="tensorboard"``
    also writes TensorBoard scalars per epoch into ``out``.
    """

    # what to train
    model: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    dataset: str = "digits"
    num_classes: int | None = None
    data_dir: str = "data"
    download: bool = False
    T: int = 4
    neuron_impl: str = "triton"
    # optimisation
    epochs: int = 6
    batch_size: int = 32
    eval_batch_size: int | None = None
    optimizer: str = "adamw"
    lr: float = 4e-3
    momentum: float = 0.9
    weight_decay: float = 1e-2
    decay_bias_and_norm: bool = False
    scheduler: str = "cosine"
    scheduler_interval: str = "step"
    milestones: list = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 1
    warmup_lr: float = 1e-4
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    # augmentation
    mean: list | None = None
    std: list | None = None
    crop_padding: int = 0
    hflip: bool = False
    augment: str = "none"
    augment_magnitude: int = 9
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_off_epoch: int | None = None
    # execution
    amp: str = "none"
    compile: bool = False
    device: str | None = None
    workers: int = 0
    cpu_threads: int | None = 1
    sync_bn: bool = False
    max_steps_per_epoch: int | None = None
    max_eval_samples: int | None = None
    # bookkeeping
    out: str | None = None
    resume: str | None = None
    log: str = "none"
    seed: int = 0
    memory_report: bool = True
    progress: bool = True

    def validate(self) -> "TrainConfig":
        """Check types and ranges; returns self. Raises :class:`ConfigError` naming the field."""
        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"config: {name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:  # finite, and finite as a float32 (the optimizer's dtype)
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v) and abs(v) <= FLOAT32_MAX

        need(self.model is None or (isinstance(self.model, str) and self.model), "model", "a model name or null")
        need(isinstance(self.model_kwargs, dict), "model_kwargs", "a mapping")
        need(isinstance(self.dataset, str) and self.dataset, "dataset", "a dataset name")
        need(isinstance(self.data_dir, str), "data_dir", "a path")
        for name in ("download", "compile", "sync_bn", "memory_report", "progress", "decay_bias_and_norm"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        need(is_int(self.T) and self.T >= 1, "T", "an integer >= 1")
        need(self.neuron_impl in NEURON_IMPLS, "neuron_impl", f"one of {NEURON_IMPLS}")
        need(self.num_classes is None or (is_int(self.num_classes) and self.num_classes >= 2), "num_classes",
             "an integer >= 2 or null")
        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "an integer >= 1")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(self.eval_batch_size is None or (is_int(self.eval_batch_size) and self.eval_batch_size >= 1),
             "eval_batch_size", "an integer >= 1 or null")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        need(is_num(self.lr) and self.lr > 0, "lr", f"a number > 0 and at most {FLOAT32_MAX:.4g} (float32's largest)")
        for name in ("momentum", "weight_decay", "gamma", "warmup_lr", "min_lr", "label_smoothing",
                     "random_erasing", "mixup", "cutmix", "mixup_prob"):
            need(is_num(getattr(self, name)) and getattr(self, name) >= 0, name,
                 f"a number >= 0 and at most {FLOAT32_MAX:.4g} (float32's largest)")
        for name in ("label_smoothing", "random_erasing", "mixup_prob"):
            need(getattr(self, name) <= 1, name, "at most 1")
        need(self.scheduler in SCHEDULERS, "scheduler", f"one of {SCHEDULERS}")
        need(self.scheduler_interval in SCHEDULER_INTERVALS, "scheduler_interval", f"one of {SCHEDULER_INTERVALS}")
        need(isinstance(self.milestones, list) and all(is_int(m) and m >= 0 for m in self.milestones),
             "milestones", "a list of epoch numbers")
        need(is_int(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup_epochs", "an integer >= 0")
        need(is_int(self.cooldown_epochs) and self.cooldown_epochs >= 0, "cooldown_epochs", "an integer >= 0")
        need(self.grad_clip is None or (is_num(self.grad_clip) and self.grad_clip > 0), "grad_clip",
             "a number > 0 or null")
        need(is_int(self.crop_padding) and self.crop_padding >= 0, "crop_padding", "an integer >= 0")
        need(isinstance(self.hflip, bool), "hflip", "true or false")
        need(self.augment in AUGMENTATIONS or (isinstance(self.augment, str) and
                                               self.augment.startswith(TIMM_RANDAUGMENT_PREFIX)),
             "augment", f"one of {AUGMENTATIONS} or a timm RandAugment string such as 'rand-m9-n1-mstd0.4-inc1'")
        for name in ("mean", "std"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, list) and len(value) >= 1 and all(is_num(v) for v in value)),
                 name, "a list of per-channel numbers or null")
        need(self.std is None or all(v > 0 for v in self.std), "std", "positive")
        need(is_int(self.augment_magnitude) and 0 <= self.augment_magnitude <= 30, "augment_magnitude",
             "an integer in [0, 30]")
        need(self.mixup_off_epoch is None or (is_int(self.mixup_off_epoch) and self.mixup_off_epoch >= 0),
             "mixup_off_epoch", "an integer >= 0 or null")
        need(self.amp in AMP_MODES, "amp", f"one of {AMP_MODES}")
        need(self.device is None or isinstance(self.device, str), "device", "a device string such as 'cpu'")
        need(is_int(self.workers) and self.workers >= 0, "workers", "an integer >= 0")
        need(self.cpu_threads is None or (is_int(self.cpu_threads) and self.cpu_threads >= 1), "cpu_threads",
             "an integer >= 1 or null")
        need(self.max_steps_per_epoch is None or (is_int(self.max_steps_per_epoch) and self.max_steps_per_epoch >= 1),
             "max_steps_per_epoch", "an integer >= 1 or null")
        need(self.max_eval_samples is None or (is_int(self.max_eval_samples) and self.max_eval_samples >= 1),
             "max_eval_samples", "an integer >= 1 or null")
        need(self.out is None or (isinstance(self.out, str) and self.out), "out", "a folder path or null")
        need(self.resume is None or (isinstance(self.resume, str) and self.resume), "resume",
             "a checkpoint path or null")
        need(self.log in LOGGERS, "log", f"one of {LOGGERS}")
        need(is_int(self.seed) and 0 <= self.seed <= SEED_MAX, "seed", f"an integer in [0, {SEED_MAX}]")
        return self

    def to_dict(self) -> dict:
        """Plain, JSON/YAML-serialisable copy (stored in checkpoints and the run directory)."""
        return dataclasses.asdict(self)


def field_names() -> list[str]:
    """Valid configuration keys, in declaration order."""
    return [f.name for f in fields(TrainConfig)]


def shipped_configs() -> list[str]:
    """Stems of the recipe files shipped in ``revsnn_triton/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a recipe file, or a shipped recipe's stem -> the file's path."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ConfigError(f"config: expected a file path or a shipped recipe name, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"config file {name_or_path!r} not found{did_you_mean(name_or_path, shipped_configs())}; give "
                      f"a path to a .yaml/.yml/.toml file or one of the shipped recipes: {', '.join(shipped_configs())}")


def read_config_file(name_or_path: str) -> dict:
    """Read a recipe (YAML or TOML) into a dict of validated keys (unknown keys -> :class:`ConfigError`)."""
    path = resolve_config_path(name_or_path)
    if path.suffix.lower() == ".toml" and tomllib is None:
        raise ConfigError(f"config file {str(path)!r}: reading TOML needs Python 3.11+ or `pip install tomli`; "
                          "or write the recipe as YAML")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError) as exc:  # TOMLDecodeError is a ValueError
        raise ConfigError(f"config file {str(path)!r} could not be read: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, "
                          f"got {type(data).__name__}")
    data.pop(RECIPE_CARD_KEY, None)  # the recipe's card (revsnn_triton.recipes), not a setting
    check_keys(data, source=f"config file {str(path)!r}")
    return data


def check_keys(data: dict, source: str = "config") -> None:
    """Raise :class:`ConfigError` listing the valid keys if ``data`` has any unknown one."""
    unknown = sorted(set(data) - set(field_names()))
    if unknown:
        hints = "".join(did_you_mean(key, field_names()) for key in unknown)
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}{hints}; valid keys are: "
                          f"{', '.join(field_names())}")


def make_config(file: str | None = None, **overrides: Any) -> TrainConfig:
    """Build a validated config: defaults, then the recipe ``file`` (if any), then ``overrides``.

    Integers given for float fields are accepted (YAML writes ``1e-3`` as a string in some dialects: such
    strings are converted for float fields too).
    """
    values: dict[str, Any] = {}
    if file is not None:
        values.update(read_config_file(file))
    check_keys(overrides, source="config overrides")
    values.update(overrides)
    return TrainConfig(**_coerce(values)).validate()


def _coerce(values: dict) -> dict:
    float_fields = {f.name for f in fields(TrainConfig) if f.type in ("float", "float | None")}
    out = dict(values)
    for name in float_fields & set(out):
        v = out[name]
        if isinstance(v, str):
            try:
                out[name] = float(v)
            except ValueError:
                raise ConfigError(f"config: {name} must be a number, got {v!r}") from None
        elif isinstance(v, int) and not isinstance(v, bool):
            out[name] = float(v)
    return out


def resume_config(saved: dict, requested: dict) -> tuple[TrainConfig, list[str]]:
    """The config of a resumed run: the checkpoint's ``saved`` config with the ``requested`` settings applied.

    Only the settings in :data:`MUTABLE_ON_RESUME` may differ from ``saved`` (``resume`` itself is not compared);
    any other difference raises :class:`ConfigError` naming each one. Returns the validated config and one
    ``"key: old -> new"`` line per applied change.
    """
    if not isinstance(saved, dict) or not isinstance(requested, dict):
        raise TypeError("resume_config: saved and requested must be dicts")
    check_keys(saved, source="the checkpoint's config")
    check_keys(requested, source="config overrides")
    before = TrainConfig(**_coerce(saved))
    after = TrainConfig(**_coerce({**saved, **requested})).validate()
    changed = [name for name in field_names()
               if name != "resume" and getattr(before, name) != getattr(after, name)]
    refused = [name for name in changed if name not in MUTABLE_ON_RESUME]
    if refused:
        parts = ", ".join(f"{name} {getattr(before, name)!r} -> {getattr(after, name)!r}" for name in refused)
        raise ConfigError(f"--resume continues a run with the settings it started with; these cannot change in the "
                          f"middle of a run: {parts}. Start a new run (without --resume) to change them; settings "
                          f"that may change on resume: {', '.join(sorted(MUTABLE_ON_RESUME))}")
    return after, [f"{name}: {getattr(before, name)!r} -> {getattr(after, name)!r}" for name in changed]


def recipe_summary(name_or_path: str) -> dict:
    """``{"name", "dataset", "model", "epochs"}`` of a recipe (the model is None when the dataset's default is
    used), for listings."""
    values = {**TrainConfig().to_dict(), **read_config_file(name_or_path)}
    return {"name": Path(name_or_path).stem, "dataset": values["dataset"], "model": values["model"],
            "epochs": values["epochs"]}
