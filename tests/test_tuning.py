"""Launch configurations (``revsnn_triton.launch``: heuristic, tuned cache) and the tuner
(``revsnn_triton.tuning``: measuring, writing the cache, refusing to tune without a GPU)."""
import contextlib
import json
import warnings

import pytest
import torch

from revsnn_triton import launch, tuning
from revsnn_triton.launch import LaunchConfig, launch_config
from revsnn_triton.ops.neuron.spec import BACKWARD_KERNEL, FORWARD_KERNEL, MAX_RECOMPUTE_T, RECOMPUTE_KERNEL
from revsnn_triton.runtime import interpreter_enabled
from revsnn_triton.testing import assert_equal

FAKE_GPU = "Fake GPU 80GB"


@pytest.fixture
def fake_gpu(monkeypatch):
    """Let `launch_config` look up the cache for a CUDA device on a machine that has none: only the GPU's
    name (part of the cache key) is faked; nothing is launched."""
    launch.clear_memory_cache()
    monkeypatch.setattr(launch, "gpu_name", lambda index: FAKE_GPU)
    yield
    launch.clear_memory_cache()


def test_heuristic_is_sane_and_deterministic():
    for n in (1, 7, 1000, 65_536, 131_072, 524_288, 8_388_608, 10**9):
        for T in (1, 4, 16):
            for size in (4, 2):
                cfg = launch.heuristic(n, T, on_gpu=True, element_size=size)
                assert cfg == launch.heuristic(n, T, on_gpu=True, element_size=size)
                assert 128 <= cfg.block_size <= 1024 and 1 <= cfg.num_warps <= 8
                # enough programs to fill a GPU whenever n allows it
                if n >= 512 * 128:
                    assert -(-n // cfg.block_size) >= 512
                # one 16-byte access per thread of the widest tensor: 4 fp32 or 8 bf16 elements
                assert cfg.block_size // (32 * cfg.num_warps) == 16 // size or cfg.num_warps == 1
    assert launch.heuristic(8_388_608, 4, on_gpu=True) == LaunchConfig(1024, 8)
    assert launch.heuristic(8_388_608, 4, on_gpu=True, element_size=2) == LaunchConfig(1024, 4)
    # a kernel that keeps `resident` values per neuron in registers: at most MAX_RESIDENT_VALUES per thread where
    # the warps (<= 8) and block (>= 128) allow it, so a larger T gets a smaller block; never fewer programs
    for size in (4, 2):
        for n in (1, 1000, 524_288, 4_194_304, 8_388_608):
            blocks = []
            for T in (1, 2, 4, 8, 16, 32):
                cfg = launch.heuristic(n, T, on_gpu=True, resident=T, element_size=size)
                plain = launch.heuristic(n, T, on_gpu=True, element_size=size)
                per_thread = cfg.block_size // (32 * cfg.num_warps)
                assert per_thread * T <= launch.MAX_RESIDENT_VALUES or per_thread <= 1, (n, T, cfg)
                assert cfg.block_size <= plain.block_size and cfg.num_warps <= 8
                blocks.append(cfg.block_size)
            assert blocks == sorted(blocks, reverse=True), (n, blocks)
    # the benchmark's recompute backward: fp32 T=16 two neurons per thread (64-bit accesses), bf16 T=4 eight
    # (128-bit), fp32 T=4 four (128-bit)
    assert launch.heuristic(4_194_304, 16, on_gpu=True, resident=16) == LaunchConfig(512, 8)
    assert launch.heuristic(8_388_608, 4, on_gpu=True, resident=4, element_size=2) == LaunchConfig(1024, 4)
    assert launch.heuristic(8_388_608, 4, on_gpu=True, resident=4) == LaunchConfig(1024, 8)
    # the launchers ask for their kernel's residency: T for the fused recompute backward, 1 otherwise
    from revsnn_triton.kernels.neurons import resident_values
    assert [resident_values(k, 16) for k in (FORWARD_KERNEL, BACKWARD_KERNEL, RECOMPUTE_KERNEL)] == [1, 1, 16]
    # interpreter: one fixed small block, so that test shapes span several programs
    assert launch_config("neuron_fwd", 10**6, 4, torch.float32, "cpu") == LaunchConfig(launch.INTERPRETER_BLOCK, 1)


@pytest.mark.parametrize("bad, exc", [
    (dict(kernel=""), ValueError), (dict(kernel=3), ValueError), (dict(n=0), ValueError),
    (dict(n=2.0), TypeError), (dict(T=0), ValueError), (dict(T=True), TypeError),
    (dict(dtype=torch.int32), TypeError), (dict(dtype="fp32"), TypeError),
])
def test_launch_config_rejects_bad_input(bad, exc):
    args = dict(kernel="neuron_fwd", n=100, T=4, dtype=torch.float32, device="cpu") | bad
    with pytest.raises(exc, match=next(iter(bad))):
        launch_config(**args)


@pytest.mark.parametrize("block, warps", [(100, 4), (1024, 3), (8, 1), (1024, 64)])
def test_launch_config_validates(block, warps):
    with pytest.raises(ValueError, match="power of two"):
        LaunchConfig(block, warps)


def test_cache_round_trip(tmp_path, fake_gpu, monkeypatch):
    """A winner written by `tune` (measurements faked: fastest = block 2048 / 8 warps) is read back by
    `launch_config` for every (n, T) of the same bucket, and only for the same kernel, dtype and GPU."""
    path = tmp_path / "sub" / "tune.json"
    calls = []

    def factory(T, n, dtype, device):
        calls.append((T, n, dtype))
        return lambda block_size, num_warps: (block_size, num_warps)

    times = {(2048, 8): 0.5}
    monkeypatch.setattr(tuning, "_require_gpu_for_tuning", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(tuning, "_kernels", lambda: {name: launch.TunableKernel(name, factory)
                                                     for name in ("neuron_fwd", "neuron_bwd")})
    monkeypatch.setattr(tuning, "_measure_ms", lambda fn: times.get(fn(), 1.0))

    new = tuning.tune([(4, 8_000_000)], [torch.bfloat16], kernels=["neuron_fwd"], cache_path=path)
    assert calls == [(4, 8_000_000, torch.bfloat16)]
    assert len(new) == 1
    (key, entry), = new.items()
    assert FAKE_GPU in key and "neuron_fwd" in key and "bf16" in key
    assert (entry["block_size"], entry["num_warps"], entry["ms"], entry["heuristic_ms"]) == (2048, 8, 0.5, 1.0)
    on_disk = json.loads(path.read_text())
    assert on_disk["format"] == launch.CACHE_FORMAT and on_disk["entries"] == new
    assert [p.name for p in path.parent.iterdir()] == ["tune.json"]  # no temp file left behind

    launch.clear_memory_cache()  # read back from the file, not from memory
    monkeypatch.setattr(launch, "gpu_name", lambda index: FAKE_GPU)
    dev = torch.device("cuda", 0)
    for n, T in ((8_000_000, 4), (5_000_000, 3), (8_388_608, 4)):  # same bucket (2^23, 4)
        assert launch_config("neuron_fwd", n, T, torch.bfloat16, dev, cache_file=path) == LaunchConfig(2048, 8)
    heur = launch.heuristic(8_000_000, 4, on_gpu=True)
    heur_bf16 = launch.heuristic(8_000_000, 4, on_gpu=True, element_size=2)  # the heuristic follows the dtype
    assert launch.lookup_config("neuron_fwd", 8_000_000, 4, torch.bfloat16, dev, cache_file=path) == (
        LaunchConfig(2048, 8), "tuned")
    assert launch.lookup_config("neuron_fwd", 8_000_000, 4, torch.float32, dev, cache_file=path) == (
        heur, "heuristic")
    assert launch_config("neuron_bwd", 8_000_000, 4, torch.bfloat16, dev, cache_file=path) == heur_bf16
    assert launch_config("neuron_fwd", 8_000_000, 4, torch.float32, dev, cache_file=path) == heur
    assert launch_config("neuron_fwd", 8_000_000, 16, torch.bfloat16, dev, cache_file=path) == heur_bf16
    assert launch_config("neuron_fwd", 9_000_000, 4, torch.bfloat16, dev, cache_file=path) == heur_bf16
    # the environment variable selects the same file
    monkeypatch.setenv(launch.CACHE_ENV, str(path))
    launch.clear_memory_cache()
    monkeypatch.setattr(launch, "gpu_name", lambda index: FAKE_GPU)
    assert launch_config("neuron_fwd", 8_000_000, 4, torch.bfloat16, dev) == LaunchConfig(2048, 8)
    monkeypatch.setenv(launch.CACHE_ENV, "off")
    assert launch_config("neuron_fwd", 8_000_000, 4, torch.bfloat16, dev) == LaunchConfig(2048, 8)  # memoized
    launch.clear_memory_cache()
    assert launch_config("neuron_fwd", 8_000_000, 4, torch.bfloat16, dev) == heur_bf16
    # another GPU does not use this GPU's winners
    launch.clear_memory_cache()
    monkeypatch.setattr(launch, "gpu_name", lambda index: "Other GPU")
    assert launch_config("neuron_fwd", 8_000_000, 4, torch.bfloat16, dev, cache_file=path) == heur_bf16

    # a second tune merges into the file instead of replacing it
    monkeypatch.setattr(launch, "gpu_name", lambda index: FAKE_GPU)
    tuning.tune([(16, 1000)], [torch.float32], kernels=["neuron_bwd"], cache_path=path)
    assert len(json.loads(path.read_text())["entries"]) == 2


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 999, "entries": {}}),
                                     json.dumps({"format": 1, "entries": {"k": {"block_size": 100,
                                                                                "num_warps": 4}}})])
