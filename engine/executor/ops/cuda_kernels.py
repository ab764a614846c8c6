"""Compiles the kernels in cuda/*.cu with NVRTC (cupy.RawModule), each variant once, and
launches them, with Hopper's programmatic dependent launch where a kernel allows it.

A kernel is asked for by file and C++ name, e.g. kernel("rms_norm.cu", "rms_norm_kernel<__half>").
All the template instances a file needs are compiled together on first use and cached.

launch(fn, grid, block, args, pdl=True) lets the kernel become resident while the previous
kernel on the stream still runs (cuLaunchKernelEx with the programmatic-stream-serialization
attribute, through ctypes: CuPy has no launch attributes); the kernel itself waits for it with
pdl_wait() (cuda/common.cuh). A decode step is a chain of small kernels of a few microseconds
each, and this hides each one's launch and ramp-up behind its predecessor; a GEMV also starts
streaming its weights before the wait. CUDA graphs capture the launches with their programmatic
edges. PDL applies inside `with programmatic_launches():` (DecodeGraphs' capture): building a
launch through ctypes costs more host time than CuPy's, which a captured graph pays once and an
eager step at every launch. Only kernels of which every block calls pdl_wait() before it reads
what an earlier kernel wrote, and before it writes anything, may be launched so (common.cuh).

It is on where the GPU (sm_90+) and the driver (cuLaunchKernelEx) can do it, PAGEDSERVE_PDL=0
turns it off; elsewhere kernels launch plainly. Device run 2 (tools/bench_latency.py, batch 1,
PDL off -> on): Qwen3-0.6B 0.99 -> 0.81 ms/token, Llama-3-8B 4.31 -> 4.16. PDL_EARLY (below)
lets some kernels trigger their successor before their own wait: on in the short-context decode
graphs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

logger = logging.getLogger("pagedserve." + __name__)
PDL = os.environ.get("PAGEDSERVE_PDL", "1") != "0"
# PDL_EARLY (read at every launch): the kernels that take common.cuh's PDL_EARLY flag (the GEMVs
# of gemv.cu, fp8.cu and gguf_dp4a.cu, fp8.cu's quantize kernels, the q/k-norm + RoPE kernel)
# trigger their successor before they wait on their predecessor, so that two kernels ahead are
# resident: the attention's pre-wait copies overlap the RoPE kernel, an FP8 GEMV requests its
# weights while the kernel before its quantize kernel still runs. PAGEDSERVE_PDL_EARLY: "auto"
# (default) turns it on while DecodeGraphs captures its short-context graphs (early_triggers),
# "1" everywhere PDL applies, "0" nowhere. H200, tools/bench_latency.py batch 1 (session 12),
# off -> on everywhere: Llama-3-8B shapes Q4_K 1.80 -> 1.75 / 1.74 ms/token, Q8_0 2.56 -> 2.51,
# FP8 2.75 -> 2.75, bf16 3.99 -> 3.91; Qwen3-0.6B 0.67 -> 0.60; but at a 32,532-token context
# (the split graphs) 1.68 -> 1.72: hence "auto".
_EARLY_ENV = os.environ.get("PAGEDSERVE_PDL_EARLY", "auto")
PDL_EARLY = _EARLY_ENV == "1"
PDL_EARLY_SHORT = _EARLY_ENV != "0"  # the short-context decode graphs' setting
_pdl_scope = [False]  # inside programmatic_launches()


def early_flag() -> int:
    """common.cuh's PDL_EARLY bit (1) of a kernel's `flags` where PDL_EARLY is on, else 0 (read
    at each launch: the kernels listed above or-in their other bits)."""
    return 1 if PDL_EARLY else 0


@contextlib.contextmanager
def early_triggers(on: bool):
    """PDL_EARLY on inside (as configured when `on` is false), restored after."""
    global PDL_EARLY
    saved = PDL_EARLY
    PDL_EARLY = saved or on
    try:
        yield
    finally:
        PDL_EARLY = saved


# fp8_mma.cu's compiled steps of weight words a lane keeps in flight (cuda_fp8.MMA_STEPS; 4
# measured no faster on the H200, so only 2 is compiled)
FP8_MMA_STEPS = (2,)

# numpy storage dtype name -> the C++ element type the kernels are instantiated with
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
HEAD_DIMS = (64, 128)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y size (decode rows, prefill work items)
NORM_VEC_WIDTHS = (1, 2, 4)  # 16-byte words a thread of rms_norm_vec_kernel holds (V)
DECODE_GROUPS = (1, 2, 4, 8)  # query heads per decode block (template G); larger groups take passes
GGUF_KINDS = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")  # format structs in cuda/gguf.cu
GGUF_GEMV_M = (1, 2, 4, 8)  # rows compiled for the GGUF GEMV (fewer rows run the next size up)
GGUF_GEMV_R = 2  # weight rows per GEMV row group (template R); other R at M = 1 for kernel_check
GGUF_GEMV_VARIANTS = [(m, GGUF_GEMV_R) for m in GGUF_GEMV_M] + [(1, 1), (1, 3)]
GGUF_GEMV2_KINDS = ("Q4_K", "Q8_0")  # formats with a second GEMV (gguf.cu's G2_ structs)
# the G2_ struct of (kind, weight rows a warp takes at once); Q4_K's 2-row form at M = 1 only
GGUF_GEMV2_STRUCTS = {("Q4_K", 1): "G2_Q4_K<1>", ("Q4_K", 2): "G2_Q4_K<2>", ("Q8_0", 1): "G2_Q8_0"}
# formats of gguf_dp4a.cu (x quantized to int8: G3_ structs), and the warps of its
# one-block-per-SM form at M = 1 (F::BIG)
GGUF_GEMV3_BIG = {"Q4_K": 24, "Q8_0": 32, "Q6_K": 24}
GGUF_GEMV3_KINDS = tuple(GGUF_GEMV3_BIG)
DECODE_UNROLL = 2  # 16-byte K and V loads per lane in flight (U); 2 beat 4 and 8 on the H200
# attention_decode_mma.cu's (warps, stages per warp) variants; rows GR are 8 or 16. The first is
# cuda_attention's for split grids, the second for grids of one split. An experiment names its
# own as PAGEDSERVE_DECODE_MMA_CONFIGS=4x2/6x2/4x4 (warps x stages, "/" between variants).
DECODE_MMA_CONFIGS = ((4, 2), (6, 2), (4, 3), (8, 2))


def _configs_from_env(text: str) -> tuple[tuple[int, int], ...]:
    try:
        configs = tuple(tuple(int(v) for v in c.split("x")) for c in text.split("/"))
    except ValueError:
        configs = ()
    if len(configs) < 2 or any(len(c) != 2 or not (1 <= c[0] <= 16 and 2 <= c[1] <= 8)
                               for c in configs):
        raise ValueError("PAGEDSERVE_DECODE_MMA_CONFIGS: two or more WARPSxSTAGES joined by '/' "
                         f"(1-16 warps, 2-8 stages), e.g. 4x2/6x2; got {text!r}")
    return configs


if os.environ.get("PAGEDSERVE_DECODE_MMA_CONFIGS"):
    DECODE_MMA_CONFIGS = _configs_from_env(os.environ["PAGEDSERVE_DECODE_MMA_CONFIGS"])
# attention_decode_mma.cu's tiles where a block takes 8 query heads (TR): 2, S^T = K Q^T and
# O^T += V^T P^T with the heads as an mma's 8 columns, registers capped for three 6-warp blocks an
# SM (four 4-warp ones); 1 the same under 0's looser bound (12 warps an SM); 0 the heads as 8 of
# an m16 tile's 16 rows. H200, W1 Llama-3-8B interleaved in two calls (session 25): 2 gave
# 10,273 / 10,294 / 10,279 / 10,277 output tok/s, 0 10,261 / 10,229 / 10,224 / 10,224, 1 10,254;
# on an H100 all three within the noise.
DECODE_MMA_TR = os.environ.get("PAGEDSERVE_DECODE_MMA_TR", "2")
if DECODE_MMA_TR not in ("0", "1", "2"):
    raise ValueError(f"PAGEDSERVE_DECODE_MMA_TR must be 0, 1 or 2, got {DECODE_MMA_TR!r}")
# attention_decode_mma.cu's TMA: "1", on sm_90 its stages fill by TMA tensor copies (16 keys x 64
# values an instruction into swizzled rows, an mbarrier a stage) where the block size is a
# multiple of 16; "0", and elsewhere, by cp.async (16 bytes a lane an instruction). Session 30 on
# an H100, W1's batch-256 mix alone (tools/energy_parts.py --attention-variants): TMA 3.02 TB/s
# and 191 pJ a K/V byte on (4, 2), cp.async 2.96-2.97 and 218-220; W1 Llama-3-8B 9,000 / 8,985
# output tok/s against 8,881 / 8,878. (Bulk copies of a key row each, 2.93 TB/s and 201-203 pJ a
# byte, no gain in W1: branch exp-decode-bulk-rows.) On an H200 (session 32): W1 Llama-3-8B 10,853 /
# 10,841 against 10,537 / 10,538; the mix alone 4.08 TB/s and 146 pJ a byte against 3.91 and 178.
DECODE_MMA_TMA = os.environ.get("PAGEDSERVE_DECODE_MMA_TMA", "1")
if DECODE_MMA_TMA not in ("0", "1"):
    raise ValueError(f"PAGEDSERVE_DECODE_MMA_TMA must be 0 or 1, got {DECODE_MMA_TMA!r}")
# attention_decode_mma.cu's cluster kernel (warps, stages, blocks a cluster): the first is what
# cuda_attention's short-context graphs run (others measured slower, cuda_attention.py)
DECODE_CLUSTER_CONFIGS = ((8, 2, 4),)
# PAGEDSERVE_DECODE_CLUSTER_MERGE ("1"): a split grid of 2..8 splits on sm_90 with TMA runs as
# clusters of its splits (rounded up to 2, 4 or 8), which merge in distributed shared memory
# instead of a reduce launch a layer (decode_mma_cluster_tma_kernel; W1's steps of 9-63
# sequences). H100, W1 Llama-3-8B in three calls (session 37): steps of 1-64 sequences 1.740 /
# 1.742 / 1.742 s against 1.769 / 1.761 / 1.758 with "0", other kinds within 0.2%; 8,915 / 8,893 /
# 8,953 output tok/s against 8,885 / 8,914 / 8,920.
DECODE_CLUSTER_MERGE = os.environ.get("PAGEDSERVE_DECODE_CLUSTER_MERGE", "1") == "1"
MERGE_CLUSTERS = (2, 4, 8)
# attention_prefill_gqa.cu's (MI, NW, BN) variants, which cuda_prefill.prefill_plan picks among
PREFILL_CONFIGS = ((2, 8, 64), (2, 4, 64), (1, 8, 64), (1, 4, 64))
# attention_prefill_sm90.cu's (BN, ST) variants: key tile, stages; blocks are always 128 rows in
# 3 warpgroups. The first is the engine's. (64, 4) and (64, 2) measured 7-8% slower (H200).
SM90_CONFIGS = ((128, 2),)
# wgmma and setmaxnreg need sm_90a, an arch CuPy's RawModule cannot ask NVRTC for: these files
# compile through _sm90a_module
SM90A_FILES = ("attention_prefill_sm90.cu", "gemm_sm90.cu")


def cuda_dir() -> Path:
    """The .cu sources: engine/cuda/ inside an installed wheel, else the checkout's cuda/."""
    here = Path(__file__).resolve().parents[2]  # the engine package
    for candidate in (here / "cuda", here.parent / "cuda"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"CUDA kernel sources not found in {here / 'cuda'} or {here.parent / 'cuda'}")


