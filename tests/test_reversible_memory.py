"""Memory: the measurement itself against known allocations, and the reversible engine's stored
activations, which must not grow with depth (real allocator accounting, not shapes)."""
import pytest
import torch

from revsnn_triton.memory import measure_memory, measure_peak_bytes, memory_per_image, peak_breakdown
from revsnn_triton.testing.strategies import input_for, make_sequence
from reversible_cases import DEVICE

MIB = 1 << 20


def test_measure_memory_known_allocations():
    kept = []

    def fn():
        a = torch.empty(MIB, dtype=torch.uint8, device=DEVICE)
        b = torch.empty(3 * MIB, dtype=torch.uint8, device=DEVICE)
        del a
        kept.append(torch.empty(MIB // 2, dtype=torch.uint8, device=DEVICE))
        del b

    use = measure_memory(fn, DEVICE)
    assert use.peak_bytes == 4 * MIB  # a and b alive together
    assert use.retained_bytes == MIB // 2
    # memory allocated before the measurement does not count; its free counts negative on CUDA and is
    # ignored on CPU (the profiler does not know the size of blocks allocated before it started)
    use = measure_memory(lambda: kept.clear(), DEVICE)
    assert use == (0, -(MIB // 2) if DEVICE == "cuda" else 0)
    older = torch.empty(MIB, dtype=torch.uint8, device=DEVICE)

    def swap():
        nonlocal older
        older = None
        kept.append(torch.empty(2 * MIB, dtype=torch.uint8, device=DEVICE))
    use = measure_memory(swap, DEVICE)
    assert use == ((MIB, MIB) if DEVICE == "cuda" else (2 * MIB, 2 * MIB))
    assert measure_peak_bytes(lambda: torch.ones(1000, dtype=torch.float64, device=DEVICE), DEVICE) >= 8000


def test_peak_breakdown_names_what_is_alive_at_the_peak():
    def fn():
        a = torch.zeros(MIB, dtype=torch.uint8)
        b = torch.ones(3 * MIB, dtype=torch.uint8)
        del a
        c = torch.full((MIB // 2,), 7, dtype=torch.uint8)  # allocated after the peak: not part of it
        del b, c

    peak, rows = peak_breakdown(fn, depth=1)
    assert peak == 4 * MIB
    by_op = dict(rows)
    assert sum(by_op.values()) == peak
    assert rows == [("aten::empty", 4 * MIB)]  # depth 1: the innermost operator, which allocated both
    peak2, rows2 = peak_breakdown(fn, depth=3)
    assert peak2 == peak and sum(n for _, n in rows2) == peak
    ones = [n for k, n in rows2 if "aten::ones" in k]
    zeros = [n for k, n in rows2 if "aten::zeros" in k]
    assert ones == [3 * MIB] and zeros == [MIB]
    assert not any("aten::full" in k for k, _ in rows2)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        peak_breakdown(fn, depth=0)
    with pytest.raises(TypeError, match="fn must be callable"):
        peak_breakdown(None)


def test_memory_per_image_is_the_slope():
    resident = [torch.empty(5 * MIB, dtype=torch.uint8, device=DEVICE)]  # a "model": cancels out

    def step(batch):
        lazy = resident.append(torch.empty(MIB, dtype=torch.uint8, device=DEVICE)) if len(resident) == 1 else None
        act = torch.empty(batch * 64 * 1024, dtype=torch.uint8, device=DEVICE)
        tmp = torch.empty(1024, dtype=torch.uint8, device=DEVICE)
        del act, tmp, lazy

    assert memory_per_image(step, [4, 16], DEVICE) == 64 * 1024
    with pytest.raises(ValueError, match="two different sizes"):
        memory_per_image(step, [4, 4], DEVICE)
    with pytest.raises(ValueError, match="at least two positive ints"):
        memory_per_image(step, [4], DEVICE)
    with pytest.raises(TypeError, match="step_fn must be callable"):
        memory_per_image(None, [1, 2], DEVICE)
    with pytest.raises(ValueError, match="CPU or CUDA"):
        measure_peak_bytes(lambda: None, "meta")


# Frame size of the stream: on CUDA the caching allocator rounds every tensor up to 512 bytes (the 16
# bytes of checksums per block take 512), so the stream is made larger there to keep it dominant.
SIZE = 64 if DEVICE == "cuda" else 16


def stored_bytes(depth: int, reversible: bool) -> int:
    """Bytes a training forward leaves allocated (saved activations, the output, and whatever else the
    sequence keeps for backward) for ``depth`` blocks of the same spiking conv block; then backward."""
    seq = make_sequence("conv", depth, 4, seed=0).to(DEVICE)
    seq.reversible = reversible
    x = input_for("conv", 2, 2, 4, SIZE, 3.0, 0).to(DEVICE).requires_grad_()
    out = []
    use = measure_memory(lambda: out.append(seq(x)), DEVICE)
    out.pop().sum().backward()  # the kept state is consumable: backward still works
    assert x.grad is not None
    return use.retained_bytes


def test_stored_activations_do_not_grow_with_depth():
    rev = {d: stored_bytes(d, True) for d in (2, 32)}
    base = {d: stored_bytes(d, False) for d in (2, 8, 32)}
    stream_bytes = 2 * 2 * 8 * SIZE * SIZE * 4  # one float32 copy of the [T=2, B=2, C=8, SIZE, SIZE] stream
    print(f"stored bytes: reversible {rev}, reversible=False {base}, stream {stream_bytes}")
    # reversible: the output (which is also what backward keeps of the stream: its values are below 256, so
    # float32 decodes the stream exactly) and 16 bytes of checksums per block, whatever the depth
    assert abs(rev[32] - rev[2]) <= 0.10 * rev[2]
    assert rev[2] < 1.5 * stream_bytes
    # reversible=False: every block's saved activations, i.e. linear in depth
    per_block_2_8 = (base[8] - base[2]) / 6
    per_block_8_32 = (base[32] - base[8]) / 24
    assert per_block_2_8 > stream_bytes
    assert abs(per_block_8_32 - per_block_2_8) <= 0.10 * per_block_2_8
    assert base[32] > 10 * rev[32]


def retained_per_image(offset: float) -> float:
    """Bytes per image a training forward leaves allocated when the layer after the sequence keeps the
    output for its backward (``out * w`` with a parameter ``w``, like a neuron that saves its input):
    the slope of :func:`measure_memory`'s retained bytes between batch sizes 2 and 4."""
    from test_reversible import kept_as_float
    seq = make_sequence("conv", 4, 4, seed=0).to(DEVICE)
    w = torch.nn.Parameter(torch.full((), 0.5, device=DEVICE))
    retained = {}
    for batch in (2, 4):
        x = (input_for("conv", 2, batch, 4, SIZE, 3.0, 0) + offset).to(DEVICE).requires_grad_()
        out = []

        def forward():
            y = seq(x)
            out.append((y, y * w))  # y is kept anyway, as the product's saved input
        retained[batch] = measure_memory(forward, DEVICE).retained_bytes
        y, prod = out.pop()
        assert kept_as_float(y) == (offset == 0)
        prod.sum().backward()
    return (retained[4] - retained[2]) / 2


def test_saved_float_output_saves_the_int32_stream():
    # offset 0: every value is below 256, float32 decodes the stream exactly and the sequence keeps the output
    # itself (which `out * w` keeps anyway); offset 512: beyond that range, so the int32 halves are kept too.
    exact, wide = retained_per_image(0.0), retained_per_image(512.0)
    stream_per_image = 2 * 8 * SIZE * SIZE * 4  # int32 stream of one image: [T=2, C=8, SIZE, SIZE]
    print(f"retained per image: float output kept {exact}, int32 kept {wide}, int32 stream {stream_per_image}")
    # The two runs allocate the same tensors except for the int32 halves (and the 16 bytes of output
    # checksums, which do not grow with the batch): the difference is the stream, within 1%.
    assert abs((wide - exact) - stream_per_image) <= 0.01 * stream_per_image
    # what stays is the output and the product (and the product's saved input is the output itself)
    assert exact <= 2.05 * stream_per_image