def test_corrupt_cache_falls_back_with_warning(tmp_path, fake_gpu, content):
    path = tmp_path / "tune.json"
    path.write_text(content)
    dev = torch.device("cuda", 0)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        cfg = launch_config("neuron_fwd", 4096, 4, torch.float32, dev, cache_file=path)
    assert cfg == launch.heuristic(4096, 4, on_gpu=True)
    with warnings.catch_warnings():  # warned once, then silent
        warnings.simplefilter("error")
        assert launch_config("neuron_fwd", 4096, 4, torch.float32, dev, cache_file=path) == cfg


def test_missing_cache_is_silent(tmp_path, fake_gpu):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = launch_config("neuron_fwd", 4096, 4, torch.float32, "cuda:0", cache_file=tmp_path / "none.json")
    assert cfg == launch.heuristic(4096, 4, on_gpu=True)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(launch.CACHE_ENV, raising=False)
    assert launch.resolve_cache_path() == launch.DEFAULT_CACHE.expanduser()
    monkeypatch.setenv(launch.CACHE_ENV, str(tmp_path / "x.json"))
    assert launch.resolve_cache_path() == tmp_path / "x.json"
    assert launch.resolve_cache_path(tmp_path / "y.json") == tmp_path / "y.json"


@pytest.mark.skipif(torch.cuda.is_available() and not interpreter_enabled(),
                    reason="tuning is allowed on this machine (CUDA, no interpreter)")