@functools.cache
def sm90_device() -> bool:
    """Whether this process's GPU is an sm_90 (Hopper: the TMA decode kernel's tested home, as
    cuda_prefill.sm90_missing checks it); False without CuPy or a GPU."""
    try:
        import cupy

        return cupy.cuda.Device().compute_capability == "90"
    except (ImportError, RuntimeError):
        return False


def decode_mma_name(ctype: str, head_dim: int, group_rows: int, warps: int, stages: int,
                    tma: bool = False) -> str:
    """The mma decode kernel's instance: the transposed tiles (DECODE_MMA_TR) take 8 heads only;
    `tma` (sm_90): its stages fill by TMA tensor copies, a kernel of its own (DECODE_MMA_TMA)."""
    tr = DECODE_MMA_TR if group_rows == 8 else "0"
    params = f"{ctype}, {head_dim}, {group_rows}, {warps}, {stages}"
    if tma:
        return f"decode_mma_tma_kernel<{params}, {tr}>"
    tail = f", {tr}" if tr != "0" else ""
    return f"decode_mma_kernel<{params}{tail}>"


def decode_mma_cluster_tma_name(ctype: str, head_dim: int, group_rows: int, warps: int,
                                stages: int, cluster: int) -> str:
    """decode_mma_name's TMA kernel with its splits merged in a cluster of `cluster` blocks."""
    tr = DECODE_MMA_TR if group_rows == 8 else "0"
    return (f"decode_mma_cluster_tma_kernel<{ctype}, {head_dim}, {group_rows}, {warps}, {stages}, "
            f"{cluster}, {tr}>")


