// Small-batch matrix products for decode: y (M, N) = x (M, K) @ w (N, K)^T with M <= 8 rows of
// activations, w as HF stores it (row n of w is output n). At such M the product is a pure read
// of w; cuBLAS picks tensor-core tiles with M padded to 64+ and often a split-K pass. Here the
// weights stream through once in 16-byte loads, every byte used by all M rows.
//
// Layout: block b computes R weight rows for all M rows. Its threads split K (split-K inside the
// block): thread j reads 16-byte words j, j + blockDim, ... of each of its R weight rows, U words
// per row in flight before the first use, and multiplies each by the same 8 elements of every x
// row (so x is read once per R weight words). The block sums its threads' partials through
// shuffles and shared memory; no second launch, no atomics.
//
// Two fusions around the product, each a template switch of the one kernel:
// NORM (the add + RMSNorm before a layer's qkv and gate_up GEMVs, M <= 4):
//   res_out = x + residual (rounded to T; residual null: x), y = rms_norm(res_out) * norm_w @ w^T.
//   One pass: the block multiplies s = res_out (as T) times norm_w into the product as it streams
//   the weights, sums s^2 alongside, and scales each output by rsqrt(mean(s^2) + eps) at the end,
//   so the norm costs no pass of its own before the first FMA (the earlier kernel staged the
//   normalized row in shared memory first: 15 us per Llama-3-8B gate_up, 7168 blocks).
//   NOTE: the normalized row is not rounded to T before the product as the unfused pair rounds
//   it; the difference is one rounding of h, below the dtype's resolution on average.
//   Block 0 also stores res_out; the inputs are never written, so the blocks cannot race.
// GLU (the MLP's gate_up, w = [gate (I rows); up (I rows)]): block b takes gate rows R/2 * b ..
//   and the same up rows, and stores silu(gate) * up (M, I) instead of gate_up (M, 2I), as
//   silu_and_mul_kernel would from the rounded gate_up: the down GEMV then reads plain input.
// PRE (one row, M = 1; cuda_gemv.GEMV_PREFETCH_X): the same sums in the same order, so the same
//   bits, with the dependent loads batched: each pass requests all its x (and residual) words
//   at once, right after the weights, instead of one 16-byte word per u between the FMAs of the
//   previous one; the norm weight's words are requested before pdl_wait() with the weights.
//   NOTE: why it may pay: after the wait x comes from L2 (the previous kernel just wrote it),
//   and the default code waits for that round trip GEMV_U times in a row (one per u, sm_90
//   SASS) before the block can reduce: at K = 1024 and 64 threads both words of a thread are
//   in its first pass, so PRE takes one round trip off the critical path of each such GEMV.
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

