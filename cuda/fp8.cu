// FP8 (E4M3) W8A8: per-row quantization of activations and weights (fused with the RMSNorm or the
// SiLU-mul that precedes a matrix product), the small-batch FP8 GEMV, and the epilogue that scales
// cuBLASLt's fp32 product. engine/model/fp8.py is the numpy twin that defines every value here:
//   quantize:  s = absmax(row) / 448 (1 for an all-zero row), q = e4m3_rn_satfinite(x / s)
//   product:   y[m, n] = (sum_k dec(qx[m, k]) * dec(qw[n, k])) * sx[m] * sw[n]
// NOTE: x / s and absmax / 448 are IEEE divisions (NVRTC's default -prec-div=true), so the codes
// and scales are bit-identical to numpy's. Products of two E4M3 values are exact in fp32; only the
// order of the fp32 sums differs from the twin.
#include <cuda_fp8.h>

#include "common.cuh"

constexpr float E4M3_MAX = 448.f;

__device__ __forceinline__ unsigned char encode_e4m3(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);  // RNE; +-inf -> +-448; NaN -> 0x7F
}

__device__ __forceinline__ float row_scale(float absmax) {
  const float s = absmax / E4M3_MAX;
  return s == 0.f ? 1.f : s;
}

// ------------------------------------------------------------------------------ quantization

