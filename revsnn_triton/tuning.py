"""Launch configurations for the Triton kernels: a heuristic default, overridden by a tuned cache.

The op layer asks :func:`launch_config` for every launch; it must stay cheap, so the cache file is read
once per path and kept in memory. :func:`tune` (and the ``revsnn tune`` command, :func:`main`) measures
candidate configurations on a GPU with ``triton.testing.do_bench`` and writes the winners to a JSON file.

A configuration only changes speed, never results: every kernel reduces in an order that does not
depend on ``block_size`` or ``num_warps`` (tested in ``tests/test_tuning.py``).

Cache file: JSON ``{"format": 1, "entries": {key: entry}}`` where ``key`` is
``"<gpu name>|triton-<version>|<kernel>|<dtype>|n<bucket>|T<bucket>"`` (buckets: the next power of two
of the neuron count ``n`` per time step and of ``T``) and ``entry`` holds ``block_size``, ``num_warps``,
the measured ``ms`` and the ``n``/``T`` it was measured at. Location: the ``cache_path`` argument, else
the environment variable ``REVSNN_TUNE_CACHE`` (``off`` disables the cache), else
``~/.cache/revsnn_triton/tune.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from revsnn_triton.fileio import atomic_write_text
from revsnn_triton.runtime import interpreter_enabled

CACHE_FORMAT = 1
CACHE_ENV = "REVSNN_TUNE_CACHE"
DEFAULT_CACHE = Path("~/.cache/revsnn_triton/tune.json")

# Block used for every kernel under Triton's interpreter: small, so that the tests' shapes of a few
# hundred neurons span several programs and exercise the masked tail.
INTERPRETER_BLOCK = 128

# Candidates tried by `tune` unless given: block sizes x warps, all powers of two.
DEFAULT_CANDIDATES: tuple[tuple[int, int], ...] = tuple(
    (b, w) for b in (256, 512, 1024, 2048, 4096) for w in (2, 4, 8))

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()} | {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LaunchConfig:
    """Launch parameters of an elementwise-over-neurons kernel: ``block_size`` neurons per program
    (a power of two), ``num_warps`` warps per program (a power of two, 1..32)."""
    block_size: int
    num_warps: int

    def __post_init__(self) -> None:
        _check_pow2("block_size", self.block_size, 16, 1 << 16)
        _check_pow2("num_warps", self.num_warps, 1, 32)


def _check_pow2(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not (lo <= value <= hi) or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [{lo}, {hi}], got {value}")


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_dtype(dtype: object) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"dtype must be one of {list(_DTYPE_NAMES)}, got {dtype!r}")
    return _DTYPE_NAMES[dtype]  # type: ignore[index]


def _check_kernel(kernel: object) -> str:
    if not isinstance(kernel, str) or not kernel or "|" in kernel:
        raise ValueError(f"kernel must be a non-empty name without '|', got {kernel!r}")
    return kernel


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def bucket(n: int, T: int) -> tuple[int, int]:
    """The cache bucket of a launch: next powers of two of ``n`` (neurons per time step) and ``T``."""
    return _next_pow2(n), _next_pow2(T)


# Kernels that keep all T steps of each of their neurons in registers (the fused save="input" backward
# holds H[0..T-1]): their heuristic bounds the neurons per thread so that T of them fit.
REGISTER_RESIDENT_KERNELS = ("neuron_backward_recompute",)
# Bound on (neurons per thread) x T for those kernels. Measured with ptxas for sm_90 (LIF, ATan, fp32): 16
# gives about 55-80 registers per thread (no spills, at least half occupancy); 32 about 85-150; 64 spills.
MAX_RESIDENT_VALUES = 16


def heuristic(n: int, T: int, on_gpu: bool, kernel: str | None = None) -> LaunchConfig:
    """Default configuration. On a GPU: 1024 neurons and 4 warps per program for large ``n``, halved
    while fewer than 512 programs would be launched (so that small layers still fill the SMs), down to
    128 neurons and 1 warp. For a kernel of :data:`REGISTER_RESIDENT_KERNELS` (registers grow with T),
    the warps are then doubled (up to 8) and after that the block halved (down to 128) while a thread
    would hold more than :data:`MAX_RESIDENT_VALUES` values (``T`` per neuron): a smaller block for a
    larger T. Under the interpreter: :data:`INTERPRETER_BLOCK`, 1 warp."""
    if not on_gpu:
        return LaunchConfig(INTERPRETER_BLOCK, 1)
    block = 1024
    while block > 128 and n < 512 * block:
        block //= 2
    warps = {1024: 4, 512: 4, 256: 2, 128: 1}[block]
    if kernel in REGISTER_RESIDENT_KERNELS:
        per_thread = max(1, MAX_RESIDENT_VALUES // T)
        while block // (32 * warps) > per_thread:
            if warps < 8:
                warps *= 2
            elif block > 128:
                block //= 2
            else:
                break
    return LaunchConfig(block, warps)


# --------------------------------------------------------------------------------------------- cache

def resolve_cache_path(path: str | os.PathLike | None = None) -> Path | None:
    """Where the cache lives: ``path``, else ``$REVSNN_TUNE_CACHE`` (``off`` -> no cache), else the
    default under ``~/.cache``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        if env.strip().lower() in ("", "off", "none", "0"):
            return None
        return Path(env).expanduser()
    return DEFAULT_CACHE.expanduser()


