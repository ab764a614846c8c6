// Batch-1 decode: the activation's FP8 quantization fused into the FP8 GEMV, one launch instead of
// two. Every block first builds the quantized input row in shared memory (the prologue PRO below,
// recomputed by each block from L2: it pays while N / R blocks x K elements stays small next to
// the N x K weight bytes), then streams its R weight rows. Each thread's first weight word of
// every row is loaded before the prologue, so that latency hides behind it.
//   PRO 0: x (K)                      -> q = quantize(x)
//   PRO 1: x = gate_up (2K)           -> q = quantize(T(silu(gate) * up))
//   PRO 2: x, residual (K), norm_w    -> res_out = T(x + residual) (x alone when residual is null;
//                                        block 0 stores it), q = quantize(T(rms_norm(res_out) * w))
//   y[n] = T((sum_k dec(q[k]) * dec(qw[n, k])) * s * sw[n]),  s = the row's scale
// Semantics are those of fp8.cu's quantize kernels + fp8_gemv_kernel (engine/model/fp8.py);
// NOTE: PRO 2's sum of squares runs in its own order, so a code may differ from
// fp8_norm_quantize_kernel's where h lands within an ulp of a rounding boundary.
#include "fp8.cuh"

// Dynamic shared memory: K * sizeof(T) + K bytes (the row in T, then its codes).
// Grid: (ceil(N / R))  Block: (128 or 256)
template <typename T, int PRO, int R>
__global__ void __launch_bounds__(256) fp8_fused_gemv_kernel(
    T* __restrict__ y,                     // [1, N]
    T* __restrict__ res_out,               // [1, K] (PRO 2) or null
    const T* __restrict__ x,               // [1, K] ([1, 2K] for PRO 1)
    const T* __restrict__ residual,        // [1, K] or null (PRO 2)
    const T* __restrict__ norm_w,          // [K] (PRO 2) or null
    const unsigned char* __restrict__ qw,  // [N, K]
    const float* __restrict__ sw,          // [N]
    int N, int K, float eps) {
  extern __shared__ uint4 smem[];
  T* hbuf = reinterpret_cast<T*>(smem);                                 // [K]
  unsigned char* codes = reinterpret_cast<unsigned char*>(hbuf + K);    // [K], 16-byte aligned
  __shared__ float red[32];
  __shared__ float part[8][R];  // blockDim <= 256: 8 warps
  const int n0 = blockIdx.x * R, words = K / 16, tid = threadIdx.x;

  const uint4* wrow[R];
  uint4 wr[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    wrow[r] = reinterpret_cast<const uint4*>(qw + (long)min(n0 + r, N - 1) * K);
    wr[r] = tid < words ? __ldcs(wrow[r] + tid) : make_uint4(0u, 0u, 0u, 0u);  // in flight
  }
  pdl_start();  // PDL: the weight words above stream while the previous kernel finishes

  // ---- prologue: the row in T into hbuf (each thread its own 8-element words), its absmax
  float f[8], g[8], amax = 0.f;
  if (PRO == 2) {
    float ss = 0.f;
    for (int w = tid; w < K / 8; w += blockDim.x) {
      load8(x + 8 * w, f);
      if (residual != nullptr) {
        load8(residual + 8 * w, g);
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] += g[e];
      }
      store8(hbuf + 8 * w, f);
      if (blockIdx.x == 0) store8(res_out + 8 * w, f);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        const float v = to_float(from_float<T>(f[e]));
        ss += v * v;
      }
    }
    const float inv = rsqrtf(block_sum(ss, red) / K + eps);
    for (int w = tid; w < K / 8; w += blockDim.x) {
      load8(hbuf + 8 * w, f);
      load8(norm_w + 8 * w, g);
#pragma unroll
      for (int e = 0; e < 8; e++) f[e] = f[e] * inv * g[e];
      round8<T>(f, amax);
      store8(hbuf + 8 * w, f);
    }
  } else {
    for (int w = tid; w < K / 8; w += blockDim.x) {
      load8(x + 8 * w, f);
      if (PRO == 1) {
        load8(x + K + 8 * w, g);
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = f[e] / (1.f + expf(-f[e])) * g[e];
      }
      round8<T>(f, amax);
      store8(hbuf + 8 * w, f);
    }
  }
  const float s = row_scale(block_max(amax, red));
  for (int w = tid; w < K / 8; w += blockDim.x) {
    load8(hbuf + 8 * w, f);
    encode8(codes + 8 * w, f, s);
  }
  __syncthreads();  // every thread's codes are read by all

  // ---- the product over the block's R rows
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; r++) acc[r] = 0.f;
  const uint4* xw = reinterpret_cast<const uint4*>(codes);
  for (int v = tid; v < words; v += blockDim.x) {
    if (v != tid) {
#pragma unroll
      for (int r = 0; r < R; r++) wr[r] = __ldcs(wrow[r] + v);
    }
    const uint4 xc = xw[v];
#pragma unroll
    for (int h = 0; h < 2; h++) {
      float xf[8];
      fp8x8_to_float(xc, h, xf);
#pragma unroll
      for (int r = 0; r < R; r++) {
        float wf[8];
        fp8x8_to_float(wr[r], h, wf);
#pragma unroll
        for (int e = 0; e < 8; e++) acc[r] += xf[e] * wf[e];
      }
    }
  }
  const int lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int r = 0; r < R; r++) {
    const float v = warp_sum(acc[r]);
    if (lane == 0) part[warp][r] = v;
  }
  __syncthreads();
  if (tid < R && n0 + tid < N) {
    float sum = 0.f;
    for (int k = 0; k < (int)(blockDim.x >> 5); k++) sum += part[k][tid];
    y[n0 + tid] = from_float<T>(sum * s * sw[n0 + tid]);
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, PRO)                                                                 \
  template __global__ void fp8_fused_gemv_kernel<T, PRO, 8>(                                 \
      T*, T*, const T*, const T*, const T*, const unsigned char*, const float*, int, int, float);
INSTANTIATE(__nv_bfloat16, 0)
INSTANTIATE(__nv_bfloat16, 1)
INSTANTIATE(__half, 2)
#endif
