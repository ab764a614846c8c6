"""What W1's parts cost in energy, each run alone and sustained at the GPU's power cap.

W1 on Llama-3-8B shapes holds the H200 at its 700 W cap from the first prompt step to the last
second or so, with the SM clock pulled down to ~1.5 GHz. There the wall time is the energy the
run spends over the watts the cap allows, so this tool asks: what energy do W1's counted parts
need, each timed alone at the cap?

- prefill GEMMs: a layer's four products (qkv, o, gate_up, down) at 8,192 token rows;
- decode GEMMs: the same four at the decode graphs' row counts, over enough weight copies that
  every call reads its weights from HBM, and the lm_head;
- decode attention: W1's batch-256 mix (one-split grids) and a 32-sequence tail mix (split
  grids), as joules per byte of K and V read;
- the GPU's draw with nothing running.

Each part is a CUDA graph replayed back to back for --warm seconds untimed and then --measure
seconds between events; NVML's energy counter (libnvidia-ml, read through ctypes) gives its
joules. The parts are then scaled by W1's counts from a model of its schedule (all prompts
first, then one decode step per output token: a sequence with O outputs is in O - 1 decode
steps, its context the prompt plus the tokens so far). Left out, so the sum is a floor for
these kernels: prefill attention, norms, RoPE, SiLU, the sampler and the gaps.

    python tools/energy_parts.py --w1-seconds 14.75 --w1-watts 679

prints each part (us a call, mJ a call, mean W and SM MHz) and the W1 sum: joules by part and
the wall time that energy takes at the parts' mean draw under the cap.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.nvml import Nvml  # noqa: E402
from tools.workloads import positive_arg, require_gpu, w1_requests  # noqa: E402

LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 32, 8, 128  # Llama-3-8B
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}  # (N, K) of each weight
LM_HEAD = (128256, 4096)
KV_BYTES_PER_TOKEN = LAYERS * NUM_KV_HEADS * HEAD_DIM * 2 * 2  # K and V, 16 bits
DECODE_ROWS = (8, 32, 64, 128, 192, 256)
PREFILL_ROWS = 8192
ATTN_CALLS = 8  # attention calls a graph: the replay's own launch is not the figure


def w1_schedule():
    """W1 (tools/workloads.py): (prompt lengths, and per decode step its rows and the context
    tokens its attention reads), all prompts first."""
    prompt_ids, output_lens = w1_requests()
    prompts = np.array([len(p) for p in prompt_ids])
    outputs = np.array(output_lens)
    steps = np.arange(1, int(outputs.max()))
    alive = (outputs[None, :] - 1) >= steps[:, None]  # (steps, sequences)
    rows = alive.sum(axis=1)
    context = (alive * (prompts[None, :] + steps[:, None])).sum(axis=1)
    return prompts, rows, context


def graph_rows(rows: int) -> int:
    """The decode graph a step of `rows` sequences replays: multiples of 8 (cuda_graph.py)."""
    return -(-rows // 8) * 8


def interpolate(points: dict[int, float], m: int) -> float:
    """points[m] measured at a few row counts; linear between them, flat outside."""
    xs = sorted(points)
    return float(np.interp(m, xs, [points[x] for x in xs]))


def w1_joules(prompts, rows, context, parts) -> dict[str, float]:
    """W1's counted energy by part, from parts: {"prefill": J a token-layer, "layer": {M: J},
    "lm_head": {M: J}, "attn_batch": J a KV byte (> 64 rows), "attn_tail": (<= 64 rows)}."""
    m = np.array([graph_rows(int(r)) for r in rows])
    kv = context.astype(np.float64) * KV_BYTES_PER_TOKEN
    wide = rows > 64
    return {
        "prefill GEMMs": parts["prefill"] * float(prompts.sum()) * LAYERS,
        "decode GEMMs": LAYERS * sum(interpolate(parts["layer"], int(x)) for x in m),
        "lm_head": sum(interpolate(parts["lm_head"], int(x)) for x in m),
        "decode attention": parts["attn_batch"] * float(kv[wide].sum())
        + parts["attn_tail"] * float(kv[~wide].sum()),
    }


def sustained(launch, nvml: Nvml, warm_s: float, measure_s: float):
    """(seconds, joules, mean W, mean SM MHz) per launch(): replayed back to back, untimed for
    warm_s, then timed between events for measure_s with the energy counter read around it."""
    import cupy

    stream = cupy.cuda.get_current_stream()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < warm_s:
        for _ in range(4):
            launch()
        stream.synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    clocks, reps = [], 0
    e0 = nvml.energy_mj()
    start.record(stream)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < measure_s:
        for _ in range(4):
            launch()
        reps += 4
        clocks.append(nvml.sm_mhz())
        stream.synchronize()
    end.record(stream)
    end.synchronize()
    wall = time.perf_counter() - t0
    joules = (nvml.energy_mj() - e0) / 1e3
    seconds = cupy.cuda.get_elapsed_time(start, end) / 1e3
    return seconds / reps, joules / reps, joules / wall, sum(clocks) / len(clocks)


def capture(fn):
    """fn's launches as a CUDA graph on a fresh stream (fn run once first: compiles, plans and
    fills the memory pool); returns a function that replays it on that stream."""
    import cupy

    cupy.cuda.Device().synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        fn()
        stream.synchronize()
        stream.begin_capture()
        fn()
        graph = stream.end_capture()

    def launch():
        with stream:
            graph.launch(stream)
    return launch, stream


def measure(name, fn, nvml, args, table):
    import cupy

    launch, stream = capture(fn)
    with stream:
        sec, joules, watts, mhz = sustained(launch, nvml, args.warm, args.measure)
    table.append((name, sec, joules, watts, mhz))
    print(f"| {name} | {sec * 1e6:.1f} | {joules * 1e3:.2f} | {watts:.0f} | {mhz:.0f} |",
          flush=True)
    cupy.get_default_memory_pool().free_all_blocks()
    return joules, watts


READ_PAGES = r"""
// Three ways to read the decode mix's K and V pages and compute nothing. Block (kv head,
// sequence), 256 threads: each 4 KB page of K and of V is 256 16-byte words, one per thread. The
// XOR of the words feeds a store that never happens, so the loads stay.
#define FOR_PAGES int h = blockIdx.x, s = blockIdx.y, n = pages[s]; unsigned acc = 0;
#define PAGE(p) (((long)tables[s * max_pages + (p)] * nkv + h) * 256)
#define KEEP if (acc == 0x9E3779B9u) out[s * nkv + h] = acc;
#define ARGS const uint4* __restrict__ k, const uint4* __restrict__ v, \
  const int* __restrict__ tables, const int* __restrict__ pages, int max_pages, int nkv, \
  unsigned* __restrict__ out
