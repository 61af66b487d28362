"""Fixed-point coupling: the plain-PyTorch oracle against independent numpy arithmetic, and the Triton
kernel (interpreter on CPU, compiled on a GPU) against the oracle, bit for bit."""
import contextlib
import warnings

import numpy as np
import pytest
import torch
from hypothesis import example, given, strategies as st
from hypothesis.extra import numpy as hnp

from revsnn_triton.ops import coupling as C
from revsnn_triton.ops.coupling import reference as ref
from revsnn_triton.ops.coupling import spec
from revsnn_triton.runtime import cpu_kernels
from revsnn_triton.testing import assert_equal
from revsnn_triton.testing.strategies import INT32_MAX, INT32_MIN, int32_arrays, stream_and_branch
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# The kernel_device fixture as a constant, for Hypothesis tests (function-scoped fixtures are refused there).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def triton_path(device: str):
    """Run the ops' Triton kernels: compiled on a GPU, through the interpreter on CPU."""
    with warnings.catch_warnings():
        # The interpreter evaluates with numpy, which warns on float overflow (f * 2**R -> inf), a case
        # the quantizer defines (saturation).
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        if device == "cpu":
            with cpu_kernels("triton"):
                yield
        else:
            yield


def expected_quantize(f: np.ndarray, frac_bits: int) -> np.ndarray:
    """Independent model of the branch quantizer: exact float64 rint (numpy rounds half to even),
    NaN -> 0, saturation to int32. float64 holds f * 2**R exactly for every float32 f."""
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.rint(f.astype(np.float64) * 2.0 ** frac_bits)
    v = np.where(np.isnan(v), 0.0, v)
    return np.clip(v, INT32_MIN, INT32_MAX).astype(np.int64)


def wrap(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.int64) - INT32_MIN) % 2 ** 32 + INT32_MIN).astype(np.int32)


# ------------------------------------------------------------------------------- oracle vs numpy

@given(stream_and_branch(), st.integers(spec.MIN_FRAC_BITS, spec.MAX_FRAC_BITS))
@example((np.array([INT32_MAX, INT32_MIN, 0, 7], np.int32),
          np.array([2.0 ** -16, -(2.0 ** -16), 0.5 * 2 ** -16, 1.5 * 2 ** -16], np.float32)), 16)
def test_oracle_couple_matches_numpy_and_inverts(data, frac_bits):
    x, f = data
    xt, ft = torch.from_numpy(x), torch.from_numpy(f)
    y = ref.couple(xt, ft, frac_bits)
    assert_equal(y, torch.from_numpy(wrap(x.astype(np.int64) + expected_quantize(f, frac_bits))), "couple")
    assert_equal(ref.uncouple(y, ft, frac_bits), xt, "uncouple(couple(x, f), f)")


def test_round_half_to_even_and_saturation():
    R = 4
    k = np.arange(-40, 40)
    halves = (k + 0.5) / 2 ** R  # exactly half-way between the grid points k and k + 1
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38, 1e-45, -1e-45,
                        2.0 ** 27 - 2.0 ** -4, -(2.0 ** 27)], np.float64)
    f = np.concatenate([halves, special])
    want = np.concatenate([
        np.where(k % 2 == 0, k, k + 1),  # ties go to the even neighbour
        [0, 0, INT32_MAX, INT32_MIN, 0, INT32_MAX, INT32_MIN, 0, 0, INT32_MAX, INT32_MIN]]).astype(np.int32)
    for dtype in (torch.float32, torch.float64):
        got = ref.quantize(torch.from_numpy(f).to(dtype), R)
        assert_equal(got, torch.from_numpy(want), f"quantize {dtype}")
    # wrap-around: one grid step past the top lands at the bottom, and back.
    top = torch.tensor([INT32_MAX], dtype=torch.int32)
    one = torch.tensor([2.0 ** -R])
    assert ref.couple(top, one, R).item() == INT32_MIN
    assert ref.uncouple(ref.couple(top, one, R), one, R).item() == INT32_MAX


# ----------------------------------------------------------------------------- Triton vs oracle

@given(stream_and_branch(), st.integers(spec.MIN_FRAC_BITS, spec.MAX_FRAC_BITS), st.sampled_from(FLOAT_DTYPES))
@example((np.array([1, -1, INT32_MAX, INT32_MIN, 0, 5], np.int32),
          np.array([np.float32(1e-45), -0.0, 3e38, -3e38, 0.5 / 65536, 2.5 / 65536], np.float32)),
         16, torch.float32)