// Row-wise quantization of x (activations per token, or a weight per output channel).
// Grid: (rows)  Block: (256)
template <typename T>
__global__ void fp8_quantize_kernel(unsigned char* __restrict__ q,     // [rows, K]
                                    float* __restrict__ scale,   // [rows]
                                    const T* __restrict__ x,     // [rows, K]
                                    int K) {
  __shared__ float red[32];
  const long base = (long)blockIdx.x * K;
  float amax = 0.f;
  for (int i = threadIdx.x; i < K; i += blockDim.x) amax = fmaxf(amax, fabsf(to_float(x[base + i])));
  const float s = row_scale(block_max(amax, red));
  for (int i = threadIdx.x; i < K; i += blockDim.x) q[base + i] = encode_e4m3(to_float(x[base + i]) / s);
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

// silu(gate) * up rounded to T (exactly silu_and_mul_kernel's value), then quantized: the MLP's
// down projection input without the bf16 round trip through memory.
// Grid: (rows)  Block: (256)
template <typename T>
__global__ void fp8_silu_quantize_kernel(unsigned char* __restrict__ q,         // [rows, K]
                                         float* __restrict__ scale,       // [rows]
                                         const T* __restrict__ gate_up,   // [rows, 2K]
                                         int K) {
  __shared__ float red[32];
  const T* g = gate_up + (long)blockIdx.x * 2 * K;
  const T* u = g + K;
  auto act = [&](int i) {
    const float gv = to_float(g[i]);
    return to_float(from_float<T>(gv / (1.f + expf(-gv)) * to_float(u[i])));
  };
  float amax = 0.f;
  for (int i = threadIdx.x; i < K; i += blockDim.x) amax = fmaxf(amax, fabsf(act(i)));
  const float s = row_scale(block_max(amax, red));
  unsigned char* qr = q + (long)blockIdx.x * K;
  for (int i = threadIdx.x; i < K; i += blockDim.x) qr[i] = encode_e4m3(act(i) / s);
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

// The residual add + RMSNorm of rms_norm_kernel (same modes, same loop and reduction order at
// 256 threads, so the normalized row is bit-identical to that kernel's output), then quantized.
// mode 1: residual = x; mode 2: residual += x (rounded to T); the norm reads the residual.
// Grid: (rows)  Block: (256, exactly: the sum's order must match rms_norm_kernel)
template <typename T>
__global__ void fp8_norm_quantize_kernel(unsigned char* __restrict__ q,          // [rows, K]
                                         float* __restrict__ scale,        // [rows]
                                         T* __restrict__ residual,         // [rows, K]
                                         const T* __restrict__ x,          // [rows, K]
                                         const T* __restrict__ weight,     // [K]
                                         float eps, int K, int mode) {
  __shared__ float red[32];
  const long base = (long)blockIdx.x * K;
  float ss = 0.f;
  for (int i = threadIdx.x; i < K; i += blockDim.x) {
    float v = to_float(x[base + i]);
    if (mode == 2) {
      const T s = from_float<T>(v + to_float(residual[base + i]));
      residual[base + i] = s;
      v = to_float(s);
    } else {
      residual[base + i] = x[base + i];
    }
    ss += v * v;
  }
  const float inv = rsqrtf(block_sum(ss, red) / K + eps);
  // Each thread re-reads only the residual elements it wrote itself: no barrier needed.
  auto h = [&](int i) {
    return to_float(from_float<T>(to_float(residual[base + i]) * inv * to_float(weight[i])));
  };
  float amax = 0.f;
  for (int i = threadIdx.x; i < K; i += blockDim.x) amax = fmaxf(amax, fabsf(h(i)));
  const float s = row_scale(block_max(amax, red));
  for (int i = threadIdx.x; i < K; i += blockDim.x) q[base + i] = encode_e4m3(h(i) / s);
  if (threadIdx.x == 0) scale[blockIdx.x] = s;
}

// ------------------------------------------------------------------------------ products

constexpr int F8_R = 4;  // weight rows per GEMV block
constexpr int F8_U = 2;  // 16-byte weight words per row in flight per thread
constexpr int F8_MAX_WARPS = 8;

// 8 E4M3 codes (half of a 16-byte word: h = 0 low, 1 high) -> floats, through the f16x2
// conversion sm_89+ does in one instruction per pair (every E4M3 value is exact in fp16).
__device__ __forceinline__ void fp8x8_to_float(const uint4& w, int h, float* f) {
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&w) + 4 * h;
#pragma unroll
  for (int e = 0; e < 4; e++) {
    const __half2_raw raw = __nv_cvt_fp8x2_to_halfraw2(p[e], __NV_E4M3);
    const float2 v = __half22float2(*reinterpret_cast<const __half2*>(&raw));
    f[2 * e] = v.x;
    f[2 * e + 1] = v.y;
  }
}

// y (M, N) = (qx (M, K) . qw (N, K)^T) * sx * sw for decode batches (M <= 8): a pure read of the
// weights, half the bytes of bf16. Block b computes outputs R*b .. R*b + R-1 for all M rows; its
// threads split K in 16-byte words (16 codes), U words per row in flight; partial sums meet
// through shuffles and shared memory. K is a multiple of 16, qx and qw 16-byte aligned.
// Grid: (ceil(N / F8_R))  Block: (64..256, a multiple of 32)
template <typename T, int M>
__global__ void __launch_bounds__(256) fp8_gemv_kernel(T* __restrict__ y,              // [M, N]
                                                       const unsigned char* __restrict__ qx,  // [M, K]
                                                       const float* __restrict__ sx,    // [M]
                                                       const unsigned char* __restrict__ qw,  // [N, K]
                                                       const float* __restrict__ sw,    // [N]
                                                       int N, int K) {
  __shared__ float red[F8_MAX_WARPS][M * F8_R];
  const int n0 = blockIdx.x * F8_R, words = K / 16;
  float acc[M][F8_R];
#pragma unroll
  for (int m = 0; m < M; m++)
#pragma unroll
    for (int r = 0; r < F8_R; r++) acc[m][r] = 0.f;
  const uint4* wrow[F8_R];
#pragma unroll
  for (int r = 0; r < F8_R; r++)
    wrow[r] = reinterpret_cast<const uint4*>(qw + (long)min(n0 + r, N - 1) * K);
  const uint4* xw = reinterpret_cast<const uint4*>(qx);

  for (int base = threadIdx.x; base < words; base += F8_U * blockDim.x) {
    uint4 wr[F8_U][F8_R];
#pragma unroll
    for (int u = 0; u < F8_U; u++) {
      const int v = base + u * blockDim.x;
#pragma unroll
      for (int r = 0; r < F8_R; r++)
        wr[u][r] = v < words ? __ldcs(wrow[r] + v) : make_uint4(0u, 0u, 0u, 0u);  // read once
    }
#pragma unroll
    for (int u = 0; u < F8_U; u++) {
      const int v = base + u * blockDim.x;
      if (v >= words) continue;
#pragma unroll
      for (int h = 0; h < 2; h++) {
        float wf[F8_R][8];
#pragma unroll
        for (int r = 0; r < F8_R; r++) fp8x8_to_float(wr[u][r], h, wf[r]);
#pragma unroll
        for (int m = 0; m < M; m++) {
          float xf[8];
          fp8x8_to_float(__ldg(xw + (long)m * words + v), h, xf);
#pragma unroll
          for (int r = 0; r < F8_R; r++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[m][r] += xf[e] * wf[r][e];
        }
      }
    }
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int m = 0; m < M; m++)
#pragma unroll
    for (int r = 0; r < F8_R; r++) {
      const float s = warp_sum(acc[m][r]);
      if (lane == 0) red[warp][m * F8_R + r] = s;
    }
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  for (int i = threadIdx.x; i < M * F8_R; i += blockDim.x) {
    const int m = i / F8_R, r = i % F8_R;
    if (n0 + r >= N) continue;
    float s = 0.f;
    for (int k = 0; k < num_warps; k++) s += red[k][i];
    y[(long)m * N + n0 + r] = from_float<T>(s * sx[m] * sw[n0 + r]);
  }
}

// The epilogue of a cuBLASLt FP8 product run without per-channel scales (fp32 out, scales 1):
// y = acc * sx[m] * sw[n], rounded to T.
// Grid: (ceil(M * N / 256))  Block: (256)
template <typename T>
__global__ void fp8_scale_kernel(T* __restrict__ y,              // [M, N]
                                 const float* __restrict__ acc,  // [M, N]
                                 const float* __restrict__ sx,   // [M]
                                 const float* __restrict__ sw,   // [N]
                                 long total, int N) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < total) y[i] = from_float<T>(acc[i] * sx[i / N] * sw[i % N]);
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void fp8_quantize_kernel<__nv_bfloat16>(unsigned char*, float*,
                                                            const __nv_bfloat16*, int);
template __global__ void fp8_silu_quantize_kernel<__half>(unsigned char*, float*, const __half*, int);
template __global__ void fp8_norm_quantize_kernel<__nv_bfloat16>(
    unsigned char*, float*, __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*, float, int, int);
template __global__ void fp8_gemv_kernel<__nv_bfloat16, 1>(__nv_bfloat16*, const unsigned char*,
                                                           const float*, const unsigned char*,
                                                           const float*, int, int);
template __global__ void fp8_gemv_kernel<__half, 8>(__half*, const unsigned char*, const float*,
                                                    const unsigned char*, const float*, int, int);
template __global__ void fp8_scale_kernel<__nv_bfloat16>(__nv_bfloat16*, const float*,
                                                         const float*, const float*, long, int);
#endif