constexpr int ST = 4;  // pages of K and V in flight a block (the smem forms)

__device__ __forceinline__ unsigned fold(uint4 a, uint4 b) {
  return a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w;
}
__device__ __forceinline__ unsigned smem(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// global -> registers (LDG.128)
extern "C" __global__ void read_pages(ARGS) {
  FOR_PAGES
#pragma unroll 4
  for (int p = 0; p < n; ++p) acc ^= fold(k[PAGE(p) + threadIdx.x], v[PAGE(p) + threadIdx.x]);
  KEEP
}

// global -> shared by cp.async (16 bytes a thread, as the decode kernel copies), then each
// thread reads back its own words: ST pages in flight, no block barrier
extern "C" __global__ void read_pages_cp_async(ARGS) {
  __shared__ __align__(16) uint4 ks[ST][256], vs[ST][256];
  FOR_PAGES
  const int t = threadIdx.x;
  for (int p = 0; p < ST; ++p) {
    if (p < n) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem(&ks[p][t])),
                   "l"(k + PAGE(p) + t));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem(&vs[p][t])),
                   "l"(v + PAGE(p) + t));
    }
    asm volatile("cp.async.commit_group;");
  }
  for (int p = 0; p < n; ++p) {
    const int st = p % ST;
    asm volatile("cp.async.wait_group %0;" ::"n"(ST - 1));
    acc ^= fold(ks[st][t], vs[st][t]);
    if (p + ST < n) {
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem(&ks[st][t])),
                   "l"(k + PAGE(p + ST) + t));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem(&vs[st][t])),
                   "l"(v + PAGE(p + ST) + t));
    }
    asm volatile("cp.async.commit_group;");
  }
  KEEP
}