def kernel_names(file: str, ctype: str) -> list[str]:
    """Every kernel instance of `file` for the compute type `ctype`."""
    if file == "gather.cu":
        return ["gather_rows_kernel", "resolve_placeholders_kernel", f"from_float_kernel<{ctype}>"]
    if file == "activation.cu":
        return [f"silu_and_mul_kernel<{ctype}>", f"silu_and_mul_vec8_kernel<{ctype}>",
                f"add_bias_kernel<{ctype}>"]
    if file == "rms_norm.cu":
        return ([f"rms_norm_kernel<{ctype}>"]
                + [f"rms_norm_vec_kernel<{ctype}, {v}>" for v in NORM_VEC_WIDTHS]
                + [f"reduce_rms_norm_vec_kernel<{ctype}, {v}>" for v in NORM_VEC_WIDTHS]
                + [f"qk_norm_kernel<{ctype}, {d}>" for d in HEAD_DIMS])
    if file == "rope.cu":
        return [f"rope_kernel<{ctype}, {ctype}>", f"rope_kernel<{ctype}, float>"]
    if file == "qk_rope_kv.cu":
        return [f"qk_norm_rope_kv_kernel<{ctype}, {cs}, {d}>" for cs in (ctype, "float")
                for d in HEAD_DIMS]
    if file == "gemv.cu":  # <T, M, NORM, GLU, PRE>; PRE (x words batched) at M = 1 only
        return ([f"gemv_kernel<{ctype}, {m}, false, false, false>" for m in range(1, 9)]
                + [f"gemv_kernel<{ctype}, {m}, {n}, {g}, false>" for m in range(1, 5)
                   for n, g in (("true", "false"), ("false", "true"), ("true", "true"))]
                + [f"gemv_kernel<{ctype}, 1, {n}, {g}, true>" for n in ("false", "true")
                   for g in ("false", "true")])
    if file == "fp8.cu":
        # <T, PRO, QC> a block a row, <T, PRO, C> a cluster's blocks a row (cuda_fp8._quantize)
        return ([f"fp8_quantize_kernel<{ctype}, {p}, {qc}>" for p in range(3) for qc in (2, 4)]
                + [f"fp8_quantize_cluster_kernel<{ctype}, {p}, {c}>" for p in range(3)
                   for c in (4, 8)]
                + [f"fp8_scale_kernel<{ctype}>"]
                + [f"fp8_gemv_kernel<{ctype}, {m}>" for m in range(1, 9)])
    if file == "fp8_mma.cu":  # <T, M, U> (cuda_fp8.MMA_STEPS: U)
        return [f"fp8_mma_gemv_kernel<{ctype}, {m}, {u}>" for m in range(1, 9)
                for u in FP8_MMA_STEPS]
    if file == "fp8_fused.cu":
        return [f"fp8_stream_gemv_kernel<{ctype}, {m}, {p}>" for m in range(1, 5)
                for p in range(4)]
    if file == "lt_splitk.cu":
        return [f"fp8_splitk_scale_kernel<{ctype}>"]
    if file == "kv_cache.cu":
        return [f"write_kv_cache_kernel<{ctype}>"]
    if file == "attention.cu":
        return ([f"decode_attention_kernel<{ctype}, {d}, {g}, {DECODE_UNROLL}>"
                 for d in HEAD_DIMS for g in DECODE_GROUPS]
                + [f"decode_reduce_kernel<{ctype}, {d}>" for d in HEAD_DIMS])
    if file == "attention_decode_mma.cu":
        # the form this GPU runs (a block size that TMA cannot take compiles cp.async's apart)
        tma = DECODE_MMA_TMA == "1" and sm90_device()
        configs = dict.fromkeys(DECODE_MMA_CONFIGS)  # once each: 4x2/4x2 names one twice
        return ([decode_mma_name(ctype, d, gr, nw, st, tma) for d in HEAD_DIMS
                 for gr in (8, 16) for nw, st in configs]
                + [f"decode_mma_cluster_kernel<{ctype}, {d}, {gr}, {nw}, {st}, {cl}>"
                   for d in HEAD_DIMS for gr in (8, 16) for nw, st, cl in DECODE_CLUSTER_CONFIGS]
                + ([decode_mma_cluster_tma_name(ctype, d, gr, *DECODE_MMA_CONFIGS[0], cl)
                    for d in HEAD_DIMS for gr in (8, 16) for cl in MERGE_CLUSTERS]
                   if tma and DECODE_CLUSTER_MERGE else []))
    if file == "attention_prefill.cu":
        return [f"prefill_attention_kernel<{ctype}, {d}>" for d in HEAD_DIMS]
    if file == "attention_prefill_gqa.cu":
        return [f"prefill_gqa_kernel<{ctype}, {d}, {', '.join(map(str, c))}>" for d in HEAD_DIMS
                for c in PREFILL_CONFIGS]
    if file == "attention_prefill_sm90.cu":
        return [f"prefill_sm90_kernel<{ctype}, {d}, {bn}, {st}>" for d in HEAD_DIMS
                for bn, st in SM90_CONFIGS]
    if file == "gemm_sm90.cu":  # <T, token rows (64..256), stages, GLU>: cuda_gemm_sm90
        return ([f"gemm_sm90_{kind}<{ctype}, {rows}, 4, {glu}>"
                 for kind in ("kernel", "pair_kernel") for rows in (64, 128, 192, 256)
                 for glu in ("false", "true")] + [f"gemm_sm90_reduce_kernel<{ctype}>"])
    if file == "gguf.cu":
        return ([f"gguf_gemv_kernel<{f}, {ctype}, {m}, {r}>" for f in GGUF_KINDS
                 for m, r in GGUF_GEMV_VARIANTS]
                + [f"gguf_gemv2_kernel<{st}, {ctype}, {m}, {norm}>"
                   for (_, r), st in GGUF_GEMV2_STRUCTS.items() for m in GGUF_GEMV_M
                   for norm in ("false", "true") if m == 1 or (norm == "false" and r == 1)]
                + [f"gguf_dequant_kernel<{f}, {o}>" for f in GGUF_KINDS for o in (ctype, "float")])
    if file == "gguf_dp4a.cu":
        # <F, T, M, NORM, W, GLU>: NORM and GLU (add + norm + gate_up + SiLU) at M = 1
        return ([f"gguf_gemv3_kernel<G3_{f}, {ctype}, {m}, {norm}, {w}, {glu}>"
                 for f in GGUF_GEMV3_KINDS for m in GGUF_GEMV_M
                 for norm, glu in (("false", "false"), ("true", "false"), ("true", "true"))
                 if m == 1 or norm == "false" for w in (8, GGUF_GEMV3_BIG[f]) if m == 1 or w == 8]
                # X2: one row of x as two int8 terms (the lm_head, cuda_quant_gguf.GEMV3_X2)
                + [f"gguf_gemv3_kernel<G3_{f}, {ctype}, 2, false, 8, false, true>"
                   for f in GGUF_GEMV3_KINDS]
                # SPLIT: a block's warps share its rows' loads (cuda_quant_gguf.GEMV3_SPLIT)
                + [f"gguf_gemv3_kernel<G3_{f}, {ctype}, 1, false, {w}, false, false, true>"
                   for f in GGUF_GEMV3_KINDS for w in (8, GGUF_GEMV3_BIG[f])]
                + [f"gguf_quantize_x_kernel<{ctype}, {m}, {norm}>" for m in GGUF_GEMV_M
                   for norm in ("false", "true") if m == 1 or norm == "false"])
    if file == "bitmask.cu":
        return [f"apply_token_bitmask_kernel<{t}>" for t in CTYPES.values()]
    if file == "sampling.cu":
        return (["rebuild_counts_kernel", "count_drawn_kernel", "add_logit_bias_kernel"]
                + [f"adjust_logits_kernel<{t}>" for t in CTYPES.values()]
                + [f"sample_kernel<{t}>" for t in CTYPES.values()])
    if file == "sampling_tokens.cu":
        return ["allow_only_kernel"] + [f"row_logprobs_kernel<{t}>" for t in CTYPES.values()]
    if file == "sampling_greedy.cu":
        return [f"greedy_kernel<{t}>" for t in CTYPES.values()]
    if file == "sampling_bisect.cu":
        return [f"sample_bisect_kernel<{t}>" for t in CTYPES.values()]
    raise KeyError(file)