_loaded: dict[Path, dict[str, dict]] = {}


def clear_memory_cache() -> None:
    """Forget cache files read and answers given so far: the next launch reads ``$REVSNN_TUNE_CACHE`` and
    the cache file again."""
    _loaded.clear()
    _gpu_names.clear()
    _answers.clear()


def _read_entries(path: Path) -> dict[str, dict]:
    """Valid entries of the cache at ``path``; a missing file gives none, a corrupt one a warning."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        warnings.warn(f"revsnn_triton tuning cache {path} unreadable ({exc}); using heuristic configs",
                      RuntimeWarning, stacklevel=3)
        return {}
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"expected a JSON object with format {CACHE_FORMAT}")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not an object")
        good = {}
        for key, entry in entries.items():
            LaunchConfig(entry["block_size"], entry["num_warps"])  # validates
            good[key] = entry
        return good
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"revsnn_triton tuning cache {path} is corrupt ({exc}); using heuristic configs. "
                      f"Delete it or run `revsnn tune` again.", RuntimeWarning, stacklevel=3)
        return {}


def _entries(path: Path) -> dict[str, dict]:
    if path not in _loaded:
        _answers.clear()
        _loaded[path] = _read_entries(path)
    return _loaded[path]


_gpu_names: dict[int, str] = {}


def _gpu_name(index: int) -> str:
    if index not in _gpu_names:
        _gpu_names[index] = torch.cuda.get_device_name(index)
    return _gpu_names[index]


def _triton_version() -> str:
    import triton
    return triton.__version__


def cache_key(kernel: str, n: int, T: int, dtype: torch.dtype, gpu_name: str) -> str:
    nb, tb = bucket(n, T)
    return f"{gpu_name}|triton-{_triton_version()}|{kernel}|{_DTYPE_NAMES[dtype]}|n{nb}|T{tb}"


def launch_config(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device | str, *,
                  cache_file: str | os.PathLike | None = None) -> LaunchConfig:
    """Launch configuration for ``kernel`` over ``n`` neurons per time step and ``T`` steps of input
    ``dtype`` on ``device``: the tuned cache entry of this GPU, Triton version and (n, T) bucket when
    one exists, else :func:`heuristic`. Under the interpreter (CPU tensors) always the fixed small
    interpreter block. ``cache_file`` overrides the cache location (see :func:`resolve_cache_path`).
    Never fails because of the cache file (missing: heuristic; corrupt: a warning once, then heuristic)."""
    return lookup_config(kernel, n, T, dtype, device, cache_file=cache_file)[0]


def lookup_config(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device | str, *,
                  cache_file: str | os.PathLike | None = None) -> tuple[LaunchConfig, str]:
    """:func:`launch_config` and where it came from: ``"tuned"``, ``"heuristic"`` or ``"interpreter"``."""
    _check_kernel(kernel)
    _check_positive_int("n", n)
    _check_positive_int("T", T)
    _check_dtype(dtype)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    # Called for every launch: answers are memoized (cleared whenever a cache file is read or written, and
    # by clear_memory_cache(): a change of $REVSNN_TUNE_CACHE after the first launch needs that call).
    memo_key = (kernel, n, T, dtype, device, cache_file)
    found = _answers.get(memo_key)
    if found is None:
        found = _answers[memo_key] = _lookup(kernel, n, T, dtype, device, cache_file)
    return found


_answers: dict[tuple, tuple[LaunchConfig, str]] = {}


def _lookup(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device,
            cache_file: str | os.PathLike | None) -> tuple[LaunchConfig, str]:
    if device.type != "cuda":
        return heuristic(n, T, on_gpu=False, kernel=kernel), "interpreter"
    path = resolve_cache_path(cache_file)
    if path is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        entry = _entries(path).get(cache_key(kernel, n, T, dtype, _gpu_name(index)))
        if entry is not None:
            return LaunchConfig(entry["block_size"], entry["num_warps"]), "tuned"
    return heuristic(n, T, on_gpu=True, kernel=kernel), "heuristic"


def _write_entries(path: Path, new: dict[str, dict]) -> None:
    """Merge ``new`` into the cache file atomically (temp file in the same folder + ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _loaded.pop(path, None)
    entries = dict(_entries(path))
    entries.update(new)
    atomic_write_text(path, json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1, sort_keys=True) + "\n")
    _loaded[path] = entries
    _answers.clear()


# -------------------------------------------------------------------------------------------- tuning