// global -> shared by the bulk copy engine (cp.async.bulk: one instruction a 4 KB page, an
// mbarrier counting its bytes), then every thread reads its words: ST pages in flight
extern "C" __global__ void read_pages_bulk(ARGS) {
  __shared__ __align__(128) uint4 ks[ST][256], vs[ST][256];
  __shared__ __align__(8) unsigned long long bar[ST];
  FOR_PAGES
  const int t = threadIdx.x;
  if (t == 0) {
    for (int i = 0; i < ST; ++i)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem(&bar[i])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int p, int st) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 8192;"
                 ::"r"(smem(&bar[st])) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1], 4096, [%2];" ::"r"(smem(&ks[st][0])), "l"(k + PAGE(p)),
                 "r"(smem(&bar[st])) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1], 4096, [%2];" ::"r"(smem(&vs[st][0])), "l"(v + PAGE(p)),
                 "r"(smem(&bar[st])) : "memory");
  };
  if (t == 0)
    for (int p = 0; p < ST && p < n; ++p) issue(p, p);
  for (int p = 0; p < n; ++p) {
    const int st = p % ST;
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" ::"r"(smem(&bar[st])), "r"((p / ST) & 1) : "memory");
    acc ^= fold(ks[st][t], vs[st][t]);
    __syncthreads();  // every thread is done with the stage before it is refilled
    if (t == 0 && p + ST < n) issue(p + ST, st);
  }
  KEEP
}
"""

READ_KERNELS = {"read_pages": "registers (LDG.128)",
                "read_pages_cp_async": "shared memory by cp.async",
                "read_pages_bulk": "shared memory by bulk copies"}


def read_floor(cache, tables, pages, nvml, args, table) -> float:
    """Joules a byte for reading the decode mix's K and V pages and computing nothing, each of
    READ_KERNELS' ways (cache (2, blocks, nkv, 16, 128) 16-bit, one 4 KB page per kv head):
    the least of them, what the attention's bytes cost at the least."""
    import cupy

    module = cupy.RawModule(code=READ_PAGES, options=("-std=c++17",))
    tables_d = cupy.asarray(tables, dtype=cupy.int32)
    pages_d = cupy.asarray(pages, dtype=cupy.int32)
    out = cupy.zeros(len(pages) * NUM_KV_HEADS, cupy.uint32)
    nbytes = sum(pages) * NUM_KV_HEADS * 2 * 16 * HEAD_DIM * 2
    least = float("inf")
    for name, how in READ_KERNELS.items():
        kernel = module.get_function(name)

        def read(kernel=kernel):
            for _ in range(ATTN_CALLS):
                kernel((NUM_KV_HEADS, len(pages)), (256,),
                       (cache[0], cache[1], tables_d, pages_d, np.int32(tables.shape[1]),
                        np.int32(NUM_KV_HEADS), out))
        joules, _ = measure(f"the same K/V pages read into {how}, nothing computed", read, nvml,
                            args, table)
        least = min(least, joules / ATTN_CALLS / nbytes)
    return least


