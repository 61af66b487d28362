"""Launch configurations of the Triton kernels: one heuristic, overridden by a tuned cache. A leaf module:
it imports torch and the standard library only, so that the kernel files may import it.

Every launcher asks :func:`launch_config` for its ``block_size`` and ``num_warps``; it must stay cheap, so the
cache file is read once per path and answers are memoized. ``revsnn_triton.tuning`` (the ``revsnn tune``
command) measures candidates on a GPU and writes the winners to the cache.

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

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_FORMAT = 1
CACHE_ENV = "REVSNN_TUNE_CACHE"
DEFAULT_CACHE = Path("~/.cache/revsnn_triton/tune.json")

# Block used for every kernel under Triton's interpreter: small, so that the tests' shapes of a few
# hundred neurons span several programs and exercise the masked tail.
INTERPRETER_BLOCK = 128

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


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


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_dtype(dtype: object) -> str:
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"dtype must be one of {list(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[dtype]  # type: ignore[index]


def _check_kernel(kernel: object) -> str:
    if not isinstance(kernel, str) or not kernel or "|" in kernel:
        raise ValueError(f"kernel must be a non-empty name without '|', got {kernel!r}")
    return kernel


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def bucket(n: int, T: int) -> tuple[int, int]:
    """The cache bucket of a launch: next powers of two of ``n`` (neurons per time step) and ``T``."""
    return _next_pow2(n), _next_pow2(T)


# Bound on (neurons per thread) x (values per neuron held in registers) for a kernel that keeps several values
# per neuron live (the fused save="input" backward holds H[0..T-1]). From the static kernel report for sm_90
# (`revsnn bench static`): with that kernel's 64-register cap, 32 fits every kind at T = 4, 16 and 32 without
# spills (fp32 T=16: two neurons per thread, 64-bit accesses; bf16 T=4: eight, 128-bit).
MAX_RESIDENT_VALUES = 32
# Bytes of one vector access (LDG.128 / STG.128): the elements per thread worth holding for full-width accesses.
VECTOR_BYTES = 16


def _floor_pow2(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def heuristic(n: int, T: int, on_gpu: bool, resident: int = 1, element_size: int = 4) -> LaunchConfig:
    """Default configuration. On a GPU: 1024 neurons per program for large ``n``, halved while fewer than 512
    programs would be launched (so that small layers still fill the SMs), down to 128. Each thread gets as many
    neurons as one 16-byte access of the launch's widest tensor (``element_size`` bytes) holds, so that every
    tensor is read and written with one vector access per thread and step and all share one register layout;
    a kernel that holds ``resident > 1`` values per neuron in registers gets at most :data:`MAX_RESIDENT_VALUES`
    values per thread. The warps follow (1 to 8; past 8 the block shrinks, down to 128). Under the
    interpreter: :data:`INTERPRETER_BLOCK`, 1 warp."""
    if not on_gpu:
        return LaunchConfig(INTERPRETER_BLOCK, 1)
    block = 1024
    while block > 128 and n < 512 * block:
        block //= 2
    per_thread = _floor_pow2(VECTOR_BYTES // element_size)
    if resident > 1:
        per_thread = min(per_thread, _floor_pow2(MAX_RESIDENT_VALUES // resident))
    warps = block // (32 * per_thread)
    if warps > 8:
        warps, block = 8, max(128, 256 * per_thread)
    return LaunchConfig(block, max(1, warps))


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


def gpu_name(index: int) -> str:
    """The name of CUDA device ``index`` (part of the cache key), asked once."""
    if index not in _gpu_names:
        _gpu_names[index] = torch.cuda.get_device_name(index)
    return _gpu_names[index]


def _triton_version() -> str:
    import triton
    return triton.__version__


def cache_key(kernel: str, n: int, T: int, dtype: torch.dtype, gpu: str) -> str:
    nb, tb = bucket(n, T)
    return f"{gpu}|triton-{_triton_version()}|{kernel}|{DTYPE_NAMES[dtype]}|n{nb}|T{tb}"


def launch_config(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device | str, *,
                  resident: int = 1, element_size: int | None = None,
                  cache_file: str | os.PathLike | None = None) -> LaunchConfig:
    """Launch configuration for ``kernel`` over ``n`` neurons per time step and ``T`` steps of input
    ``dtype`` on ``device``: the tuned cache entry of this GPU, Triton version and (n, T) bucket when
    one exists, else :func:`heuristic` (``resident``: values per neuron the kernel keeps in registers;
    ``element_size``: bytes of the widest tensor the launch streams, default ``dtype``'s).
    Under the interpreter (CPU tensors) always the fixed small interpreter block. ``cache_file`` overrides
    the cache location (see :func:`resolve_cache_path`). Never fails because of the cache file (missing:
    heuristic; corrupt: a warning once, then heuristic)."""
    return lookup_config(kernel, n, T, dtype, device, resident=resident, element_size=element_size,
                         cache_file=cache_file)[0]


def lookup_config(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device | str, *,
                  resident: int = 1, element_size: int | None = None,
                  cache_file: str | os.PathLike | None = None) -> tuple[LaunchConfig, str]:
    """:func:`launch_config` and where it came from: ``"tuned"``, ``"heuristic"`` or ``"interpreter"``."""
    _check_kernel(kernel)
    check_positive_int("n", n)
    check_positive_int("T", T)
    check_positive_int("resident", resident)
    check_dtype(dtype)
    element_size = dtype.itemsize if element_size is None else check_positive_int("element_size", element_size)
    if not isinstance(device, torch.device):
        device = torch.device(device)
    # Called for every launch: answers are memoized (cleared whenever a cache file is read or written, and
    # by clear_memory_cache(): a change of $REVSNN_TUNE_CACHE after the first launch needs that call).
    memo_key = (kernel, n, T, dtype, device, resident, element_size, cache_file)
    found = _answers.get(memo_key)
    if found is None:
        found = _answers[memo_key] = _lookup(kernel, n, T, dtype, device, resident, element_size, cache_file)
    return found


_answers: dict[tuple, tuple[LaunchConfig, str]] = {}


def _lookup(kernel: str, n: int, T: int, dtype: torch.dtype, device: torch.device, resident: int,
            element_size: int, cache_file: str | os.PathLike | None) -> tuple[LaunchConfig, str]:
    if device.type != "cuda":
        return heuristic(n, T, on_gpu=False), "interpreter"
    path = resolve_cache_path(cache_file)
    if path is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        entry = _entries(path).get(cache_key(kernel, n, T, dtype, gpu_name(index)))
        if entry is not None:
            return LaunchConfig(entry["block_size"], entry["num_warps"]), "tuned"
    return heuristic(n, T, on_gpu=True, resident=resident, element_size=element_size), "heuristic"


def forget(path: Path) -> None:
    """Drop what is remembered of the cache file at ``path`` (after it was written)."""
    _loaded.pop(path, None)
    _answers.clear()


def cached_entries(path: Path) -> dict[str, dict]:
    """The valid entries of the cache file at ``path`` (read once, then remembered)."""
    return _entries(path)




@dataclass(frozen=True)
class TunableKernel:
    """What the tuner needs of a kernel, provided by its kernel file: ``make_run(T, n, dtype, device)``
    prepares inputs and returns ``run(block_size, num_warps)`` that launches the kernel once on them;
    ``resident(T)`` is the ``resident`` argument its launcher passes to :func:`launch_config`."""
    name: str
    make_run: object  # Callable[[int, int, torch.dtype, torch.device], Callable[[int, int], object]]
    resident: object = lambda T: 1  # Callable[[int], int]