def source(folder: Path, file: str) -> str:
    """cuda/`file`'s text plus a digest of the headers beside it: CuPy's kernel cache is keyed on
    the source text, so an upgrade that changes only a .cuh would otherwise reuse stale binaries."""
    headers = hashlib.sha256()
    for header in sorted(folder.glob("*.cuh")):
        headers.update(header.name.encode() + header.read_bytes())
    return (folder / file).read_text() + f"\n// cuda/*.cuh sha256 {headers.hexdigest()}\n"


@functools.cache
def _module(file: str, ctype: str):
    """(cupy.RawModule, its kernel names); cupy is imported here, so kernel_names works without."""
    import cupy

    folder = cuda_dir()
    names = kernel_names(file, ctype)
    if file in SM90A_FILES:
        return _sm90a_module(folder, file, names), frozenset(names)
    module = cupy.RawModule(
        code=source(folder, file),
        options=("-std=c++17", f"-I{folder}"),
        name_expressions=names,
    )
    module.compile()
    return module, frozenset(names)


@functools.cache
def kernel(file: str, name: str, ctype: str = "float"):
    """The compiled kernel `name` from cuda/`file`; ctype picks the module's instantiation set.
    An instance outside that set (a test's or an experiment's variant) compiles on its own."""
    module, names = _module(file, ctype)
    if name not in names:
        module = _instance_module(file, name)
    return module.get_function(name)