# Kernel name -> factory(T, n, dtype, device) -> run(block_size, num_warps) that launches the kernel
# once on preallocated inputs. Filled lazily from `revsnn_triton.kernels.neurons` (see `_benchmarks`).
Bench = Callable[[int, int, torch.dtype, torch.device], Callable[[int, int], object]]


def _benchmarks() -> dict[str, Bench]:
    from revsnn_triton.bench.neurons import tuning_benchmarks
    return tuning_benchmarks()


def _measure_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``: CUDA events, L2 flushed per repetition)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def tunable_kernels() -> list[str]:
    """Names of the kernels :func:`tune` can measure (the names the op layer passes to
    :func:`launch_config`)."""
    return sorted(_benchmarks())


def _require_gpu_for_tuning() -> torch.device:
    if interpreter_enabled():
        raise RuntimeError("tune: refusing to tune under Triton's interpreter (TRITON_INTERPRET=1): "
                           "timings there say nothing about a GPU. Run it on a CUDA machine.")
    if not torch.cuda.is_available():
        raise RuntimeError("tune: no CUDA device available; tuning measures kernels on a GPU.")
    return torch.device("cuda", torch.cuda.current_device())


def tune(shapes: Iterable[tuple[int, int]], dtypes: Iterable[torch.dtype], kernels: Sequence[str] | None = None,
         cache_path: str | os.PathLike | None = None,
         candidates: Sequence[tuple[int, int]] | None = None, verbose: bool = False) -> dict[str, dict]:
    """Measure ``candidates`` (``(block_size, num_warps)`` pairs, default :data:`DEFAULT_CANDIDATES`;
    the :func:`heuristic` choice is always measured too)
    for every kernel in ``kernels`` (default: all of :func:`tunable_kernels`), every ``(T, n)`` in
    ``shapes`` (T time steps of n neurons) and every dtype in ``dtypes`` on the current CUDA device,
    and persist each winner (lowest median of ``triton.testing.do_bench``) to the cache. Returns the
    new entries by cache key. Raises ``RuntimeError`` under the interpreter or without CUDA."""
    shapes = [tuple(s) for s in shapes]
    dtypes = list(dtypes)
    for s in shapes:
        if len(s) != 2:
            raise ValueError(f"shapes must be (T, n) pairs, got {s!r}")
        _check_positive_int("T", s[0])
        _check_positive_int("n", s[1])
    if not shapes:
        raise ValueError("shapes must not be empty")
    if not dtypes:
        raise ValueError("dtypes must not be empty")
    for d in dtypes:
        _check_dtype(d)
    cands = [LaunchConfig(b, w) for b, w in (candidates or DEFAULT_CANDIDATES)]
    if not cands:
        raise ValueError("candidates must not be empty")
    path = resolve_cache_path(cache_path)
    if path is None:
        raise ValueError(f"tune: the cache is disabled ({CACHE_ENV}=off); pass cache_path")
    device = _require_gpu_for_tuning()
    benches = _benchmarks()
    names = list(kernels) if kernels is not None else sorted(benches)
    unknown = [k for k in names if k not in benches]
    if unknown:
        raise ValueError(f"kernels: unknown {unknown}; tunable kernels are {sorted(benches)}")

    gpu = _gpu_name(device.index)
    new: dict[str, dict] = {}
    for name in names:
        for dtype in dtypes:
            for T, n in shapes:
                run = benches[name](T, n, dtype, device)
                default = heuristic(n, T, on_gpu=True, kernel=name)
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
                key = cache_key(name, n, T, dtype, gpu)
                new[key] = {"block_size": best.block_size, "num_warps": best.num_warps, "ms": ms,
                            "heuristic_ms": default_ms, "n": n, "T": T}
                _write_entries(path, {key: new[key]})  # each winner at once: an interrupted run keeps them
                if verbose:
                    print(f"{name:24s} {_DTYPE_NAMES[dtype]} T={T:<3d} n={n:<9d} best {best.block_size:5d}/"
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
    p.add_argument("--dtype", choices=sorted(_DTYPES_BY_NAME), action="append", dest="dtypes",
                   help="input dtype (repeatable; default fp32 and bf16)")
    p.add_argument("--kernel", action="append", dest="kernels", help="kernel to tune (repeatable; default all)")
    p.add_argument("--cache", default=None, help=f"cache file (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    p.add_argument("--list", action="store_true", help="list the tunable kernels and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(tunable_kernels()))
        return 0
    shapes = args.shapes or [(4, 8388608), (16, 4194304)]
    dtypes = [_DTYPES_BY_NAME[d] for d in (args.dtypes or ["fp32", "bf16"])]
    try:
        new = tune(shapes, dtypes, kernels=args.kernels, cache_path=args.cache, verbose=True)
    except (RuntimeError, ValueError) as exc:
        print(f"revsnn {exc}", file=sys.stderr)  # the messages start with "tune: "
        return 2
    print(f"wrote {len(new)} entries to {resolve_cache_path(args.cache)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
