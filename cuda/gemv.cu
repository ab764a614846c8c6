// Small-batch matrix products for decode: y (M, N) = x (M, K) @ w (N, K)^T with M <= 8 rows of
// activations, w as HF stores it (row n of w is output n). At such M the product is a pure read
// of w; cuBLAS picks tensor-core tiles with M padded to 64+ and often a split-K pass. Here the
// weights stream through once in 16-byte loads, every byte used by all M rows.
//
// Layout: block b computes outputs n = R*b .. R*b + R-1 for all M rows. Its threads split K
// (split-K inside the block): thread j reads 16-byte words j, j + blockDim, ... of each of its R
// weight rows, U words per row in flight before the first use, and multiplies each by the same
// 8 elements of every x row (so x is read once per R weight words). The block sums its threads'
// partials through shuffles and shared memory; no second launch, no atomics.
//
// ACT: x is the MLP's gate_up (M, 2K) and the product's input is silu(gate) * up, computed here
// (rounded to T as silu_and_mul_kernel does), so the down projection needs no activation launch.
#include "common.cuh"

constexpr int GEMV_R = 4;           // weight rows per block
constexpr int GEMV_U = 2;           // 16-byte words per weight row in flight per thread
constexpr int GEMV_MAX_WARPS = 8;   // blockDim <= 256

template <typename T>
__device__ __forceinline__ void to_float8(const uint4& w, float* f) {
  const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int e = 0; e < 8; e++) f[e] = to_float(h[e]);
}

// The 8 input elements of row m at word v (elements 8v .. 8v + 7).
template <typename T, bool ACT>
__device__ __forceinline__ void load_x8(const T* __restrict__ x, int m, int v, int K, float* f) {
  if (!ACT) {
    to_float8<T>(__ldg(reinterpret_cast<const uint4*>(x + (long)m * K) + v), f);
    return;
  }
  const T* row = x + (long)m * 2 * K;
  float g[8], u[8];
  to_float8<T>(__ldg(reinterpret_cast<const uint4*>(row) + v), g);
  to_float8<T>(__ldg(reinterpret_cast<const uint4*>(row + K) + v), u);
#pragma unroll
  for (int e = 0; e < 8; e++) f[e] = to_float(from_float<T>(g[e] / (1.f + expf(-g[e])) * u[e]));
}

