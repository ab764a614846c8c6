// One kernel for everything between the qkv GEMM and attention in a layer: the qkv bias (Qwen2),
// the per-head q/k RMSNorm (Qwen3), RoPE on q and k, and the k/v store into the paged cache.
// It replaces up to four launches (add_bias, qk_norm, rope, write_kv_cache) and reads the qkv row
// once. Its numpy twin is NumpyOps.qk_norm_rope_kv_write, the composition of those four ops.
#include "qk_rope_kv.cuh"

// One warp per (token, head) over q heads, then k heads, then v heads of the fused qkv row
// (qk_rope_kv.cuh has the per-head work and its NOTEs).
// flags: PDL_EARLY (common.cuh).
// Grid: (ceil(num_tokens * (num_heads + 2 * num_kv_heads) / 4))  Block: (128)
template <typename T, typename CS, int HD>
__global__ void __launch_bounds__(128) qk_norm_rope_kv_kernel(
    T* __restrict__ qkv,                 // [num_tokens, (nh + 2 nkv) * HD], q and k updated
    T* __restrict__ k_cache,             // [num_blocks, nkv, block_size, HD]
    T* __restrict__ v_cache,             // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ positions,     // [num_tokens]
    const int* __restrict__ slot_mapping,  // [num_tokens]
    const CS* __restrict__ cos_sin,        // [max_positions, HD]: cos of HD/2 freqs, then sin
    const T* __restrict__ q_weight,        // [HD] or null
    const T* __restrict__ k_weight,        // [HD] or null
    const T* __restrict__ bias,            // [(nh + 2 nkv) * HD] or null
    float eps, int num_tokens, int num_heads, int num_kv_heads, int block_size, int flags) {
  pdl_enter(flags);
  const int heads = num_heads + 2 * num_kv_heads;
  const long warp = (long)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (warp >= (long)num_tokens * heads) return;
  qk_rope_kv_head<T, CS, HD>(qkv, k_cache, v_cache, positions, slot_mapping, cos_sin, q_weight,
                             k_weight, bias, eps, warp / heads, warp % heads, num_heads,
                             num_kv_heads, block_size, threadIdx.x & 31);
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, CS, HD)                                                                  \
  template __global__ void qk_norm_rope_kv_kernel<T, CS, HD>(                                   \
      T*, T*, T*, const int*, const int*, const CS*, const T*, const T*, const T*, float, int,  \
      int, int, int, int);
INSTANTIATE(__half, __half, 64)
INSTANTIATE(__half, float, 128)
INSTANTIATE(__nv_bfloat16, __nv_bfloat16, 128)
INSTANTIATE(__nv_bfloat16, float, 64)
#endif
