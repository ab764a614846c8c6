// RMSNorm over hidden rows (optionally fused with the residual add), and Qwen3's per-head q/k norm.
#include "common.cuh"

// mode 0: out = norm(x)
// mode 1: residual = x;        out = norm(x)          (the first layer starts the stream)
// mode 2: residual += x;       out = norm(residual)   (one pass instead of an add and a norm)
// NOTE: the residual is stored in the compute dtype and the norm reads the rounded sum, as HF does.
// Grid: (num_rows)  Block: (256)
template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out,           // [num_rows, hidden]
                                T* __restrict__ residual,      // [num_rows, hidden]; null in mode 0
                                const T* __restrict__ x,       // [num_rows, hidden]
                                const T* __restrict__ weight,  // [hidden]
                                float eps, int hidden, int mode) {
  pdl_start();
  __shared__ float red[32];
  const long base = (long)blockIdx.x * hidden;
  float ss = 0.f;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(x[base + i]);
    if (mode == 2) {
      const T s = from_float<T>(v + to_float(residual[base + i]));
      residual[base + i] = s;
      v = to_float(s);
    } else if (mode == 1) {
      residual[base + i] = x[base + i];
    }
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, red) / hidden + eps);
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    const float v = to_float(mode == 2 ? residual[base + i] : x[base + i]);
    out[base + i] = from_float<T>(v * inv * to_float(weight[i]));
  }
}

// The row pieces of the vector kernels: a thread owns V 16-byte words of the row, word
// threadIdx.x + v * blockDim.x (those past `words` are left alone).
template <int V>
__device__ __forceinline__ void load_words(uint4 (&dst)[V], const void* src, long base,
                                           int words) {
#pragma unroll
  for (int v = 0; v < V; v++) {
    const int i = threadIdx.x + v * blockDim.x;
    if (i < words) dst[v] = reinterpret_cast<const uint4*>(src)[base + i];
  }
}

// mode 2: a += r (rounded to T) and a goes to the residual; mode 1: a goes to the residual;
// mode 0: neither. Returns this thread's sum of squares of a.
template <typename T, int V>
__device__ __forceinline__ float add_residual(uint4 (&a)[V], const uint4 (&r)[V],
                                              T* __restrict__ residual, long base, int words,
                                              int mode) {
  float ss = 0.f;  // the row stays in a[] as T: to_float of it is exact, no float copy needed
#pragma unroll
  for (int v = 0; v < V; v++) {
    const int i = threadIdx.x + v * blockDim.x;
    if (i >= words) continue;
    T* ah = reinterpret_cast<T*>(&a[v]);
    const T* rh = reinterpret_cast<const T*>(&r[v]);
#pragma unroll
    for (int e = 0; e < 8; e++) {
      if (mode == 2) ah[e] = from_float<T>(to_float(ah[e]) + to_float(rh[e]));
      const float f = to_float(ah[e]);
      ss += f * f;
    }
    if (mode != 0) reinterpret_cast<uint4*>(residual)[base + i] = a[v];
  }
  return ss;
}

// out = a * inv * w, word by word.
template <typename T, int V>
__device__ __forceinline__ void store_normed(T* __restrict__ out, const uint4 (&a)[V],
                                             const uint4 (&w)[V], float inv, long base,
                                             int words) {
#pragma unroll
  for (int v = 0; v < V; v++) {
    const int i = threadIdx.x + v * blockDim.x;
    if (i >= words) continue;
    const T* ah = reinterpret_cast<const T*>(&a[v]);
    const T* wh = reinterpret_cast<const T*>(&w[v]);
    uint4 o;
    T* oh = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int e = 0; e < 8; e++) oh[e] = from_float<T>(to_float(ah[e]) * inv * to_float(wh[e]));
    reinterpret_cast<uint4*>(out)[base + i] = o;
  }
}

// rms_norm_kernel's modes and arithmetic per element, for the latency of a decode step: each thread
// owns V 16-byte words (8 elements) of the row, issues every load of them before using any, and
// keeps the row in registers between the sum of squares and the write (no second read). The
// kernel above waits a full memory latency per 2-byte element of each iteration (its store to
// the residual orders the next load), ~16 times for a 4096 row. The norm weight is read before
// the PDL wait: no kernel writes it.
// Requires hidden % 8 == 0, all four rows 16-byte aligned, hidden <= 8 * V * blockDim
// (cuda_norm.vec_launch picks V and the block). NOTE: the sum of squares runs in another order
// than rms_norm_kernel's, so an output may differ from it in the last bit; per element the same
// fp32 operations round to T at the same points.
// Grid: (num_rows)  Block: (32 * ceil(hidden / 8 / V / 32), <= 512)
template <typename T, int V>
__global__ void __launch_bounds__(512) rms_norm_vec_kernel(
    T* __restrict__ out,           // [num_rows, hidden]
    T* __restrict__ residual,      // [num_rows, hidden]; null in mode 0
    const T* __restrict__ x,       // [num_rows, hidden]
    const T* __restrict__ weight,  // [hidden]
    float eps, int hidden, int mode) {
  __shared__ float red[32];
  const int words = hidden / 8;
  const long base = (long)blockIdx.x * words;
  uint4 w[V], a[V], r[V];
  load_words(w, weight, 0, words);
  pdl_start();
  load_words(a, x, base, words);
  if (mode == 2) load_words(r, residual, base, words);
  const float ss = add_residual<T>(a, r, residual, base, words, mode);
  store_normed(out, a, w, rsqrtf(block_sum(ss, red) / hidden + eps), base, words);
}