@functools.cache
def _instance_module(file: str, name: str):
    """A module of cuda/`file` holding the one instance `name`."""
    import cupy

    folder = cuda_dir()
    if file in SM90A_FILES:
        return _sm90a_module(folder, file, [name])
    module = cupy.RawModule(code=source(folder, file), options=("-std=c++17", f"-I{folder}"),
                            name_expressions=[name])
    module.compile()
    return module


# ---------------------------------------------------------------------------- launching


class _AttrValue(ctypes.Union):  # CUlaunchAttributeValue: a 64-byte union
    _fields_ = [("pad", ctypes.c_char * 64), ("align", ctypes.c_uint64), ("flag", ctypes.c_uint)]


class _Attr(ctypes.Structure):  # CUlaunchAttribute
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", _AttrValue)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("num_attrs", ctypes.c_uint)]


PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_SCALARS = {np.int32: ctypes.c_int32, np.uint32: ctypes.c_uint32, np.int64: ctypes.c_int64,
            np.uint64: ctypes.c_uint64, np.float32: ctypes.c_float, np.float64: ctypes.c_double}


@functools.cache
def _launch_ex():
    """libcuda's cuLaunchKernelEx when this GPU and driver can do PDL, else None."""
    import cupy

    if int(cupy.cuda.Device().compute_capability) < 90:
        return None
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_SM_COUNTS: dict[int, int] = {}


