"""The ``revsnn`` command: ``revsnn train``, ``revsnn eval``, ``revsnn bench <name>``, ``revsnn tune``,
``revsnn check``.

``revsnn train`` with no arguments trains the small reversible model on scikit-learn's bundled digits (offline)
into a new folder ``runs/train/<timestamp>-<model>`` and ends with a report of accuracy, speed and memory per
image. ``--config`` takes a YAML/TOML recipe (or the name of a shipped one, see ``revsnn train
--list-configs``); flags given on the command line override it. ``--resume RUN`` continues a run with its own
settings. Under ``torchrun`` the same command trains with DistributedDataParallel. ``revsnn eval CHECKPOINT``
measures a trained model on its test split. ``revsnn check MODEL_OR_FACTORY`` runs the invertibility checks of
``revsnn_triton.testing`` on every reversible sequence of a model and prints a table per sequence.

Bad input or a problem of the environment (unknown model, dataset or config key, missing data, a corrupt
checkpoint, an output folder that cannot be written) ends with a one-line message and exit status 2; a run that
diverged stops with exit status 1; Ctrl-C with 130. Nothing here imports torch until a command needs it, so
``revsnn --help`` and ``revsnn --version`` are instant.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from typing import Sequence

USAGE = """usage: revsnn <command> [options]

commands:
  train            train a model (default: the offline digits demo); revsnn train --help
  eval CHECKPOINT  accuracy of a trained model on its test split; revsnn eval --help
  bench <name>     run a benchmark (revsnn_triton.bench.<name>); revsnn bench lists them
  tune             tune the neuron kernels' launch configurations (revsnn_triton.tuning)
  check MODEL      exactness, gradients, BatchNorm, determinism and headroom of every reversible sequence

options:
  -h, --help       this message
  --version        the installed version
