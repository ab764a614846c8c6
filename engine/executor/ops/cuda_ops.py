"""The cuda backend: NumpyOps' interface on CuPy arrays, with the kernels in cuda/ and cuBLAS.

Activations, weights and the KV cache are fp16 or bf16 (bf16 stored as uint16 arrays, since CuPy
has no bfloat16 dtype); every kernel computes in fp32. CuPy checks nothing about kernel arguments,
so each wrapper checks shapes, dtypes and contiguity before it launches.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os

import cupy
import numpy as np

from engine.executor.ops import (
    AttentionMetadata,
    SamplerOutput,
    SamplingTensors,
    cuda_fp8,
    cuda_gemm_sm90,
    cuda_gemv,
    cuda_kernels,
    cuda_norm,
)
from engine.executor.ops.cuda_attention import (
    DeviceAttentionMetadata,
    decode_kernel,
    paged_attention,
    prepare_metadata,
    rope_folds,
)
from engine.executor.ops.cuda_blas import Gemm
from engine.executor.ops.cuda_gemm_plan import PlannedGemm, lean_gemm_enabled
from engine.executor.ops.cuda_gemm_sm90 import PendingSum
from engine.executor.ops.cuda_gemm_tune import TunedGemm, tuning_enabled
from engine.executor.ops.cuda_kernels import CTYPES, HEAD_DIMS, kernel, kernel_names, launch
from engine.executor.ops.cuda_quant_gguf import GGUFLinear, is_gguf
from engine.executor.ops.cuda_sampling import (
    DeviceSample,
    DeviceTokenCounts,
    release_buffers,
    row_logprobs_on_device,
    sample_on_device,
)
from engine.model.quantized import QuantizedWeight

DTYPES = {"float16": np.float16, "bfloat16": np.uint16}
# silu_and_mul() on activation.cu's 8-wide kernel (bit-identical to the scalar one). H200,
# kernel_check --only w1 (x 28672 gate_up): 18.0 -> 5.9 us at 256 rows, 555 -> 168 us at 8192
# (3.3x, 98% of the copy ceiling). PAGEDSERVE_SILU_VEC8=0 goes back to the scalar kernel.
SILU_MUL_VEC8 = os.environ.get("PAGEDSERVE_SILU_VEC8", "1") == "1"
_NULL = np.uint64(0)
_OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation and CUDA_ERROR_OUT_OF_MEMORY alike
# cudaErrorStreamCapture* and CUDA_ERROR_STREAM_CAPTURE_* alike (unsupported, invalidated, ...,
# wrong thread): a failed capture, after which the context works on
_STREAM_CAPTURE = range(900, 909)


def _i32(v) -> np.int32:
    return np.int32(v)


def _grid(n: int, block: int) -> tuple:
    return (max(1, -(-n // block)),)


class CudaOps:
    name = "cuda"

    def __init__(self, dtype: str = "bfloat16"):
        if dtype in ("auto", "float32"):
            dtype = "bfloat16"  # the GPU computes in 16-bit; bf16 has fp32's range
        if dtype not in DTYPES:
            raise ValueError(
                f"dtype must be 'float16' or 'bfloat16' for the cuda backend, got {dtype!r}")
        if cupy.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("the cuda backend needs an NVIDIA GPU, and CuPy sees none")
        self.dtype = dtype
        self.ctype = CTYPES[dtype]
        self.storage = np.dtype(DTYPES[dtype])
        self._gemm = Gemm()
        if tuning_enabled():  # up to TUNE_MAX_M rows; above, as without it
            self._gemm.tuned = TunedGemm(
                self._gemm, beyond=PlannedGemm(self._gemm) if lean_gemm_enabled() else None)
        elif lean_gemm_enabled():
            self._gemm.tuned = PlannedGemm(self._gemm)
        # Structured outputs: the bitmask's pinned staging buffer, and the event after its last
        # copy out (apply_token_bitmask).
        self._mask_stage: np.ndarray | None = None
        self._mask_stage_mem = None
        self._mask_copied: cupy.cuda.Event | None = None
        decode_file = ("attention_decode_mma.cu",) if decode_kernel() == "mma" else ()
        # Compiled now: errors show at start-up, and no request waits for NVRTC (the sampler's
        # first compile on a fresh machine takes seconds: it was timed inside W1 sampled).
        for file in ("gather.cu", "activation.cu", "rms_norm.cu", "rope.cu", "kv_cache.cu",
                     "qk_rope_kv.cu", "gemv.cu", "attention.cu") + decode_file:
            kernel(file, _first_name(file, self.ctype), self.ctype)
        for file in ("sampling.cu", "sampling_greedy.cu"):  # cuda_sampling looks these up so
            kernel(file, _first_name(file, "float"))

    @staticmethod
    def is_fatal(error: BaseException) -> bool:
        """Whether `error` leaves the backend unusable. A CUDA runtime or driver error other
        than out-of-memory or a failed stream capture is sticky (an illegal address poisons the
        whole context: every later call fails too), so the engine cannot go on; an OOM fails a
        step, and a failed capture its graphs, not the engine."""
        if isinstance(error, (cupy.cuda.runtime.CUDARuntimeError,
                              cupy.cuda.driver.CUDADriverError)):
            return error.status != _OUT_OF_MEMORY and error.status not in _STREAM_CAPTURE
        return False

    # ---------------------------------------------------------------- checks

    def _check(self, x, name: str, ndim: int | None = None, dtype=None):
        if not isinstance(x, cupy.ndarray):
            raise TypeError(f"{name}: expected a cupy array, got {type(x).__name__}")
        want = self.storage if dtype is None else np.dtype(dtype)
        if x.dtype != want:
            raise TypeError(f"{name}: expected dtype {want}, got {x.dtype}")
        if ndim is not None and x.ndim != ndim:
            raise ValueError(f"{name}: expected {ndim} dimensions, got shape {x.shape}")
        # NOTE: the attribute behind x.flags.c_contiguous; .flags builds a Flags object, and an
        # eager step makes ~1,000 of these checks
        if not x._c_contiguous:
            raise ValueError(f"{name}: must be C-contiguous")
        return x

    def _ints(self, a, name: str) -> cupy.ndarray:
        if isinstance(a, np.ndarray):
            return cupy.asarray(np.ascontiguousarray(a, np.int32))
        return self._check(a, name, 1, np.int32)

    @staticmethod
    def _head_dim_ok(head_dim: int):
        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim {head_dim} is not supported by the cuda kernels "
                             f"(compiled for {HEAD_DIMS})")

    def check_model(self, config) -> None:
        """Refuse at start-up a model the compiled kernel variants cannot run."""
        self._head_dim_ok(config.head_dim)

    # ---------------------------------------------------------------- memory

    def from_host(self, array: np.ndarray) -> cupy.ndarray:
        if isinstance(array, QuantizedWeight):
            return _upload_quantized(array)
        array = np.asarray(array)
        if array.dtype.kind != "f":
            return cupy.asarray(np.ascontiguousarray(array))
        return self._from_fp32(cupy.asarray(np.ascontiguousarray(array, np.float32)))

    def _from_fp32(self, x: cupy.ndarray) -> cupy.ndarray:
        out = cupy.empty(x.shape, self.storage)
        n = x.size
        if n:
            kernel("gather.cu", f"from_float_kernel<{self.ctype}>", self.ctype)(
                _grid(n, 256), (256,), (out, x, np.int64(n)))
        return out

    def quantize_fp8(self, weight: cupy.ndarray) -> QuantizedWeight:
        """(out, in) weight -> E4M3 codes with per-output-channel scales, on the device."""
        q = cuda_fp8.quantize_weight(self._check(weight, "weight", 2), self.ctype)
        # The 16-bit (and fp32 staging) copies of the weights quantized so far stay cached in
        # CuPy's pool, which the KV cache's sizing counts as used: hand them back.
        cupy.get_default_memory_pool().free_all_blocks()
        return q

    def to_host(self, array) -> np.ndarray:
        a = cupy.asnumpy(array) if isinstance(array, cupy.ndarray) else np.asarray(array)
        if a.dtype == np.uint16 and self.dtype == "bfloat16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        if a.dtype == np.float16:
            return a.astype(np.float32)
        return a

    def random_weight(self, shape: tuple, std: float, rng: np.random.Generator) -> cupy.ndarray:
        seed = int(rng.integers(0, 2**63 - 1))
        x = cupy.random.RandomState(seed).standard_normal(shape, dtype=cupy.float32)
        x *= np.float32(std)
        return self._from_fp32(x)

    def ones(self, shape: tuple) -> cupy.ndarray:
        if self.dtype == "bfloat16":
            return cupy.full(shape, 0x3F80, cupy.uint16)  # 1.0 in bf16
        return cupy.ones(shape, cupy.float16)

    def alloc_kv_cache(self, num_layers, num_blocks, num_kv_heads, block_size, head_dim):
        # (num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim); [l, 0] k, [l, 1] v
        self._head_dim_ok(head_dim)
        return cupy.zeros((num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim),
                          self.storage)

    def kv_bytes_per_token(self, num_layers, num_kv_heads, head_dim) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * 2

    def copy_blocks(self, kv_cache, copies: list[tuple[int, int]]) -> None:
        """kv_cache[:, :, dst] = kv_cache[:, :, src] for every (src, dst), every layer, k and v.
        Only forks (n > 1) copy, one small gather per step that has any: CuPy's indexing is
        enough, no kernel of its own."""
        self._check(kv_cache, "kv_cache", 6)
        src, dst = cupy.asarray(np.array(copies, np.int64).reshape(-1, 2).T)
        kv_cache[:, :, dst] = kv_cache[:, :, src]

    # ---------------------------------------------------------------- layers

    def _gather(self, src, idx, n_rows: int):
        # src (rows, width) -> (n_rows, width), 16-byte words per row
        width_bytes = src.shape[1] * src.itemsize
        if width_bytes % 16 or src.data.ptr % 16:
            return cupy.take(src, idx, axis=0)
        out = cupy.empty((n_rows, src.shape[1]), src.dtype)
        if n_rows:
            launch(kernel("gather.cu", "gather_rows_kernel", self.ctype), (n_rows,),
                   (cuda_norm.gather_threads(width_bytes // 16),),
                   (out, src, idx, _i32(width_bytes // 16)), pdl=True)
        return out

    def embedding(self, ids, table):
        # ids (T,) int32, table (vocab, hidden) -> (T, hidden)
        ids = self._ints(ids, "ids")
        if isinstance(table, QuantizedWeight):
            return self._quantized_embedding(ids, table)
        return self._gather(self._check(table, "embedding table", 2), ids, len(ids))

    def gather_rows(self, x, indices):
        indices = self._ints(indices, "indices")
        return self._gather(self._check(x, "x", 2), indices, len(indices))

    def _norm(self, x, residual, weight, eps, mode):
        out = cupy.empty_like(x)
        cuda_norm.rms_norm(out, residual, x, weight, eps, mode, self.ctype)
        return out

    def rms_norm(self, x, weight, eps: float):
        # x (T, hidden), weight (hidden,)
        self._check(x, "x", 2)
        self._check(weight, "weight", 1)
        return self._norm(x, None, weight, eps, 0)

    def add_rms_norm(self, x, residual, weight, eps):
        """residual += x (in place); return (rms_norm(residual), residual). None starts it.
        x may be a split-K product still in partial sums (linear(..., defer_sum=True)): its
        reduction, the add and the norm are then one launch."""
        if isinstance(x, PendingSum):
            if residual is not None and residual.shape == x.shape:
                self._check(weight, "weight", 1)
                self._check(residual, "residual", 2)
                out = cupy.empty(x.shape, self.storage)
                if cuda_norm.reduce_rms_norm(out, residual, x.partial, weight, eps, self.ctype):
                    x.take()
                    return out, residual
            x = x.resolve()
        self._check(x, "x", 2)
        self._check(weight, "weight", 1)
        if residual is None:
            residual = cupy.empty_like(x)
            return self._norm(x, residual, weight, eps, 1), residual
        self._check(residual, "residual", 2)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {residual.shape} != x shape {x.shape}")
        return self._norm(x, residual, weight, eps, 2), residual

    def add_rms_norm_linear(self, x, residual, norm_weight, eps, weight):
        """h, residual = add_rms_norm(x, residual, norm_weight, eps); (linear(h, weight),
        residual). One GEMV launch at small batches (the residual comes back as a new array)."""
        if isinstance(x, PendingSum):  # its reduction goes into the norm's launch
            h, residual = self.add_rms_norm(x, residual, norm_weight, eps)
            return self.linear(h, weight), residual
        if isinstance(weight, QuantizedWeight) and weight.kind == "fp8":
            return cuda_fp8.add_rms_norm_linear(self, x, residual, norm_weight, eps, weight)
        if isinstance(weight, QuantizedWeight):
            if is_gguf(weight):
                self._check(x, "x", 2)
                return self._gguf.add_rms_norm_linear(x, residual, norm_weight, eps, weight)
            h, residual = self.add_rms_norm(x, residual, norm_weight, eps)
            return self._quantized_linear(h, weight), residual
        self._check(x, "x", 2)
        self._check(norm_weight, "norm_weight", 1)
        self._check(weight, "weight", 2)
        if residual is not None and self._check(residual, "residual", 2).shape != x.shape:
            raise ValueError(f"residual shape {residual.shape} != x shape {x.shape}")
        if x.shape[1] != weight.shape[1] or norm_weight.shape[0] != x.shape[1]:
            raise ValueError(f"add_rms_norm_linear: x has {x.shape[1]} features, norm weight "
                             f"{norm_weight.shape[0]}, weight expects {weight.shape[1]}")
        if cuda_gemv.use_norm_gemv(x, residual, norm_weight, weight):
            return cuda_gemv.norm_gemv(x, residual, norm_weight, weight, eps, self.ctype)
        h, residual = self.add_rms_norm(x, residual, norm_weight, eps)
        return self.linear(h, weight), residual

    def linear(self, x, weight, bias=None, defer_sum=False):
        """x (T, in) @ weight (out, in)^T (+ bias (out,)) -> (T, out). defer_sum: a product the
        skinny GEMM splits over K may come back as a PendingSum, for add_rms_norm (or mlp /
        add_rms_norm_linear, which start with it) to finish in its own launch."""
        if isinstance(weight, QuantizedWeight) and weight.kind == "fp8":
            return cuda_fp8.linear(self, x, weight, bias)
        self._check(x, "x", 2)
        if isinstance(weight, QuantizedWeight):
            if bias is not None:
                raise ValueError("linear: a bias with a quantized weight is not supported")
            return self._quantized_linear(x, weight)
        self._check(weight, "weight", 2)
        if x.shape[1] != weight.shape[1]:
            raise ValueError(
                f"linear: x has {x.shape[1]} features, weight expects {weight.shape[1]}")
        out = cupy.empty((x.shape[0], weight.shape[0]), self.storage)
        if x.shape[0] == 0:
            return out
        if cuda_gemv.use_gemv(x, weight):
            cuda_gemv.gemv(x, weight, out, self.ctype)
        elif cuda_gemm_sm90.takes(x, weight):  # PAGEDSERVE_SKINNY_GEMM=1 (an experiment)
            product = cuda_gemm_sm90.skinny_gemm(x, weight, out, self.ctype,
                                                 defer=defer_sum and bias is None)
            if isinstance(product, PendingSum):
                return product
        else:
            self._gemm(x, weight, out, self.dtype)
        if bias is not None:
            self._check(bias, "bias", 1)
            kernel("activation.cu", f"add_bias_kernel<{self.ctype}>", self.ctype)(
                _grid(out.size, 256), (256,), (out, bias, np.int64(out.size), _i32(out.shape[1])))
        return out

    def all_reduce(self, x):
        """One rank: x itself (tensor_parallel.py has the N-rank version, over NCCL)."""
        return x

    def gather_vocab(self, logits):
        return logits

    def qk_norm(self, qkv, q_weight, k_weight, eps, num_heads, num_kv_heads):
        """Per-head RMSNorm of the q and k heads of qkv, in place (Qwen3)."""
        head_dim = q_weight.shape[0]
        self._head_dim_ok(head_dim)
        self._check(qkv, "qkv", 2)
        n = len(qkv) * (num_heads + num_kv_heads)
        if n:
            kernel("rms_norm.cu", f"qk_norm_kernel<{self.ctype}, {head_dim}>", self.ctype)(
                _grid(n, 4), (128,),
                (qkv, self._check(q_weight, "q_weight", 1), self._check(k_weight, "k_weight", 1),
                 np.float32(eps), _i32(len(qkv)), _i32(num_heads), _i32(num_kv_heads)))

    def rope(self, qkv, positions, cos_sin, num_heads, num_kv_heads):
        """Rotate q and k heads of qkv in place, HF's half-split convention."""
        self._check(qkv, "qkv", 2)
        positions = self._ints(positions, "positions")
        cs_type = "float" if cos_sin.dtype == np.float32 else self.ctype
        self._check(cos_sin, "cos_sin", 2, cos_sin.dtype if cs_type == "float" else None)
        head_dim = cos_sin.shape[1]
        if len(qkv):
            kernel("rope.cu", f"rope_kernel<{self.ctype}, {cs_type}>", self.ctype)(
                (len(qkv), num_heads + num_kv_heads), (head_dim // 2,),
                (qkv, positions, cos_sin, _i32(num_heads), _i32(num_kv_heads), _i32(head_dim)))

    def silu_mul_linear(self, gate_up, weight):
        """linear(silu_and_mul(gate_up), weight); mlp() fuses the activation instead."""
        if isinstance(weight, QuantizedWeight) and weight.kind == "fp8":
            return cuda_fp8.silu_mul_linear(self, gate_up, weight)
        if not isinstance(weight, QuantizedWeight):
            self._check(gate_up, "gate_up", 2)
            if gate_up.shape[1] != 2 * self._check(weight, "weight", 2).shape[1]:
                raise ValueError(f"silu_mul_linear: gate_up has {gate_up.shape[1]} features, "
                                 f"weight expects 2 x {weight.shape[1]}")
        return self.linear(self.silu_and_mul(gate_up), weight)

    def mlp(self, x, residual, norm_weight, eps, gate_up, down, defer_sum=False):
        """add_rms_norm_linear(..., gate_up), then silu_mul_linear(..., down): (y, residual).
        At small batches the SiLU-and-mul is the gate_up GEMV's output (cuda_gemv.glu_gemv), with
        the add + norm fused in at batch 1: two launches for the whole MLP. defer_sum: as
        linear's, for down's product; x may be a PendingSum (add_rms_norm takes it)."""
        if isinstance(x, PendingSum):
            h, residual = self.add_rms_norm(x, residual, norm_weight, eps)
            if self._plain(gate_up, down) and cuda_gemm_sm90.takes(h, gate_up):
                return self._skinny_mlp(h, gate_up, down, defer_sum), residual
            return self.silu_mul_linear(self.linear(h, gate_up), down), residual
        if is_gguf(gate_up):  # the SiLU fused into a GGUF gate_up GEMV where it runs
            fused = self._gguf.add_rms_norm_glu(self._check(x, "x", 2), residual, norm_weight,
                                                eps, gate_up)
            if fused is not None:
                return self.linear(fused[0], down), fused[1]
        plain = self._plain(gate_up, down)
        if not plain or not cuda_gemv.use_glu_gemv(self._check(x, "x", 2), gate_up):
            if plain and cuda_gemm_sm90.takes(x, gate_up):  # PAGEDSERVE_SKINNY_GEMM=1
                h, residual = self.add_rms_norm(x, residual, norm_weight, eps)
                return self._skinny_mlp(h, gate_up, down, defer_sum), residual
            gate_up_out, residual = self.add_rms_norm_linear(x, residual, norm_weight, eps,
                                                             gate_up)
            return self.silu_mul_linear(gate_up_out, down), residual
        self._check(norm_weight, "norm_weight", 1)
        self._check(gate_up, "gate_up", 2)
        if residual is not None and self._check(residual, "residual", 2).shape != x.shape:
            raise ValueError(f"residual shape {residual.shape} != x shape {x.shape}")
        if not x.shape[1] == gate_up.shape[1] == norm_weight.shape[0]:
            raise ValueError(f"mlp: x has {x.shape[1]} features, norm weight "
                             f"{norm_weight.shape[0]}, gate_up expects {gate_up.shape[1]}")
        if 2 * self._check(down, "down", 2).shape[1] != gate_up.shape[0]:
            raise ValueError(f"mlp: gate_up has {gate_up.shape[0]} outputs, down expects "
                             f"2 x {down.shape[1]}")
        if cuda_gemv.use_norm_gemv(x, residual, norm_weight, gate_up):
            act, residual = cuda_gemv.norm_gemv(x, residual, norm_weight, gate_up, eps,
                                                self.ctype, glu=True)
        else:
            h, residual = self.add_rms_norm(x, residual, norm_weight, eps)
            act = cuda_gemv.glu_gemv(h, gate_up, self.ctype)
        return self.linear(act, down), residual

    @staticmethod
    def _plain(*weights) -> bool:
        return not any(isinstance(w, QuantizedWeight) for w in weights)

    def _skinny_mlp(self, h, gate_up, down, defer_sum: bool):
        """down(silu_and_mul(h @ gate_up^T)) on the skinny GEMM, the SiLU-mul in gate_up's
        epilogue (PAGEDSERVE_SKINNY_GEMM=1)."""
        act = cupy.empty((h.shape[0], gate_up.shape[0] // 2), self.storage)
        cuda_gemm_sm90.skinny_glu(h, gate_up, act, self.ctype)
        return self.linear(act, down, defer_sum=defer_sum)

    def qk_norm_rope_kv_write(self, qkv, positions, cos_sin, q_weight, k_weight, eps, k_cache,
                              v_cache, slot_mapping, num_heads, num_kv_heads, bias=None):
        """+ bias, q/k norm, RoPE, k/v into the cache: one launch (cuda/qk_rope_kv.cu)."""
        self._check(qkv, "qkv", 2)
        self._check(k_cache, "k_cache", 4)
        self._check(v_cache, "v_cache", 4)
        positions = self._ints(positions, "positions")
        slot_mapping = self._ints(slot_mapping, "slot_mapping")
        _, cache_kv_heads, block_size, head_dim = k_cache.shape
        self._head_dim_ok(head_dim)
        width = (num_heads + 2 * num_kv_heads) * head_dim
        if qkv.shape[1] != width or cache_kv_heads != num_kv_heads:
            raise ValueError(f"qkv width {qkv.shape[1]} / cache heads {cache_kv_heads} do not "
                             f"match num_heads={num_heads}, num_kv_heads={num_kv_heads}, "
                             f"head_dim={head_dim}")
        cs_type = "float" if cos_sin.dtype == np.float32 else self.ctype
        self._check(cos_sin, "cos_sin", 2, cos_sin.dtype if cs_type == "float" else None)
        if cos_sin.shape[1] != head_dim:
            raise ValueError(f"cos_sin width {cos_sin.shape[1]} != head_dim {head_dim}")
        if (q_weight is None) != (k_weight is None):
            raise ValueError("q_weight and k_weight: give both or neither")
        norms = [_NULL if w is None else self._check(w, name, 1)
                 for w, name in ((q_weight, "q_weight"), (k_weight, "k_weight"))]
        if bias is not None and self._check(bias, "bias", 1).shape[0] != width:
            raise ValueError(f"bias length {bias.shape[0]} != qkv width {width}")
        n = len(qkv) * (num_heads + 2 * num_kv_heads)
        if n:
            launch(kernel("qk_rope_kv.cu",
                          f"qk_norm_rope_kv_kernel<{self.ctype}, {cs_type}, {head_dim}>",
                          self.ctype),
                   _grid(n, 4), (128,),
                   (qkv, k_cache, v_cache, positions, slot_mapping, cos_sin, *norms,
                    _NULL if bias is None else bias, np.float32(eps), _i32(len(qkv)),
                    _i32(num_heads), _i32(num_kv_heads), _i32(block_size),
                    _i32(cuda_kernels.early_flag() | int(cuda_norm.norm_flags(True)))),
                   pdl=True)

    def silu_and_mul(self, gate_up):
        # gate_up (T, 2 * inter): gate first, then up -> (T, inter)
        self._check(gate_up, "gate_up", 2)
        inter = gate_up.shape[1] // 2
        out = cupy.empty((gate_up.shape[0], inter), self.storage)
        if not out.size:
            return out
        if SILU_MUL_VEC8 and inter % 8 == 0 and gate_up.data.ptr % 16 == 0:
            launch(kernel("activation.cu", f"silu_and_mul_vec8_kernel<{self.ctype}>",
                          self.ctype),
                   _grid(out.size // 8, 256), (256,),
                   (out, gate_up, np.int64(out.size // 8), _i32(inter // 8)), pdl=True)
        else:
            launch(kernel("activation.cu", f"silu_and_mul_kernel<{self.ctype}>", self.ctype),
                   _grid(out.size, 256), (256,), (out, gate_up, np.int64(out.size), _i32(inter)),
                   pdl=True)
        return out

    # ---------------------------------------------------------------- GGUF weights

    @functools.cached_property
    def _gguf(self) -> GGUFLinear:
        return GGUFLinear(self)

    def _quantized_linear(self, x, weight: QuantizedWeight):
        """linear() of a GGUF block-format weight (engine/executor/ops/cuda_quant_gguf.py)."""
        self._check(x, "x", 2)
        if x.shape[1] != weight.shape[1]:
            raise ValueError(f"linear: x has {x.shape[1]} features, {weight.kind} weight "
                             f"expects {weight.shape[1]}")
        if not is_gguf(weight):
            raise TypeError(f"no cuda kernels for weights of kind {weight.kind!r}")
        return self._gguf.linear(x, weight)

    def _quantized_embedding(self, ids, table: QuantizedWeight):
        if not is_gguf(table):
            raise TypeError(f"no cuda kernels for embeddings of kind {table.kind!r}")
        return self._gguf.embedding(ids, table)

    # ---------------------------------------------------------------- attention

    def prepare_metadata(self, meta: AttentionMetadata) -> DeviceAttentionMetadata:
        """Device copies of the step's metadata, uploaded once and reused by every layer."""
        return prepare_metadata(meta)

    def write_kv_cache(self, qkv, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads):
        """Store each new token's k and v heads at its slot; slot -1 means 'do not store'."""
        self._check(qkv, "qkv", 2)
        self._check(k_cache, "k_cache", 4)
        self._check(v_cache, "v_cache", 4)
        slot_mapping = self._ints(slot_mapping, "slot_mapping")
        _, _, block_size, head_dim = k_cache.shape
        if len(qkv):
            kernel("kv_cache.cu", f"write_kv_cache_kernel<{self.ctype}>", self.ctype)(
                (len(qkv),), (128,),
                (k_cache, v_cache, qkv, slot_mapping, _i32(num_heads), _i32(num_kv_heads),
                 _i32(head_dim), _i32(block_size)))

    def attention(self, qkv, k_cache, v_cache, meta, num_heads, num_kv_heads, scale, out=None,
                  rope=None):
        """Causal attention of every new query over its sequence's paged cache -> (T, q_size),
        into `out` when given. rope (positions, cos_sin), where folds_rope said yes: RoPE on q
        and k and the k/v cache write happen here (qk_norm_rope_kv_write left out)."""
        self._check(qkv, "qkv", 2)
        self._check(k_cache, "k_cache", 4)
        self._check(v_cache, "v_cache", 4)
        self._head_dim_ok(k_cache.shape[-1])
        if isinstance(meta, AttentionMetadata):
            meta = prepare_metadata(meta)
        if rope is not None:
            rope = (self._ints(rope[0], "positions"), rope[1])
        return paged_attention(qkv, k_cache, v_cache, meta, num_heads, num_kv_heads, scale,
                               self.ctype, out, rope)

    def folds_rope(self, meta, num_heads, num_kv_heads) -> bool:
        """Whether attention(rope=...) can take this step's RoPE and k/v cache write (a
        decode-only step on the mma kernel's transposed tiles: cuda_attention.rope_folds); the
        model must have no q/k norm and no qkv bias."""
        return (not isinstance(meta, AttentionMetadata)
                and rope_folds(meta, num_heads, num_kv_heads))

    # ---------------------------------------------------------------- sampling

    def sample(self, logits, tensors: SamplingTensors) -> SamplerOutput:
        # logits (R, vocab): float32, or the compute dtype straight from the lm_head GEMM
        return self.sample_start(logits, tensors).wait()

    def alloc_token_counts(self, num_slots: int, vocab: int) -> DeviceTokenCounts:
        """The per-sequence token counts that penalties read between steps."""
        return DeviceTokenCounts(num_slots, vocab)

    def sample_start(self, logits, tensors: SamplingTensors,
                     prev_sampled: cupy.ndarray | None = None) -> DeviceSample:
        """Queue the sampling; .wait() on the answer reads it. `prev_sampled` (the previous
        step's DeviceSample.token_ids) resolves placeholders among the penalties' output ids."""
        if isinstance(logits, np.ndarray):
            logits = cupy.asarray(np.ascontiguousarray(logits, np.float32))
        ctype = _LOGIT_CTYPES.get(np.dtype(logits.dtype))
        if ctype is None:
            raise TypeError(f"logits: unsupported dtype {logits.dtype}")
        self._check(logits, "logits", 2, logits.dtype)
        resolve = None
        if prev_sampled is not None:
            def resolve(ids):
                self.resolve_placeholders(ids, prev_sampled)
        result = sample_on_device(logits, tensors, ctype, resolve)
        return DeviceSample(result, row_logprobs_on_device(logits, tensors, ctype), tensors)

    def resolve_placeholders(self, ids, prev_sampled) -> None:
        """In place on the device: placeholder ids (<= -2) become the previous step's sampled
        ids (numpy_ops.resolve_placeholders is the twin)."""
        # ids (N,) int32; prev_sampled (R,) or (R, W) int32, column 0 the ids
        self._check(ids, "ids", 1, np.int32)
        self._check(prev_sampled, "prev_sampled", None, np.int32)
        if prev_sampled.ndim not in (1, 2):
            raise ValueError(f"prev_sampled: expected 1 or 2 dimensions, got {prev_sampled.shape}")
        stride = 1 if prev_sampled.ndim == 1 else prev_sampled.shape[1]
        if len(ids):
            kernel("gather.cu", "resolve_placeholders_kernel", self.ctype)(
                _grid(len(ids), 256), (256,), (ids, prev_sampled, _i32(len(ids)), _i32(stride)))

    def record_event(self) -> cupy.cuda.Event:
        """An event on the current stream, for timing the device (benchmarks)."""
        event = cupy.cuda.Event()
        event.record()
        return event

    def wait_event(self, event: cupy.cuda.Event) -> None:
        event.synchronize()

    def elapsed_s(self, start: cupy.cuda.Event, end: cupy.cuda.Event) -> float:
        return cupy.cuda.get_elapsed_time(start, end) / 1e3

    def apply_token_bitmask(self, logits, bitmask: np.ndarray):
        """Disallowed tokens' logits -> -inf, in place (numpy_ops has the twin); returns logits.
        logits (R, vocab) float32 or the compute dtype; bitmask (R, ceil(vocab / 32)) int32."""
        ctype = _LOGIT_CTYPES.get(np.dtype(logits.dtype))
        if ctype is None:
            raise TypeError(f"logits: unsupported dtype {logits.dtype}")
        self._check(logits, "logits", 2, logits.dtype)
        rows, vocab = logits.shape
        words = -(-vocab // 32)
        if bitmask.shape != (rows, words):
            raise ValueError(f"bitmask: expected shape {(rows, words)}, got {bitmask.shape}")
        mask = self._upload_bitmask(np.ascontiguousarray(bitmask, np.int32))
        kernel("bitmask.cu", f"apply_token_bitmask_kernel<{ctype}>")(
            (rows, -(-vocab // 256)), (256,), (logits, mask, _i32(vocab), _i32(words)))
        return logits

    def bitmask_buffer(self, rows: int, words: int) -> np.ndarray:
        """The pinned staging buffer as a (rows, words) int32 array: a bitmask filled there goes
        to the device without another host copy (4.9 MB for 256 rows of a 152k vocabulary)."""
        if self._mask_copied is not None:
            self._mask_copied.synchronize()  # the stage's previous copy has left it
            self._mask_copied = None
        size = rows * words
        if self._mask_stage is None or self._mask_stage.size < size:
            self._mask_stage_mem = cupy.cuda.alloc_pinned_memory(size * 4)
            self._mask_stage = np.frombuffer(self._mask_stage_mem, np.int32, size)
        return self._mask_stage[:size].reshape(rows, words)

    def _upload_bitmask(self, bitmask: np.ndarray) -> cupy.ndarray:
        """The bitmask on the device, copied through pinned memory: the copy queues on the stream
        behind the forward instead of waiting for it (a pageable copy may)."""
        in_stage = (self._mask_stage is not None and self._mask_copied is None
                    and bitmask.ctypes.data == self._mask_stage.ctypes.data)
        if in_stage:  # filled in bitmask_buffer's array
            host = bitmask
        else:
            host = self.bitmask_buffer(*bitmask.shape)
            np.copyto(host, bitmask)
        mask = cupy.empty(bitmask.shape, cupy.int32)
        stream = cupy.cuda.get_current_stream()
        cupy.cuda.runtime.memcpyAsync(mask.data.ptr, host.ctypes.data, bitmask.nbytes,
                                      cupy.cuda.runtime.memcpyHostToDevice, stream.ptr)
        self._mask_copied = cupy.cuda.Event(disable_timing=True)
        self._mask_copied.record(stream)
        return mask

    def synchronize(self):
        cupy.cuda.get_current_stream().synchronize()

    def close(self) -> None:
        """Release what this backend holds (its cuBLAS handle and workspace), then hand the
        memory pools' free blocks back to the driver. The caller has dropped every array it
        made (weights, KV cache, graphs) first, or their blocks stay in use."""
        cupy.cuda.Device().synchronize()
        self._gemm.close()
        self._mask_stage = self._mask_stage_mem = self._mask_copied = None  # pinned staging
        release_buffers()  # the greedy sampler's kept counters
        gc.collect()  # arrays caught in reference cycles would otherwise hold their blocks
        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()


# Logits arrive in fp32 or the compute dtype (bf16 stored as uint16).
_LOGIT_CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float16): "__half",
                 np.dtype(np.uint16): "__nv_bfloat16"}


def _upload_quantized(w: QuantizedWeight) -> QuantizedWeight:
    """A host QuantizedWeight with its arrays (codes or blocks, and scales) on the device."""
    def up(a):
        return None if a is None else cupy.asarray(np.ascontiguousarray(a))
    return dataclasses.replace(w, data=up(w.data), scale=up(w.scale))


def _first_name(file: str, ctype: str) -> str:
    return kernel_names(file, ctype)[0]
