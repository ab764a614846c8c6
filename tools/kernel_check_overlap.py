"""kernel_check.py's `overlap` section (--only overlap): could a W1 decode step hide its attention
(bound by reading K/V) under its GEMMs (bound by tensor-core math) on this GPU?

At Llama-3-8B shapes (bf16) and W1's contexts (600..1000 tokens), for B = 64, 128, 256 sequences:
one layer's decode attention of B sequences (the engine's kernel and graph grid) and the gate_up +
down GEMMs of B rows (cublasGemmEx, as the decode graphs run them), each timed alone by CUDA-graph
replay, then both in one graph: back to back on one stream, and forked onto two streams (event
record / wait inside the capture) so that they may run at once, as a step split into two halves
would run one half's attention beside the other half's MLP. The row's notes give the share of the
shorter op the two streams hid: 1 = fully hidden, 0 = no gain over back to back.

W1 on Llama-3-8B shapes spends about as long in decode attention as in its decode GEMMs (README,
Performance), so this share bounds what such a split could win before any engine work.
"""

from __future__ import annotations

import numpy as np

HEADS = (32, 8, 128)  # Llama-3-8B: q heads, kv heads, head_dim
HIDDEN, INTER = 4096, 14336
BATCHES = (64, 128, 256)


def hidden_share(t_a: float, t_b: float, t_both: float) -> float:
    """Of the shorter of two ops (alone: t_a, t_b), the share that running both at once (t_both)
    hid: (t_a + t_b - t_both) / min(t_a, t_b), 0 when t_both is no shorter than their sum."""
    return max(0.0, t_a + t_b - t_both) / min(t_a, t_b)


def two_stream_time(kc, fn_a, fn_b, calls: int = 10, reps: int = 10) -> float:
    """Seconds per (fn_a beside fn_b): `calls` pairs captured in one graph, fn_a on the capture
    stream and fn_b on a second stream forked from it and joined back after each pair."""
    import cupy

    cupy.cuda.Device().synchronize()
    main, side = cupy.cuda.Stream(non_blocking=True), cupy.cuda.Stream(non_blocking=True)
    for _ in range(2):  # warm-up: compiles, and fills the memory pool for the capture
        with main:
            fn_a()
        with side:
            fn_b()
    main.synchronize()
    side.synchronize()
    with main:
        main.begin_capture()
        for _ in range(calls):
            fork, join = cupy.cuda.Event(disable_timing=True), cupy.cuda.Event(disable_timing=True)
            fork.record(main)
            side.wait_event(fork)
            fn_a()
            with side:
                fn_b()
            join.record(side)
            main.wait_event(join)
        graph = main.end_capture()
        return kc.replay_time(graph, main, calls, reps)


def check_overlap(ops, kc):
    """kc: the kernel_check module (row, graph_time, replay_time, _decode_batch)."""
    import cupy

    from engine.executor.ops import cuda_attention as ca

    nh, nkv, hd = HEADS
    rng = np.random.default_rng(17)
    gate_up = ops.random_weight((2 * INTER, HIDDEN), HIDDEN**-0.5, rng)
    down = ops.random_weight((HIDDEN, INTER), INTER**-0.5, rng)
    for b in BATCHES[:1] if kc.OPTS["small"] else BATCHES:
        ctx = rng.integers(600, 1001, b).tolist()
        meta, cache = kc._decode_batch(ops, ctx, nkv, hd)
        qkv = ops.random_weight((b, (nh + 2 * nkv) * hd), 1.0, rng)
        dmeta = ops.prepare_metadata(meta)
        dmeta.num_splits = ca.decode_plan(b, nkv, nh // nkv, 32768).num_splits
        x = ops.random_weight((b, HIDDEN), 1.0, rng)
        act = ops.random_weight((b, INTER), 1.0, rng)  # down's input (SiLU-mul not timed)
        h = cupy.empty((b, 2 * INTER), ops.storage)
        y = cupy.empty((b, HIDDEN), ops.storage)

        def attention(qkv=qkv, dmeta=dmeta, cache=cache):
            ops.attention(qkv, cache[0], cache[1], dmeta, nh, nkv, hd**-0.5)

        def mlp(x=x, act=act, h=h, y=y):
            ops._gemm(x, gate_up, h, ops.dtype)
            ops._gemm(act, down, y, ops.dtype)

        t_attn = kc.graph_time(attention)
        t_mlp = kc.graph_time(mlp)
        t_serial = kc.graph_time(lambda: (mlp(), attention()))
        t_both = two_stream_time(kc, mlp, attention)
        kv = sum(ctx) * nkv * hd * 2 * 2
        flops = 2 * b * HIDDEN * 3 * INTER
        kc.row("overlap", f"B={b} attention ({kv / 1e6:.0f} MB K/V) beside gate_up+down GEMMs",
               "-", t_both, kv, flops, extra=f"alone: attention {t_attn * 1e6:.1f} us, GEMMs "
                                  f"{t_mlp * 1e6:.1f} us ({flops / t_mlp / 1e12:.0f} TFLOP/s); "
                                  f"one stream {t_serial * 1e6:.1f} us; two streams "
                                  f"{t_both * 1e6:.1f} us = {t_both / t_serial:.3f}x; share "
                                  f"hidden {hidden_share(t_attn, t_mlp, t_both):.2f}")