"""

KNOWN_BENCHMARKS = ("neurons", "memory", "train_step")


# ----------------------------------------------------------------------------------------------------- train
def _train_parser() -> argparse.ArgumentParser:
    from .config import AMP_MODES, LOGGERS, NEURON_IMPLS, TrainConfig

    defaults = TrainConfig()

    def default(name: str) -> str:
        return f" (default: {getattr(defaults, name)})"

    # Only the flags a user gives end up in the namespace (SUPPRESS): a resumed run must tell them from defaults.
    p = argparse.ArgumentParser(
        prog="revsnn train", argument_default=argparse.SUPPRESS,
        description="Train a (reversible) spiking network. With no --dataset: the offline digits demo. Flags "
        "override --config; --set KEY=VALUE sets any other config key.",
        epilog="Outputs: config.json, train.log, metrics.jsonl/.csv, curves.png, checkpoint_last.pt, "
        "checkpoint_best.pt and summary.json in the run folder. Exit status: 0 done, 1 the run diverged (the "
        "message names the last good checkpoint), 2 bad input, 130 interrupted.")
    what = p.add_argument_group("what to train")
    what.add_argument("--config", metavar="RECIPE",
                      help="recipe file (.yaml/.yml/.toml) or the name of a shipped recipe (see --list-configs)")
    what.add_argument("--list-configs", action="store_true", help="list the shipped recipes and exit")
    what.add_argument("--verbose", "-v", action="store_true", help="with --list-configs: each recipe's card (the "
                      "original it reproduces, the paper's and our accuracy, deliberate differences)")
    what.add_argument("--list-models", action="store_true", help="list the registered models and exit")
    what.add_argument("--model", help="registered model name (default: the dataset's default model)")
    what.add_argument("--dataset", help="digits, cifar10, cifar100, cifar10-dvs, dvs128-gesture, "
                      "dvs128-gesture-tonic or synthetic-cifar10" + default("dataset"))
    what.add_argument("--data-dir", dest="data_dir", metavar="DIR", help="dataset folder" + default("data_dir"))
    what.add_argument("--download", action="store_true", help="download the dataset if it is missing")
    what.add_argument("--T", "-T", dest="T", type=int, help="time steps" + default("T"))
    what.add_argument("--neuron-impl", dest="neuron_impl", choices=NEURON_IMPLS,
                      help="spiking neurons: triton (the fused multi-step kernels; plain PyTorch on the CPU), "
                      "spikingjelly (spikingjelly's nodes, for comparison) or torch (the PyTorch reference)"
                      + default("neuron_impl"))
    what.add_argument("--recompute-batch", dest="recompute_batch", type=int, metavar="N",
                      help="reversible ResNets: the floor mode, recomputing in backward N images at a time (less "
                      "memory, more time; the same as --set 'model_kwargs={recompute_batch: N}') (default: the whole "
                      "batch at once)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, help="training epochs" + default("epochs"))
    opt.add_argument("--batch-size", dest="batch_size", type=int, help="per process" + default("batch_size"))
    opt.add_argument("--lr", type=float, help="peak learning rate" + default("lr"))
    opt.add_argument("--amp", choices=AMP_MODES, help="autocast precision: bf16 (GPUs), fp16 (with a gradient "
                     "scaler) or none" + default("amp"))
    opt.add_argument("--compile", action="store_true", help="torch.compile the model (default: off)")
    opt.add_argument("--seed", type=int, help=f"seed of weights and data order, 0 to 2**32-1{default('seed')}")
    opt.add_argument("--set", dest="sets", action="append", metavar="KEY=VALUE",
                     help="set any config key (value parsed as YAML), e.g. --set weight_decay=0.05 or "
                     "--set 'model_kwargs={frac_bits: 12}'; repeatable")
    run = p.add_argument_group("run folder and execution")
    run.add_argument("--out", metavar="DIR",
                     help="run folder (default: a new runs/train/<YYYYmmdd-HHMMSS>-<model>)")
    run.add_argument("--resume", metavar="RUN", help="continue a run: its folder or checkpoint file. Its own "
                     "settings are used; flags may change those a run can change mid-way (epochs, lr, workers, "
                     "device, ...; each change is printed) and are refused for the rest (model, dataset, T, ...)")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --out folder that holds a run, replacing its outputs")
    run.add_argument("--log", choices=LOGGERS, help="also log scalars per epoch to TensorBoard event files in the "
                     "run folder" + default("log"))
    run.add_argument("--device", help="cpu, cuda, cuda:1, mps, ... (default: cuda if available, else cpu)")
    run.add_argument("--sync-bn", dest="sync_bn", action="store_true",
                     help="SyncBatchNorm under torchrun (CUDA) (default: off)")
    run.add_argument("--workers", type=int, help="data-loading worker processes" + default("workers"))
    run.add_argument("--max-steps-per-epoch", dest="max_steps_per_epoch", type=int, metavar="N",
                     help="cap the training steps per epoch (smoke tests, benchmarks) (default: no cap)")
    run.add_argument("--max-eval-samples", dest="max_eval_samples", type=int, metavar="N",
                     help="evaluate on the first N test samples only (default: the whole test split)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    run.add_argument("--no-memory-report", dest="memory_report", action="store_false",
                     help="skip the memory-per-image measurement at the end")
    return p


def _parse_sets(items: list[str]) -> dict:
    import yaml

    from .config import ConfigError

    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: could not parse {text!r} ({str(exc).splitlines()[0]})") from None
    return values


def list_configs() -> str:
    """The table of ``revsnn train --list-configs``: one shipped recipe per row."""
    from .config import recipe_summary, resolve_config_path, shipped_configs

    rows = [recipe_summary(str(resolve_config_path(name))) for name in shipped_configs()]
    return _table(["recipe", "dataset", "model", "epochs"],
                  [[r["name"], r["dataset"], r["model"] or "(dataset default)", r["epochs"]] for r in rows])


def list_models() -> str:
    """The table of ``revsnn train --list-models``: name, input, default T and classes, parameter count."""
    from .models import list_models as names, registry

    rows = []
    for name in names():
        info = registry.model_info(name)
        rows.append([name, info.input, "-" if info.T is None else info.T,
                     "-" if info.num_classes is None else info.num_classes, f"{info.num_parameters() / 1e6:.2f}M"])
    return _table(["model", "input", "T", "classes", "parameters"], rows)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def train_main(argv: Sequence[str]) -> int:
    """``revsnn train``: returns the exit status (0 ok, 2 bad input, 1 training stopped, 130 interrupted)."""
    args = vars(_train_parser().parse_args(list(argv)))
    from .checkpoint import CheckpointError
    from .config import ConfigError, read_config_file
    from .data import DataError

    try:
        verbose = args.pop("verbose", False)
        if args.pop("list_configs", False):
            if verbose:
                from .recipes import format_cards
                print(format_cards())
            else:
                print(list_configs())
            return 0
        if verbose:
            raise ConfigError("--verbose goes with --list-configs")
        if args.pop("list_models", False):
            print(list_models())
            return 0
        from .training import OutputError, TrainingError, train

        overwrite = args.pop("overwrite", False)
        # What the user asked for, without defaults: recipe file, then --set, then the flags.
        requested = read_config_file(args.pop("config")) if "config" in args else {}
        requested.update(_parse_sets(args.pop("sets", [])))
        if "recompute_batch" in args:
            kwargs = requested.get("model_kwargs", {})
            recompute_batch = args.pop("recompute_batch")
            # a model_kwargs that is not a mapping is left for the config's validation to report
            requested["model_kwargs"] = ({**kwargs, "recompute_batch": recompute_batch} if isinstance(kwargs, dict)
                                         else kwargs)
        requested.update(args)
        try:
            train(requested, overwrite=overwrite)
        except TrainingError as exc:
            print(f"revsnn train: stopped: {exc}", file=sys.stderr)
            return 1
        except OutputError as exc:
            print(f"revsnn train: error: {exc}", file=sys.stderr)
            return 2
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"revsnn train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        folder, kept = getattr(exc, "run_folder", None), getattr(exc, "last_good", None)
        if folder is None:
            print("revsnn train: interrupted", file=sys.stderr)
        elif kept is None:
            print(f"revsnn train: interrupted before the first epoch ended; nothing to resume in {folder}",
                  file=sys.stderr)
        else:
            print(f"revsnn train: interrupted; the last good checkpoint is {kept}; continue with revsnn train "
                  f"--resume {folder}", file=sys.stderr)
        return 130
    return 0


# ------------------------------------------------------------------------------------------------------ eval
def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revsnn eval", description="Top-1 accuracy and loss of a trained model on its "
                                "dataset's test split, with the settings of the run that trained it.")
    p.add_argument("checkpoint", help="checkpoint file, or a run folder (its checkpoint_best.pt)")
    p.add_argument("--data-dir", dest="data_dir", default=None, metavar="DIR",
                   help="dataset folder (default: the run's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None, metavar="N",
                   help="evaluation batch size (default: the run's)")
    p.add_argument("--max-samples", dest="max_samples", type=int, default=None, metavar="N",
                   help="evaluate the first N test samples only (default: the whole test split)")
    return p


def eval_main(argv: Sequence[str]) -> int:
    """``revsnn eval CHECKPOINT``: prints the accuracy; exit status 0, or 2 for bad input."""
    args = _eval_parser().parse_args(list(argv))
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .evaluation import evaluate_checkpoint, format_eval

    try:
        result = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device,
                                     batch_size=args.batch_size, max_samples=args.max_samples)
    except (ConfigError, DataError, CheckpointError) as exc:
        print(f"revsnn eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_eval(result))
    return 0


# ------------------------------------------------------------------------------------------------ bench, tune
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
        from .suggest import did_you_mean
        print(f"revsnn bench: error: unknown benchmark {name!r}{did_you_mean(name, names)}; choose one of: "
              f"{', '.join(names)}", file=sys.stderr)
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


# ----------------------------------------------------------------------------------------------------- check
class CheckError(Exception):
    """A user error of ``revsnn check``: printed as one line, exit status 2."""


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="revsnn check", description="Check every reversible sequence (RevSequence) of a model at a small "
        "batch: exact inversion on the fixed-point grid (and in the backward's reconstruction), gradients equal to "
        "reversible=False, BatchNorm statistics updated once per step, a bit-identical recomputation (also with "
        "the launch configurations a tuning cache may pick), and the stream's headroom before overflow. Prints a "
        "table per sequence.",
        epilog="MODEL_OR_FACTORY: a registered model (revsnn train --list-models) or package.module:factory, a "
        "function called without arguments that returns a model, or (model, example_input). Exit status: 0 all "
        "checks passed, 1 a check failed (the message names the sequence and block), 2 bad input.")
    p.add_argument("model", metavar="MODEL_OR_FACTORY", help="registered model name or package.module:factory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=2, metavar="N",
                   help="batch of the example input (default: 2)")
    p.add_argument("--T", "-T", dest="T", type=int, default=None,
                   help="time steps of a registered model (default: the model's)")
    p.add_argument("--input-shape", dest="input_shape", default=None, metavar="B,C,H,W",
                   help="shape of a random example input (default: the registered model's input at --batch-size)")
    p.add_argument("--neuron-impl", dest="neuron_impl", default=None, choices=("triton", "torch", "spikingjelly"),
                   help="neurons of a registered model (default: triton; plain PyTorch on the CPU)")
    p.add_argument("--steps", type=int, default=2, help="training steps of the BatchNorm check (default: 2)")
    p.add_argument("--runs", type=int, default=3, help="recomputations compared per branch (default: 3)")
    p.add_argument("--min-headroom", dest="min_headroom", type=float, default=0.0, metavar="BITS",
                   help="fail a block whose stream keeps fewer bits of headroom (default: 0, i.e. only overflow)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default: 0)")
    return p


def _parse_shape(text: str) -> tuple[int, ...]:
    import re

    parts = re.split(r"[,x]", text.strip())
    shape = tuple(int(v) for v in parts) if all(v.strip().isdigit() for v in parts) else ()
    if not shape or any(n < 1 for n in shape):
        raise CheckError(f"--input-shape: expected positive integers like 2,3,32,32, got {text!r}")
    return shape


def _registry_input_shape(info, batch: int, T: int) -> tuple[int, ...]:
    """``"images [B, 3, 32, 32]"`` -> ``(batch, 3, 32, 32)`` (``T`` for a ``T`` entry)."""
    import re

    match = re.search(r"\[([^\]]*)\]", info.input)
    if match is None:
        raise CheckError(f"{info.name} declares no input shape; give --input-shape")
    dims = []
    for token in match.group(1).split(","):
        token = token.strip()
        dims.append(batch if token == "B" else T if token == "T" else int(token) if token.isdigit() else None)
    if None in dims:
        raise CheckError(f"{info.name}: cannot read its input shape from {info.input!r}; give --input-shape")
    return tuple(dims)


def _load_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CheckError(f"expected package.module:factory, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: a module of the current folder
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises, reported in one line
        raise CheckError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise CheckError(f"{module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise CheckError(f"{spec} is not callable")
    try:
        return factory()
    except Exception as exc:  # noqa: BLE001
        raise CheckError(f"{spec}() raised {type(exc).__name__}: {exc}") from None


def _check_subject(args):
    """``(title, model, example_input)`` for the command's arguments."""
    import torch

    from .models import create_model, list_models, model_info

    if args.batch_size < 1:
        raise CheckError(f"--batch-size must be >= 1, got {args.batch_size}")
    example = None
    if ":" in args.model:
        given = [flag for flag, value in (("--T", args.T), ("--neuron-impl", args.neuron_impl)) if value is not None]
        if given:
            raise CheckError(f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only to registered "
                             "models; a factory builds its own model")
        made = _load_factory(args.model)
        model, example = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
        if not isinstance(model, torch.nn.Module):
            raise CheckError(f"{args.model}() must return a torch.nn.Module or (module, example_input), got "
                             f"{type(made).__name__}")
        if args.input_shape is not None:
            example = torch.randn(_parse_shape(args.input_shape))
        elif example is None:
            raise CheckError(f"{args.model}() returned no example input: return (model, example_input) or give "
                             "--input-shape")
    else:
        names = list_models()
        if args.model not in names:
            from .suggest import did_you_mean
            raise CheckError(f"unknown model {args.model!r}{did_you_mean(args.model, names)}; give a registered "
                             "name (revsnn train --list-models) or package.module:factory")
        info = model_info(args.model)
        T = info.T if args.T is None else args.T
        kwargs = {} if args.T is None else {"T": args.T}
        try:
            model = create_model(args.model, neuron_impl=args.neuron_impl or "triton", **kwargs)
        except (TypeError, ValueError) as exc:
            raise CheckError(str(exc)) from None
        shape = (_parse_shape(args.input_shape) if args.input_shape is not None else
                 _registry_input_shape(info, args.batch_size, T or 1))
        example = torch.rand(shape)
    return model, example