// The product itself, for a block's GEMV_R weight rows: load_x(m, v, f) gives the 8 input
// elements of row m at word v as floats. ready() runs once in every thread, after the first
// weight words are requested and before any input is read: with PDL it waits for the previous
// kernel there, so the weights start streaming while that kernel finishes (at Qwen3-0.6B's K
// the first words are all of the block's weights).
template <typename T, int M, typename LoadX, typename Ready>
__device__ __forceinline__ void gemv_rows(T* __restrict__ y, const T* __restrict__ w, int N, int K,
                                          LoadX load_x, Ready ready) {
  __shared__ float red[GEMV_MAX_WARPS][M * GEMV_R];
  const int n0 = blockIdx.x * GEMV_R, words = K / 8;
  float acc[M][GEMV_R];
#pragma unroll
  for (int m = 0; m < M; m++)
#pragma unroll
    for (int r = 0; r < GEMV_R; r++) acc[m][r] = 0.f;
  const uint4* wrow[GEMV_R];
#pragma unroll
  for (int r = 0; r < GEMV_R; r++)
    wrow[r] = reinterpret_cast<const uint4*>(w + (long)min(n0 + r, N - 1) * K);

  uint4 wr[GEMV_U][GEMV_R];
  auto load_w = [&](int base) {
#pragma unroll
    for (int u = 0; u < GEMV_U; u++) {
      const int v = base + u * blockDim.x;
#pragma unroll
      for (int r = 0; r < GEMV_R; r++)
        wr[u][r] = v < words ? __ldcs(wrow[r] + v) : make_uint4(0u, 0u, 0u, 0u);  // read once
    }
  };
  load_w(threadIdx.x);
  ready();
  for (int base = threadIdx.x; base < words; base += GEMV_U * blockDim.x) {
    if (base != threadIdx.x) load_w(base);
#pragma unroll
    for (int u = 0; u < GEMV_U; u++) {
      const int v = base + u * blockDim.x;
      if (v < words) {
        float wf[GEMV_R][8];
#pragma unroll
        for (int r = 0; r < GEMV_R; r++) to_float8<T>(wr[u][r], wf[r]);
#pragma unroll
        for (int m = 0; m < M; m++) {
          float xf[8];
          load_x(m, v, xf);
#pragma unroll
          for (int r = 0; r < GEMV_R; r++)
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
    for (int r = 0; r < GEMV_R; r++) {
      const float s = warp_sum(acc[m][r]);
      if (lane == 0) red[warp][m * GEMV_R + r] = s;
    }
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  for (int i = threadIdx.x; i < M * GEMV_R; i += blockDim.x) {
    const int m = i / GEMV_R, r = i % GEMV_R;
    if (n0 + r >= N) continue;
    float s = 0.f;
    for (int k = 0; k < num_warps; k++) s += red[k][i];
    y[(long)m * N + n0 + r] = from_float<T>(s);
  }
}

// Grid: (ceil(N / GEMV_R))  Block: (128 or 256; a multiple of 32)
// K is a multiple of 8 and x, w are 16-byte aligned (checked by the caller).
template <typename T, int M, bool ACT>
__global__ void __launch_bounds__(256) gemv_kernel(T* __restrict__ y,        // [M, N]
                                                   const T* __restrict__ x,  // [M, K] ([M, 2K] ACT)
                                                   const T* __restrict__ w,  // [N, K]
                                                   int N, int K) {
  gemv_rows<T, M>(y, w, N, K, [&](int m, int v, float* f) { load_x8<T, ACT>(x, m, v, K, f); },
                  [] { pdl_start(); });
}

// The residual add and RMSNorm that precede a layer's first GEMV, fused into it (decode, M <= 4):
//   res_out = x + residual (rounded to T; residual null: x), h = rms_norm(res_out) * norm_w,
//   y = h @ w^T.
// Every block computes h for all M rows into shared memory first (M x K elements: a few KB,
// read from L1/L2 while other blocks stream weights), then runs gemv_rows on it; block
// 0 also stores res_out. The inputs are never written, so the blocks cannot race.
// Dynamic shared memory: M * K * sizeof(T) bytes.
// Grid: (ceil(N / GEMV_R))  Block: (128 or 256)
template <typename T, int M>
__global__ void __launch_bounds__(256) norm_gemv_kernel(
    T* __restrict__ y,               // [M, N]
    T* __restrict__ res_out,         // [M, K]
    const T* __restrict__ x,         // [M, K]
    const T* __restrict__ residual,  // [M, K] or null
    const T* __restrict__ norm_w,    // [K]
    const T* __restrict__ w,         // [N, K]
    int N, int K, float eps) {
  extern __shared__ uint4 h_words[];  // [M][K / 8]
  __shared__ float sums[32];
  const int words = K / 8;
  const uint4* xw = reinterpret_cast<const uint4*>(x);
  const uint4* rw = reinterpret_cast<const uint4*>(residual);
  const uint4* nw = reinterpret_cast<const uint4*>(norm_w);
  // the norm, once the first weight words are on their way
  auto norm = [&] {
    pdl_start();
    for (int m = 0; m < M; m++) {
      float ss = 0.f;
      for (int v = threadIdx.x; v < words; v += blockDim.x) {
        float a[8], b[8];
        to_float8<T>(__ldg(xw + m * words + v), a);
        if (residual != nullptr) to_float8<T>(__ldg(rw + m * words + v), b);
        uint4 packed;
        T* sp = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int e = 0; e < 8; e++) {
          sp[e] = from_float<T>(residual != nullptr ? a[e] + b[e] : a[e]);
          const float sv = to_float(sp[e]);
          ss += sv * sv;
        }
        h_words[m * words + v] = packed;
        if (blockIdx.x == 0) reinterpret_cast<uint4*>(res_out)[m * words + v] = packed;
      }
      const float inv = rsqrtf(block_sum(ss, sums) / K + eps);  // its barriers publish h_words
      for (int v = threadIdx.x; v < words; v += blockDim.x) {
        float sv[8], g[8];
        to_float8<T>(h_words[m * words + v], sv);
        to_float8<T>(__ldg(nw + v), g);
        uint4 packed;
        T* hp = reinterpret_cast<T*>(&packed);
#pragma unroll
        for (int e = 0; e < 8; e++) hp[e] = from_float<T>(sv[e] * inv * g[e]);
        h_words[m * words + v] = packed;
      }
    }
    __syncthreads();
  };
  gemv_rows<T, M>(y, w, N, K, [&](int m, int v, float* f) {
    to_float8<T>(h_words[m * words + v], f);
  }, norm);
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, M, ACT) \
  template __global__ void gemv_kernel<T, M, ACT>(T*, const T*, const T*, int, int);
INSTANTIATE(__half, 1, false)
INSTANTIATE(__half, 8, false)
INSTANTIATE(__nv_bfloat16, 3, false)
INSTANTIATE(__nv_bfloat16, 8, false)
INSTANTIATE(__nv_bfloat16, 1, true)
INSTANTIATE(__half, 4, true)
template __global__ void norm_gemv_kernel<__half, 1>(__half*, __half*, const __half*,
                                                     const __half*, const __half*, const __half*,
                                                     int, int, float);
template __global__ void norm_gemv_kernel<__nv_bfloat16, 4>(
    __nv_bfloat16*, __nv_bfloat16*, const __nv_bfloat16*, const __nv_bfloat16*,
    const __nv_bfloat16*, const __nv_bfloat16*, int, int, float);
#endif
