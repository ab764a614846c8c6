"""kernel_check's `gguf` section: cuda/gguf.cu against its numpy twin (engine/model/gguf_quants.py)
and timed at Llama-3-8B shapes.

- dequantize: the device's float32 output equals the twin bit for bit (count of differing values),
  its bf16 output equals the twin rounded to bf16;
- GEMV: v1 and v2 against the twin's float matrix times x, v3 (x quantized to int8,
  cuda/gguf_dp4a.cu) against its twin engine/model/gguf_dot.py, at M = 1, 3, 8, rows aligned and
  not (v2 and v3 where they apply: Q4_K and Q8_0 with K a multiple of 2048); v3's quantized x
  against the twin's bit for bit;
- timing of the TIMED formats, cold weights (more copies than L2 holds): the fused GEMV at M = 1,
  2, 4, 8, every version on one line, and the dequantize + cuBLAS path at M = 8, 64
  (DEQUANT_SHAPES), in us, GB/s of the packed bytes read and % of the H200's 4.8 TB/s. Twin
  checks print one summary line, and each failure.
"""

from __future__ import annotations

import cupy
import numpy as np

from engine.executor.ops import cuda_quant_gguf as cq
from engine.executor.ops.cuda_kernels import GGUF_GEMV2_KINDS, GGUF_GEMV3_KINDS, GGUF_GEMV_M
from engine.model import gguf_dot
from engine.model import gguf_quants as gq
from engine.model.quantized import QuantizedWeight

L2_BYTES = 60 << 20
PEAK_BW = 4.8e12  # the H200's HBM3e bandwidth (spec sheet)
TIMED = ("Q4_K", "Q8_0", "Q6_K")  # the targets' formats and Q4_K_M's other one (M = 1 only)
DEQUANT_SHAPES = ("qkv 6144x4096", "gate_up 28672x4096", "down 4096x14336")
FUSED_SHAPES = ("qkv 6144x4096", "gate_up 28672x4096")  # v2's add + norm at M = 1
SHAPES = {"qkv 6144x4096": (6144, 4096), "o 4096x4096": (4096, 4096),
          "gate 14336x4096": (14336, 4096), "gate_up 28672x4096": (28672, 4096),
          "down 4096x14336": (4096, 14336), "lm_head 128256x4096": (128256, 4096)}


def finite_blocks(kind: str, shape: tuple, rng) -> np.ndarray:
    """Random blocks with every bit random except the float16 scales (random finite values)."""
    return gq.random_blocks(kind, shape, 0.02, rng, random_scales=True)


def upload(kind: str, host: np.ndarray, shape: tuple) -> QuantizedWeight:
    return QuantizedWeight(kind, shape, cupy.asarray(host))


def bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bf16 -> float32 (what from_float<__nv_bfloat16> does)."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def check_twins(ops, small: bool, report):
    rng = np.random.default_rng(0)
    for kind in gq.KINDS:
        values = gq.BLOCKS[kind][0]
        for rows, k in ((64, 4096), (9, 3 * values)) if not small else ((9, 3 * values),):
            host = finite_blocks(kind, (rows, k), rng)
            want = gq.dequantize_gguf(QuantizedWeight(kind, (rows, k), host))
            w = upload(kind, host, (rows, k))
            got = cq.dequantize(w, ops.ctype, exact=True).get()
            diff = int(np.count_nonzero(got.view(np.uint32) != want.view(np.uint32)))
            got16 = ops.to_host(cq.dequantize(w, ops.ctype))
            diff16 = int(np.count_nonzero(got16 != bf16_round(want)))
            ids = rng.integers(0, rows, 5).astype(np.int32)
            emb = cq.dequantize(w, ops.ctype, exact=True, ids=cupy.asarray(ids)).get()
            diff_emb = int(np.count_nonzero(emb.view(np.uint32) != want[ids].view(np.uint32)))
            report(f"{kind} dequantize {rows}x{k}",
                   f"fp32 diff {diff}, bf16 diff {diff16}, gather diff {diff_emb}",
                   "OK" if diff == diff16 == diff_emb == 0 else "MISMATCH", quiet=True)
            for m in (1, 3, 8):
                x_h = rng.standard_normal((m, k)).astype(np.float32)
                x = ops.from_host(x_h)
                ref = ops.to_host(x) @ want.T
                for version in versions(kind, m, k):
                    out = cupy.empty((m, rows), ops.storage)
                    cq.gemv(x, w, out, ops.ctype, **variant(version))
                    twin = (gguf_dot.linear(ops.to_host(x), QuantizedWeight(kind, (rows, k), host))
                            if version.startswith("v3") else ref)
                    err = rel_err(ops.to_host(out), twin)
                    report(f"{kind} GEMV {version} {rows}x{k} M={m}", f"rel err {err:.1e}",
                           "OK" if err < 1e-2 else "MISMATCH", quiet=True)
                if "v3" in versions(kind, m, k):
                    q, dx, sums, _ = cq.quantize_x(x, ops.ctype)
                    tq, tdx, tsums = gguf_dot.quantize_x(ops.to_host(x))
                    diff = (int(np.count_nonzero(q.get() != tq))
                            + int(np.count_nonzero(dx.get().view(np.uint32) != tdx.view(np.uint32)))
                            + int(np.count_nonzero(sums.get() != tsums)))
                    report(f"v3 x quantization M={m} K={k}", f"{diff} values differ",
                           "OK" if diff == 0 else "MISMATCH", quiet=True)


