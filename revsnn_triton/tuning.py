"""Tuning of the kernels' launch configurations: the ``revsnn tune`` command.

:func:`tune` measures candidate ``(block_size, num_warps)`` pairs of every tunable kernel on a GPU with
``triton.testing.do_bench`` and merges the winners into the cache that :func:`revsnn_triton.launch.launch_config`
reads (format and location: :mod:`revsnn_triton.launch`). The kernels to tune, and how to launch each one on
prepared inputs, come from the kernel files (``revsnn_triton.kernels.neurons.tunable_kernels``). Import
direction: benchmarks -> this tuner -> kernels -> the launch-config leaf.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from revsnn_triton import launch
from revsnn_triton.fileio import atomic_write_text
from revsnn_triton.launch import (CACHE_ENV, CACHE_FORMAT, DEFAULT_CACHE, DTYPE_NAMES, LaunchConfig, TunableKernel,
                                  check_dtype, check_positive_int, heuristic, resolve_cache_path)
from revsnn_triton.runtime import interpreter_enabled

__all__ = ["tune", "tunable_kernels", "main", "DEFAULT_CANDIDATES"]

# Candidates tried by `tune` unless given: block sizes x warps, all powers of two.
DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = tuple(
    (b, w) for b in (256, 512, 1024, 2048, 4096) for w in (2, 4, 8))

DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()} | {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _kernels() -> dict[str, TunableKernel]:
    from revsnn_triton.kernels.neurons import tunable_kernels as neuron_kernels
    return {k.name: k for k in neuron_kernels()}


def tunable_kernels() -> list[str]:
    """Names of the kernels :func:`tune` can measure (the names their launchers pass to ``launch_config``)."""
    return sorted(_kernels())


def _measure_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``: CUDA events, L2 flushed per repetition)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _require_gpu_for_tuning() -> torch.device:
    if interpreter_enabled():
        raise RuntimeError("tune: refusing to tune under Triton's interpreter (TRITON_INTERPRET=1): "
                           "timings there say nothing about a GPU. Run it on a CUDA machine.")
    if not torch.cuda.is_available():
        raise RuntimeError("tune: no CUDA device available; tuning measures kernels on a GPU.")
    return torch.device("cuda", torch.cuda.current_device())


def _write_entries(path: Path, new: dict[str, dict]) -> None:
    """Merge ``new`` into the cache file atomically (temp file in the same folder + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    launch.forget(path)
    entries = dict(launch.cached_entries(path))
    entries.update(new)
    atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1, sort_keys=True) + "\n")
    launch.forget(path)