def test_triton_couple_equals_oracle_and_inverts(data, frac_bits, dtype):
    x, f = data
    xt = torch.from_numpy(x).to(DEVICE)
    ft = torch.from_numpy(f).to(dtype).to(DEVICE)
    want_y = ref.couple(xt.cpu(), ft.cpu(), frac_bits)
    with triton_path(DEVICE):
        y = C.couple(xt, ft, frac_bits)
        back = C.uncouple(y, ft, frac_bits)
        flags = C.coupling_flags(xt, ft, frac_bits)
    assert_equal(y.cpu(), want_y, "couple (triton vs oracle)")
    assert_equal(back.cpu(), xt.cpu(), "uncouple(couple(x, f), f) (triton)")
    assert_equal(flags.cpu(), ref.coupling_flags(xt.cpu(), ft.cpu(), frac_bits), "coupling flags (triton vs oracle)")


def test_triton_quantizer_non_finite_and_extremes(kernel_device):
    f = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 3e38, -3e38, 1e-45,
                      2.0 ** 31, -(2.0 ** 31), 2.0 ** 31 - 128, 0.5, 1.5, 2.5, -2.5], dtype=torch.float64)
    x = torch.zeros(f.shape, dtype=torch.int32)
    for dtype in FLOAT_DTYPES:
        fd = f.to(dtype)
        want = torch.from_numpy(wrap(expected_quantize(fd.double().numpy(), 1)))
        with triton_path(kernel_device):
            got = C.couple(x.to(kernel_device), fd.to(kernel_device), 1)
        assert_equal(got.cpu(), want, f"quantize extremes {dtype}")
    # float64 path: 2**31 - 1 is representable and must not saturate early.
    f64 = torch.tensor([(2.0 ** 31 - 1) / 2, -(2.0 ** 31) / 2], dtype=torch.float64)
    with triton_path(kernel_device):
        got = C.couple(torch.zeros(2, dtype=torch.int32, device=kernel_device), f64.to(kernel_device), 1)
    assert got.cpu().tolist() == [INT32_MAX, INT32_MIN]


@given(int32_arrays,
       st.integers(spec.MIN_FRAC_BITS, spec.MAX_FRAC_BITS), st.sampled_from(FLOAT_DTYPES))
def test_triton_decode_equals_oracle(q, frac_bits, dtype):
    qt = torch.from_numpy(q)
    # independent: float64 q * 2**-R is exact; the oracle rounds it to float32 once, then to dtype.
    exact = torch.from_numpy(q.astype(np.float64) * 2.0 ** -frac_bits)
    want = exact if dtype == torch.float64 else exact.float().to(dtype)
    assert_equal(ref.decode(qt, frac_bits, dtype), want, "decode oracle")
    with triton_path(DEVICE):
        got = C.decode(qt.to(DEVICE), frac_bits, dtype)
    assert_equal(got.cpu(), want, "decode triton")


