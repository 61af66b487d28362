"""`revsnn bench memory`: defaults per device, only what was asked, the low-reading warning, each model's own input
size, the peak-RSS column; and the RSS / mmap-threshold helpers of revsnn_triton.memory."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from revsnn_triton import memory
from revsnn_triton.bench import memory as bench_memory

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def test_defaults_per_device(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cpu = bench_memory._parse(["--device", "cpu"])
    assert cpu.batch_sizes == [16, 32] and cpu.dtypes == ["fp32"] and cpu.table
    assert not cpu.sweep and not cpu.ablation and cpu.models == list(bench_memory.ALL_MODELS)
    # outside the source tree's committed results: runs/bench/memory-<UTC time> under the current directory
    assert cpu.out.parts[:2] == ("runs", "bench") and cpu.out.name.startswith("memory-")
    assert bench_memory._parse(["--device", "cpu", "--cpu-small"]).batch_sizes == [4, 8]
    if torch.cuda.is_available():
        gpu = bench_memory._parse(["--device", "cuda"])
        assert gpu.batch_sizes == [16, 64] and gpu.dtypes == ["fp32", "bf16"]


def test_only_what_was_asked() -> None:
    only = bench_memory._parse(["--device", "cpu", "--models", "RevSResNet21"])
    assert only.models == ["RevSResNet21"] and only.table and not only.sweep and not only.ablation
    ablation = bench_memory._parse(["--device", "cpu", "--ablation", "--models", "RevSResNet37", "RevSResNet21"])
    assert ablation.ablation_models == ["RevSResNet37"] and ablation.table
    assert bench_memory._parse(["--device", "cpu", "--ablation"]).ablation_models == list(bench_memory.ABLATION)
    sweep = bench_memory._parse(["--device", "cpu", "--sweep"])
    assert sweep.sweep == ["resnet", "transformer"] and not sweep.table and not sweep.ablation
    assert bench_memory._parse(["--device", "cpu", "--sweep", "transformer"]).sweep == ["transformer"]
    assert bench_memory._parse(["--device", "cpu"]).sweep is None


@pytest.mark.parametrize("argv, match", [
    (["--models", "RevSResNet73"], "unknown model 'RevSResNet73' \\(did you mean 'RevSResNet37'"),
    (["--ablation", "--models", "MS-ResNet18"], "no ablation variants for MS-ResNet18"),
    (["--image-size", "0"], "--image-size must be >= 1"),
    (["--mmap-threshold", "-1"], "--mmap-threshold must be >= 0"),
])
def test_bad_arguments_are_one_line_errors(argv, match, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        bench_memory._parse(["--device", "cpu", *argv])
    assert info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_runs_only_the_table_and_writes_outside_the_tree(tmp_path) -> None:
    """A subprocess from a fresh directory: the default output folder, no sweep, no ablation, no alarming
    profiler line on a machine without a GPU, and the RSS columns on the CPU."""
    cmd = [sys.executable, "-m", "revsnn_triton", "bench", "memory", "--device", "cpu", "--cpu-small",
           "--models", "MS-ResNet18", "--T", "2"]  # T=1: too small for RSS to move
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (out,) = (tmp_path / "runs" / "bench").iterdir()
    assert out.name.startswith("memory-") and str(out.relative_to(tmp_path)) in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["memory.csv", "memory.json", "memory.md"]
    assert "gpuGetDeviceCount" not in result.stderr + result.stdout
    (row,) = json.loads((out / "memory.json").read_text())["rows"]
    assert row["model"] == "MS-ResNet18" and row["batches"] == "4/8" and row["mib_per_image"] > 0
    if memory.peak_rss_unavailable() is None and sys.platform.startswith("linux"):
        assert row["peak_rss_big_MiB"] > 0 and row["rss_mib_per_image"] is not None
        assert "mmap threshold fixed at 131072 bytes" in (out / "memory.md").read_text()


def test_low_reading_warning(tmp_path, capsys) -> None:
    warning = bench_memory.low_reading_warning("RevSResNet37", "cpu", (2, 4))
    assert warning.startswith("RevSResNet37 at cpu batches 2/4 reads low: ") and "16 and 32" in warning
    assert "\n" not in warning
    assert bench_memory.low_reading_warning("RevSResNet37", "cpu", (16, 32)) is None
    assert bench_memory.low_reading_warning("MS-ResNet34", "cpu", (2, 4)) is None
    assert bench_memory.low_reading_warning("RevSResNet37", "cuda", (16, 64)) is None
    # printed by the command before measuring (--budget-s 0: nothing is measured)
    rc = bench_memory.main(["--device", "cpu", "--models", "RevSResNet37", "--batch-sizes", "2", "4",
                            "--budget-s", "0", "--out", str(tmp_path)])
    assert rc == 0
    assert f"memory: warning: {warning}" in capsys.readouterr().err


def test_digits_models_at_their_own_input_size() -> None:
    case = bench_memory.model_case("RevSResNet-digits")
    row = bench_memory.measure_case(case, device=torch.device("cpu"), dtype="fp32", batch_sizes=(2, 4), T=1,
                                    image_size=None, rss=False)
    assert row["image"] == 8 and row["mib_per_image"] > 0 and row["warning"] is None
    assert "rss_mib_per_image" not in row  # not asked
    assert set(row) <= set(bench_memory.COLUMNS)


# ------------------------------------------------------------------------------ revsnn_triton.memory helpers

def test_set_malloc_mmap_threshold_validates() -> None:
    for bad, error in ((0, ValueError), (1 << 30, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="nbytes"):
            memory.set_malloc_mmap_threshold(bad)


def test_peak_rss_follows_allocations_with_a_fixed_threshold() -> None:
    """In a fresh process (the threshold is process-wide): after fixing the threshold, the peak RSS of a step that
    writes 32 MiB of fresh tensors is those 32 MiB, as the allocation count says."""
    code = textwrap.dedent("""
        import platform, torch
        from revsnn_triton import memory
        applied = memory.set_malloc_mmap_threshold(128 * 1024)
        assert applied == (platform.libc_ver()[0] == "glibc"), applied
        if memory.peak_rss_unavailable() is not None:
            print("unavailable", memory.peak_rss_unavailable())
            raise SystemExit(0)
        assert memory.malloc_mmap_threshold() == (128 * 1024 if applied else None)
        def step():
            blocks = [torch.ones(1 << 20) for _ in range(8)]  # 8 x 4 MiB, written
            del blocks
        step()
        print(memory.measure_peak_rss(step) / 2**20, memory.measure_peak_bytes(step, "cpu") / 2**20)
    """)
    result = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    if result.stdout.startswith("unavailable"):
        pytest.skip(result.stdout.strip())
    rss_mib, alloc_mib = map(float, result.stdout.split())
    assert alloc_mib == pytest.approx(32.0, abs=0.01)
    # RSS counts pages: a few pages of other memory may come and go during the step
    assert 31.0 <= rss_mib <= 34.0, rss_mib


def test_measure_peak_rss_argument() -> None:
    with pytest.raises(TypeError, match="fn must be callable"):
        memory.measure_peak_rss(3)


def test_input_sizes_agree_with_the_registry() -> None:
    """The benchmark's input size of every registered model is the one the registry states for it."""
    from revsnn_triton.models import create_model, list_models
    from revsnn_triton.models.registry import model_info

    for name in list_models():
        with torch.device("meta"):
            model = create_model(name, neuron_impl="torch")
        stated = re.search(r"(\d+), (\d+)\]$", model_info(name).input)
        assert stated, (name, model_info(name).input)
        assert bench_memory.input_size(name, model) == int(stated.group(1)) == int(stated.group(2)), name


@pytest.mark.parametrize("name", list(bench_memory.ABLATION))
def test_every_ablation_variant_trains(name):
    """Each variant of the ablation builds and runs a training step (at tiny widths: what is checked is that the
    combination of options is valid, e.g. torch.nn BatchNorm only where nothing recomputes in micro-batches)."""
    case = bench_memory.model_case(name, small=True)
    batch = 9  # above every default micro-batch of the zoo (8), so that the micro-batched paths run
    for variant, extra in bench_memory.ABLATION[name]:
        _, step, _, _ = bench_memory._model_and_step(case, torch.device("cpu"), "fp32", (batch,), 2, 32, "triton",
                                                     extra)
        step(batch)