def tune(shapes: Iterable[tuple[int, int]], dtypes: Iterable[torch.dtype], kernels: Sequence[str] | None = None,
         cache_path=None, candidates: Sequence[tuple[int, int]] | None = None, verbose: bool = False) -> dict[str, dict]:
    """Measure ``candidates`` (``(block_size, num_warps)`` pairs, default :data:`DEFAULT_CANDIDATES`; the
    heuristic's choice is always measured too) for every kernel in ``kernels`` (default: all of
    :func:`tunable_kernels`), every ``(T, n)`` in ``shapes`` (T time steps of n neurons) and every dtype in
    ``dtypes`` on the current CUDA device, and persist each winner (lowest median of
    ``triton.testing.do_bench``) to the cache. Returns the new entries by cache key. Raises ``RuntimeError``
    under the interpreter or without CUDA."""
    shapes = [tuple(s) for s in shapes]
    dtypes = list(dtypes)
    for s in shapes:
        if len(s) != 2:
            raise ValueError(f"shapes must be (T, n) pairs, got {s!r}")
        check_positive_int("T", s[0])
        check_positive_int("n", s[1])
    if not shapes:
        raise ValueError("shapes must not be empty")
    if not dtypes:
        raise ValueError("dtypes must not be empty")
    for d in dtypes:
        check_dtype(d)
    cands = [LaunchConfig(b, w) for b, w in (candidates or DEFAULT_CANDIDATES)]
    if not cands:
        raise ValueError("candidates must not be empty")
    path = resolve_cache_path(cache_path)
    if path is None:
        raise ValueError(f"tune: the cache is disabled ({CACHE_ENV}=off); pass cache_path")
    device = _require_gpu_for_tuning()
    known = _kernels()
    names = list(kernels) if kernels is not None else sorted(known)
    unknown = [k for k in names if k not in known]
    if unknown:
        raise ValueError(f"kernels: unknown {unknown}; tunable kernels are {sorted(known)}")

    gpu = launch.gpu_name(device.index)
    new: dict[str, dict] = {}
    for name in names:
        for dtype in dtypes:
            for T, n in shapes:
                run = known[name].make_run(T, n, dtype, device)
                default = heuristic(n, T, on_gpu=True, resident=known[name].resident(T), element_size=dtype.itemsize)
                timings = []
                for cfg in dict.fromkeys([*cands, default]):  # the heuristic is always a candidate
                    try:
                        ms = _measure_ms(lambda: run(cfg.block_size, cfg.num_warps))
                    except Exception as exc:  # a config can exceed the GPU's resources: skip it
                        if verbose:
                            print(f"  {name} {cfg}: failed ({type(exc).__name__}: {exc})", file=sys.stderr)
                        continue
                    if math.isfinite(ms):
                        timings.append((ms, cfg))
                if not timings:
                    raise RuntimeError(f"tune: every candidate failed for {name} T={T} n={n} {dtype}")
                ms, best = min(timings, key=lambda t: t[0])
                default_ms = next((m for m, c in timings if c == default), float("nan"))
                key = launch.cache_key(name, n, T, dtype, gpu)
                new[key] = {"block_size": best.block_size, "num_warps": best.num_warps, "ms": ms,
                            "heuristic_ms": default_ms, "n": n, "T": T}
                _write_entries(path, {key: new[key]})  # each winner at once: an interrupted run keeps them
                if verbose:
                    print(f"{name:24s} {DTYPE_NAMES[dtype]} T={T:<3d} n={n:<9d} best {best.block_size:5d}/"
                          f"{best.num_warps:<2d} {ms:.4f} ms (heuristic {default.block_size}/{default.num_warps}: "
                          f"{default_ms:.4f} ms)")
    return new


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        T, n = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like TxN (e.g. 4x8388608), got {text!r}") from None
    if T < 1 or n < 1:
        raise argparse.ArgumentTypeError(f"shape needs T >= 1 and N >= 1, got {text!r}")
    return T, n


def main(argv: Sequence[str] | None = None) -> int:
    """``revsnn tune``: tune the neuron kernels for some shapes and dtypes and write the cache."""
    p = argparse.ArgumentParser(prog="revsnn tune", description=main.__doc__)
    p.add_argument("--shape", type=_parse_shape, action="append", dest="shapes",
                   help="TxN: T time steps of N neurons (repeatable; default 4x8388608 and 16x4194304)")
    p.add_argument("--dtype", choices=sorted(DTYPES_BY_NAME), action="append", dest="dtypes",
                   help="input dtype (repeatable; default fp32 and bf16)")
    p.add_argument("--kernel", action="append", dest="kernels", help="kernel to tune (repeatable; default all)")
    p.add_argument("--cache", default=None, help=f"cache file (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--list", action="store_true", help="list the tunable kernels and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(tunable_kernels()))
        return 0
    shapes = args.shapes or [(4, 8388608), (16, 4194304)]
    dtypes = [DTYPES_BY_NAME[d] for d in (args.dtypes or ["fp32", "bf16"])]
    try:
        new = tune(shapes, dtypes, kernels=args.kernels, cache_path=args.cache, verbose=True)
    except (RuntimeError, ValueError) as exc:
        print(f"revsnn {exc}", file=sys.stderr)  # the messages start with "tune: "
        return 2
    print(f"wrote {len(new)} entries to {resolve_cache_path(args.cache)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
