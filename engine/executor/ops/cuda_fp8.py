"""FP8 (E4M3) W8A8 on the cuda backend: cuda/fp8.cu, fp8_fused.cu and cuBLASLt behind the three
ops that take a weight (linear, add_rms_norm_linear, silu_mul_linear). engine/model/fp8.py is the
numpy twin.

Each matrix product is two launches: one kernel quantizes the activations per token, fused with
the residual add + RMSNorm or the SiLU-mul that produces them (so the bf16 activation never goes
through memory), then the product runs as
- the FP8 GEMV at decode batches (M <= FP8_GEMV_MAX_M; 2..8 rows on sm_89+ the tensor-core
  GEMV, cuda/fp8_mma.cu): one read of the weights, half the bytes of bf16;
- cuBLASLt's FP8 GEMM above that (cuda_blaslt.py), or the GEMV 8 rows at a time for a shape
  cuBLASLt has no plan for.
With STREAM (PAGEDSERVE_FP8_STREAM=1, opt-in: slower on the H200, below) a decode batch of up to
STREAM_MAX_M rows is one launch instead: cuda/fp8_fused.cu's persistent GEMV, which streams its
weights through shared memory from its first instruction and quantizes its input in a prologue.
Every kernel here may be a programmatic dependent launch (cuda_kernels.launch, PAGEDSERVE_PDL=1
in decode graphs): the GEMVs request their first weight words before waiting for the quantization.
"""

from __future__ import annotations

import functools
import os

import cupy
import numpy as np

from engine.executor.ops import cuda_kernels
from engine.executor.ops.cuda_blas import Gemm
from engine.executor.ops.cuda_blaslt import Fp8Gemm
from engine.executor.ops.cuda_fp8_tune import Fp8Tuner, tuning_enabled
from engine.executor.ops.cuda_kernels import kernel, launch
from engine.model.quantized import QuantizedWeight

