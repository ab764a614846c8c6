"""kernel_check.py's `fp8b1` section (--only fp8b1): the FP8 batch-1 linears as one launch each
(cuda_fp8.FUSED, cuda/fp8_gemv_fused.cu) against the quantize kernel + GEMV pair they replace.

At Llama-3-8B's shapes (qkv and gate_up with the add + RMSNorm, o plain, down with the SiLU-mul):
each op graph-timed as a PDL chain both ways (the weights cycled through copies larger than L2,
so read cold as in the step), the fused one in each (R, MINB) compiled for M = 1, and its outputs
(and the residual it writes) compared bit for bit with the pair's at M = 1..4. Then the real
batch-1 decode step graph of Llama-3-8B in FP8 (kernel_check_decode1's build, real_step and
compare): unfused, every linear fused, and only the linears whose fused GEMV was faster above
(each in its fastest config), the logits compared bit for bit.

    PYTHONPATH=. python tools/kernel_check.py --only fp8b1
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.executor.ops import cuda_fp8
from engine.executor.ops.cuda_kernels import FP8_FUSED_CONFIGS
from tools import kernel_check_decode1 as decode1

# (op, N, K, prologue)
SHAPES = (("qkv", 6144, 4096, cuda_fp8.PRO_NORM), ("o", 4096, 4096, cuda_fp8.PRO_QUANTIZE),
          ("gate_up", 28672, 4096, cuda_fp8.PRO_NORM), ("down", 4096, 14336, cuda_fp8.PRO_SILU))
KINDS = ("quantize", "SiLU-mul+quantize", "add+RMSNorm+quantize")
EPS = 1e-5


def check_fp8b1(ops, kc):
    """kc: the kernel_check module (graph_time, row, OPTS, L2_BYTES)."""
    rng = np.random.default_rng(16)
    best = {}  # linear -> its fastest (R, MINB) where fused beats the pair
    for name, n, k, pro in SHAPES:
        assert cuda_fp8.fused_op(pro, n) == name
        t_old, t_new = check_op(ops, kc, rng, name, n, k, pro)
        config = min(t_new, key=t_new.get)
        if t_new[config] < t_old:
            best[name] = config
        cupy.get_default_memory_pool().free_all_blocks()
    check_step(ops, kc, rng, best)


def _inputs(ops, rng, m, k, pro):
    def up(shape, shift=0.0):
        return ops.from_host((rng.standard_normal(shape) + shift).astype(np.float32))

    x = up((m, 2 * k if pro == cuda_fp8.PRO_SILU else k))
    return x, up((m, k)), up((k,), 1.0)


def unfused(ops, pro, qw, x, res, nw):
    """(y, residual or None): the quantize kernel + fp8.cu's GEMV (res updated in place)."""
    if pro == cuda_fp8.PRO_NORM:
        q, s, res = cuda_fp8.norm_quantize(x, res, nw, EPS, ops.ctype)
    else:
        q, s = (cuda_fp8.silu_quantize if pro == cuda_fp8.PRO_SILU
                else cuda_fp8.quantize_rows)(x, ops.ctype)
        res = None
    y = cupy.empty((x.shape[0], qw.data.shape[0]), ops.storage)
    return cuda_fp8.gemv(q, s, qw, y, ops.ctype), res


def fused(ops, pro, qw, x, res, nw, config=None):
    norm = pro == cuda_fp8.PRO_NORM
    return cuda_fp8.fused_gemv(ops, pro, qw, x, res if norm else None, nw if norm else None,
                               EPS, config)


def _bits(a) -> np.ndarray:
    return cupy.asnumpy(a).view(np.uint16)


def agreement(ops, rng, pro, qw, k) -> str:
    """'bit-identical' where the fused GEMV's y (and residual) equal the pair's at M = 1..4,
    every compiled (R, MINB), else what differs."""
    bad = []
    for m in range(1, cuda_fp8.FUSED_MAX_M + 1):
        x, res, nw = _inputs(ops, rng, m, k, pro)
        want = unfused(ops, pro, qw, x, res.copy(), nw)
        for config in FP8_FUSED_CONFIGS[m]:
            got = fused(ops, pro, qw, x, res, nw, config)
            for label, g, w in (("y", got[0], want[0]), ("residual", got[1], want[1])):
                if w is not None and not np.array_equal(_bits(g), _bits(w)):
                    bad.append(f"{label} M={m} {config}: "
                               f"{int((_bits(g) != _bits(w)).sum())} values differ")
    return "bit-identical M=1..4" if not bad else "DIFFERS: " + "; ".join(bad)


def check_op(ops, kc, rng, name, n, k, pro):
    copies = 1 if kc.OPTS["small"] else max(2, -(-3 * kc.L2_BYTES // (n * k)))  # read cold
    qws = [ops.quantize_fp8(ops.random_weight((n, k), k**-0.5, rng)) for _ in range(copies)]
    err = agreement(ops, rng, pro, qws[0], k)
    x, res, nw = _inputs(ops, rng, 1, k, pro)

    def chained(fn):
        it = iter(range(10**9))
        return kc.graph_time(lambda: fn(qws[next(it) % copies]), max(20, copies), pdl=True)

    t_old = chained(lambda qw: unfused(ops, pro, qw, x, res, nw))
    configs = FP8_FUSED_CONFIGS[1]
    t_new = {c: chained(lambda qw, c=c: fused(ops, pro, qw, x, res, nw, c)) for c in configs}
    default = t_new[configs[0]]
    others = ", ".join(f"{c} {t * 1e6:.2f} us" for c, t in t_new.items() if c != configs[0])
    kc.row("fp8b1", f"{name} {n}x{k} M=1 fused GEMV ({KINDS[pro]}) {configs[0]}, PDL chain",
           err, default, n * k, 2 * n * k,
           extra=f"quantize + GEMV {t_old * 1e6:.2f} us (fused {t_old / default:.3f}x faster); "
                 f"(R, MINB) {others}")
    return t_old, t_new


def check_step(ops, kc, rng, best: dict, ctx: int = 512):
    """The real Llama-3-8B FP8 batch-1 step graph, FUSED off (the default), then every linear
    fused (the default (R, MINB)), then only the linears `best` names, each with its config."""
    _, model = decode1.build(ops, "llama3-8b", "fp8", kc.OPTS["small"], ctx)
    title = f"llama3-8b fp8 B=1 ctx={ctx}"
    variants = {"all fused": (cuda_fp8.FUSED_OPS, {})}
    if best:
        variants[f"fused where faster {best}"] = (tuple(best), best)
    saved = cuda_fp8.FUSED
    cuda_fp8.FUSED = frozenset()
    try:
        base = decode1.real_step(ops, kc, model, ctx)
        ratios = []
        for label, (names, configs) in variants.items():
            settings = {"FUSED": frozenset(names),
                        "FUSED_CONFIG_M1": {**cuda_fp8.FUSED_CONFIG_M1, **configs}}
            _, ratio = decode1.compare(ops, kc, model, ctx, rng, f"{title} {label}",
                                       ("cuda_fp8", settings, (), True), [], base)
            ratios.append(f"{label}: {ratio}")
    finally:
        cuda_fp8.FUSED = saved
    kc.row("fp8b1", f"{title} real step graph, unfused ({base['total']} launches)", "-",
           base["gpu"], extra="fused / unfused: " + "; ".join(ratios))
