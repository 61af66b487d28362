"""The ``revsnn`` command: ``revsnn train``, ``revsnn bench <name>``, ``revsnn tune``.

``revsnn train`` with no arguments trains the small reversible model on scikit-learn's bundled digits (offline)
and ends with a report of accuracy, speed and memory per image. ``--config`` takes a YAML/TOML recipe (or the
name of a shipped one, see ``revsnn train --list-configs``); flags given on the command line override it.
Under ``torchrun`` the same command trains with DistributedDataParallel. Bad input (unknown model, dataset or
config key, missing data, a corrupt checkpoint, a loss that became NaN) ends with a one-paragraph message and
a non-zero exit status: 2 for bad input, 1 when training itself stopped.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence

import yaml

USAGE = """revsnn <command> [options]

commands:
  train            train a model (default: the offline digits demo); revsnn train --help
  bench <name>     run a benchmark (revsnn_triton.bench.<name>); revsnn bench lists them
  tune             tune the neuron kernels' launch configurations (revsnn_triton.tuning)
"""

KNOWN_BENCHMARKS = ("neurons", "memory", "train_step")


def _train_parser() -> argparse.ArgumentParser:
    from .config import AMP_MODES, NEURON_IMPLS

    p = argparse.ArgumentParser(prog="revsnn train", description="Train a (reversible) spiking network. With no "
                                "--dataset: the offline digits demo. Flags override --config.",
                                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="recipe file (.yaml/.yml/.toml) or the name of a shipped recipe")
    p.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    p.add_argument("--verbose", "-v", action="store_true", help="with --list-configs: each recipe's card (the "
                   "original it reproduces, the paper's and our accuracy, deliberate differences)")
    p.add_argument("--list-models", action="store_true", help="list the registered models and exit")
    p.add_argument("--model", help="model name (default: the dataset's default model)")
    p.add_argument("--dataset", help="digits (default), cifar10, cifar100, cifar10-dvs, dvs128-gesture, "
                   "dvs128-gesture-tonic, synthetic-cifar10")
    p.add_argument("--data-dir", dest="data_dir", help="dataset folder (default: ./data)")
    p.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="per process")
    p.add_argument("--T", "-T", dest="T", type=int, help="time steps")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--amp", choices=AMP_MODES, help="autocast precision (bf16 recommended on GPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--neuron-impl", dest="neuron_impl", choices=NEURON_IMPLS)
    p.add_argument("--out", help="output folder for metrics, curves and checkpoints")
    p.add_argument("--resume", help="checkpoint file (or output folder) to continue from")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--sync-bn", dest="sync_bn", action="store_true", help="SyncBatchNorm under torchrun (CUDA)")
    p.add_argument("--workers", type=int, help="data-loading worker processes")
    p.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int,
                   help="cap the training steps per epoch (smoke tests, benchmarks)")
    p.add_argument("--max-eval-samples", dest="max_eval_samples", type=int,
                   help="evaluate on the first N test samples only (smoke tests)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--no-memory-report", dest="memory_report", action="store_false",
                   help="skip the memory-per-image measurement at the end")
    p.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                   help="set any config key (value parsed as YAML), e.g. --set weight_decay=0.05")
    return p


def _parse_sets(items: list[str]) -> dict:
    from .config import ConfigError

    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: could not parse {text!r} ({exc})") from None
    return values


def train_main(argv: Sequence[str]) -> int:
    """``revsnn train``: returns the exit status (0 ok, 2 bad input, 1 training stopped, 130 interrupted)."""
    from .checkpoint import CheckpointError
    from .config import ConfigError, make_config, shipped_configs
    from .data import DataError

    args = vars(_train_parser().parse_args(list(argv)))
    verbose = args.pop("verbose", False)
    if args.pop("list_configs", False):
        if verbose:
            from .recipes import format_cards
            try:
                print(format_cards())
            except ConfigError as exc:
                print(f"revsnn train: error: {exc}", file=sys.stderr)
                return 2
        else:
            print("\n".join(shipped_configs()))
        return 0
    if verbose:
        print("revsnn train: error: --verbose goes with --list-configs", file=sys.stderr)
        return 2
    if args.pop("list_models", False):
        from .models import list_models
        print("\n".join(list_models()))
        return 0
    from .training import TrainingError, train

    try:
        overrides = _parse_sets(args.pop("sets", []))
        overrides.update(args)
        cfg = make_config(overrides.pop("config", None), **overrides)
        train(cfg)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"revsnn train: error: {exc}", file=sys.stderr)
        return 2
    except TrainingError as exc:
        print(f"revsnn train: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("revsnn train: interrupted; the checkpoint of the last finished epoch is kept "
              "(continue with --resume <out>)", file=sys.stderr)
        return 130
    return 0


def _available_benchmarks() -> list[str]:
    from . import bench
    return sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))


def bench_main(argv: Sequence[str]) -> int:
    """``revsnn bench <name> [args]``: ``revsnn_triton.bench.<name>.main(args)``."""
    argv = list(argv)
    names = sorted(set(KNOWN_BENCHMARKS) | set(_available_benchmarks()))
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: revsnn bench <name> [benchmark options]\n\nbenchmarks: " + ", ".join(names) +
              "\n(revsnn bench <name> --help for each benchmark's options)")
        return 0
    name, rest = argv[0], argv[1:]
    if not name.isidentifier() or name not in names:
        print(f"revsnn bench: error: unknown benchmark {name!r}; choose one of: {', '.join(names)}", file=sys.stderr)
        return 2
    return _run_entry(f"revsnn_triton.bench.{name}", rest, f"revsnn bench {name}")


def tune_main(argv: Sequence[str]) -> int:
    """``revsnn tune [args]``: ``revsnn_triton.tuning.main(args)``."""
    return _run_entry("revsnn_triton.tuning", list(argv), "revsnn tune")


def _run_entry(module_name: str, argv: list[str], what: str) -> int:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        print(f"{what}: error: {module_name} is not available in this installation ({exc})", file=sys.stderr)
        return 2
    entry = getattr(module, "main", None)
    if not callable(entry):
        print(f"{what}: error: {module_name} has no main(argv) entry point", file=sys.stderr)
        return 2
    status = entry(argv)
    return int(status or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``revsnn`` console script and ``python -m revsnn_triton``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"train": train_main, "bench": bench_main, "tune": tune_main}
    if command not in commands:
        print(f"revsnn: error: unknown command {command!r}; choose one of: {', '.join(commands)}\n\n{USAGE}",
              file=sys.stderr)
        return 2
    try:
        return commands[command](rest)
    except SystemExit as exc:  # argparse errors and benchmarks that exit with a message
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            return 2
        return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