// flags: PDL_EARLY (common.cuh).
// Grid: (ceil(N / R)); GLU: (ceil(N / 2 / (R / 2)))  Block: (64, 128 or 256; a multiple of 32)
// PRE only with M = 1 (it holds one row's words in registers).
// K is a multiple of 8 and every pointer 16-byte aligned (checked by the caller, cuda_gemv.py).
// NOTE: under PDL the first weight words are requested before pdl_wait(): w (and with PRE,
// norm_w) must never be the output of a kernel of the same stream.
template <typename T, int M, bool NORM, bool GLU, bool PRE>
__global__ void __launch_bounds__(256) gemv_kernel(
    T* __restrict__ y,               // [M, N] ([M, N / 2] with GLU)
    T* __restrict__ res_out,         // [M, K] with NORM, else unused
    const T* __restrict__ x,         // [M, K]
    const T* __restrict__ residual,  // [M, K] or null (NORM only)
    const T* __restrict__ norm_w,    // [K] (NORM only)
    const T* __restrict__ w,         // [N, K]
    int N, int K, float eps, int flags) {
  static_assert(!PRE || M == 1, "PRE holds one row's words");
  constexpr int H = GEMV_R / 2;  // GLU: gate rows (and up rows) per block
  __shared__ float red[GEMV_MAX_WARPS][M * GEMV_R + M];
  const int words = K / 8, half = N / 2;
  float acc[M][GEMV_R], ss[M];
#pragma unroll
  for (int m = 0; m < M; m++) {
    ss[m] = 0.f;
#pragma unroll
    for (int r = 0; r < GEMV_R; r++) acc[m][r] = 0.f;
  }
  const uint4* wrow[GEMV_R];
#pragma unroll
  for (int r = 0; r < GEMV_R; r++) {
    const long row = GLU ? (r < H ? 0 : half) + min(blockIdx.x * H + r % H, half - 1)
                         : min(blockIdx.x * GEMV_R + r, N - 1);
    wrow[r] = reinterpret_cast<const uint4*>(w + row * K);
  }
  const uint4* xw = reinterpret_cast<const uint4*>(x);
  const uint4* rw = reinterpret_cast<const uint4*>(residual);
  const uint4* nw = reinterpret_cast<const uint4*>(norm_w);

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
  // PRE: one pass's words of x, residual and norm_w (M = 1), requested together
  uint4 xp[GEMV_U], rp[GEMV_U], gp[GEMV_U];
  auto load_words = [&](uint4* dst, const uint4* src, int base) {
#pragma unroll
    for (int u = 0; u < GEMV_U; u++) {
      const int v = base + u * blockDim.x;
      dst[u] = v < words ? __ldg(src + v) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  load_w(threadIdx.x);
  if (PRE && NORM) load_words(gp, nw, threadIdx.x);
  // At Qwen3-0.6B's and Llama-3-8B's K = 1024 / 4096 those words are the block's whole weight
  // tile: under PDL it streams while the previous kernel finishes.
  pdl_enter(flags);
  for (int base = threadIdx.x; base < words; base += GEMV_U * blockDim.x) {
    if (base != threadIdx.x) {
      load_w(base);
      if (PRE && NORM) load_words(gp, nw, base);
    }
    if (PRE) {
      load_words(xp, xw, base);
      if (NORM && residual != nullptr) load_words(rp, rw, base);
    }
#pragma unroll
    for (int u = 0; u < GEMV_U; u++) {
      const int v = base + u * blockDim.x;
      if (v >= words) continue;
      float wf[GEMV_R][8], g[8];
#pragma unroll
      for (int r = 0; r < GEMV_R; r++) to_float8<T>(wr[u][r], wf[r]);
      if (NORM) to_float8<T>(PRE ? gp[u] : __ldg(nw + v), g);
#pragma unroll
      for (int m = 0; m < M; m++) {
        float xf[8];
        if (NORM) {
          uint4 packed = PRE ? xp[u] : __ldg(xw + m * words + v);
          if (residual != nullptr) {
            float a[8], b[8];
            to_float8<T>(packed, a);
            to_float8<T>(PRE ? rp[u] : __ldg(rw + m * words + v), b);
            T* sp = reinterpret_cast<T*>(&packed);
#pragma unroll
            for (int e = 0; e < 8; e++) sp[e] = from_float<T>(a[e] + b[e]);
          }
          if (blockIdx.x == 0) reinterpret_cast<uint4*>(res_out)[m * words + v] = packed;
          to_float8<T>(packed, xf);
#pragma unroll
          for (int e = 0; e < 8; e++) {
            ss[m] += xf[e] * xf[e];
            xf[e] *= g[e];
          }
        } else {
          to_float8<T>(PRE ? xp[u] : __ldg(xw + m * words + v), xf);
        }
#pragma unroll
        for (int r = 0; r < GEMV_R; r++)
#pragma unroll
          for (int e = 0; e < 8; e++) acc[m][r] += xf[e] * wf[r][e];
      }
    }
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
#pragma unroll
  for (int m = 0; m < M; m++) {
#pragma unroll
    for (int r = 0; r < GEMV_R; r++) {
      const float s = warp_sum(acc[m][r]);
      if (lane == 0) red[warp][m * GEMV_R + r] = s;
    }
    if (NORM) {
      const float s = warp_sum(ss[m]);
      if (lane == 0) red[warp][M * GEMV_R + m] = s;
    }
  }
  __syncthreads();
  auto total = [&](int i) {
    float s = 0.f;
    for (int k = 0; k < num_warps; k++) s += red[k][i];
    return s;
  };
  constexpr int OUTS = GLU ? M * H : M * GEMV_R;  // outputs per block
  for (int i = threadIdx.x; i < OUTS; i += blockDim.x) {
    const int m = i / (OUTS / M), c = i % (OUTS / M);
    const float scale = NORM ? rsqrtf(total(M * GEMV_R + m) / K + eps) : 1.f;
    if (GLU) {
      const int j = blockIdx.x * H + c;
      if (j >= half) continue;
      // rounded to T first, as gate_up is stored before silu_and_mul_kernel reads it
      const float gate = to_float(from_float<T>(total(m * GEMV_R + c) * scale));
      const float up = to_float(from_float<T>(total(m * GEMV_R + H + c) * scale));
      y[(long)m * half + j] = from_float<T>(gate / (1.f + expf(-gate)) * up);
    } else {
      const int n = blockIdx.x * GEMV_R + c;
      if (n < N) y[(long)m * N + n] = from_float<T>(total(m * GEMV_R + c) * scale);
    }
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, M, NORM, GLU, PRE)                                                      \
  template __global__ void gemv_kernel<T, M, NORM, GLU, PRE>(T*, T*, const T*, const T*,       \
                                                             const T*, const T*, int, int,     \
                                                             float, int);
INSTANTIATE(__half, 1, false, false, false)
INSTANTIATE(__half, 8, false, false, false)
INSTANTIATE(__nv_bfloat16, 3, false, false, false)
INSTANTIATE(__nv_bfloat16, 1, true, false, false)
INSTANTIATE(__half, 4, true, false, false)
INSTANTIATE(__nv_bfloat16, 2, false, true, false)
INSTANTIATE(__nv_bfloat16, 1, true, true, false)
INSTANTIATE(__half, 4, true, true, false)
INSTANTIATE(__nv_bfloat16, 1, false, false, true)
INSTANTIATE(__nv_bfloat16, 1, true, false, true)
INSTANTIATE(__nv_bfloat16, 1, false, true, true)
INSTANTIATE(__nv_bfloat16, 1, true, true, true)
INSTANTIATE(__half, 1, true, true, true)
#endif
