"""GGUF weights kept in their block formats on the GPU (cuda/gguf.cu), behind CudaOps' linear and
embedding.

- Decode (x with <= GGUF_GEMV_MAX_M rows): one fused dequantize-GEMV launch that streams the
  packed blocks; bytes read per token are the quantized size. Q4_K and Q8_0 have a second GEMV
  (gguf.cu's "GEMV v2": x staged once per block, 16-byte weight loads straight into registers,
  one step ahead) where it fits (K a multiple of 2048, x in shared memory) and where device run 2
  measured it faster: Q8_0 at every M (1.09-1.96x), Q4_K up to 4 rows (1.2-1.8x at M = 1; at 8
  rows v1 is as fast). PAGEDSERVE_GGUF_GEMV=v1 or v2 forces one.
  A third, v3 (cuda/gguf_dp4a.cu), quantizes x to int8 in each block and takes integer dot
  products on the packed quants (engine/model/gguf_dot.py is its twin), for Q4_K, Q8_0 and Q6_K:
  "auto" takes it at every M up to 8 (GEMV3_AUTO_MAX_M: device run B, 1.14-3.6x over v1/v2), except
  for the lm_head, which keeps x unquantized (QuantizedWeight.quantize_x: v2 or v1 there).
  For the formats in GEMV3_X2_KINDS (Q4_K; PAGEDSERVE_GGUF_LM_HEAD_X2=1/0 forces) the lm_head at
  M = 1 runs on v3 with x as two int8 terms ("v3x2": x within ~amax / 32,000, finer than its
  16-bit rounding; v3's speed on twice the integer products: Q4_K's lm_head took 70 us on v3, 116
  on v2).
- Larger batches (prefill): the weight is dequantized into a bf16/fp16 scratch, SCRATCH_ELEMS
  values at a time, and multiplied by cuBLAS; the dequantization is a read of the packed bytes plus
  a write and a read of the scratch, small next to a prefill's GEMM.
- Embeddings gather rows: only the looked-up rows are dequantized.

The scratch belongs to the CudaOps object and grows on first use. The CUDA-graph warm-up forward
runs every captured shape once before capture, so capture itself never allocates it.
"""

from __future__ import annotations

import functools
import os

import cupy
import numpy as np

from engine.executor.ops import cuda_gemv, cuda_kernels, cuda_norm
from engine.executor.ops.cuda_kernels import (
    GGUF_GEMV2_KINDS,
    GGUF_GEMV2_STRUCTS,
    GGUF_GEMV3_BIG,
    GGUF_GEMV3_KINDS,
    GGUF_GEMV_M,
    GGUF_GEMV_R,
    kernel,
    launch,
)
from engine.model.gguf_quants import BLOCKS, row_bytes
from engine.model.quantized import QuantizedWeight

