"""Static kernel report: what the compiler says about each main kernel configuration, without a GPU.

Every row is one kernel launch exactly as the launchers issue it (real arguments, the launch configuration the
GPU heuristic picks for the benchmark shapes), compiled for a GPU target on this machine with Triton's own
specialization rules, then read from the compiler's output:

- ``regs``, ``local_bytes`` (spills: local memory per thread), ``shared_bytes`` (per program): from the cubin;
- ``loop``: the time loop as compiled: ``loop`` (a runtime-T loop; ``loop xK``: the compiler unrolled K steps
  into one iteration) or ``unrolled`` (T a compile-time constant);
  ``loop_barriers`` / ``loop_shared_ops``: ``BAR`` and ``LDS``/``STS`` instructions in it;
- ``ld_bits`` / ``st_bits``: widths of the global loads and stores in it (128 = one 16-byte vector access);
- ``sass_per_elem_step``: SASS instructions of the loop body (or of the whole unrolled body over T) per
  neuron-step; ``div_per_elem_step``: correctly rounded divisions (``FCHK``) per neuron-step;
- ``ptx_fma`` / ``ptx_div_approx``: fused multiply-adds and approximate divisions in the PTX (the forward must
  have neither, so that it rounds as the reference; the backward's surrogates divide approximately);
- ``occupancy``: theoretical, from registers, shared memory and warps;
- ``bytes_per_elem_step``: the launch's traffic from the op's byte plan; ``issue_share``: the share of the
  GPU's instruction issue (4 warp-instructions per SM per cycle) that streaming those bytes at the target's
  bandwidth would need. Above 100% the kernel cannot reach that bandwidth; the targets ask for <= 50%.

These are compile-time figures, not timings: they say where time will go, not how long anything takes.

Run: ``revsnn bench static [--target sm_90|sm_80] [--out DIR]`` (``python -m revsnn_triton.bench.static``).
Writes ``static.csv``/``.json``/``.md`` and exits with status 1 when a budget is exceeded (``--no-check``: 0).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from revsnn_triton.bench import environment, write_results
from revsnn_triton.ops.neuron.spec import (FORWARD_KERNEL, KINDS, SAVE_MODES, NeuronConfig,
                                           backward_traffic, forward_traffic)


@dataclass(frozen=True)
class Target:
    """A GPU the report compiles for and the figures its estimates assume (stated in the report)."""
    name: str
    capability: int
    card: str
    sms: int
    clock_hz: float  # sustained SM clock under load
    bandwidth: float  # bytes/s read + written (device-to-device copy)
    bandwidth_source: str
    regs_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    shared_per_sm: int = 228 * 1024
    shared_reserved: int = 1024  # per program


TARGETS = {
    "sm_90": Target("sm_90", 90, "H100 SXM", 132, 1.755e9, 3.0e12, "copy bandwidth measured on one H100 80GB HBM3"),
    "sm_80": Target("sm_80", 80, "A100 SXM 80GB", 108, 1.41e9, 1.7e12,
                    "assumed: about 85% of the A100 80GB's 2.04 TB/s peak, not measured", shared_per_sm=164 * 1024),
}

# The benchmark shapes: T=4 with 8.39M neurons per step, T=16 with 4.19M.
SHAPES = ((4, 64 * 128 * 32 * 32), (16, 32 * 128 * 32 * 32))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
COUPLING_ELEMENTS = 64 * 128 * 32 * 32

# The benchmark's neuron per kind: tau=2 (LIF; PLIF from w), hard reset to 0, detach_reset, ATan(alpha=2).
NEURONS = {kind: NeuronConfig(kind=kind, tau=2.0 if kind == "lif" else 1.0, decay_input=True, v_threshold=1.0,
                              hard_reset=True, v_reset=0.0, detach_reset=True, surrogate="atan", alpha=2.0)
           for kind in KINDS}

# Budgets on the target (sm_90) for the benchmark shapes.
MAX_ISSUE_SHARE = 0.50
MAX_FORWARD_REGS = 40  # the T=4 fp32 forward of the benchmark's LIF

COLUMNS = ["kernel", "kind", "dtype", "save", "T", "neurons", "block", "warps", "regs", "local_bytes",
           "shared_bytes", "loop", "loop_barriers", "loop_shared_ops", "ld_bits", "st_bits", "sass_per_elem_step",
           "div_per_elem_step", "ptx_fma", "ptx_div_approx", "occupancy", "bytes_per_elem_step", "issue_share",
           "compile_s"]


@dataclass(frozen=True)
class Case:
    """One main configuration: a neuron kind, input dtype, save mode and benchmark shape."""
    kind: str
    dtype: torch.dtype
    save: str
    T: int
    n: int


def main_cases(kinds: Iterable[str] = KINDS, dtypes: Iterable[str] = ("fp32", "bf16"),
               saves: Iterable[str] = SAVE_MODES, shapes: Iterable[tuple[int, int]] = SHAPES) -> list[Case]:
    return [Case(k, DTYPES[d], s, T, n) for k in kinds for d in dtypes for s in saves for T, n in shapes]


# ----------------------------------------------------------------------------------------- launches

def neuron_launches(case: Case):
    """The launches of the benchmark's call (no v_init, v_final unused, only the spikes' gradient flows), with
    the byte plan of each and the element sizes of the tensors it stores every step:
    ``[(launch, traffic, step_stores)]``, forward first."""
    from revsnn_triton.kernels import neurons as K
    cfg = NEURONS[case.kind]
    x = torch.empty(case.T, case.n, dtype=case.dtype, device="meta")
    q = torch.empty(1, device="meta") if case.kind == "plif" else None
    with K.record_launches() as launches:
        _, _, saved = K.neuron_forward(x, None, q, cfg, case.save, store_v_final=False)
        K.neuron_backward(torch.empty_like(x), None, saved, x, None, q, cfg, case.save, need_grad_v_init=False)
    fwd = forward_traffic(case.save, cfg, case.T, case.n, case.dtype, store_v_final=False)
    bwd = backward_traffic(case.save, cfg, case.T, case.n, case.dtype)
    b = case.dtype.itemsize
    if len(launches) == 2:
        return [(launches[0], fwd, (b,) + ((saved.element_size(),) if saved is not None else ())),
                (launches[1], bwd, (b,))]
    raise AssertionError(f"expected a forward and a backward launch for {case}, got {[l.name for l in launches]}")


class _LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is recorded, not run."""

    def __init__(self, kernel, name: str, into: list):
        self.kernel, self.name, self.into = kernel, name, into

    def __getitem__(self, grid):
        from revsnn_triton.kernels.neurons import Launch

        def record(*args, **kwargs):
            self.into.append(Launch(self.kernel, grid, args, kwargs, self.name))
        return record