@given(hnp.arrays(np.float32, st.integers(1, 200), elements=st.floats(-30000, 30000, width=32)),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
def test_encode_round_trip(x, dtype):
    xt = torch.from_numpy(x).to(dtype)
    want = torch.from_numpy(expected_quantize(xt.double().numpy(), 16).astype(np.int32))
    assert_equal(ref.encode(xt, 16), want, "encode oracle")
    with triton_path(DEVICE):
        q = C.encode(xt.to(DEVICE), 16)
        q2, xr = C.encode_ste(xt.to(DEVICE), 16)
    assert_equal(q.cpu(), want, "encode triton")
    assert_equal(q2.cpu(), want, "encode_ste stream")
    assert_equal(xr.cpu(), ref.decode(want, 16, dtype), "encode_ste float")
    # encode is idempotent on its own grid
    assert_equal(ref.encode(ref.decode(want, 16, torch.float64), 16), want, "encode(decode(q))")


def test_encode_errors_and_saturation(kernel_device):
    lo, hi = C.representable_range(16)
    assert (lo, hi) == (-32768.0, 32768.0 - 2.0 ** -16)
    for path in (contextlib.nullcontext(), triton_path(kernel_device)):
        with path:
            for bad, what in ((float("nan"), "non-finite"), (float("inf"), "non-finite"),
                              (40000.0, "outside the fixed-point range"), (-32768.5, "outside")):
                x = torch.tensor([1.0, bad, 2.0], device=kernel_device)
                with pytest.raises(ValueError, match=what):
                    C.encode(x, 16)
            with pytest.raises(ValueError, match="non-finite"):
                C.encode(torch.tensor([float("nan")], device=kernel_device), 16, saturate=True)
            sat = C.encode(torch.tensor([40000.0, -1e30, 1.0], device=kernel_device), 16, saturate=True)
            assert sat.cpu().tolist() == [INT32_MAX, INT32_MIN, 65536]
    # the top of the range: hi encodes, one half-step above it rounds past INT32_MAX
    assert C.encode(torch.tensor([hi], dtype=torch.float64), 16).item() == INT32_MAX
    with pytest.raises(ValueError, match="outside"):
        C.encode(torch.tensor([hi + 2.0 ** -17], dtype=torch.float64), 16)


# ------------------------------------------------------------------------------ in-place stream ops

def _true_flags(x: np.ndarray, f: np.ndarray, frac_bits: int) -> list[int]:
    """Independent model of the flags of ``couple(x, f)``: OVERFLOW where f is finite and either the exact sum leaves
    int32 or f's scaled value does; NONFINITE where f is not finite; INEXACT where the wrapped result has |q| >= 2**24."""
    finite = np.isfinite(f)
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = np.rint(f.astype(np.float64) * 2.0 ** frac_bits)
        exact = x.astype(np.float64) + np.clip(np.where(np.isnan(scaled), 0, scaled), INT32_MIN, INT32_MAX)
    out_of_range = (scaled > INT32_MAX) | (scaled < INT32_MIN) | (exact > INT32_MAX) | (exact < INT32_MIN)
    y = wrap(x.astype(np.int64) + expected_quantize(f, frac_bits)).astype(np.int64)
    return [int((out_of_range & finite).any()), int((~finite).any()), int((np.abs(y) >= 2 ** 24).any())]


@given(stream_and_branch(), st.sampled_from([4, 16, 30]))
@example((np.array([INT32_MAX, 0], np.int32), np.array([1.0, 0.0], np.float32)), 16)
@example((np.array([0, 0], np.int32), np.array([np.inf, 1.0], np.float32)), 16)
@example((np.array([2 ** 23, 0], np.int32), np.array([2.0 ** 23, 0.0], np.float32)), 0 + 1)
def test_flags_match_an_independent_model(data, frac_bits):
    x, f = data
    got = ref.coupling_flags(torch.from_numpy(x), torch.from_numpy(f), frac_bits)
    assert got.tolist() == _true_flags(x, f, frac_bits)


def _poisoned(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan")) if t.is_floating_point() else torch.full_like(t, -12345)


@pytest.mark.parametrize("storage", [torch.int32, torch.float32, torch.float64])
def test_stream_ops_on_strided_halves_equal_the_oracle_and_invert(storage, kernel_device):
    """The in-place ops on the views the engine uses (a channel half of [T, B, C, H, W], a micro-batch of it): the
    kernel equals the reference bit for bit, uncouple undoes couple, and the rest of the stream is untouched."""
    torch.manual_seed(4)
    T, B, C2, H, W = 2, 3, 6, 3, 5
    x = torch.randn(T, B, C2, H, W) * 50
    f = torch.randn(T, B, C2 // 2, H, W) * 10.0 ** torch.randint(-6, 3, (T, B, C2 // 2, H, W))
    f[0, 0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    results = []
    for path in (contextlib.nullcontext(), triton_path(kernel_device)):
        with path:
            s = _poisoned(torch.empty(T, B, C2, H, W, dtype=storage, device=kernel_device))
            flags = C.new_flags(3, kernel_device)
            C.stream_encode_(s, x.to(kernel_device), 12, flags[0])
            start = s.clone()
            half = s[:, :, C2 // 2:]
            C.stream_couple_(half, f.to(kernel_device), 12, flags[1])
            C.stream_couple_(s[:, 1:3, :C2 // 2], f[:, 1:3].to(kernel_device), 12, flags[2])  # a micro-batch
            coupled = s.clone()
            decoded = C.stream_decode(half, 12, torch.bfloat16)
            C.stream_uncouple_(s[:, 1:3, :C2 // 2], f[:, 1:3].to(kernel_device), 12)
            C.stream_uncouple_(half, f.to(kernel_device), 12)
            results.append((start.cpu(), coupled.cpu(), decoded.cpu(), flags.cpu(), s.cpu()))
    (start, coupled, decoded, flags, back), kernel = results[0], results[1]
    for a, b, what in zip(results[0], kernel, ("encoded", "coupled", "decoded", "flags", "uncoupled")):
        assert_equal(b, a, f"{what} ({storage}, triton vs reference)")
    if storage == torch.float32:
        # the saturated inf put |q| >= 2**24 into the stream, which float32 storage cannot hold: flagged, and the
        # reason the engine then keeps an int32 stream
        assert flags[1, C.INEXACT] == 1
    else:
        assert_equal(back, start, f"uncouple(couple(s)) ({storage})")
    q_start = C.encode(x, 12)
    assert_equal(start if storage == torch.int32 else C.encode(start, 12), q_start, "stream_encode_")
    assert flags[0].tolist() == [0, 0, 0] and flags[1, C.NONFINITE] == 1
    if storage != torch.float32:
        want = ref.couple(q_start[:, :, C2 // 2:].contiguous(), f, 12)
        got = coupled[:, :, C2 // 2:]
        assert_equal(got if storage == torch.int32 else C.encode(got.contiguous(), 12, saturate=True), want,
                     "couple on a strided half")


def test_float32_storage_round_trip_and_to_float(kernel_device):
    q = torch.randint(-(2 ** 24) + 1, 2 ** 24, (4, 5, 6), dtype=torch.int32)
    for path in (contextlib.nullcontext(), triton_path(kernel_device)):
        with path:
            s = q.clone().to(kernel_device)
            fl = C.stream_to_float_(s, 10)
            assert fl.data_ptr() == s.data_ptr()  # the same memory
            assert_equal(fl.cpu(), ref.decode(q, 10, torch.float32), "stream_to_float_")


def test_stream_ops_validate_their_arguments():
    s = torch.zeros(2, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="s must have dtype"):
        C.stream_couple_(s.to(torch.int16), torch.zeros(2, 4), 8)
    with pytest.raises(ValueError, match="f must have shape"):
        C.stream_couple_(s, torch.zeros(2, 3), 8)
    with pytest.raises(ValueError, match="flags must have shape"):
        C.stream_couple_(s, torch.zeros(2, 4), 8, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="contiguous"):
        C.stream_to_float_(s.t(), 8)
    with pytest.raises(TypeError, match="s must have dtype"):
        C.stream_to_float_(s.float(), 8)


def test_straight_through_gradients():
    torch.manual_seed(0)
    x = (torch.randn(5, 6) * 3).requires_grad_()
    q, xr = C.encode_ste(x, 8)
    w = torch.randn(5, 6)
    (xr * w).sum().backward()
    assert_equal(x.grad, w, "encode_ste grad")
    xq = C.encode(torch.randn(5, 6), 8)
    carrier = C.decode(xq, 8).requires_grad_()
    f = torch.randn(5, 6, dtype=torch.bfloat16, requires_grad=True)
    y_q, y = C.couple_ste(xq, carrier, f, 8)
    assert_equal(y_q, ref.couple(xq, f, 8), "couple_ste stream")
    assert y.dtype == torch.float32
    (y * w).sum().backward()
    assert_equal(carrier.grad, w, "couple_ste grad x")
    assert_equal(f.grad, w.to(torch.bfloat16), "couple_ste grad f")


def test_opcheck_all_ops(kernel_device):
    torch.manual_seed(0)
    xq = C.encode(torch.randn(3, 4), 10)
    xf = C.decode(xq, 10)
    f = torch.randn(3, 4)
    s32 = xq.clone()
    ops = [
        (torch.ops.revsnn.fixed_encode.default, (torch.randn(3, 4), 10, False)),
        (torch.ops.revsnn.fixed_decode.default, (xq, 10, torch.float32)),
        (torch.ops.revsnn.fixed_couple.default, (xq, f, 10)),
        (torch.ops.revsnn.fixed_uncouple.default, (xq, f, 10)),
        (torch.ops.revsnn.fixed_coupling_flags.default, (xq, f, 10)),
        (torch.ops.revsnn.fixed_encode_ste.default, (torch.randn(3, 4, requires_grad=True), 10, False)),
        (torch.ops.revsnn.fixed_couple_ste.default,
         (xq, xf.clone().requires_grad_(), f.clone().requires_grad_(), 10)),
        (torch.ops.revsnn.stream_encode_.default, (s32.clone(), torch.randn(3, 4), 10, C.new_flags(1, "cpu")[0])),
        (torch.ops.revsnn.stream_couple_.default, (s32.clone(), f, 10, C.new_flags(1, "cpu")[0])),
        (torch.ops.revsnn.stream_uncouple_.default, (xf.clone(), f, 10)),
        (torch.ops.revsnn.stream_to_float_.default, (s32.clone(), 10)),
        (torch.ops.revsnn.stream_decode.default, (xf.clone(), 10, torch.bfloat16)),
    ]
    # The schema, fake and autograd registrations do not depend on which implementation runs, so the
    # interpreted kernel (slow under opcheck's many calls) is left to the bitwise tests above; on a GPU
    # the same ops run their compiled Triton kernels.
    for op, args in ops:
        args = tuple(a.to(kernel_device).detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor)
                     else a for a in args)
        torch.library.opcheck(op, args)


def test_api_validation():
    q = torch.zeros(4, dtype=torch.int32)
    f = torch.zeros(4)
    with pytest.raises(TypeError, match="frac_bits must be an int"):
        C.couple(q, f, 16.0)
    for bad in (0, 31, -3):
        with pytest.raises(ValueError, match=r"frac_bits must be in \[1, 30\]"):
            C.encode(f, bad)
    with pytest.raises(TypeError, match="x_q must have dtype"):
        C.couple(f, f, 16)
    with pytest.raises(TypeError, match="f must have dtype"):
        C.couple(q, q, 16)
    with pytest.raises(ValueError, match="f must have shape"):
        C.uncouple(q, torch.zeros(5), 16)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        C.encode([1.0], 16)
    with pytest.raises(TypeError, match="dtype must be one of"):
        C.decode(q, 16, torch.int64)
    with pytest.raises(TypeError, match="saturate must be a bool"):
        C.encode(f, 16, saturate=1)
    with pytest.raises(ValueError, match="f must have shape"):
        C.coupling_flags(q, torch.zeros(3), 16)


# Compiles the coupling kernel for an H100 (sm_90) without a GPU, in a subprocess without the
# interpreter, and inspects the PTX: the round-half-even trick's magic constants (+-2**23 for float32,
# +-2**52 for float64) must survive, i.e. the compiler did not fold (v + c) - c away; int32 results are
# produced by an exact truncating conversion of an already integral value.
_COMPILE_SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from revsnn_triton.kernels.coupling import coupling_kernel as fn

report = []
for ptr_types, consts in json.loads(sys.argv[1]):
    names = fn.arg_names
    sig = {n: ptr_types.get(n) or ("constexpr" if n in consts else "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4)).asm["ptx"]
    report.append(dict(
        f32_magic=bool(re.search(r"0f4B000000", ptx)) and bool(re.search(r"0fCB000000", ptx)),
        f64_magic=bool(re.search(r"0d4330000000000000", ptx)) and bool(re.search(r"0dC330000000000000", ptx)),
        cvt=sorted(set(re.findall(r"cvt\.(\w+)\.s32\.f(?:32|64)", ptx)))))
print(json.dumps(report))
"""
_BASE_CONSTS = dict(SCALE=65536.0, INV_SCALE=2.0 ** -16, OP=2, S_INT=True, S_F64=False, F_F64=False,
                    OUT_F64=False, OUT_BF16=False, FLAGS=True, BLOCK_SIZE=1024)
_PTRS = dict(s_ptr="*i32", f_ptr="*fp32", out_ptr="*fp32", flags_ptr="*i32")
_COMPILE_VARIANTS = [
    (_PTRS, _BASE_CONSTS),  # couple, int32 stream, float32 branch output, flags
    (dict(_PTRS, f_ptr="*fp64", s_ptr="*fp64"), dict(_BASE_CONSTS, F_F64=True, S_INT=False, S_F64=True)),
    (dict(_PTRS, f_ptr="*bf16", s_ptr="*fp32"), dict(_BASE_CONSTS, OP=3, S_INT=False, FLAGS=False)),  # uncouple
]


def test_kernel_compiles_for_h100_keeping_the_rounding_trick():
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(_COMPILE_VARIANTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f32, f64, bf16 = json.loads(proc.stdout.strip().splitlines()[-1])
    assert f32["f32_magic"] and bf16["f32_magic"], (f32, bf16)
    assert f64["f64_magic"], f64
    for r in (f32, f64, bf16):
        assert r["cvt"] and set(r["cvt"]) <= {"rzi"}, r  # truncation of integral values only
