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
template __global__ void rms_norm_kernel<__half>(__half*, __half*, const __half*, const __half*,
                                                 float, int, int);
template __global__ void rms_norm_kernel<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*,
                                                        const __nv_bfloat16*,
                                                        const __nv_bfloat16*, float, int, int);
template __global__ void qk_norm_kernel<__half, 128>(__half*, const __half*, const __half*, float,
                                                     int, int, int);
template __global__ void qk_norm_kernel<__nv_bfloat16, 64>(__nv_bfloat16*, const __nv_bfloat16*,
                                                           const __nv_bfloat16*, float, int, int,
                                                           int);
#endif