def coupling_launches(n: int = COUPLING_ELEMENTS):
    """The coupling ops' passes as the reversible engine issues them, 16 fractional bits: ``encode`` (float input ->
    int32 stream, with flags), ``couple`` (the forward step on an int32 stream, ``s += q(f)`` in place, with flags),
    ``uncouple`` (the backward step on a float32 stream, ``s -= q(f)`` in place). Bytes: every tensor the pass reads
    or writes, once."""
    from revsnn_triton.kernels import coupling as kc
    from revsnn_triton.ops.coupling.op import coupling_heuristic
    cfg = coupling_heuristic(n)
    f32 = lambda: torch.empty(n, device="meta")  # noqa: E731
    i32 = lambda: torch.empty(n, dtype=torch.int32, device="meta")  # noqa: E731
    flags = lambda: torch.empty(3, dtype=torch.int32, device="meta")  # noqa: E731
    passes = {
        "coupling:encode": ("encode", dict(s=i32(), f=f32(), flags=flags()), 4 + 4),
        "coupling:couple": ("couple", dict(s=i32(), f=f32(), flags=flags()), 3 * 4),
        "coupling:uncouple": ("uncouple", dict(s=f32(), f=f32()), 3 * 4),
    }
    out = []
    for name, (op, tensors, nbytes) in passes.items():
        recorded: list = []
        with _patched(kc, "coupling_kernel", _LaunchRecorder(kc.coupling_kernel, name, recorded)):
            kc.coupling(op, **tensors, frac_bits=16, block_size=cfg.block_size, num_warps=cfg.num_warps)
        out.append((recorded[0], nbytes))
    return out