def num_sms() -> int:
    """The current GPU's streaming multiprocessors (asked once per device)."""
    import cupy

    device = cupy.cuda.Device()
    if device.id not in _SM_COUNTS:
        _SM_COUNTS[device.id] = int(device.attributes["MultiProcessorCount"])
    return _SM_COUNTS[device.id]


def can_launch_by_value() -> bool:
    """Whether launch() can pass a structure by value here (libcuda's cuLaunchKernelEx, sm_90)."""
    return _launch_ex() is not None


def _c_arg(a):
    import cupy

    if isinstance(a, cupy.ndarray):
        return ctypes.c_void_p(a.data.ptr)
    if isinstance(a, ctypes.Structure):
        return a
    kind = _SCALARS.get(type(a))
    if kind is None:
        raise TypeError(f"launch: argument of type {type(a).__name__}; pass a cupy array or a "
                        "numpy scalar of the kernel parameter's type")
    return kind(a.item())


def _dims(d) -> tuple:
    d = tuple(d) if isinstance(d, (tuple, list)) else (d,)
    return d + (1,) * (3 - len(d))


@contextlib.contextmanager
def programmatic_launches():
    """Within it, launch(..., pdl=True) is a programmatic dependent launch (module docstring)."""
    saved, _pdl_scope[0] = _pdl_scope[0], True
    try:
        yield
    finally:
        _pdl_scope[0] = saved


