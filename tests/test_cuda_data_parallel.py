"""On the GPU: data-parallel engine cores each on their own GPU (CUDA_VISIBLE_DEVICES in the
child), giving the tokens one in-process engine gives; too many cores for the GPUs is one line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_gpu

pytestmark = pytest.mark.gpu
cupy = require_gpu()

from engine.core.outputs import EngineCoreRequest  # noqa: E402
from engine.core.sampling_params import SamplingParams  # noqa: E402
from engine.dp_client import DPClient  # noqa: E402
from engine.engine import LLMEngine  # noqa: E402
from engine.executor.ops import visible_gpus  # noqa: E402
from engine.model.config import EngineConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIELDS = dict(model="smollm2-135m", load_format="dummy", device="cuda", max_model_len=256,
              max_num_seqs=8, num_kv_blocks=64)
PROMPTS = [[1, 100 + i, 200 + i, 300 + i] for i in range(8)]
PARAMS = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


async def _run_dp(num_cores: int) -> tuple[list[list[int]], list[str]]:
    dp = DPClient(EngineConfig(**FIELDS, data_parallel_size=num_cores))
    dp.start()
    try:
        ready = dp.wait_ready()
        dp.attach()
        for i, prompt in enumerate(PROMPTS):
            dp.add_request(EngineCoreRequest(f"r{i}", prompt, PARAMS, time.time()))
        tokens = {f"r{i}": [] for i in range(len(PROMPTS))}
        unfinished = set(tokens)
        while unfinished:
            message = await asyncio.wait_for(dp.get_output_async(), 60)
            assert message.fatal is None, message.fatal
            for out in message.outputs:
                tokens[out.request_id] += out.new_token_ids
                if out.finish_reason is not None:
                    unfinished.discard(out.request_id)
        assert all(n > 0 for n in dp.balancer.num_routed)
        return [tokens[f"r{i}"] for i in range(len(PROMPTS))], ready.summary
    finally:
        dp.shutdown()


@pytest.mark.parametrize("num_cores", [1, 2])
def test_cores_on_their_own_gpus_give_the_in_process_tokens(num_cores):
    gpus = visible_gpus()
    if num_cores > len(gpus):
        pytest.skip(f"{num_cores} cores need {num_cores} GPUs; {len(gpus)} visible")
    got, summary = asyncio.run(_run_dp(num_cores))
    assert f"on GPUs {' | '.join(gpus[:num_cores])}" in summary[-1]
    engine = LLMEngine(EngineConfig(**FIELDS))
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, PARAMS)
    want = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                want[out.request_id] = out.outputs[0].token_ids
    engine.shutdown()
    assert got == [want[f"r{i}"] for i in range(len(PROMPTS))]


def test_more_cores_than_gpus_is_one_line_and_exit_1():
    n = len(visible_gpus()) + 1
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "smollm2-135m",
                        "--load-format", "dummy", "--device", "cuda", "--port", "0",
                        "--data-parallel-size", str(n)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert f"data_parallel_size {n} x tensor_parallel_size 1 needs {n} GPUs" in lines[0]