@contextlib.contextmanager
def _patched(module, name: str, value):
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


# --------------------------------------------------------------------------------------- compilation

def compile_launch(launch, target: Target):
    """Compile a recorded launch for ``target`` as Triton's JIT would specialize it (pointer alignment 16,
    integer specializations), without a driver. Returns the compiled kernel (``asm`` holds ptx and cubin)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    gpu = GPUTarget("cuda", target.capability, 32)
    backend = make_backend(gpu)
    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def _tool(name: str) -> str:
    import triton.backends.nvidia
    return os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", name)


def _cubin_facts(cubin: bytes) -> tuple[int, int, list[tuple[int, str]]]:
    """``(registers, local bytes, SASS instructions [(address, text)])`` of a one-kernel cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    instructions = [(int(a, 16), text.strip()) for a, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    return regs, local, instructions


def _mnemonic(text: str) -> str:
    parts = text.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def _body(instructions: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The kernel's main path, without NOPs: up to the end-of-kernel self-branch or the first return, after
    which come subroutines (the out-of-line slow path of a correctly rounded division)."""
    body = []
    for addr, text in instructions:
        op = _mnemonic(text)
        if op.startswith("RET") or (op == "BRA" and _target(text) == addr):
            break
        if op != "NOP":
            body.append((addr, text))
    return body


def _target(text: str) -> int | None:
    m = re.search(r"\bBRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def _loop(body: list[tuple[int, str]]) -> list[tuple[int, str]] | None:
    """The largest region closed by a backward branch (the time loop), or None when there is none."""
    best = None
    for addr, text in body:
        if _mnemonic(text) == "BRA":
            target = _target(text)
            if target is not None and target < addr and (best is None or addr - target > best[1] - best[0]):
                best = (target, addr)
    if best is None:
        return None
    return [(a, t) for a, t in body if best[0] <= a <= best[1]]


def _widths(region: list[tuple[int, str]], op: str) -> str:
    """Bit widths of the global loads (``LDG``) or stores (``STG``) in ``region``, e.g. ``"128"``, ``"64,128"``."""
    widths = set()
    for _, text in region:
        name = _mnemonic(text)
        if not name.startswith(op):
            continue
        tokens = name.split(".")[1:]
        width = 32
        for token, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
            if token in tokens:
                width = bits
        widths.add(width)
    return ",".join(str(w) for w in sorted(widths))


def occupancy(regs: int, shared: int, warps: int, target: Target) -> float:
    """Theoretical occupancy (resident warps / the SM's maximum), as CUDA's occupancy calculator computes it:
    registers allocated in units of 256 per warp, shared memory plus a reserved 1 KB per program."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (target.regs_per_sm // per_warp) // warps
    by_shared = target.shared_per_sm // (shared + target.shared_reserved) if shared else target.max_blocks
    by_warps = target.max_warps // warps
    blocks = min(by_regs, by_shared, by_warps, target.max_blocks)
    return blocks * warps / target.max_warps


def issue_share(sass_per_elem_step: float, bytes_per_elem_step: float, target: Target) -> float:
    """The share of the GPU's issue slots (4 warp-instructions per SM per cycle) needed to stream
    ``bytes_per_elem_step`` at the target's bandwidth with ``sass_per_elem_step`` thread instructions."""
    elem_steps_per_s = target.bandwidth / bytes_per_elem_step
    needed = elem_steps_per_s * sass_per_elem_step / 32
    return needed / (target.sms * 4 * target.clock_hz)


def analyse(launch, target: Target, steps: int, nbytes_per_elem_step: float, cache: dict,
            step_stores: Sequence[int] = ()) -> dict:
    """Compile ``launch`` (or reuse an identical compilation) and derive the report's figures. ``step_stores``:
    element sizes of the tensors the time loop stores each step; a loop body holding k times their stores was
    unrolled k times by the compiler."""
    key = (launch.kernel.__name__, tuple(map(_arg_key, launch.args)),
           tuple(sorted((k, _arg_key(v)) for k, v in launch.kwargs.items())))
    if key not in cache:
        t0 = time.perf_counter()
        compiled = compile_launch(launch, target)
        seconds = time.perf_counter() - t0
        regs, local, instructions = _cubin_facts(compiled.asm["cubin"])
        ptx = compiled.asm["ptx"]
        ptx_counts = (len(re.findall(r"\bfma\.", ptx)), len(re.findall(r"\bdiv\.(?:approx|full)", ptx)))
        cache[key] = (compiled.metadata.shared, regs, local, instructions, ptx_counts, seconds)
    shared, regs, local, instructions, (fma, div_approx), seconds = cache[key]
    warps = launch.kwargs["num_warps"]
    block = launch.kwargs.get("BLOCK", launch.kwargs.get("BLOCK_SIZE"))
    per_thread = max(1, block // (32 * warps))
    body = _body(instructions)
    loop = _loop(body)
    region = loop if loop is not None else body
    unrolled = 1
    if loop is not None and step_stores:
        per_step = sum(math.ceil(per_thread * size / 16) for size in step_stores)
        unrolled = max(1, sum(_mnemonic(t).startswith("STG") for _, t in loop) // per_step)
    work = per_thread * (unrolled if loop is not None else steps)
    sass = len(region) / work
    return dict(
        block=block, warps=warps, regs=regs, local_bytes=local, shared_bytes=shared,
        loop="unrolled" if loop is None else "loop" if unrolled == 1 else f"loop x{unrolled}",
        loop_barriers=sum(_mnemonic(t).startswith("BAR") for _, t in region),
        loop_shared_ops=sum(_mnemonic(t).startswith(("LDS", "STS")) for _, t in region),
        ld_bits=_widths(region, "LDG"), st_bits=_widths(region, "STG"),
        sass_per_elem_step=sass, div_per_elem_step=sum(_mnemonic(t).startswith("FCHK") for _, t in region) / work,
        ptx_fma=fma, ptx_div_approx=div_approx, occupancy=occupancy(regs, shared, warps, target), bytes_per_elem_step=nbytes_per_elem_step,
        issue_share=issue_share(sass, nbytes_per_elem_step, target), compile_s=seconds)


def _arg_key(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    if isinstance(value, int) and not isinstance(value, bool):  # what Triton specializes an int on
        return ("int", value == 1, value % 16 == 0, value >= 2**31)
    return value


def report(target: Target, cases: Sequence[Case], coupling: bool = True) -> list[dict]:
    """One row per kernel launch of every case (and of the coupling passes)."""
    cache: dict = {}
    rows = []
    for case in cases:
        for launch, traffic, step_stores in neuron_launches(case):
            row = dict(kernel=launch.name, kind=case.kind, dtype=DTYPE_NAMES[case.dtype], save=case.save, T=case.T,
                       neurons=case.n)
            row |= analyse(launch, target, case.T, traffic.total / (case.T * case.n), cache, step_stores)
            rows.append(row)
    if coupling:
        for launch, nbytes in coupling_launches():
            row = dict(kernel=launch.name, dtype="fp32", T=1, neurons=COUPLING_ELEMENTS)
            rows.append(row | analyse(launch, target, 1, nbytes, cache))
    return rows


def budget_violations(rows: Iterable[dict]) -> list[str]:
    """What exceeds the budgets: shared memory or barriers in a neuron kernel's time loop, spills, a fused
    multiply-add in a neuron kernel or an approximate division in a forward, more than :data:`MAX_FORWARD_REGS`
    registers in the T=4 fp32 forward of LIF, more than :data:`MAX_ISSUE_SHARE` of the issue capacity."""
    bad = []
    for r in rows:
        what = f"{r['kernel']} {r.get('kind') or ''} {r['dtype']} save={r.get('save') or '-'} T={r['T']}"
        if r["kernel"].startswith("neuron") and (r["loop_barriers"] or r["loop_shared_ops"]):
            bad.append(f"{what}: {r['loop_barriers']} barriers and {r['loop_shared_ops']} shared-memory accesses "
                       f"in the time loop")
        if r["local_bytes"]:
            bad.append(f"{what}: {r['local_bytes']} bytes of local memory (spills)")
        if r["kernel"].startswith("neuron") and (r["ptx_fma"] or (r["kernel"] == FORWARD_KERNEL
                                                                  and r["ptx_div_approx"])):
            bad.append(f"{what}: {r['ptx_fma']} fused multiply-adds, {r['ptx_div_approx']} approximate divisions "
                       f"(the forward must round as the reference)")
        if (r["kernel"] == FORWARD_KERNEL and r.get("kind") == "lif" and r["dtype"] == "fp32" and r["T"] == 4
                and r["regs"] > MAX_FORWARD_REGS):
            bad.append(f"{what}: {r['regs']} registers > {MAX_FORWARD_REGS}")
        if r["issue_share"] > MAX_ISSUE_SHARE:
            bad.append(f"{what}: needs {r['issue_share']:.0%} of the issue capacity (budget {MAX_ISSUE_SHARE:.0%})")
    return bad


def _notes(target: Target, seconds: float, violations: list[str]) -> str:
    lines = [
        f"Compile-time figures for {target.name} ({target.card}), not timings: nothing ran on a GPU. Each row is "
        f"one launch as the launchers issue it for the benchmark's call (LIF tau=2 / IF / PLIF, hard reset, "
        f"detach_reset, ATan; no v_init, v_final unused), with the configuration the GPU heuristic picks; "
        f"the coupling passes are fp32 with 16 fractional bits. Compiled in {seconds:.0f} s.",
        "",
        f"`issue_share` assumes {target.sms} SMs x 4 warp-instructions per cycle at {target.clock_hz / 1e9:.3f} GHz "
        f"and {target.bandwidth / 1e12:.2f} TB/s ({target.bandwidth_source}); `bytes_per_elem_step` is the "
        f"launch's byte plan (`revsnn_triton.ops.neuron.spec`). `sass_per_elem_step` counts the SASS instructions "
        f"of the time loop per neuron-step (`loop`), or of the whole main path over T steps (`unrolled`); the "
        f"out-of-line slow path of divisions is not counted. `div_per_elem_step` counts `FCHK` (one per correctly "
        f"rounded division).",
        "",
        f"Budgets (sm_90): no shared memory or barriers in a neuron kernel's time loop, no spills, LIF T=4 fp32 "
        f"forward <= {MAX_FORWARD_REGS} registers, every row <= {MAX_ISSUE_SHARE:.0%} of the issue capacity.",
    ]
    if target.name == "sm_90":
        lines += ["", f"Budget check: {'all rows within budget' if not violations else 'EXCEEDED:'}"]
        lines += [f"- {v}" for v in violations]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="revsnn bench static", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=sorted(TARGETS), default="sm_90", help="GPU target (default sm_90)")
    p.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.add_argument("--stem", default="static", help="file name stem of the results (default static)")
    p.add_argument("--kind", action="append", dest="kinds", choices=KINDS, help="neuron kind (repeatable)")
    p.add_argument("--dtype", action="append", dest="dtypes", choices=sorted(DTYPES),
                   help="input dtype (repeatable; default fp32 and bf16)")
    p.add_argument("--save", action="append", dest="saves", choices=SAVE_MODES, help="save mode (repeatable)")
    p.add_argument("--no-coupling", action="store_true", help="leave out the coupling kernels")
    p.add_argument("--no-check", action="store_true", help="exit 0 even when a budget is exceeded")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The kernels were (or would be) built for the interpreter: compile in a fresh process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "revsnn_triton.bench.static", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    target = TARGETS[args.target]
    cases = main_cases(args.kinds or KINDS, args.dtypes or ("fp32", "bf16"), args.saves or SAVE_MODES)
    t0 = time.perf_counter()
    try:
        rows = report(target, cases, coupling=not args.no_coupling)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"revsnn bench static: could not compile for {target.name}: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    violations = budget_violations(rows) if target.name == "sm_90" else []
    title = f"Static kernel report for {target.name} ({target.card}): compile-time figures, not timings"
    env = environment()
    env["device"] = f"no GPU: compiled on this machine for {target.name}"
    paths = write_results(rows, args.out, args.stem, title, columns=COLUMNS, env=env,
                          notes=_notes(target, seconds, violations))
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if violations and not args.no_check:
        print(f"revsnn bench static: {len(violations)} budget(s) exceeded", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
