"""Benchmark utilities and the neuron benchmark's plumbing (the timings themselves need a GPU)."""
import csv
import importlib.util
import json
import math
import subprocess

import pytest
import torch

from revsnn_triton import bench
from revsnn_triton.bench import neurons as bn

ENV_KEYS = {"device", "torch", "triton", "spikingjelly", "python", "date_utc", "command"}


def test_environment_records_versions_and_date():
    env = bench.environment()
    assert ENV_KEYS <= set(env)
    assert env["torch"] == torch.__version__
    assert env["device"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    assert env["date_utc"].endswith("Z") and env["date_utc"][:2] == "20"


def test_git_commit_marks_uncommitted_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    assert bench._git_commit(tmp_path) is None          # not a checkout
    git("init", "-q")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                          text=True).stdout.strip()
    assert bench._git_commit(tmp_path) == head
    (tmp_path / "b.txt").write_text("untracked files do not count")
    assert bench._git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("2")
    assert bench._git_commit(tmp_path) == head + "-dirty"


def test_write_results_writes_the_fixed_schema(tmp_path):
    rows = [{"case": "a", "median_ms": 0.123456, "status": "ok"},
            {"case": "b|c", "median_ms": float("nan"), "status": "error: x"}]
    cols = ["case", "median_ms", "status", "unused"]
    paths = bench.write_results(rows, tmp_path / "out", "stem", "A title", columns=cols)
    assert set(paths) == {"csv", "json", "md"} and all(p.exists() for p in paths.values())

    with open(paths["csv"]) as f:
        read = list(csv.reader(f))
    assert read[0] == cols
    assert read[1] == ["a", "0.123456", "ok", ""]
    assert read[2][0] == "b|c" and math.isnan(float(read[2][1]))

    data = json.loads(paths["json"].read_text())  # strict JSON: NaN became null
    assert data["title"] == "A title" and data["columns"] == cols
    assert data["rows"][0] == rows[0] and data["rows"][1]["median_ms"] is None
    assert ENV_KEYS <= set(data["environment"])

    md = paths["md"].read_text().splitlines()
    assert md[0] == "# A title"
    assert any(data["environment"]["torch"] in line and data["environment"]["date_utc"] in line for line in md)
    assert "| case | median_ms | status | unused |" in md
    assert "| a | 0.1235 | ok |  |" in md
    assert "| b\\|c | n/a | error: x |  |" in md


def test_write_results_default_columns_and_bad_input(tmp_path):
    paths = bench.write_results([{"x": 1}, {"y": 2, "x": 3}], tmp_path, "s", "t")
    assert json.loads(paths["json"].read_text())["columns"] == ["x", "y"]
    with pytest.raises(ValueError, match="outside the fixed columns"):
        bench.write_results([{"x": 1, "z": 2}], tmp_path, "s", "t", columns=["x"])
    with pytest.raises(ValueError, match="stem"):
        bench.write_results([], tmp_path, "a/b", "t")
    with pytest.raises(TypeError, match="rows"):
        bench.write_results([1], tmp_path, "s", "t")


def test_require_cuda_exits_nonzero_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        bench.require_cuda("my benchmark")
    assert info.value.code == 2
    assert "my benchmark: needs a CUDA GPU" in capsys.readouterr().err