def test_tune_refuses_without_gpu_or_under_interpreter(tmp_path):
    with pytest.raises(RuntimeError, match="interpreter|no CUDA device"):
        tuning.tune([(4, 1024)], [torch.float32], cache_path=tmp_path / "t.json")
    assert not (tmp_path / "t.json").exists()
    assert tuning.main(["--shape", "4x1024", "--cache", str(tmp_path / "t.json")]) == 2


def test_tune_refuses_under_interpreter_even_with_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="interpreter"):
        tuning.tune([(4, 1024)], [torch.float32], cache_path=tmp_path / "t.json")


@pytest.mark.parametrize("kwargs, match", [
    (dict(shapes=[(4,)]), "shapes"), (dict(shapes=[]), "shapes"), (dict(shapes=[(0, 5)]), "T"),
    (dict(dtypes=[]), "dtypes"), (dict(dtypes=[torch.int8]), "dtype"), (dict(candidates=[(100, 4)]), "power"),
])
def test_tune_rejects_bad_input(kwargs, match, tmp_path):
    args = dict(shapes=[(4, 1024)], dtypes=[torch.float32], cache_path=tmp_path / "t.json") | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        tuning.tune(**args)


def test_cli_parses_shapes():
    assert tuning._parse_shape("4x8388608") == (4, 8388608)
    with pytest.raises(Exception, match="TxN"):
        tuning._parse_shape("4-8")


# ------------------------------------------------------------------ configurations never change results
# The launchers' own test (tests/test_neuron_kernels.py::test_launch_configs_bit_identical) passes block
# sizes to the launchers directly. These go the way a user's call goes: `multistep_neuron` -> custom ops ->
# launchers -> `launch.launch_config`, with the configuration coming from `launch_config` (CPU and GPU) and
# from a real tuning cache file (GPU), and compare forward and backward results, PLIF's grad of w included.

HAS_CUDA = torch.cuda.is_available()


def _op_results(device, dtype, save):
    from revsnn_triton.ops.neuron import multistep_neuron
    gen = torch.Generator().manual_seed(1)
    T, shape = 4, (3, 107)  # 321 neurons: several programs at every block below, masked tail
    x = ((torch.rand((T, *shape), generator=gen) * 4 - 1.5)).to(dtype)
    x[0, 0, :7] = 1.0  # exactly at the threshold
    x = x.to(device).requires_grad_(True)
    v0 = (torch.rand(shape, generator=gen) - 0.5).to(device).requires_grad_(True)
    w = torch.tensor([-0.3], device=device, requires_grad=True)
    grad_s = torch.randn((T, *shape), generator=gen).to(dtype).to(device)
    grad_v = torch.randn(shape, generator=gen).to(device)
    spikes, v = multistep_neuron(x, v0, w=w, v_reset=None, detach_reset=False, surrogate="sigmoid", alpha=4.0,
                                 save=save)
    gx, gv0, gw = torch.autograd.grad((spikes, v), (x, v0, w), (grad_s, grad_v))
    return {"spikes": spikes, "v_final": v, "grad_x": gx, "grad_v_init": gv0, "grad_w": gw}