GGUF_GEMV_MAX_M = 8  # rows up to which linear() takes the fused GEMV (0 = never: kernel_check)
SCRATCH_ELEMS = 64 << 20  # dequantized values per cuBLAS pass (128 MiB in bf16)
GEMV_WARPS = 4  # warps per GEMV block: cuda/gguf.cu's GG_WARPS
# GEMV blocks per SM: 4 x 4 warps, each with up to 7 tiles in flight, keep ~100 KB per SM moving
GEMV_BLOCKS_PER_SM = 4
STORAGE = {"__half": np.float16, "__nv_bfloat16": np.uint16}  # compute type -> storage dtype
GEMV_KERNEL = os.environ.get("PAGEDSERVE_GGUF_GEMV", "auto")  # or v1, v2, v3 (module docstring)
GEMV2_AUTO_MAX_M = {"Q4_K": 4, "Q8_0": 8}  # compiled rows up to which "auto" takes v2
# weight rows a warp takes at once at M = 1 (each x read from shared memory serves them all);
# Q4_K's 2 (PAGEDSERVE_GGUF_Q4K_ROWS=2) measured 0-7% faster per GEMV in run 3, not in a whole step
GEMV2_ROWS = {"Q4_K": int(os.environ.get("PAGEDSERVE_GGUF_Q4K_ROWS", "1")), "Q8_0": 1}
GEMV2_WARPS = 8  # gguf.cu's G2_WARPS
GEMV2_CHUNK = 2048  # G2_CHUNK: K must be a multiple
GEMV2_STAGE = {"Q4_K": 0, "Q8_0": 136}  # 16-byte words of shared memory per warp (F::STAGE)
GEMV2_MAX_BLOCKS_PER_SM = 4
# compiled rows up to which "auto" takes v3: device run B measured it faster than v1 and v2 at
# every M, shape and format (1.14-3.6x)
GEMV3_AUTO_MAX_M = {"Q4_K": 8, "Q8_0": 8, "Q6_K": 8}
GEMV3_WARPS = 8  # gguf_dp4a.cu's G3_WARPS
# at M = 1 one block of GGUF_GEMV3_BIG warps per SM, not several of 8 (kernel_check: "v3 big"):
# where K >= GEMV3_BIG_MIN_K (device run B, gguf_dp4a.cu's NOTE); PAGEDSERVE_GGUF_V3_BIG=1/0 forces
_BIG_ENV = os.environ.get("PAGEDSERVE_GGUF_V3_BIG")
GEMV3_BIG: bool | None = None if _BIG_ENV is None else _BIG_ENV == "1"
GEMV3_BIG_MIN_K = {"Q4_K": 0, "Q6_K": 0, "Q8_0": 8192}
# the MLP's add + norm + gate_up + SiLU in one launch at M = 1 (GGUFLinear.add_rms_norm_glu)
GEMV3_GLU = os.environ.get("PAGEDSERVE_GGUF_GLU", "0") == "1"
GEMV3_STAGE = {"Q4_K": 0, "Q8_0": 136, "Q6_K": 106}  # 16-byte words of shared memory per warp
# v3's grid: "even" (every warp the same number of rows, _grid) or "fill" (every resident block
# slot: 4096 rows of Q4_K down / o on 132 x 24 warps use 132 SMs, not 86; some warps 1 row fewer)
GEMV3_GRID = os.environ.get("PAGEDSERVE_GGUF_V3_GRID", "even")
# the lm_head (quantize_x False) at M = 1 on v3 with x as two int8 terms (module docstring)
# (device session 9, tools/b1_gap.py, Llama-3-8B shapes, the batch-1 step graph: Q4_K 1.881 ->
# 1.839 ms, Q8_0 2.651 -> 2.837): on for the formats listed, PAGEDSERVE_GGUF_LM_HEAD_X2=1/0 forces
GEMV3_X2_KINDS = frozenset({"Q4_K"})
_X2_ENV = os.environ.get("PAGEDSERVE_GGUF_LM_HEAD_X2")
GEMV3_X2: bool | None = None if _X2_ENV is None else _X2_ENV == "1"
# v3's SPLIT form at M = 1 (gguf_dp4a.cu): a block's warps share its rows' loads, where that
# gives every warp fewer loads than the even grid (_gemv3_split_config). Device session 9 (as
# GEMV3_X2): Q4_K 1.881 -> 1.863 ms a step (1.833 with X2), Q8_0 2.651 -> 2.662: on for the
# formats listed, PAGEDSERVE_GGUF_V3_SPLIT=1/0 forces
GEMV3_SPLIT_KINDS = frozenset({"Q4_K"})
_SPLIT_ENV = os.environ.get("PAGEDSERVE_GGUF_V3_SPLIT")
GEMV3_SPLIT: bool | None = None if _SPLIT_ENV is None else _SPLIT_ENV == "1"
G3_SPLIT_MAX = 512  # gguf_dp4a.cu's: the item sums (outputs x loads per row) a block holds
G3_STEPS = {"Q4_K": 2, "Q8_0": 1, "Q6_K": 1}  # warp steps per load (the G3_ structs' STEPS)


def _flag(forced: bool | None, kinds: frozenset, kind: str) -> bool:
    """A per-format switch: forced by its environment variable, else on for the listed formats."""
    return kind in kinds if forced is None else forced


def is_gguf(weight) -> bool:
    return isinstance(weight, QuantizedWeight) and weight.kind in BLOCKS


def check(weight: QuantizedWeight, name: str = "weight") -> QuantizedWeight:
    """CuPy checks nothing: a wrong layout would read garbage."""
    rows, cols = weight.shape
    data = weight.data
    want = (rows, row_bytes(weight.kind, cols))
    if not isinstance(data, cupy.ndarray) or data.dtype != np.uint8 or data.shape != want:
        raise TypeError(f"{name}: {weight.kind} data must be a cupy uint8 array of shape {want}, "
                        f"got {type(data).__name__} {getattr(data, 'dtype', '')} "
                        f"{getattr(data, 'shape', '')}")
    if not data.flags.c_contiguous:
        raise ValueError(f"{name}: {weight.kind} data must be C-contiguous")
    return weight