def versions(kind: str, m: int, k: int) -> tuple:
    """The GEMV kernels that run (kind, m rows, K)."""
    compiled = next(c for c in GGUF_GEMV_M if c >= m)
    found = ["v1"]
    if cq.gemv2_fits(kind, compiled, k):
        # v2x2: Q4_K's 2 weight rows per warp at M = 1 (cq.GEMV2_ROWS)
        found += ["v2", "v2x2"] if kind == "Q4_K" and m == 1 else ["v2"]
    if cq.gemv3_fits(kind, compiled, k):
        # v3: several blocks per SM; v3 big: one block of GGUF_GEMV3_BIG warps (cq.use_big)
        found += ["v3", "v3 big"] if m == 1 else ["v3"]
    return tuple(found)


def variant(version: str) -> dict:
    """cq.gemv's arguments for a versions() name."""
    return {"version": version[:2], "rows2": 2 if version == "v2x2" else None,
            "big": version == "v3 big"}


def check_speed(ops, small: bool, timer, report):
    rng = np.random.default_rng(1)
    shapes = {"small 1024x1024": (1024, 1024)} if small else SHAPES
    for kind in TIMED:
        for name, (n, k) in shapes.items():
            nbytes = n * gq.row_bytes(kind, k)
            copies = 1 if small else max(1, -(-3 * L2_BYTES // nbytes))
            host = gq.random_blocks(kind, (n, k), 0.02, rng)
            ws = [upload(kind, host, (n, k)) for _ in range(copies)]
            gl = cq.GGUFLinear(ops)
            for m in ((1,) if small or kind == "Q6_K" else (1, 2, 4, 8)):
                x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
                out = cupy.empty((m, n), ops.storage)
                times = {}
                for version in versions(kind, m, k):
                    it = iter(range(10**9))
                    times[version] = timer(lambda x=x, out=out, it=it, ws=ws, v=version: cq.gemv(
                        x, ws[next(it) % len(ws)], out, ops.ctype, **variant(v)),
                        max(20, copies))
                plain = dict(times)
                for version in ("v2", "v3", "v3 big") if m == 1 else ():
                    if version in times:  # as in a decode graph: weights stream during the wait
                        it = iter(range(10**9))
                        times[f"{version} PDL chain"] = timer(
                            lambda x=x, out=out, it=it, ws=ws, v=version: cq.gemv(
                                x, ws[next(it) % len(ws)], out, ops.ctype, **variant(v)),
                            max(20, copies), pdl=True)
                others = min(t for v, t in plain.items() if not v.startswith("v3"))
                report(f"{kind} {name} GEMV M={m}", " | ".join(
                    f"{v} {t * 1e6:.1f} us {nbytes / t / 1e9:.0f} GB/s ({nbytes / t / PEAK_BW:.0%})"
                    for v, t in times.items()),
                    f"v3 {others / min(t for v, t in plain.items() if v.startswith('v3')):.2f}x "
                    "best other" if "v3" in plain else
                    f"v2 {plain['v1'] / plain['v2']:.2f}x v1" if "v2" in plain else "v1 only")
            if kind in GGUF_GEMV3_KINDS and name in FUSED_SHAPES and not small:
                check_fused(ops, kind, name, (n, k), ws, copies, timer, report, rng)
            if small or name not in DEQUANT_SHAPES:
                continue
            for m in (8, 64):
                x = ops.from_host(rng.standard_normal((m, k)).astype(np.float32))
                saved, cq.GGUF_GEMV_MAX_M = cq.GGUF_GEMV_MAX_M, 0  # force dequantize + cuBLAS
                try:
                    gl.linear(x, ws[0])  # grows the scratch outside capture
                    it = iter(range(10**9))
                    t = timer(lambda x=x, it=it, ws=ws, gl=gl: gl.linear(x, ws[next(it) % len(ws)]),
                              max(20, copies))
                finally:
                    cq.GGUF_GEMV_MAX_M = saved
                bf16 = n * k * 2
                report(f"{kind} {name} dequant+cuBLAS M={m}", f"{t * 1e6:.1f} us",
                       f"bf16 weight read alone {bf16 / PEAK_BW * 1e6:.1f} us")


def check_fused(ops, kind, name, shape, ws, copies, timer, report, rng):
    """v2 (where it exists) and v3 with the add + norm fused, M = 1, against the two launches;
    the twin check is the GEMV of what the unfused op hands it."""
    for version in ("v2", "v3", "v3 big") if kind in GGUF_GEMV2_KINDS else ("v3", "v3 big"):
        check_fused_version(ops, kind, name, shape, ws, copies, timer, report, rng, version)


def check_fused_version(ops, kind, name, shape, ws, copies, timer, report, rng, version):
    k = shape[1]
    gl = cq.GGUFLinear(ops)
    saved = cq.GEMV_KERNEL, cq.GEMV3_BIG
    cq.GEMV_KERNEL, cq.GEMV3_BIG = version[:2], version == "v3 big"
    try:
        x, r, g = (ops.from_host(rng.standard_normal(s).astype(np.float32))
                   for s in ((1, k), (1, k), (k,)))
        fused = lambda w: gl.add_rms_norm_linear(x, r, g, 1e-5, w)[0]  # noqa: E731
        # add_rms_norm adds into r in place: the check's call below runs before the timing
        unfused = lambda w: gl.linear(ops.add_rms_norm(x, r, g, 1e-5)[0], w)  # noqa: E731
        err = rel_err(ops.to_host(fused(ws[0])), ops.to_host(unfused(ws[0])))
        fns = [fused, unfused]
        glu = version.startswith("v3") and name.startswith("gate_up")
        if glu:  # + the SiLU-and-mul in the same launch, against the fused GEMV and its kernel
            fns.append(lambda w: gl.add_rms_norm_glu(x, r, g, 1e-5, w, glu=True)[0])
            fns.append(lambda w: ops.silu_and_mul(fused(w)))
            glu_same = bool((ops.to_host(fns[2](ws[0])) == ops.to_host(fns[3](ws[0]))).all())
        times = []
        for fn in fns:
            it = iter(range(10**9))
            times.append(timer(lambda fn=fn, it=it: fn(ws[next(it) % len(ws)]), max(20, copies),
                               pdl=True))
    finally:
        cq.GEMV_KERNEL, cq.GEMV3_BIG = saved
    # v3: a last-bit difference in the norm can move a quantized x by one step
    tol = 2e-3 if version.startswith("v3") else 1e-3
    report(f"{kind} {name} {version} add + norm fused M=1, PDL chain",
           f"{times[0] * 1e6:.1f} us, unfused "
           f"{times[1] * 1e6:.1f} us", f"rel err {err:.1e} " + ("OK" if err < tol else "MISMATCH"))
    if glu:
        report(f"{kind} {name} {version} add + norm + SiLU fused (GLU) M=1, PDL chain",
               f"{times[2] * 1e6:.1f} us, fused GEMV + silu_and_mul {times[3] * 1e6:.1f} us",
               "bit-exact OK" if glu_same else "MISMATCH")


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def check_gguf(ops, timer, small: bool = False):
    """timer(fn, calls, pdl=False) -> seconds per call on the GPU (kernel_check.graph_time)."""
    lines = []

    checks = []

    def report(case, a, b, quiet=False):
        """quiet: a twin check, printed only when it fails (one summary line otherwise)."""
        line = f"| {case} | {a} | {b} |"
        lines.append(line)
        if quiet:
            checks.append(b)
        if not quiet or b != "OK":
            print("gguf", line, flush=True)

    check_twins(ops, small, report)
    print(f"gguf | twin checks | {checks.count('OK')} of {len(checks)} OK | dequantize bit-exact, "
          "GEMV rel err < 1e-2 |", flush=True)
    cupy.get_default_memory_pool().free_all_blocks()
    check_speed(ops, small, timer, report)
    return lines