def check_main(argv: Sequence[str]) -> int:
    """``revsnn check MODEL_OR_FACTORY``: prints a table per reversible sequence; exit status 0 (all checks passed),
    1 (a check failed) or 2 (bad input)."""
    args = _check_parser().parse_args(list(argv))
    for name in ("steps", "runs"):
        if getattr(args, name) < (1 if name == "steps" else 2):
            print(f"revsnn check: error: --{name} must be >= {1 if name == 'steps' else 2}", file=sys.stderr)
            return 2
    try:
        import torch

        from .testing import check_model

        torch.manual_seed(args.seed)  # the weights and the example input
        model, example = _check_subject(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(device)
            model = model.to(device).train()
        except (RuntimeError, ValueError, AssertionError) as exc:  # torch without CUDA raises AssertionError
            raise CheckError(f"--device {args.device}: {exc}") from None
        example = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example) \
            if isinstance(example, (tuple, list)) else example.to(device)
        shape = list(example.shape) if isinstance(example, torch.Tensor) else "(several inputs)"
        print(f"revsnn check {args.model}: input {shape} on {device}, training mode")
        try:
            reports = check_model(model, example, steps=args.steps, runs=args.runs, seed=args.seed,
                                  min_headroom_bits=args.min_headroom)
        except ValueError as exc:
            raise CheckError(str(exc)) from None
    except CheckError as exc:
        print(f"revsnn check: error: {exc}", file=sys.stderr)
        return 2
    failures = []
    for report in reports:
        print()
        print(report.format())
        failures += [f"{report.name}: {problem}" for problem in report.problems]
    blocks = sum(r.num_blocks for r in reports)
    print()
    if failures:
        for line in failures:
            print(f"FAILED {line}")
        print(f"revsnn check: {len(failures)} problem{'s' if len(failures) != 1 else ''} in {len(reports)} "
              f"sequence{'s' if len(reports) != 1 else ''} ({blocks} blocks)", file=sys.stderr)
        return 1
    print(f"revsnn check: all checks passed ({len(reports)} sequence{'s' if len(reports) != 1 else ''}, "
          f"{blocks} blocks)")
    return 0


# ------------------------------------------------------------------------------------------------------ main
COMMANDS = {"train": train_main, "eval": eval_main, "bench": bench_main, "tune": tune_main, "check": check_main}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``revsnn`` console script and ``python -m revsnn_triton``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = _dispatch(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:  # e.g. `revsnn train --help | head`: the reader left; no traceback, no second error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv[0] == "--version":
        from . import __version__
        print(f"revsnn-triton {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        from .suggest import did_you_mean
        print(f"revsnn: error: unknown command {command!r}{did_you_mean(command, COMMANDS)}; choose one of: "
              f"{', '.join(COMMANDS)}\n\n{USAGE}", file=sys.stderr, end="")
        return 2
    try:
        return COMMANDS[command](rest)
    except SystemExit as exc:  # argparse errors and benchmarks that exit with a message
        code = exc.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            return 2
        return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