def attention_parts(ops, rng, parts: dict, nvml, args, table, variants: bool = False) -> list:
    """The decode attention on W1's batch-256 mix (one-split grids) and on a 32-sequence tail mix
    (split grids), as joules a K/V byte in parts["attn_batch"] / ["attn_tail"], and the batch
    mix's pages read with nothing computed in parts["read_floor"]; `variants`: only the batch
    mix, then attention_variants. Returns the watts each drew."""
    from engine.executor.ops import cuda_attention as ca
    from tools.kernel_check import _decode_batch

    mixes = {"attn_batch": ("decode attention, W1's batch-256 mix",
                            np.random.default_rng(3).integers(100, 1101, 256)),
             "attn_tail": ("decode attention, 32 x 1,100..2,000",
                           np.random.default_rng(4).integers(1100, 2001, 32))}
    drawn = []
    for key, (label, ctx) in mixes.items():
        ctx = [int(c) for c in ctx]
        meta, cache = _decode_batch(ops, ctx, NUM_KV_HEADS, HEAD_DIM)  # 16-token pages
        tables, blocks = meta.block_tables, [-(-c // 16) for c in ctx]
        qkv = ops.random_weight((len(ctx), (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM), 1.0, rng)
        dmeta = ops.prepare_metadata(meta)
        dmeta.num_splits = ca.decode_plan(len(ctx), NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS,
                                          32768).num_splits

        def attn(qkv=qkv, cache=cache, dmeta=dmeta):
            for _ in range(ATTN_CALLS):
                ops.attention(qkv, cache[0], cache[1], dmeta, NUM_HEADS, NUM_KV_HEADS,
                              HEAD_DIM**-0.5)
        joules, watts = measure(f"{label} ({dmeta.num_splits} splits)", attn, nvml, args,
                                table)
        parts[key] = joules / ATTN_CALLS / (sum(ctx) * KV_BYTES_PER_TOKEN / LAYERS)
        drawn.append(watts)
        if key == "attn_batch":  # the floor: the same pages read and nothing computed
            parts["read_floor"] = read_floor(cache, tables, blocks, nvml, args, table)
            if variants:
                attention_variants(attn, dmeta, sum(ctx), parts, nvml, args, table)
                return drawn
        del cache
    return drawn


def attention_variants(attn, dmeta, keys: int, parts: dict, nvml, args, table) -> None:
    """The batch mix's decode attention on each (warps, stages) of the mma kernel: pJ a K/V byte
    beside the read floor (the tiles' layout and how the stages fill, PAGEDSERVE_DECODE_MMA_TR
    and _TMA, and the variants, _CONFIGS, are fixed at import: run the tool once per value)."""
    from engine.executor.ops.cuda_kernels import (
        DECODE_MMA_CONFIGS,
        DECODE_MMA_TMA,
        DECODE_MMA_TR,
    )

    plan = dmeta.work[NUM_HEADS // NUM_KV_HEADS]
    nbytes = keys * KV_BYTES_PER_TOKEN / LAYERS
    print(f"\nPAGEDSERVE_DECODE_MMA_TR={DECODE_MMA_TR} _TMA={DECODE_MMA_TMA}; read floor "
          f"{parts['read_floor'] * 1e12:.0f} pJ a byte, the default "
          f"{parts['attn_batch'] * 1e12:.0f}")
    for warps, stages in DECODE_MMA_CONFIGS:
        plan.decode_config = (warps, stages)
        joules, _ = measure(f"batch mix, {warps} warps x {stages} stages", attn, nvml, args,
                            table)
        sec = table[-1][1] / ATTN_CALLS
        print(f"  {warps} warps x {stages} stages: {joules / ATTN_CALLS / nbytes * 1e12:.0f} pJ "
              f"a byte, {nbytes / sec / 1e12:.2f} TB/s", flush=True)
    plan.decode_config = None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm", type=positive_arg, default=0.6,
                    help="seconds each part runs untimed before it is timed")
    ap.add_argument("--measure", type=positive_arg, default=1.2, help="seconds each part is timed")
    ap.add_argument("--w1-seconds", type=positive_arg, default=None,
                    help="W1's measured wall time on this GPU, to set beside the sum")
    ap.add_argument("--w1-watts", type=positive_arg, default=None,
                    help="W1's measured mean draw while busy (nvidia-smi), for its energy")
    ap.add_argument("--attention-variants", action="store_true",
                    help="only the decode attention: the batch mix on each (warps, stages) of "
                         "the mma kernel beside the read floor, in pJ a byte")
    args = ap.parse_args(argv)
    require_gpu("energy_parts")
    import cupy

    from engine.executor.ops.cuda_ops import CudaOps

    ops = CudaOps("bfloat16")
    ops._gemm.tuned = None  # cublasGemmEx, as the decode graphs run it above 128 rows
    nvml = Nvml()
    rng = np.random.default_rng(5)
    table: list = []
    print("| part | us a call | mJ a call | W | SM MHz |\n|---|---|---|---|---|", flush=True)

    def gemms(m: int, layers: list) -> None:
        x = {k: ops.random_weight((m, k), 1.0, rng) for k in {k for _, k in SHAPES.values()}}
        out = {name: cupy.empty((m, n), ops.storage) for name, (n, _) in SHAPES.items()}

        def fn():
            for layer in layers:
                for name, (_, k) in SHAPES.items():
                    ops._gemm(x[k], layer[name], out[name], ops.dtype)
        return fn

    parts: dict = {"layer": {}, "lm_head": {}}
    if args.attention_variants:
        attention_parts(ops, rng, parts, nvml, args, table, variants=True)
        return
    # the GPU at its cap before the first part
    one = {name: ops.random_weight(shape, 0.02, rng) for name, shape in SHAPES.items()}
    spin = gemms(PREFILL_ROWS, [one])
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 1.5:
        spin()
        cupy.cuda.Device().synchronize()
    joules, watts_cap = measure(f"prefill layer's GEMMs, {PREFILL_ROWS} rows",
                                gemms(PREFILL_ROWS, [one]), nvml, args, table)
    parts["prefill"] = joules / PREFILL_ROWS
    del one, spin
    copies = [{name: ops.random_weight(shape, 0.02, rng) for name, shape in SHAPES.items()}
              for _ in range(3)]  # 1.3 GB: every call reads its weights from HBM
    drawn = [watts_cap]
    for m in DECODE_ROWS:
        joules, watts = measure(f"decode layer's GEMMs, {m} rows", gemms(m, copies), nvml,
                                args, table)
        parts["layer"][m] = joules / len(copies)
        drawn.append(watts)
    del copies
    heads = [ops.random_weight(LM_HEAD, 0.02, rng) for _ in range(2)]
    for m in DECODE_ROWS:
        x = ops.random_weight((m, LM_HEAD[1]), 1.0, rng)
        out = cupy.empty((m, LM_HEAD[0]), ops.storage)
        joules, _ = measure(f"lm_head, {m} rows", lambda x=x, out=out, hs=heads: [
            ops._gemm(x, w, out, ops.dtype) for w in hs], nvml, args, table)
        parts["lm_head"][m] = joules / len(heads)
    heads = None
    drawn += attention_parts(ops, rng, parts, nvml, args, table)
    cupy.cuda.Device().synchronize()
    e0, t0 = nvml.energy_mj(), time.perf_counter()
    time.sleep(2.0)
    idle_w = (nvml.energy_mj() - e0) / 1e3 / (time.perf_counter() - t0)
    print(f"| nothing running | - | - | {idle_w:.0f} | {nvml.sm_mhz()} |")

    prompts, rows, context = w1_schedule()
    by_part = w1_joules(prompts, rows, context, parts)
    total = sum(by_part.values())
    cap_w = max(drawn)
    print(f"\nW1 model: {prompts.sum():,} prompt tokens, {len(rows)} decode steps, "
          f"{(rows.sum() + len(prompts)):,} output tokens")
    print("| W1 part | J | s at the cap's draw |\n|---|---|---|")
    for name, j in by_part.items():
        print(f"| {name} | {j:,.0f} | {j / cap_w:.2f} |")
    print(f"| counted parts | {total:,.0f} | {total / cap_w:.2f} |")
    output_tokens = int(rows.sum() + len(prompts))
    print(f"at {cap_w:.0f} W (the parts' highest draw) the counted parts alone take "
          f"{total / cap_w:.2f} s: W1 could reach at most {output_tokens / (total / cap_w):,.0f} "
          "output tok/s with these kernels, before the parts left out")
    attn_bytes = float(context[rows > 64].sum()) * KV_BYTES_PER_TOKEN
    floor_j = parts["read_floor"] * attn_bytes
    print(f"decode attention (batch mix): {parts['attn_batch'] * 1e12:.0f} pJ a K/V byte against "
          f"{parts['read_floor'] * 1e12:.0f} for reading the same pages alone: in W1's steps of "
          f"more than 64 sequences ({attn_bytes / 1e12:.1f} TB) the attention spends "
          f"{parts['attn_batch'] * attn_bytes - floor_j:,.0f} J beyond the reads "
          f"({(parts['attn_batch'] * attn_bytes - floor_j) / cap_w:.2f} s at the cap)")
    if args.w1_seconds and args.w1_watts:
        w1_j = args.w1_seconds * args.w1_watts
        print(f"W1 measured: {args.w1_seconds:.2f} s at {args.w1_watts:.0f} W = {w1_j:,.0f} J; "
              f"the counted parts are {total / w1_j:.1%} of it")


if __name__ == "__main__":
    main()