def dequantize(weight: QuantizedWeight, ctype: str, exact: bool = False,
               ids: cupy.ndarray | None = None, out: cupy.ndarray | None = None,
               row_start: int = 0, num_rows: int | None = None) -> cupy.ndarray:
    """Rows of the float matrix: ids[r] for r < len(ids) if ids is given, else rows row_start ..
    row_start + num_rows. In the compute type `ctype`'s storage, or with `exact` in float32 (the
    bit-exact twin of gguf_quants.dequantize_gguf). out: the (R, K) array to write into."""
    check(weight)
    rows, k = weight.shape
    data = weight.data
    if ids is None:
        num_rows = rows - row_start if num_rows is None else num_rows
        data = data[row_start : row_start + num_rows]
    else:
        num_rows = len(ids)
    dtype = np.float32 if exact else STORAGE[ctype]
    if out is None:
        out = cupy.empty((num_rows, k), dtype)
    elif out.shape != (num_rows, k) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ValueError(f"out: expected contiguous {np.dtype(dtype)} {(num_rows, k)}, got "
                         f"{out.dtype} {out.shape}")
    if num_rows:
        store = "float" if exact else ctype
        kernel("gguf.cu", f"gguf_dequant_kernel<{weight.kind}, {store}>", ctype)(
            (-(-k // 16 // 128), num_rows), (128,),
            (out, data, np.uint64(0) if ids is None else ids, np.int32(k),
             np.int32(row_bytes(weight.kind, k))))
    return out


def gemv_fits(x: cupy.ndarray, weight: QuantizedWeight, max_m: int | None = None) -> bool:
    """Whether the fused GEMV can run: few rows, x in 16-byte words, weight 16-byte aligned."""
    max_m = GGUF_GEMV_MAX_M if max_m is None else max_m
    return (0 < x.shape[0] <= min(max_m, GGUF_GEMV_M[-1]) and x.shape[1] % 16 == 0
            and x.data.ptr % 16 == 0 and weight.data.data.ptr % 16 == 0)


def gemv2_smem(kind: str, m: int, k: int) -> int:
    """Dynamic shared memory of gguf_gemv2_kernel: x and its sums per 32 values in float, and
    each warp's staging words."""
    return m * k * 4 + m * k // 32 * 4 + GEMV2_WARPS * GEMV2_STAGE[kind] * 16


def gemv2_fits(kind: str, m: int, k: int) -> bool:
    """Whether the second GEMV runs this (kind, compiled rows m, K)."""
    return (kind in GGUF_GEMV2_KINDS and k % GEMV2_CHUNK == 0
            and gemv2_smem(kind, m, k) <= _device()["sharedMemPerBlockOptin"])


def gemv3_smem(kind: str | None, m: int, k: int, norm: bool = False,
               warps: int = GEMV3_WARPS) -> int:
    """Dynamic shared memory of gguf_gemv3_kernel (kind None: gguf_quantize_x_kernel): x's int8
    copy, its scales and sums per 32 values, each warp's staging words, and with norm K floats
    between the norm's two passes."""
    stage = warps * GEMV3_STAGE[kind] * 16 if kind else 0
    return m * k + m * k // 32 * 8 + stage + (4 * k if norm else 0)


def gemv3_fits(kind: str, m: int, k: int, norm: bool = False) -> bool:
    """Whether the third GEMV runs this (kind, compiled rows m, K)."""
    return (kind in GGUF_GEMV3_KINDS and k % GEMV2_CHUNK == 0
            and gemv3_smem(kind, m, k, norm) <= _device()["sharedMemPerBlockOptin"])


def gemv_version(x: cupy.ndarray, weight: QuantizedWeight, version: str | None = None) -> str:
    """Which GEMV gemv() runs for x (M, K): "v3x2", "v3", "v2" or "v1" (version: GEMV_KERNEL if
    None; a forced v3 that does not fit falls back to auto's v2/v1 choice, a forced v2 to v1;
    "v3x2" only for a weight that keeps x unquantized, at M = 1: forced, or auto with
    GEMV3_X2 / GEMV3_X2_KINDS)."""
    m, kind, k = x.shape[0], weight.kind, weight.shape[1]
    version = version or GEMV_KERNEL
    if version == "v1" or not 0 < m <= min(GGUF_GEMV_MAX_M, GGUF_GEMV_M[-1]):
        return "v1"
    compiled = next(c for c in GGUF_GEMV_M if c >= m)
    if x.data.ptr % 16 or weight.data.data.ptr % 16:
        return "v1"
    if ((version == "v3x2" or (version == "auto" and _flag(GEMV3_X2, GEMV3_X2_KINDS, kind)))
            and not weight.quantize_x
            and m == 1 and gemv3_fits(kind, 2, k)):
        return "v3x2"
    if (version in ("v3", "auto") and weight.quantize_x and gemv3_fits(kind, compiled, k)
            and (version == "v3" or compiled <= GEMV3_AUTO_MAX_M.get(kind, 0))):
        return "v3"
    if gemv2_fits(kind, compiled, k) and (
            version == "v2" or compiled <= GEMV2_AUTO_MAX_M.get(kind, 0)):
        return "v2"
    return "v1"


def use_big(kind: str, k: int) -> bool:
    """Whether gemv3 at M = 1 runs one block per SM (GEMV3_BIG, else GEMV3_BIG_MIN_K)."""
    return GEMV3_BIG if GEMV3_BIG is not None else k >= GEMV3_BIG_MIN_K[kind]


def gemv3(x: cupy.ndarray, weight: QuantizedWeight, out: cupy.ndarray, ctype: str,
          norm: bool = False, residual=None, norm_w=None, res_out=None, eps: float = 0.0,
          big: bool | None = None, glu: bool = False, x2: bool = False,
          split: bool | None = None):
    """The third GEMV (x quantized to int8): out = x @ W^T, or with norm (M = 1) out =
    (rms_norm(x + residual) * norm_w) @ W^T and x + residual into res_out. big: one block per
    SM at M = 1 (use_big if None). glu (with norm): W is gate_up and out (1, N / 2) its
    silu(gate) * up, as silu_and_mul would make it. x2 (M = 1, no norm): x as two int8 terms
    (the "v3x2" lm_head; compiled as M = 2). split (if None: GEMV3_SPLIT, else whether the
    format is in GEMV3_SPLIT_KINDS): the SPLIT form at M = 1 without norm, glu, x2, where
    _gemv3_split_config takes it."""
    n, k = weight.shape
    m = x.shape[0]
    compiled = 2 if x2 else next(c for c in GGUF_GEMV_M if c >= m)
    big = use_big(weight.kind, k) if big is None else big
    warps = GGUF_GEMV3_BIG[weight.kind] if big and compiled == 1 else GEMV3_WARPS
    name = (f"gguf_gemv3_kernel<G3_{weight.kind}, {ctype}, {compiled}, "
            f"{'true' if norm else 'false'}, {warps}, {'true' if glu else 'false'}"
            f"{', true' if x2 else ''}>")
    outs = n // 2 if glu else n
    blocks = 0
    if split is None:
        split = _flag(GEMV3_SPLIT, GEMV3_SPLIT_KINDS, weight.kind)
    if split and compiled == 1 and not (norm or glu or x2):
        split_name = (f"gguf_gemv3_kernel<G3_{weight.kind}, {ctype}, 1, false, {warps}, false, "
                      "false, true>")
        blocks, smem = _gemv3_split_config(split_name, name, ctype, weight.kind, n, k, warps)
        name = split_name if blocks else name
    if not blocks:
        blocks, smem = _gemv3_config(name, ctype, weight.kind, compiled, outs, k, norm, warps)
    null = np.uint64(0)
    launch(kernel("gguf_dp4a.cu", name, ctype), (blocks,), (32 * warps,),
           (out, x, weight.data, np.int32(n), np.int32(k), np.int32(m),
            np.int32(row_bytes(weight.kind, k)), null if residual is None else residual,
            null if norm_w is None else norm_w, null if res_out is None else res_out,
            np.float32(eps), cuda_norm.norm_flags(norm) | np.int32(cuda_kernels.early_flag())),
           shared_mem=smem, pdl=True)
    return out


def quantize_x(x: cupy.ndarray, ctype: str, residual=None, norm_w=None, eps: float = 0.0):
    """x as gemv3 stages it, written out: (q (M, K) int8, dx (M, K / 32) float32, sums (M,
    K / 32) int32, x + residual or None), for the twin test; norm_w given: the fused norm's."""
    m, k = x.shape
    compiled = next(c for c in GGUF_GEMV_M if c >= m)
    norm = norm_w is not None
    q = cupy.empty((m, k), np.int8)
    dx = cupy.empty((m, k // 32), np.float32)
    sums = cupy.empty((m, k // 32), np.int32)
    res_out = cupy.empty_like(x) if norm else None
    name = f"gguf_quantize_x_kernel<{ctype}, {compiled}, {'true' if norm else 'false'}>"
    fn = kernel("gguf_dp4a.cu", name, ctype)
    smem = gemv3_smem(None, compiled, k, norm)
    fn.max_dynamic_shared_size_bytes = max(fn.max_dynamic_shared_size_bytes, smem)
    null = np.uint64(0)
    launch(fn, (1,), (32 * GEMV3_WARPS,),
           (q, dx, sums, x, np.int32(k), np.int32(m), null if residual is None else residual,
            null if norm_w is None else norm_w, null if res_out is None else res_out,
            np.float32(eps), cuda_norm.norm_flags(norm)), shared_mem=smem, pdl=True)
    return q, dx, sums, res_out


def gemv2(x: cupy.ndarray, weight: QuantizedWeight, out: cupy.ndarray, ctype: str,
          norm: bool = False, residual=None, norm_w=None, res_out=None, eps: float = 0.0,
          rows: int | None = None):
    """The second GEMV (gemv_version): out = x @ W^T, or with norm (compiled for M = 1) out =
    (rms_norm(x + residual) * norm_w) @ W^T and x + residual into res_out. rows: weight rows per
    warp at M = 1 (GEMV2_ROWS by default; kernel_check compares)."""
    n, k = weight.shape
    m = x.shape[0]
    compiled = next(c for c in GGUF_GEMV_M if c >= m)
    r = (GEMV2_ROWS[weight.kind] if rows is None else rows) if compiled == 1 else 1
    struct = GGUF_GEMV2_STRUCTS[weight.kind, r]
    name = f"gguf_gemv2_kernel<{struct}, {ctype}, {compiled}, {'true' if norm else 'false'}>"
    blocks, smem = _gemv2_config(name, ctype, weight.kind, compiled, n, k, r)
    null = np.uint64(0)
    launch(kernel("gguf.cu", name, ctype), (blocks,), (32 * GEMV2_WARPS,),
           (out, x, weight.data, np.int32(n), np.int32(k), np.int32(m),
            np.int32(row_bytes(weight.kind, k)), null if residual is None else residual,
            null if norm_w is None else norm_w, null if res_out is None else res_out,
            np.float32(eps), cuda_norm.norm_flags(norm)), shared_mem=smem, pdl=True)
    return out


def gemv(x: cupy.ndarray, weight: QuantizedWeight, out: cupy.ndarray, ctype: str,
         rows_per_block: int = GGUF_GEMV_R, blocks_per_sm: int | None = None,
         version: str | None = None, rows2: int | None = None, big: bool | None = None):
    """out (M, N) = x (M, K) @ dequantized(weight)^T, M <= 8. One launch: a few blocks per SM,
    each warp streaming row groups (cuda/gguf.cu). rows_per_block and blocks_per_sm: variants
    kernel_check compares (GGUF_GEMV_VARIANTS). version: "v1", "v2", "v3" or "auto" (GEMV_KERNEL
    by default), as gemv_version resolves it. rows2: gemv2's rows; big: gemv3's."""
    n, k = weight.shape
    m = x.shape[0]
    chosen = gemv_version(x, weight, version)
    if chosen == "v3x2":
        return gemv3(x, weight, out, ctype, x2=True)
    if chosen == "v3":
        return gemv3(x, weight, out, ctype, big=big)
    if chosen == "v2":
        return gemv2(x, weight, out, ctype, rows=rows2)
    compiled = next(c for c in GGUF_GEMV_M if c >= m)
    row_groups = -(-n // rows_per_block)
    per_sm = GEMV_BLOCKS_PER_SM if blocks_per_sm is None else blocks_per_sm
    blocks = max(1, min(-(-row_groups // GEMV_WARPS), per_sm * _sm_count()))
    name = f"gguf_gemv_kernel<{weight.kind}, {ctype}, {compiled}, {rows_per_block}>"
    kernel("gguf.cu", name, ctype)(
        (blocks,), (32 * GEMV_WARPS,),
        (out, x, weight.data, np.int32(n), np.int32(k), np.int32(m),
         np.int32(row_bytes(weight.kind, k))))
    return out


@functools.cache
def _gemv2_config(name: str, ctype: str, kind: str, m: int, n: int, k: int,
                  rows: int) -> tuple[int, int]:
    """(blocks, shared memory bytes) of gemv2 (_grid)."""
    smem = gemv2_smem(kind, m, k)
    return _grid(kernel("gguf.cu", name, ctype), smem, GEMV2_WARPS, -(-n // rows)), smem


@functools.cache
def _gemv3_config(name: str, ctype: str, kind: str, m: int, n: int, k: int, norm: bool,
                  warps: int) -> tuple[int, int]:
    """(blocks, shared memory bytes) of gemv3 (_grid): one row per warp at a time."""
    smem = gemv3_smem(kind, m, k, norm, warps)
    return _grid(kernel("gguf_dp4a.cu", name, ctype), smem, warps, n, GEMV3_GRID == "fill"), smem


@functools.cache
def _gemv3_split_config(name: str, plain: str, ctype: str, kind: str, n: int, k: int,
                        warps: int) -> tuple[int, int]:
    """(blocks, shared memory bytes) of gemv3's SPLIT form `name` at M = 1: a block on every
    resident slot (at most one per output); blocks 0 where its item sums would not fit
    G3_SPLIT_MAX, or where its warps would read no fewer loads than under the grid of the plain
    form `plain` (4096 rows of Q4_K down, 7 steps, on 24-warp blocks: 6 loads a warp on 132 SMs
    instead of 2 rows x 4 loads on 86)."""
    smem = gemv3_smem(kind, 1, k, False, warps)
    fn = kernel("gguf_dp4a.cu", name, ctype)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    blocks = min(n, max(1, _per_sm(fn, smem, warps)) * _sm_count())
    per_row = -(-(k // GEMV2_CHUNK) // G3_STEPS[kind])
    rows = -(-n // blocks)
    if rows * per_row > G3_SPLIT_MAX:
        return 0, smem
    plain_blocks, _ = _gemv3_config(plain, ctype, kind, 1, n, k, False, warps)
    plain_loads = -(-n // (plain_blocks * warps)) * per_row
    return (blocks if -(-rows * per_row // warps) < plain_loads else 0), smem


def _per_sm(fn, smem: int, warps: int) -> int:
    """Blocks of fn (warps each, smem dynamic shared bytes) that fit on an SM together, at most
    GEMV2_MAX_BLOCKS_PER_SM."""
    prop = _device()
    warp_regs = -(-fn.num_regs * 32 // 256) * 256  # registers are granted per warp by 256
    return min(GEMV2_MAX_BLOCKS_PER_SM, prop["regsPerMultiprocessor"] // (warp_regs * warps),
               prop["sharedMemPerMultiprocessor"] // (smem + fn.shared_size_bytes
                                                      + prop["reservedSharedMemPerBlock"]))


def _grid(fn, smem: int, warps: int, groups: int, fill: bool = False) -> int:
    """Blocks of a GEMV whose warps stride over `groups` row groups: at most as many as stay
    resident together (a block that waited for a free SM would leave its rows for last), and as
    few as give every warp the same number of rows: 4096 rows on 3168 resident warps would leave
    928 warps a second row to read with the SMs nearly idle; 2048 warps of 2 rows each share the
    bandwidth to the end (fill: as many blocks as stay resident instead, if the rows need them).
    Raises fn's shared memory limit to smem."""
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    per_sm = _per_sm(fn, smem, warps)
    block_groups = -(-groups // warps)  # a block's warps take so many row groups at a time
    if fill:
        return min(block_groups, max(1, per_sm) * _sm_count())
    rounds = -(-block_groups // (max(1, per_sm) * _sm_count()))
    return -(-block_groups // rounds)


@functools.cache
def _device() -> dict:
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)


def _sm_count() -> int:
    return int(_device()["multiProcessorCount"])


class GGUFLinear:
    """linear and embedding for GGUF weights on one CudaOps (which lends its cuBLAS GEMM)."""

    def __init__(self, ops):
        self.ops = ops
        self._scratch: cupy.ndarray | None = None  # (SCRATCH_ELEMS at most,) compute dtype

    def scratch(self, numel: int) -> cupy.ndarray:
        if self._scratch is None or self._scratch.size < numel:
            self._scratch = None  # let the old one go before the new one is made
            self._scratch = cupy.empty(numel, self.ops.storage)
        return self._scratch[:numel]

    def linear(self, x: cupy.ndarray, weight: QuantizedWeight) -> cupy.ndarray:
        # x (T, K), weight (N, K) quantized -> (T, N)
        check(weight)
        n, k = weight.shape
        out = cupy.empty((x.shape[0], n), self.ops.storage)
        if x.shape[0] == 0:
            return out
        if gemv_fits(x, weight):
            return gemv(x, weight, out, self.ops.ctype)
        chunk = max(1, min(n, SCRATCH_ELEMS // k))
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            w = dequantize(weight, self.ops.ctype, out=self.scratch(rows * k).reshape(rows, k),
                           row_start=start, num_rows=rows)
            if rows == n:
                self._dense(x, w, out)
            else:  # a weight larger than the scratch: its output columns pass by pass
                part = cupy.empty((x.shape[0], rows), self.ops.storage)
                out[:, start : start + rows] = self._dense(x, w, part)
        return out

    def add_rms_norm_linear(self, x, residual, norm_w, eps: float, weight: QuantizedWeight):
        """(linear(h, weight), x + residual) with h = rms_norm(x + residual) * norm_w: one launch
        where the second or third GEMV runs at M = 1 (the fused variants compiled), else the
        ops' add_rms_norm, then linear."""
        check(weight)
        version = gemv_version(x, weight)
        if (version in ("v2", "v3") and x.shape == (1, weight.shape[1])
                and norm_w.data.ptr % 16 == 0
                and (version == "v2" or gemv3_fits(weight.kind, 1, weight.shape[1], True))
                and (residual is None or (residual.shape == x.shape
                                          and residual.data.ptr % 16 == 0))):
            res_out = cupy.empty_like(x)
            out = cupy.empty((x.shape[0], weight.shape[0]), self.ops.storage)
            fused = gemv3 if version == "v3" else gemv2
            fused(x, weight, out, self.ops.ctype, True, residual, norm_w, res_out, eps)
            return out, res_out
        h, residual = self.ops.add_rms_norm(x, residual, norm_w, eps)
        return self.linear(h, weight), residual

    def add_rms_norm_glu(self, x, residual, norm_w, eps: float, gate_up: QuantizedWeight,
                         glu: bool | None = None):
        """(silu_and_mul(linear(h, gate_up)), x + residual), h = rms_norm(x + residual) * norm_w,
        in one v3 launch where it runs (x one row, GEMV3_GLU or glu); None elsewhere."""
        check(gate_up, "gate_up")
        n, k = gate_up.shape
        if not (GEMV3_GLU if glu is None else glu) or x.shape != (1, k) or n % 2:
            return None
        if (gemv_version(x, gate_up) != "v3" or not gemv3_fits(gate_up.kind, 1, k, True)
                or norm_w.data.ptr % 16
                or (residual is not None and (residual.shape != x.shape
                                              or residual.data.ptr % 16))):
            return None
        res_out = cupy.empty_like(x)
        out = cupy.empty((1, n // 2), self.ops.storage)
        gemv3(x, gate_up, out, self.ops.ctype, True, residual, norm_w, res_out, eps, glu=True)
        return out, res_out

    def _dense(self, x: cupy.ndarray, w: cupy.ndarray, out: cupy.ndarray) -> cupy.ndarray:
        if cuda_gemv.use_gemv(x, w):  # w: just dequantized by the previous kernel
            return cuda_gemv.gemv(x, w, out, self.ops.ctype, w_is_fresh=True)
        self.ops._gemm(x, w, out, self.ops.dtype)
        return out

    def embedding(self, ids: cupy.ndarray, weight: QuantizedWeight) -> cupy.ndarray:
        # ids (T,) int32 -> (T, K): only the looked-up rows are dequantized
        return dequantize(weight, self.ops.ctype, ids=ids)
