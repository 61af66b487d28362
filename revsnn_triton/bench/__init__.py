"""Shared benchmark utilities: environment record, result files, timing, copy bandwidth.

Every benchmark (``revsnn_triton.bench.<name>``, with ``main(argv=None)``) writes its rows through
:func:`write_results`: ``<stem>.csv`` (one row per measurement, columns fixed by the caller),
``<stem>.json`` (title, environment, columns, rows) and ``<stem>.md`` (the environment line and a
markdown table), so that every figure travels with its card, versions, date and command line.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["Timing", "environment", "write_results", "require_cuda", "time_ms", "copy_bandwidth",
           "format_value", "markdown_table"]


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # absent or broken: record that rather than fail the benchmark
        return None
    return getattr(mod, "__version__", None)


def _git_commit(where: Path | None = None) -> str | None:
    """The short commit of the checkout holding this package (or ``where``), with ``-dirty`` appended when tracked
    files differ from it: a result measured on uncommitted code says so. None outside a git checkout."""
    cwd = where or Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=cwd)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        diff = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=5, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if diff.returncode == 1 else "")


def environment() -> dict:
    """Where and when a result was measured: ``device`` (the GPU's name, or ``"cpu"``), CUDA capability
    and runtime version, torch/triton/spikingjelly/python versions, git commit, UTC date (ISO 8601)
    and the command line."""
    cuda = torch.cuda.is_available()
    env = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "spikingjelly": _spikingjelly_version(),
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "git_commit": _git_commit(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": _command_line(),
    }
    return env


def _command_line() -> str:
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if argv:
        argv[0] = Path(argv[0]).name
    return " ".join(shlex.quote(a) for a in argv)


def _jsonable(value: object) -> object:
    """Strict JSON: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _spikingjelly_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("spikingjelly")
    except PackageNotFoundError:
        return None


def format_value(value: object) -> str:
    """A cell for the markdown table: floats with 4 significant digits, None as an empty cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _environment_line(env: dict) -> str:
    return (f"{env['device']}" + (f" (sm {env['capability']}, CUDA {env['cuda']})" if env.get("capability") else "")
            + f"; torch {env['torch']}, triton {env['triton']}, spikingjelly {env['spikingjelly']}, "
            f"python {env['python']}; commit {env['git_commit']}; {env['date_utc']}")


def write_results(rows: Sequence[dict], out_dir: str | os.PathLike, stem: str, title: str,
                  columns: Sequence[str] | None = None, env: dict | None = None,
                  notes: str | None = None) -> dict[str, Path]:
    """Write ``rows`` (dicts of column -> value) to ``out_dir/<stem>.{csv,json,md}``.

    ``columns`` fixes the schema and its order (default: the keys of the rows in first-seen order);
    a row with a key outside ``columns`` raises ``ValueError``, a missing key is an empty cell.
    Non-finite floats are written as ``nan``/``inf`` in the CSV, ``null`` in the JSON and ``n/a`` in the
    table. ``env`` defaults to :func:`environment`. ``notes`` (markdown) goes under the table.
    Returns the three paths by suffix."""
    if not isinstance(stem, str) or not stem or "/" in stem or os.sep in stem:
        raise ValueError(f"stem must be a plain file name without a suffix, got {stem!r}")
    if not isinstance(rows, Sequence) or not all(isinstance(r, dict) for r in rows):
        raise TypeError("rows must be a sequence of dicts")
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    else:
        columns = list(columns)
        if len(set(columns)) != len(columns):
            raise ValueError(f"columns has duplicates: {columns}")
        for i, r in enumerate(rows):
            extra = [k for k in r if k not in columns]
            if extra:
                raise ValueError(f"rows[{i}] has keys {extra} outside the fixed columns {columns}")
    env = environment() if env is None else env
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: out / f"{stem}.{s}" for s in ("csv", "json", "md")}

    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    with open(paths["json"], "w") as f:
        json.dump(_jsonable({"title": title, "environment": env, "columns": columns, "rows": list(rows)}), f,
                  indent=1, default=str, allow_nan=False)
        f.write("\n")
    md = [f"# {title}", "", f"Measured on {_environment_line(env)}.", "",
          f"Command: `{str(env.get('command', '')).replace(chr(10), ' ')}`", "", markdown_table(rows, columns), ""]
    if notes:
        md += [notes.rstrip(), ""]
    paths["md"].write_text("\n".join(md))
    return paths


def require_cuda(what: str) -> torch.device:
    """The current CUDA device; without one, print a clear message naming ``what`` and exit with
    status 2 (nothing is measured on a CPU: these are GPU benchmarks)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    reason = "torch.cuda.is_available() is False"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        reason += "; TRITON_INTERPRET is set"
    print(f"{what}: needs a CUDA GPU and found none ({reason}). Nothing was measured.", file=sys.stderr)
    raise SystemExit(2)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th/80th percentiles over the repetitions."""
    median: float
    q20: float
    q80: float

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in asdict(self).items()}


def time_ms(fn: Callable[[], object], warmup: int = 25, rep: int = 100,
            grad_to_none: Sequence[torch.Tensor] | None = None) -> Timing:
    """Time ``fn`` on the GPU with ``triton.testing.do_bench`` (CUDA events, L2 flushed before every
    repetition, ``warmup``/``rep`` in milliseconds of run time)."""
    import triton.testing
    med, q20, q80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                            quantiles=[0.5, 0.2, 0.8])
    return Timing(float(med), float(q20), float(q80))


def copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, rep: int = 200) -> tuple[float, Timing]:
    """Device-to-device copy bandwidth in bytes per second, counting bytes read plus bytes written
    (``2 * nbytes`` per copy of an ``nbytes`` buffer of random fp32 data), from the median of
    :func:`time_ms`. Returns ``(bytes_per_second, timing)``."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"copy_bandwidth: device must be a CUDA device, got {device}")
    if not isinstance(nbytes, int) or nbytes < 4 * 1024:
        raise ValueError(f"copy_bandwidth: nbytes must be an int >= 4096, got {nbytes!r}")
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing = time_ms(lambda: dst.copy_(src), rep=rep)
    bandwidth = 2 * src.numel() * 4 / (timing.median * 1e-3)
    del src, dst
    return bandwidth, timing


def parse_case(spec: str) -> tuple[str, dict]:
    """``"NAME"`` or ``"NAME:key=value,key=value"`` (values parsed as Python literals, e.g.
    ``RevSResNet37:recompute_batch=8``) -> ``(name, overrides)``: a zoo model with constructor overrides."""
    import ast

    name, _, rest = spec.partition(":")
    overrides = {}
    items, depth, start = [], 0, 0
    for i, ch in enumerate(rest + ","):  # commas inside brackets belong to a value: widths=(16,32,64)
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(rest[start:i])
            start = i + 1
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"case {spec!r}: expected NAME or NAME:key=value,..., got {item!r}")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"case {spec!r}: {key.strip()}={value.strip()!r} is not a Python literal") from None
    return name, overrides
