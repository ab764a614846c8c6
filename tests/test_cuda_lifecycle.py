"""Engines come and go in one process: LLM.close() / `with LLM(...)` hands back every byte of GPU
memory it took (KV cache, weights, decode graphs, cuBLAS workspace, pool blocks), cycle after
cycle. Run it alone on the GPU: the free-memory checks read the device's free memory, which
other processes on the same GPU (parallel test lanes) move by gigabytes. Run once under
compute-sanitizer too, smaller (memcheck slows kernels ~50x):
    LIFECYCLE_CYCLES=2 LIFECYCLE_OUTPUT_SCALE=64 compute-sanitizer --tool memcheck \
        python -m pytest -q -m gpu tests/test_cuda_lifecycle.py
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest
from conftest import require_gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tools/ is not an installed package

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.llm import LLM  # noqa: E402
from tools.workloads import w1_requests  # noqa: E402

MiB = 1 << 20
CYCLES = int(os.environ.get("LIFECYCLE_CYCLES", 5))
# W1's 256 prompts, all in flight at once, outputs cut to 1/8 (~18.6k tokens)
OUTPUT_SCALE = int(os.environ.get("LIFECYCLE_OUTPUT_SCALE", 8))


def live_device_arrays() -> str:
    """What still holds pool memory: each live cupy array's shape, dtype and who refers to it
    (the failure message of the test below; a leak is found from the log of one device run)."""
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, cupy.ndarray) and obj.nbytes:
            owners = [type(r).__name__ + (f" {sorted(r)[:6]}" if isinstance(r, dict) else "")
                      for r in gc.get_referrers(obj) if r is not found]
            found.append(f"{obj.shape} {obj.dtype} {obj.nbytes} B <- {owners[:4]}")
    return "; ".join(found[:20]) or "no live cupy array (a raw allocation or a leaked pointer)"


def memory() -> tuple[int, int]:
    """(bytes in use in CuPy's default pool, free bytes on the device)."""
    cupy.cuda.Device().synchronize()
    return cupy.get_default_memory_pool().used_bytes(), cupy.cuda.runtime.memGetInfo()[0]


def test_create_run_close_cycles_return_the_memory():
    prompts, output_lens = w1_requests()
    prompts = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=max(1, o // OUTPUT_SCALE), ignore_eos=True)
              for o in output_lens]
    gc.collect()  # what earlier tests left in cycles (a capture collects too: cuda_graph.py)
    used_before, free_before = memory()
    free_after = []
    for _ in range(CYCLES):
        with LLM("qwen3-0.6b", load_format="dummy", device="cuda", dtype="bfloat16",
                 max_model_len=2048, max_num_seqs=256) as llm:
            assert llm.engine.runner.graphs is not None  # the graphs are part of what is freed
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert [len(o.outputs[0].token_ids) for o in outs] == [p.max_tokens for p in params]
            assert llm.engine.get_stats().kv_blocks_used == 0
        used, free = memory()
        # Less than before is what earlier tests of the process left to the collector, frozen
        # by an engine's start (gc.freeze) and let go by this one's shutdown: the new baseline.
        used_before = min(used_before, used)
        if used != used_before:
            gc.collect()
            cycle = "freed by gc.collect()" if memory()[0] == used_before else "not freed by gc"
            pytest.fail(f"{used - used_before} B left in the pool ({cycle}): "
                        + live_device_arrays())
        free_after.append(free)
    # The first engine loads kernels and cuBLAS's own state for good; after it nothing grows.
    kept = cupy.get_default_memory_pool().total_bytes() / MiB  # held by the pool, in use or not
    assert free_before - free_after[0] < 512 * MiB, ((free_before - free_after[0]) / MiB, kept)
    assert max(free_after) - min(free_after) < 64 * MiB, [f / MiB for f in free_after]