def launch(fn, grid, block, args: tuple, shared_mem: int = 0, pdl: bool = False) -> None:
    """fn(grid, block, args, shared_mem=...) on the current stream; with pdl inside
    programmatic_launches(), as a programmatic dependent launch where the GPU can (module
    docstring). fn must then call pdl_wait() first. An argument that is a ctypes.Structure (a
    TMA tensor map) is passed by value, which only libcuda's launch can do."""
    global PDL
    by_value = any(isinstance(a, ctypes.Structure) for a in args)
    pdl = pdl and PDL and _pdl_scope[0]
    launch_ex = _launch_ex() if pdl or by_value else None
    ptr = None
    if launch_ex is not None:  # (an eager step's plain launch looks nothing up)
        # RawModule.get_function gives a RawKernel; its .kernel is the Function holding the
        # CUfunction
        ptr = getattr(getattr(fn, "kernel", fn), "ptr", None)
        if ptr is None and not by_value:
            logger.warning("CuPy's kernel has no CUfunction handle: launching without PDL")
            PDL, launch_ex = False, None
    if by_value and (launch_ex is None or ptr is None):
        raise RuntimeError("launch: a by-value structure argument needs libcuda's "
                           "cuLaunchKernelEx (sm_90) and the kernel's CUfunction")
    if launch_ex is None:
        fn(grid, block, args, shared_mem=shared_mem)
        return
    import cupy

    values = [_c_arg(a) for a in args]
    params = (ctypes.c_void_p * max(1, len(values)))(*[ctypes.addressof(v) for v in values])
    attr = _Attr(id=PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value.flag = 1
    config = _Config((ctypes.c_uint * 3)(*_dims(grid)), (ctypes.c_uint * 3)(*_dims(block)),
                     shared_mem, cupy.cuda.get_current_stream().ptr,
                     ctypes.pointer(attr) if pdl else None, 1 if pdl else 0)
    status = launch_ex(ctypes.byref(config), ptr, params, None)
    if status != 0 and by_value:
        raise RuntimeError(f"cuLaunchKernelEx failed (CUresult {status})")
    if status != 0:  # nothing was queued: launch it the plain way, and every later one too
        logger.warning("cuLaunchKernelEx failed (CUresult %d): launching without PDL", status)
        PDL = False
        fn(grid, block, args, shared_mem=shared_mem)


# ---------------------------------------------------------------------------- sm_90a modules


class _LoweredModule:
    """A cubin loaded as a cupy.RawModule whose kernels are found by their NVRTC lowered names."""

    def __init__(self, module, lowered: dict[str, str]):
        self.module, self.lowered = module, lowered

    def get_function(self, name: str):
        return self.module.get_function(self.lowered[name])


def _sm90a_module(folder: Path, file: str, names: list[str]) -> _LoweredModule:
    """NVRTC straight from CuPy's bindings with -arch=sm_90a (RawModule appends the device's plain
    sm_90), with the include options RawModule would pass. The cubin and its lowered names are
    kept in CuPy's kernel cache folder, keyed by the source, options and names: a later process
    loads them without compiling, and every GPU of this one loads the same file."""
    import cupy

    nvrtc = cupy.cuda.nvrtc  # CuPy's NVRTC bindings (cupy_backends.cuda.libs.nvrtc)
    options = ("-std=c++17", f"-I{folder}", "-ftz=true")
    try:
        from cupy._core.core import assemble_cupy_compiler_options

        options = assemble_cupy_compiler_options(options)
    except ImportError:  # an older CuPy: the toolkit's headers
        options += (f"-I{Path(cupy.cuda.get_cuda_path() or '/usr/local/cuda') / 'include'}",)
    text = source(folder, file)
    key = hashlib.sha256("\0".join([text, *options, *names, str(nvrtc.getVersion())]).encode())
    stem = f"pagedserve-sm90a-{Path(file).stem}-{key.hexdigest()[:24]}"
    cubin_path, names_path = _cache_dir() / f"{stem}.cubin", _cache_dir() / f"{stem}.json"
    if not (cubin_path.exists() and names_path.exists()):
        prog = nvrtc.createProgram(text, file, (), ())
        try:
            for name in names:
                nvrtc.addNameExpression(prog, name)
            try:
                nvrtc.compileProgram(prog, options + ("-arch=sm_90a",))
            except nvrtc.NVRTCError as e:
                raise RuntimeError(f"NVRTC (sm_90a) failed on {file}:\n"
                                   f"{nvrtc.getProgramLog(prog)}") from e
            cubin = nvrtc.getCUBIN(prog)
            lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
        finally:
            nvrtc.destroyProgram(prog)
        _write_atomically(names_path, json.dumps(lowered).encode())
        _write_atomically(cubin_path, cubin)
    lowered = json.loads(names_path.read_text())
    module = cupy.RawModule(path=str(cubin_path))
    module.get_function(lowered[names[0]])  # loads the file now
    return _LoweredModule(module, lowered)


def _cache_dir() -> Path:
    """CuPy's kernel cache folder: CUPY_CACHE_DIR, else ~/.cupy/kernel_cache."""
    folder = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _write_atomically(path: Path, data: bytes) -> None:
    """path's content becomes data at once: processes compiling side by side never read half."""
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
        f.write(data)
    os.replace(f.name, path)
