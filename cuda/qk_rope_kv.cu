// One kernel for everything between the qkv GEMM and attention in a layer: the qkv bias (Qwen2),
// the per-head q/k RMSNorm (Qwen3), RoPE on q and k, and the k/v store into the paged cache.
// It replaces up to four launches (add_bias, qk_norm, rope, write_kv_cache) and reads the qkv row
// once. Its numpy twin is NumpyOps.qk_norm_rope_kv_write, the composition of those four ops.
#include "common.cuh"

// One warp per (token, head) over q heads, then k heads, then v heads of the fused qkv row; lane l
// holds elements l, l + 32, ... of the head, so the rotary partner of element j (j + HD / 2) sits in
// the same lane and every store of a head is a coalesced row.
// NOTE: each stage rounds to T before the next, as the unfused kernels (and HF) do, so the fused
// path is bit-identical to add_bias -> qk_norm -> rope -> write_kv_cache.
// q_weight / k_weight null: no q/k norm; bias null: no bias; slot -1: k/v not stored.
// flags: PDL_EARLY; NORM_W_EARLY (common.cuh; cuda_norm.NORM_VEC): the norm weight, the bias and
// the position's cos/sin (never written by a kernel: common.cuh's pdl_wait) are read before the
// PDL wait, not each after the previous step's arithmetic (without it, this kernel at batch 1 is
// a chain of memory latencies: the qkv row, the norm weight, the position, cos/sin, the slot).
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
  constexpr int PER = HD / 32, HALF = PER / 2;
  const bool early = flags & NORM_W_EARLY;
  const int heads = num_heads + 2 * num_kv_heads;
  const long warp = (long)blockIdx.x * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  const bool active = warp < (long)num_tokens * heads;
  const long t = active ? warp / heads : 0;
  const int h = active ? warp % heads : 0;
  const bool is_q = h < num_heads, is_v = h >= num_heads + num_kv_heads;
  const T* w = is_q ? q_weight : k_weight;
  float wv[PER], bv[PER], c[HALF], s[HALF];  // with `early`: norm weight, bias, cos, sin
  long slot = -1;
  if (early && active) {
#pragma unroll
    for (int i = 0; i < PER; i++) {
      if (!is_v && w != nullptr) wv[i] = to_float(w[lane + 32 * i]);
      if (bias != nullptr) bv[i] = to_float(bias[h * HD + lane + 32 * i]);
    }
    if (!is_v) {
      const long pos = positions[t];
#pragma unroll
      for (int i = 0; i < HALF; i++) {
        c[i] = to_float(cos_sin[pos * HD + lane + 32 * i]);
        s[i] = to_float(cos_sin[pos * HD + HD / 2 + lane + 32 * i]);
      }
    }
    if (!is_q) slot = slot_mapping[t];
  }
  pdl_enter(flags);
  if (!active) return;
  T* p = qkv + t * heads * HD + (long)h * HD;
  float v[PER];
#pragma unroll
  for (int i = 0; i < PER; i++) v[i] = to_float(p[lane + 32 * i]);
  if (bias != nullptr) {
#pragma unroll
    for (int i = 0; i < PER; i++) {
      const float b = early ? bv[i] : to_float(bias[h * HD + lane + 32 * i]);
      v[i] = to_float(from_float<T>(v[i] + b));
    }
  }
  if (!is_v) {
    if (w != nullptr) {
      float ss = 0.f;
#pragma unroll
      for (int i = 0; i < PER; i++) ss += v[i] * v[i];
      const float inv = rsqrtf(warp_sum(ss) / HD + eps);
#pragma unroll
      for (int i = 0; i < PER; i++) {
        const float g = early ? wv[i] : to_float(w[lane + 32 * i]);
        v[i] = to_float(from_float<T>(v[i] * inv * g));
      }
    }
    const long pos = early ? 0 : positions[t];
#pragma unroll
    for (int i = 0; i < HALF; i++) {
      const int j = lane + 32 * i;
      const float cj = early ? c[i] : to_float(cos_sin[pos * HD + j]);
      const float sj = early ? s[i] : to_float(cos_sin[pos * HD + HD / 2 + j]);
      const float x1 = v[i], x2 = v[i + HALF];
      v[i] = to_float(from_float<T>(x1 * cj - x2 * sj));
      v[i + HALF] = to_float(from_float<T>(x2 * cj + x1 * sj));
    }
  }
  if (!is_v || bias != nullptr) {
#pragma unroll
    for (int i = 0; i < PER; i++) p[lane + 32 * i] = from_float<T>(v[i]);
  }
  if (is_q) return;
  if (!early) slot = slot_mapping[t];
  if (slot < 0) return;
  const int kvh = is_v ? h - num_heads - num_kv_heads : h - num_heads;
  T* cache = (is_v ? v_cache : k_cache) +
             (((slot / block_size) * num_kv_heads + kvh) * block_size + slot % block_size) * HD;
#pragma unroll
  for (int i = 0; i < PER; i++) cache[lane + 32 * i] = from_float<T>(v[i]);
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