# Rows up to which the GEMV runs instead of cuBLASLt (compiled for 1..8; 0: cuBLASLt where the
# tensor-core GEMV below does not run).
# H200, Llama-3-8B shapes (kernel_check --only fp8): the GEMV wins at M <= 4 (qkv, o, down) and
# M <= 2 for gate_up (28672 outputs), cuBLASLt above (14-48 us at M = 8).
FP8_GEMV_MAX_M = 4
FP8_GEMV_MAX_M_TALL = 2  # ... for weights of >= 16384 outputs
GEMV_ROWS_PER_BLOCK = 4  # fp8.cu's F8_R
# The tensor-core GEMV (cuda/fp8_mma.cu, sm_89+; PAGEDSERVE_FP8_MMA_GEMV=0 keeps fp8.cu's) for
# MMA_MIN_M..8 rows: a block of mma_warps() warps per 16 weight rows, MMA_STEPS 16-byte words of
# each of a lane's two rows in flight (cuda_kernels.FP8_MMA_STEPS). Its cost barely grows with M.
# H200, Llama-3-8B shapes (qkv / o / gate_up / down, us; weights cycled past L2, device run 2 of
# session 11): M = 2: fp8.cu 10.6 / 8.3 / 33.3 / 19.0, mma 9.5 / 7.6 / 31.5 / 20.2; M = 4: fp8.cu
# 13.9 / 10.6 / 51.2 / 36.3, mma 9.5 / 7.7 / 35.0 / 20.4; M = 8 (cuBLASLt before, 14-48): mma
# 9.8 / 7.9 / 35.3 / 20.5; but M = 1: fp8.cu 9.5 / 7.1 / 29.8 / 17.1, mma 9.3 / 7.5 / 31.3 /
# 19.8 (8, 4 warps; 16 warps, or 4 steps of words in flight, measured slower). A lane's loads
# cover 64 bytes of 8 rows an instruction where fp8.cu's cover 512 of one row.
MMA_GEMV = os.environ.get("PAGEDSERVE_FP8_MMA_GEMV", "1") == "1"
MMA_MIN_M = 2
MMA_WARPS = int(os.environ.get("PAGEDSERVE_FP8_MMA_WARPS", "0"))  # 0: mma_warps() picks
MMA_STEPS = 2
# 16-byte weight words per thread per row: a GEMV block has (words of a row) / this threads (64 to
# 256). H200, Llama-3-8B shapes, the FP8 batch-1 step graph with early PDL triggers
# (tools/b1_gap.py --variant, session 12): 2 -> 4 words 2.727 -> 2.638 ms (8: 2.637; 4 words in
# flight per row instead of 2, fp8.cu's U: 2.82, slower); before the early triggers 4 was slower
# in the step (3.12 vs 3.07 ms, session 6) though faster alone on qkv and o.
FP8_GEMV_WORDS = 4
# The streaming GEMV (cuda/fp8_fused.cu): correct but slower on the H200 (device run B, Llama-3-8B
# shapes, M = 1, PDL-chained): qkv 12.9 us vs 9.5 for fp8.cu's GEMV, gate_up 37.0 vs 29.4, down
# 19.9 vs 17.4; the batch-1 step 3563 vs 2973 us (bench_latency 3.44 vs 2.84 ms/token). Its
# per-warp consumer loop (16 warps an SM) cannot keep up with the bytes it has in flight. Opt-in.
STREAM = os.environ.get("PAGEDSERVE_FP8_STREAM", "0") == "1"
STREAM_MAX_M = 4  # rows compiled (template M); gemv_wins' caps apply as well
STREAM_WARPS = 16  # per block, one block per SM
STREAM_MAX_STAGES = 7  # chunks in flight per warp (fp8.cuh's f8_cp_async_wait takes up to 7)
STREAM_STAGE_BYTES = 4096  # fp8_fused.cu's FS_STAGE (256 uint4 words) in bytes
PRO_QUANTIZE, PRO_SILU, PRO_NORM, PRO_CODES = 0, 1, 2, 3  # fp8_fused.cu's prologues
_NULL = np.uint64(0)


def fp8_gemm(gemm: Gemm) -> Fp8Gemm:
    """The cuBLASLt FP8 GEMM sharing `gemm`'s handle and workspace (gemm.fp8, made at first
    use)."""
    if gemm.fp8 is None:
        gemm.fp8 = Fp8Gemm(gemm)
        if tuning_enabled():  # unless PAGEDSERVE_FP8_TUNE=0 (cuda_fp8_tune.py)
            gemm.fp8.tuner = Fp8Tuner(gemm.fp8)
    return gemm.fp8


def _i32(v) -> np.int32:
    return np.int32(v)


def _flags() -> np.int32:
    """fp8.cu's `flags` (its only bit: PDL_EARLY)."""
    return np.int32(cuda_kernels.early_flag())


