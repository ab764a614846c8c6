"""cuda_prefetch.ranges on the CPU: which bytes the L2 prefetch asks for (the kernel's own test,
on the GPU, is tests/test_cuda_l2_prefetch.py)."""

import os
import types

import pytest

from engine.executor.ops import cuda_prefetch
from engine.model.quantized import QuantizedWeight


def array(ptr: int, nbytes: int):
    """What ranges() reads of a device array: its pointer and size."""
    return types.SimpleNamespace(data=types.SimpleNamespace(ptr=ptr), nbytes=nbytes)


def test_in_order_up_to_the_budget_in_16_byte_units():
    o, gate_up, down = array(0x1000, 4000), array(0x10000, 100_000), array(0x40000, 50_000)
    assert cuda_prefetch.ranges((o, gate_up, down), 10**9) == [
        (0x1000, 4000), (0x10000, 100_000), (0x40000, 50_000)]
    # the budget ends inside gate_up: its first bytes, rounded down to 16; down not at all
    assert cuda_prefetch.ranges((o, gate_up, down), 20_010) == [(0x1000, 4000),
                                                                 (0x10000, 16_000)]
    assert cuda_prefetch.ranges((array(0x1000, 30),), 10**9) == [(0x1000, 16)]
    assert cuda_prefetch.ranges((o,), 15) == []


def test_quantized_weights_give_blocks_and_scales_and_unaligned_arrays_are_skipped():
    fp8 = QuantizedWeight("fp8", (8, 16), array(0x2000, 128), array(0x3000, 32))
    gguf = QuantizedWeight("Q4_K", (8, 256), array(0x5000, 1152))
    odd = array(0x6008, 64)  # not 16-byte aligned: the bulk request cannot take it
    assert cuda_prefetch.ranges((fp8, odd, gguf), 10**9) == [
        (0x2000, 128), (0x3000, 32), (0x5000, 1152)]


def test_at_most_the_kernels_ranges():
    many = [array(0x1000 * (i + 1), 256) for i in range(12)]
    got = cuda_prefetch.ranges(many, 10**9)
    assert len(got) == cuda_prefetch.MAX_RANGES == 8 and got[-1] == (0x8000, 256)


@pytest.mark.skipif("PAGEDSERVE_L2_PREFETCH_MB" in os.environ, reason="set in the environment")
def test_off_by_default():
    assert cuda_prefetch.PREFETCH_MAX_BYTES == 0