def test_neuron_benchmark_exits_nonzero_without_gpu(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        bn.main(["--out", str(tmp_path)])
    assert info.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def test_copy_bandwidth_rejects_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        bench.copy_bandwidth("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="counts accesses through Triton's interpreter")
@pytest.mark.parametrize("save,dtype", [("input", torch.float32), ("h", torch.bfloat16), ("h_bf16", torch.float32)])
def test_traffic_bytes_are_what_the_benchmarked_call_moves(save, dtype, monkeypatch):
    """The benchmark's `bytes` (its bandwidth fractions' numerator) equal the bytes the kernels of the
    benchmarked call really read and write, forward and forward+backward, counted through the interpreter;
    the minimum traffic (5 passes: X, S | dS, X, dX) is below every save mode's."""
    from revsnn_triton import runtime
    from neuron_cases import recorded_accesses
    if not runtime.interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (see conftest)")
    case = bn.Case("tiny", 3, 200, dtype)
    forward = bn._ours(save)
    x, grad = bn._inputs(case, torch.device("cpu"))
    with runtime.cpu_kernels("triton"), recorded_accesses(monkeypatch, {}) as log:
        forward(x)
    assert sum(log.reads.values()) + sum(log.writes.values()) == bn.traffic_bytes(case, "forward", save)
    with runtime.cpu_kernels("triton"), recorded_accesses(monkeypatch, {}) as log:
        forward(x).backward(grad)
    assert sum(log.reads.values()) + sum(log.writes.values()) == bn.traffic_bytes(case, "forward+backward", save)
    for pass_ in bn.PASSES:
        assert bn.traffic_bytes(case, pass_, None) <= bn.traffic_bytes(case, pass_, save)
    steps, b = case.T * case.n, x.element_size()
    assert bn.traffic_bytes(case, "forward+backward", None) == 5 * steps * b
    with pytest.raises(ValueError, match="pass_"):
        bn.traffic_bytes(case, "backward", "h")
    with pytest.raises(ValueError, match="save"):
        bn.traffic_bytes(case, "forward", "fp8")


def test_finish_adds_fraction_reference_and_target():
    case = bn.CASES["T4-8.39M-fp32"]
    row = bn._row(case, "revsnn[h]", "forward+backward", "ok", timing=bench.Timing(0.3, 0.29, 0.31))
    out = bn._finish(row, bandwidth=3.0e12)
    nbytes = bn.traffic_bytes(case, "forward+backward", "h")
    assert out["bytes"] == nbytes and out["bytes_basis"] == "kernel traffic"
    assert out["frac_copy_bw"] == pytest.approx(nbytes / 0.3e-3 / 3.0e12)
    assert out["target"] == "<= 0.25 ms" and out["meets_target"] == "no"
    assert out["reference_ms"] == 0.284
    fwd = bn._finish(bn._row(case, "revsnn[input]", "forward", "ok", timing=bench.Timing(0.1, 0.1, 0.1)), 3.0e12)
    assert fwd["target"] == ">= 85% copy bw"
    assert fwd["meets_target"] == ("yes" if fwd["frac_copy_bw"] >= 0.85 else "no")
    sj = bn._finish(bn._row(case, "spikingjelly-triton", "forward", "error: boom"), 3.0e12)
    assert sj["bytes_basis"] == "minimum traffic" and "median_ms" not in sj and "target" not in sj
    assert sj["reference_ms"] == 0.180


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for i, prov in enumerate(bn.PROVIDERS):
        for c in bn.CASES.values():
            for p in bn.PASSES:
                timing = bench.Timing(0.1 * (i + 1), 0.09 * (i + 1), 0.11 * (i + 1)) if i != 3 else None
                rows.append(bn._row(c, prov, p, "ok" if timing else "error: unsupported", timing=timing))
    path = bn.plot(rows, tmp_path / "n.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_time(calls):
    def time_ms(fn, warmup=25, rep=100, grad_to_none=None):
        fn()
        if grad_to_none:
            for t in grad_to_none:
                calls.append(t.grad is not None)
                t.grad = None
        return bench.Timing(1.0, 0.5, 1.5)
    return time_ms


@pytest.mark.parametrize("provider", ["revsnn[input]", "spikingjelly-triton"])
def test_measure_runs_each_provider_forward_and_backward(provider, monkeypatch):
    """The benchmark's providers really run forward and backward (on CPU tensors, timing faked)."""
    if provider.startswith("revsnn") and importlib.util.find_spec("revsnn_triton.ops.neuron") is None:
        pytest.skip("revsnn_triton.ops.neuron not written yet")
    if provider.startswith("spikingjelly"):
        pytest.importorskip("spikingjelly")
    calls = []
    monkeypatch.setattr(bn, "time_ms", _fake_time(calls))
    tiny = bn.Case("tiny", 3, 257, torch.float32)
    rows = bn._measure(provider, [tiny], torch.device("cpu"), warmup=1, rep=1)
    assert [r["pass"] for r in rows] == list(bn.PASSES)
    assert all(r["status"] == "ok" and r["median_ms"] == 1.0 for r in rows), rows
    assert calls == [True]  # backward reached the input


def test_measure_records_provider_errors(monkeypatch):
    monkeypatch.setattr(bn, "time_ms", _fake_time([]))
    tiny = bn.Case("tiny", 2, 5, torch.float32)
    rows = bn._measure("no-such-provider", [tiny], torch.device("cpu"), 1, 1)
    assert len(rows) == 2 and all(r["status"].startswith("error: ValueError") for r in rows)


def test_neuron_benchmark_main_writes_results(monkeypatch, tmp_path, capsys):
    """The whole `main` on CPU tensors with the GPU-only parts faked (device, timing, copy bandwidth): the
    result files get one row per provider, case and pass; a failing spikingjelly subprocess (it does not
    know the tiny case) becomes error rows instead of stopping the run."""
    tiny = bn.Case("tiny", 3, 301, torch.float32)
    monkeypatch.setattr(bn, "CASES", {"tiny": tiny})
    monkeypatch.setattr(bn, "require_cuda", lambda what: torch.device("cpu"))
    monkeypatch.setattr(bn, "copy_bandwidth", lambda device: (2.0e12, bench.Timing(1.0, 0.9, 1.1)))
    monkeypatch.setattr(bn, "time_ms", _fake_time([]))
    providers = ["revsnn[h]", "spikingjelly-torch"]
    assert bn.main(["--out", str(tmp_path), "--case", "tiny", "--worker-timeout", "120",
                    *[a for p in providers for a in ("--provider", p)]]) == 0
    data = json.loads((tmp_path / "neurons.json").read_text())
    assert data["columns"] == bn.COLUMNS
    rows = data["rows"]
    assert rows[0]["case"] == "device-copy" and rows[0]["GBps"] == pytest.approx(2000.0)
    ours = [r for r in rows if r["provider"] == "revsnn[h]"]
    assert [r["pass"] for r in ours] == list(bn.PASSES) and all(r["status"] == "ok" for r in ours)
    assert ours[0]["frac_copy_bw"] == pytest.approx(bn.traffic_bytes(tiny, "forward", "h") / 1e-3 / 2.0e12)
    assert "forward" in ours[0]["detail"] and "backward" in ours[0]["detail"]
    sj = [r for r in rows if r["provider"] == "spikingjelly-torch"]
    assert len(sj) == 2 and all(r["status"].startswith("error: worker exit") for r in sj)
    for suffix in ("csv", "md", "png"):
        assert (tmp_path / f"neurons.{suffix}").stat().st_size > 0
    assert "revsnn[h]" in capsys.readouterr().out