def check_weight(w: QuantizedWeight, in_features: int | None = None) -> None:
    data, scale = w.data, w.scale
    if not isinstance(data, cupy.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise TypeError("fp8 weight: expected a 2-D uint8 cupy array of E4M3 codes")
    if not (data.flags.c_contiguous and isinstance(scale, cupy.ndarray)
            and scale.dtype == np.float32 and scale.shape == (data.shape[0],)
            and scale.flags.c_contiguous):
        raise ValueError(f"fp8 weight: codes {data.shape} must be C-contiguous with one float32 "
                         "scale per row")
    if in_features is not None and data.shape[1] != in_features:
        raise ValueError(f"fp8 linear: x has {in_features} features, weight expects "
                         f"{data.shape[1]}")


def _check_k(k: int, *arrays) -> None:
    """The kernels load 16-byte words: K a multiple of 16, every array 16-byte aligned."""
    if k % 16:
        raise ValueError(f"fp8 on the cuda backend needs in_features divisible by 16 (16-byte "
                         f"loads of E4M3 codes), got {k}")
    if any(a is not None and a.data.ptr % 16 for a in arrays):
        raise ValueError("fp8: activations and weights must be 16-byte aligned")


# ----------------------------------------------------------------------------- quantization


# Large batches (rows x K >= QUANT_WORDS_MIN_ELEMENTS): QUANT_WORDS 8-element words per thread in
# the quantize kernels (all of a thread's words in registers: their QC = 2 or 4 instance) instead
# of one, so that more rows are resident per SM. H200 (device run B, kernel_check --only fp8,
# bit-exact either way), 1 -> 4 words: 2048 x 4096 add+RMSNorm 22.7 -> 18.3 us, plain 11.7 ->
# 9.9; SiLU-mul at K = 14336: 2048 rows 82.9 -> 71.6 us, 256 rows 10.5 -> 9.8; but 256 x 4096
# slower (add+RMSNorm 3.9 -> 5.5 us), and one row much slower (session 12, the Llama-3-8B FP8
# batch-1 step graph: 2.641 -> 2.909 ms; session 14, 2 words a thread: 2.514 -> 2.544 ms).
QUANT_WORDS = 4
QUANT_WORDS_MIN_ELEMENTS = 1 << 21


# Up to CLUSTER_MAX_ROWS rows (sm_90) a quantize kernel splits each row over the blocks of a
# thread-block cluster (fp8.cu's fp8_quantize_cluster_kernel): PLAIN_CLUSTER, SILU_CLUSTER,
# NORM_CLUSTER blocks (4 or 8; 0: a block a row). At batch 1 one block's latency is on the step's
# critical path. H200, Llama-3-8B shapes, the FP8 batch-1 step graph (tools/b1_gap.py, session
# 13): without the plain / SiLU / norm quantize kernels 2.634 -> 2.591 / 2.516 / 2.444 ms (1.3,
# 3.7 and 3.0 us a launch); the SiLU's over 8 blocks 2.647 -> 2.570 (4: 2.582); the norm's over
# 4 or 8 blocks and the plain one's measured slower or the same (2.585 -> 2.614 / 2.630, 2.587 /
# 2.592).
PLAIN_CLUSTER = 0
SILU_CLUSTER = 8
NORM_CLUSTER = 0
CLUSTER_MAX_ROWS = 8


def _quant_launch(rows: int, k: int) -> tuple[int, int]:
    """(threads, QC) of a row-quantizing block: about one 8-element word per thread, so that a
    decode row (one block on one SM) is a couple of loads per thread, not dozens."""
    words = QUANT_WORDS if rows * k >= QUANT_WORDS_MIN_ELEMENTS else 1
    threads = min(1024, max(64, -(-k // (256 * words)) * 32))
    return threads, 2 if words <= 2 else 4  # QC: a thread's words all in registers


def _quantize(prologue: int, q, s, x, k: int, ctype: str, residual=None, h_out=None,
              norm_w=None, eps: float = 0.0, mode: int = 0) -> None:
    """fp8.cu's quantize kernel `prologue` (PRO_QUANTIZE, PRO_SILU, PRO_NORM) on q.shape[0]
    rows: a cluster's blocks a row where the settings above say so, else a block a row."""
    rows = q.shape[0]
    blocks = {PRO_QUANTIZE: PLAIN_CLUSTER, PRO_SILU: SILU_CLUSTER, PRO_NORM: NORM_CLUSTER}[prologue]
    args = (q, s, *[_NULL if a is None else a for a in (residual, h_out, x, norm_w)],
            np.float32(eps), _i32(k), _i32(mode), _flags())
    if (rows <= CLUSTER_MAX_ROWS and blocks > 1
            and _device(cupy.cuda.Device().id)[2] >= 90):
        threads = min(1024, max(64, -(-k // (8 * blocks * 32)) * 32))  # about a word a thread
        name = f"fp8_quantize_cluster_kernel<{ctype}, {prologue}, {blocks}>"
        launch(kernel("fp8.cu", name, ctype), (blocks, rows), (threads,), args, pdl=True)
    else:
        threads, qc = _quant_launch(rows, k)
        name = f"fp8_quantize_kernel<{ctype}, {prologue}, {qc}>"
        launch(kernel("fp8.cu", name, ctype), (rows,), (threads,), args, pdl=True)


def quantize_rows(x: cupy.ndarray, ctype: str) -> tuple[cupy.ndarray, cupy.ndarray]:
    """x (rows, K) -> (codes (rows, K) uint8, scales (rows,) float32); fp8.quantize_rows' twin."""
    rows, k = x.shape
    _check_k(k, x)
    q, s = cupy.empty((rows, k), cupy.uint8), cupy.empty(rows, cupy.float32)
    if rows:
        _quantize(PRO_QUANTIZE, q, s, x, k, ctype)
    return q, s


def quantize_weight(w: cupy.ndarray, ctype: str) -> QuantizedWeight:
    """(out, in) -> an "fp8" QuantizedWeight on the device, per-output-channel scales."""
    q, s = quantize_rows(w, ctype)
    return QuantizedWeight("fp8", tuple(w.shape), q, s)


def norm_quantize(x, residual, norm_w, eps: float, ctype: str, h_out=None):
    """(codes, scales, residual): residual += x (residual None: starts as x), then
    quantize_rows(h), h = rms_norm(residual) * norm_w rounded to the compute dtype; h_out (tests)
    receives h.

    A form keeping the row in registers (as cuda_norm's vector RMSNorm) was bit-identical but no
    faster on the H200 (session 7, kernel_check --only norms: 0.97-1.00x at 1..2048 x 4096); the
    kernel keeps a thread's first words (and the norm weight's, loaded before the PDL wait) in
    registers between its passes."""
    rows, k = x.shape
    _check_k(k, x, residual, norm_w, h_out)
    mode = 1 if residual is None else 2
    residual = cupy.empty_like(x) if residual is None else residual
    q, s = cupy.empty((rows, k), cupy.uint8), cupy.empty(rows, cupy.float32)
    if rows:
        _quantize(PRO_NORM, q, s, x, k, ctype, residual, h_out, norm_w, eps, mode)
    return q, s, residual


def silu_quantize(gate_up: cupy.ndarray, ctype: str):
    """quantize_rows(silu(gate) * up rounded to the compute dtype); gate_up (rows, 2K)."""
    rows, k = gate_up.shape[0], gate_up.shape[1] // 2
    _check_k(k, gate_up)
    q, s = cupy.empty((rows, k), cupy.uint8), cupy.empty(rows, cupy.float32)
    if rows:
        _quantize(PRO_SILU, q, s, gate_up, k, ctype)
    return q, s


# ----------------------------------------------------------------------------- products


def use_mma_gemv(m: int = 8) -> bool:
    return MMA_GEMV and MMA_MIN_M <= m <= 8 and _device(cupy.cuda.Device().id)[2] >= 89


def gemv_wins(m: int, n: int) -> bool:
    """Whether the GEMV beats cuBLASLt for M rows of an N-output weight (caps above)."""
    if use_mma_gemv(m):
        return True
    return m <= (FP8_GEMV_MAX_M if n < 16384 else min(FP8_GEMV_MAX_M, FP8_GEMV_MAX_M_TALL))


def mma_warps(n: int, k: int) -> int:
    """Warps per block of the tensor-core GEMV: 8, 4 for the many rows of gate_up (the device
    sweep above), fewer when K has too few words for them."""
    nw = MMA_WARPS or (4 if n >= 16384 else 8)
    while nw > 1 and 4 * nw * MMA_STEPS > k // 16:
        nw //= 2
    return nw


def gemv(q, s, w: QuantizedWeight, out, ctype: str):
    """out (M, N) = (q . w^T) * s * w.scale for M <= 8 rows: one launch. NOTE: under PDL the
    kernel reads w before waiting for the previous kernel: w must be a weight."""
    m = q.shape[0]
    n, k = w.data.shape
    if use_mma_gemv(m):
        launch(kernel("fp8_mma.cu", f"fp8_mma_gemv_kernel<{ctype}, {m}, {MMA_STEPS}>", ctype),
               (-(-n // 16),), (32 * mma_warps(n, k),),
               (out, q, s, w.data, w.scale, _i32(n), _i32(k)), pdl=True)
        return out
    words = k // 16
    threads = min(256, max(64, -(-words // (32 * FP8_GEMV_WORDS)) * 32))
    launch(kernel("fp8.cu", f"fp8_gemv_kernel<{ctype}, {m}>", ctype),
           (-(-n // GEMV_ROWS_PER_BLOCK),), (threads,),
           (out, q, s, w.data, w.scale, _i32(n), _i32(k), _flags()), pdl=True)
    return out


def matmul(ops, q, s, w: QuantizedWeight, use_gemv: bool | None = None):
    """(M, N) in the compute dtype = (q . w^T) * s[m] * w.scale[n]: GEMV or cuBLASLt by M."""
    m = q.shape[0]
    n = w.data.shape[0]
    if use_gemv is None:
        use_gemv = gemv_wins(m, n)
    if use_gemv and use_stream(m, w):
        return stream_gemv(ops, PRO_CODES, w, q=q, s=s)[0]
    out = cupy.empty((m, n), ops.storage)
    if m == 0:
        return out
    if use_gemv and m <= 8:
        return gemv(q, s, w, out, ops.ctype)

    def scale(acc, y):
        launch(kernel("fp8.cu", f"fp8_scale_kernel<{ops.ctype}>", ops.ctype),
               (-(-y.size // 256),), (256,), (y, acc, s, w.scale, np.int64(y.size), _i32(n)),
               pdl=True)

    if fp8_gemm(ops._gemm)(q, s, w.data, w.scale, out, ops.dtype, scale) is None:
        # NOTE: no cuBLASLt plan for this shape: correct but slow, every 8 rows re-read w.
        for r in range(0, m, 8):
            gemv(q[r:r + 8], s[r:r + 8], w, out[r:r + 8], ops.ctype)
    return out


# ----------------------------------------------------------------------------- streaming GEMV


@functools.cache
def _device(device_id: int) -> tuple[int, int, int]:
    """(SMs, opt-in shared memory per block, compute capability as 90) of a GPU."""
    prop = cupy.cuda.runtime.getDeviceProperties(device_id)
    return (int(prop["multiProcessorCount"]), int(prop["sharedMemPerBlockOptin"]),
            10 * int(prop["major"]) + int(prop["minor"]))


def stream_stages(m: int, k: int) -> int:
    """Chunks in flight per warp for M rows of K features (the codes take M * K bytes of shared
    memory beside them); below 2 (or before sm_80: no cp.async) the kernel is not used."""
    _, smem, cc = _device(cupy.cuda.Device().id)
    stages = (smem - 1024 - m * k) // (STREAM_WARPS * STREAM_STAGE_BYTES)
    return min(STREAM_MAX_STAGES, stages) if cc >= 80 else 0


def use_stream(m: int, w: QuantizedWeight) -> bool:
    n, k = w.data.shape
    return STREAM and 1 <= m <= STREAM_MAX_M and gemv_wins(m, n) and stream_stages(m, k) >= 2


def stream_gemv(ops, prologue: int, w: QuantizedWeight, x=None, residual=None, norm_w=None,
                eps: float = 0.0, q=None, s=None):
    """(y (M, N), res_out (M, K) or None) in one launch, M = len(x) (len(q) for PRO_CODES).
    PRO_QUANTIZE: y = linear(x); PRO_SILU: x is gate_up, y = silu_mul_linear(x); PRO_NORM:
    res_out = x + residual (x if None), y = linear(rms_norm(res_out) * norm_w); PRO_CODES: y =
    matmul of the codes q with their scales s. NOTE: under PDL the kernel reads w before waiting
    for the previous kernel: w must be a weight."""
    n, k = w.data.shape
    m, ctype = (q if prologue == PRO_CODES else x).shape[0], ops.ctype
    _check_k(k, x, residual, norm_w, q)
    stages = stream_stages(m, k)
    sms = _device(cupy.cuda.Device().id)[0]
    y = cupy.empty((m, n), ops.storage)
    res_out = cupy.empty((m, k), ops.storage) if prologue == PRO_NORM else None
    fn = kernel("fp8_fused.cu", f"fp8_stream_gemv_kernel<{ctype}, {m}, {prologue}>", ctype)
    smem = m * k + STREAM_WARPS * stages * STREAM_STAGE_BYTES
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    pairs = -(-n // 2)
    args = [y, res_out, x, residual, norm_w, q, s]
    launch(fn, (min(sms, -(-pairs // STREAM_WARPS)),), (32 * STREAM_WARPS,),
           (*[_NULL if a is None else a for a in args], w.data, w.scale, _i32(n), _i32(k),
            np.float32(eps), _i32(stages)), shared_mem=smem, pdl=True)
    return y, res_out


# ----------------------------------------------------------------------------- the ops


def linear(ops, x, weight: QuantizedWeight, bias=None):
    """ops.linear for an fp8 weight: x (T, in) -> (T, out)."""
    ops._check(x, "x", 2)
    check_weight(weight, x.shape[1])
    if use_stream(x.shape[0], weight):
        out = stream_gemv(ops, PRO_QUANTIZE, weight, x)[0]
    else:
        q, s = quantize_rows(x, ops.ctype)
        out = matmul(ops, q, s, weight)
    if bias is not None and out.size:
        ops._check(bias, "bias", 1)
        kernel("activation.cu", f"add_bias_kernel<{ops.ctype}>", ops.ctype)(
            (-(-out.size // 256),), (256,), (out, bias, np.int64(out.size), _i32(out.shape[1])))
    return out


def add_rms_norm_linear(ops, x, residual, norm_weight, eps, weight: QuantizedWeight):
    """ops.add_rms_norm_linear for an fp8 weight: (y, residual), the norm fused into the
    activation quantization (the residual updated in place, or a new one from the streaming
    GEMV)."""
    ops._check(x, "x", 2)
    ops._check(norm_weight, "norm_weight", 1)
    if residual is not None and ops._check(residual, "residual", 2).shape != x.shape:
        raise ValueError(f"residual shape {residual.shape} != x shape {x.shape}")
    if norm_weight.shape[0] != x.shape[1]:
        raise ValueError(f"add_rms_norm_linear: x has {x.shape[1]} features, norm weight "
                         f"{norm_weight.shape[0]}")
    check_weight(weight, x.shape[1])
    if use_stream(x.shape[0], weight):
        return stream_gemv(ops, PRO_NORM, weight, x, residual, norm_weight, eps)
    q, s, residual = norm_quantize(x, residual, norm_weight, eps, ops.ctype)
    return matmul(ops, q, s, weight), residual


def silu_mul_linear(ops, gate_up, weight: QuantizedWeight):
    """ops.silu_mul_linear for an fp8 weight, the SiLU-mul fused into the quantization."""
    ops._check(gate_up, "gate_up", 2)
    if gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul_linear: gate_up width {gate_up.shape[1]} is odd")
    check_weight(weight, gate_up.shape[1] // 2)
    if use_stream(gate_up.shape[0], weight):
        return stream_gemv(ops, PRO_SILU, weight, gate_up)[0]
    q, s = silu_quantize(gate_up, ops.ctype)
    return matmul(ops, q, s, weight)
