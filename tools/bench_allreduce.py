"""All-reduce time of one tensor-parallel decode step (issue 18): NCCL bf16 all-reduces of the
(batch, hidden) activations, two per layer plus the embedding's, timed on N GPUs of this host.

    python tools/bench_allreduce.py --model llama3-8b --tensor-parallel-size 2 --batch 1 256

One process per GPU, as the engine runs them; the collectives replay from a captured CUDA graph
(as in a decode step), so the figure is the GPU time of the all-reduces, launch overhead excluded.
Prints one JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.model.config import ModelConfig  # noqa: E402
from tools.workloads import count_arg, require_gpu  # noqa: E402

REPLAYS = 50


def _rank(rank: int, size: int, unique_id, hidden: int, num_layers: int, batches: list[int],
          results) -> None:
    import cupy

    from engine.executor.distributed import NcclCommunicator

    cupy.cuda.Device(rank).use()
    comm = NcclCommunicator(unique_id, rank, size, "bfloat16")
    stream = cupy.cuda.Stream(non_blocking=True)
    out = {}
    for batch in batches:
        x = cupy.zeros((batch, hidden), cupy.uint16)  # bf16 bits
        with stream:
            comm.all_reduce(x)  # warm-up: NCCL sets up its channels outside the capture
            stream.synchronize()
            stream.begin_capture()
            for _ in range(2 * num_layers + 1):
                comm.all_reduce(x)
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            for _ in range(REPLAYS):
                graph.launch(stream)
            end.record(stream)
            end.synchronize()
        out[batch] = cupy.cuda.get_elapsed_time(start, end) / REPLAYS  # ms per step
    comm.close()
    if rank == 0:
        results.put(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b", help="preset name (its hidden size, layers)")
    ap.add_argument("--tensor-parallel-size", type=count_arg, default=2,
                    help="GPUs (ranks, one process each) the all-reduces run over (default 2)")
    ap.add_argument("--batch", type=count_arg, nargs="+", default=[1, 256],
                    help="rows of the (batch, hidden) activations, one timing each "
                         "(default 1 256)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    require_gpu("bench_allreduce")
    from cupy.cuda import nccl

    config = ModelConfig.from_preset(args.model)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    uid = nccl.get_unique_id()
    size = args.tensor_parallel_size
    t = time.perf_counter()
    procs = [ctx.Process(target=_rank, args=(r, size, uid, config.hidden_size, config.num_layers,
                                             args.batch, results)) for r in range(size)]
    for p in procs:
        p.start()
    per_step = results.get(timeout=300)
    for p in procs:
        p.join(60)
    result = {"model": args.model, "tensor_parallel_size": size,
              "all_reduces_per_step": 2 * config.num_layers + 1,
              "ms_per_decode_step": {str(b): round(ms, 4) for b, ms in per_step.items()},
              "wall_s": round(time.perf_counter() - t, 1)}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