@contextlib.contextmanager
def _on(device):
    if device == "cpu":
        from revsnn_triton.runtime import cpu_kernels
        with cpu_kernels("triton"):
            yield
    else:
        yield


@pytest.mark.skipif(not HAS_CUDA and not interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("save, dtype", [("h", torch.float32), ("input", torch.bfloat16), ("h_bf16", torch.float16)])
def test_configs_from_launch_config_give_identical_results(save, dtype, kernel_device, monkeypatch):
    configs = [LaunchConfig(16, 1), LaunchConfig(64, 2), LaunchConfig(256, 8)]
    asked = []
    results = []
    for cfg in configs:
        def fake(kernel, n, T, dtype_, device, *, resident=1, element_size=None, cache_file=None, _cfg=cfg):
            asked.append((kernel, n, T, dtype_, _cfg))
            return _cfg
        monkeypatch.setattr(launch, "launch_config", fake)
        with _on(kernel_device):
            results.append(_op_results(kernel_device, dtype, save))
    # every launch took its configuration from launch_config, forward and backward (save="input", T=4: the
    # backward that recomputes H in registers)
    backward = RECOMPUTE_KERNEL if save == "input" else BACKWARD_KERNEL
    assert {a[0] for a in asked} == {FORWARD_KERNEL, backward}
    assert all(a[1:4] == (321, 4, dtype) for a in asked)
    assert {a[4] for a in asked} == set(configs)
    for cfg, res in zip(configs[1:], results[1:]):
        for name in res:
            assert_equal(res[name], results[0][name], f"{name} with {cfg} vs {configs[0]}")


@pytest.mark.skipif(not HAS_CUDA or interpreter_enabled(), reason="the tuning cache applies to CUDA launches")
def test_configs_from_tuning_cache_give_identical_results(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    gpu = torch.cuda.get_device_name()
    dtype = torch.float32
    results, seen = [], []
    for fwd, bwd in ((None, None), (LaunchConfig(2048, 8), LaunchConfig(256, 1)), (LaunchConfig(512, 2), None)):
        entries = {}
        for kernel, cfg in ((FORWARD_KERNEL, fwd), (BACKWARD_KERNEL, bwd)):
            if cfg is not None:
                entries[launch.cache_key(kernel, 321, 4, dtype, gpu)] = {
                    "block_size": cfg.block_size, "num_warps": cfg.num_warps, "ms": 0.0, "n": 321, "T": 4}
        path.write_text(json.dumps({"format": launch.CACHE_FORMAT, "entries": entries}))
        monkeypatch.setenv(launch.CACHE_ENV, str(path))
        launch.clear_memory_cache()
        expect = fwd or launch.heuristic(321, 4, on_gpu=True)
        assert launch_config(FORWARD_KERNEL, 321, 4, dtype, "cuda") == expect
        seen.append(expect)
        results.append(_op_results("cuda", dtype, "h"))
    launch.clear_memory_cache()
    assert len(set(seen)) == 3
    for res in results[1:]:
        for name in res:
            assert_equal(res[name], results[0][name], f"{name} with a tuned configuration vs the heuristic")


@pytest.mark.skipif(not HAS_CUDA and not interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_tuning_benchmarks_launch_every_tunable_kernel(kernel_device):
    """Each kernel `tune` measures runs through its factory and gives identical results, without NaN, at two
    configurations (the recompute kernel's factory refuses a T that kernel does not serve)."""
    known = tuning._kernels()
    assert set(known) == {FORWARD_KERNEL, BACKWARD_KERNEL, RECOMPUTE_KERNEL} == set(tuning.tunable_kernels())
    assert known[RECOMPUTE_KERNEL].resident(16) == 16 and known[FORWARD_KERNEL].resident(16) == 1
    for name, kernel in sorted(known.items()):
        torch.manual_seed(0)
        run = kernel.make_run(3, 200, torch.float32, torch.device(kernel_device))
        with _on(kernel_device):
            first = [t.clone() for t in run(32, 1) if t is not None and t.numel()]
            second = [t for t in run(128, 2) if t is not None and t.numel()]
        assert first
        for a, b in zip(first, second):
            assert not torch.isnan(a).any(), name
            assert_equal(b, a, f"{name}: block 128 vs 32")
    with pytest.raises(ValueError, match="T <= "):
        known[RECOMPUTE_KERNEL].make_run(MAX_RECOMPUTE_T + 1, 10, torch.float32, torch.device(kernel_device))