// rms_norm_vec_kernel's mode 2 where x is a split-K product still in its fp32 partial sums
// (gemm_sm90.cu, [splits][rows][hidden]): x = T(partial[0] + partial[1] + ...), summed and rounded
// as gemm_sm90_reduce_kernel does, then residual += x and out = norm(residual) as above - so
// residual and out are bit-identical to that kernel followed by rms_norm_vec_kernel, one launch
// and one round trip of x fewer.
// splits <= REDUCE_NORM_MAX_SPLITS (cuda_norm.MAX_PARTIALS).
// Grid: (num_rows)  Block: as rms_norm_vec_kernel's
constexpr int REDUCE_NORM_MAX_SPLITS = 8;
template <typename T, int V>
__global__ void __launch_bounds__(512) reduce_rms_norm_vec_kernel(
    T* __restrict__ out,                // [num_rows, hidden]
    T* __restrict__ residual,           // [num_rows, hidden]
    const float* __restrict__ partial,  // [splits, num_rows, hidden]
    const T* __restrict__ weight,       // [hidden]
    float eps, int hidden, int splits, long split_stride) {  // stride: num_rows * hidden
  __shared__ float red[32];
  const int words = hidden / 8;
  const long base = (long)blockIdx.x * words;
  uint4 w[V], a[V], r[V];
  load_words(w, weight, 0, words);
  pdl_start();
  load_words(r, residual, base, words);
#pragma unroll
  for (int v = 0; v < V; v++) {
    const int i = threadIdx.x + v * blockDim.x;
    if (i >= words) continue;
    const float4* p = reinterpret_cast<const float4*>(partial) + (base + i) * 2;
    float4 lo = p[0], hi = p[1];
#pragma unroll
    for (int s = 1; s < REDUCE_NORM_MAX_SPLITS; s++) {  // unrolled: every load goes out at once
      if (s >= splits) break;
      const float4 l = p[s * split_stride / 4], h = p[s * split_stride / 4 + 1];
      lo.x += l.x, lo.y += l.y, lo.z += l.z, lo.w += l.w;
      hi.x += h.x, hi.y += h.y, hi.z += h.z, hi.w += h.w;
    }
    T* ah = reinterpret_cast<T*>(&a[v]);
    const float sum[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
    for (int e = 0; e < 8; e++) ah[e] = from_float<T>(sum[e]);
  }
  const float ss = add_residual<T>(a, r, residual, base, words, 2);
  store_normed(out, a, w, rsqrtf(block_sum(ss, red) / hidden + eps), base, words);
}

// One warp per (token, head) over the q heads then the k heads of the fused qkv row, in place.
// Grid: (ceil(num_tokens * (num_heads + num_kv_heads) / 4))  Block: (128)
template <typename T, int HD>
__global__ void qk_norm_kernel(T* __restrict__ qkv,             // [num_tokens, (nh + 2 nkv) * HD]
                               const T* __restrict__ q_weight,  // [HD]
                               const T* __restrict__ k_weight,  // [HD]
                               float eps, int num_tokens, int num_heads, int num_kv_heads) {
  const int heads = num_heads + num_kv_heads;
  const long warp = (long)blockIdx.x * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (warp >= (long)num_tokens * heads) return;
  const long t = warp / heads;
  const int h = warp % heads;
  T* p = qkv + t * (num_heads + 2 * num_kv_heads) * HD + (long)h * HD;
  const T* w = h < num_heads ? q_weight : k_weight;
  constexpr int PER = HD / 32;
  float v[PER];
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < PER; i++) {
    v[i] = to_float(p[lane + 32 * i]);
    ss += v[i] * v[i];
  }
  const float inv = rsqrtf(warp_sum(ss) / HD + eps);
#pragma unroll
  for (int i = 0; i < PER; i++)
    p[lane + 32 * i] = from_float<T>(v[i] * inv * to_float(w[lane + 32 * i]));
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void reduce_rms_norm_vec_kernel<__nv_bfloat16, 1>(
    __nv_bfloat16*, __nv_bfloat16*, const float*, const __nv_bfloat16*, float, int, int, long);
template __global__ void rms_norm_kernel<__half>(__half*, __half*, const __half*, const __half*,
                                                 float, int, int);
template __global__ void rms_norm_kernel<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*,
                                                        const __nv_bfloat16*,
                                                        const __nv_bfloat16*, float, int, int);
template __global__ void rms_norm_vec_kernel<__half, 1>(__half*, __half*, const __half*,
                                                        const __half*, float, int, int);
template __global__ void rms_norm_vec_kernel<__nv_bfloat16, 4>(__nv_bfloat16*, __nv_bfloat16*,
                                                               const __nv_bfloat16*,
                                                               const __nv_bfloat16*, float, int,
                                                               int);
template __global__ void qk_norm_kernel<__half, 128>(__half*, const __half*, const __half*, float,
                                                     int, int, int);
template __global__ void qk_norm_kernel<__nv_bfloat16, 64>(__nv_bfloat16*, const __nv_bfloat16*,
                                                           const __nv_bfloat16*, float, int, int,
                                                           int);
#endif
