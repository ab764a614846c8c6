// Decode batches (M <= 4): fp8.cu's GEMV with its input's quantization inside, one launch per
// linear instead of a quantize kernel and then the GEMV (cuda_fp8.FUSED,
// PAGEDSERVE_FP8_GEMV_FUSED=1). At batch 1 each quantize kernel is a dependent launch of 2-3 us
// in the step's chain (four a layer); here every block computes the activation's per-token scale
// itself: it reads the whole row (8-28 KB, from L2), reduces its absmax and quantizes the 16-byte
// words its own threads multiply, into shared memory; the product is fp8.cuh's fp8_gemv_block
// unchanged, the weights' first words requested before the PDL wait.
//
// Prologues (cuda_fp8.PRO_*, as in fp8_fused.cu), each the unfused kernel's values:
//   PRO 0: x (M, K)                  -> codes = quantize(x)                 (fp8_quantize_kernel)
//   PRO 1: x = gate_up (M, 2K)       -> quantize(T(silu(gate) * up))   (fp8_silu_quantize_kernel)
//   PRO 2: x, residual (M, K) or null, norm_w (K) -> res_out = T(x + residual) (x alone when
//          residual is null; block 0 stores it, the inputs are never written, so blocks cannot
//          race), codes = quantize(T(rms_norm(res_out) * norm_w))   (fp8_norm_quantize_kernel)
// Everything is bit for bit the unfused pair's, y included: codes and scales are elementwise
// functions of the same T-rounded values and a max; the product is the same code with the same
// block size. The one sum whose order matters, the norm's sum of squares, runs as the unfused
// kernel's block of `vthreads` threads runs it: virtual thread j sums words j, j + vthreads, ...
// in turn, a warp butterfly per 32 of them, then one warp over those sums. This block (blockDim
// threads, both multiples of 32) plays the virtual threads tid, tid + blockDim, ...
#include "fp8.cuh"

constexpr int FG_VJ = 2;  // virtual threads a thread sums at once (their loads issued together;
                          // 4: 35 more registers at M = 1)

// PRO 2, row m: writes res (shared, [K]) = T(x + residual) and, in block 0, res_out; returns
// rsqrt(mean(res^2) + eps) summed in fp8_norm_quantize_kernel's order (above).
template <typename T>
__device__ __forceinline__ float fg_norm_pass(T* res, T* __restrict__ res_out,
                                              const T* __restrict__ xr,
                                              const T* __restrict__ rr, float* vred, int K,
                                              float eps, int vthreads) {
  const int k8 = K / 8, lane = threadIdx.x & 31;
  for (int vt0 = threadIdx.x; vt0 < vthreads; vt0 += FG_VJ * blockDim.x) {  // warp-uniform
    float ss[FG_VJ];
#pragma unroll
    for (int j = 0; j < FG_VJ; j++) ss[j] = 0.f;
    // word i of virtual thread vt0 + j * blockDim is w0 + j * blockDim, w0 = vt0 + i * vthreads
    for (int w0 = vt0; w0 < k8; w0 += vthreads) {
      float f[FG_VJ][8];
#pragma unroll
      for (int j = 0; j < FG_VJ; j++) {
        const int w = w0 + j * blockDim.x;
        if (vt0 + j * blockDim.x < vthreads && w < k8) {
          load8(xr + 8 * w, f[j]);
          if (rr != nullptr) {
            float r[8];
            load8(rr + 8 * w, r);
#pragma unroll
            for (int e = 0; e < 8; e++) f[j][e] += r[e];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < FG_VJ; j++) {
        const int w = w0 + j * blockDim.x;
        if (vt0 + j * blockDim.x < vthreads && w < k8) {
          store8(res + 8 * w, f[j]);
          if (blockIdx.x == 0) store8(res_out + 8 * w, f[j]);
#pragma unroll
          for (int e = 0; e < 8; e++) {
            const float v = to_float(from_float<T>(f[j][e]));
            ss[j] += v * v;
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < FG_VJ; j++) {
      const int vt = vt0 + j * blockDim.x;
      if (vt < vthreads) {  // warp-uniform
        const float s = warp_sum(ss[j]);
        if (lane == 0) vred[vt >> 5] = s;
      }
    }
  }
  __syncthreads();  // vred and res complete
  const float total = warp_sum(lane < (vthreads >> 5) ? vred[lane] : 0.f);
  return rsqrtf(total / K + eps);
}

// Dynamic shared memory: M * K bytes of codes, then the row's values [K] (T), then (PRO 2) the
// norm weight [K] (T).
// MINB: blocks of 256 threads an SM must hold (the register cap: 4 is fp8_gemv_kernel's 64
// registers, so as many weight words in flight per SM; 1 leaves the prologue its registers).
// Grid: (ceil(N / R))  Block: (64..256, a multiple of 32: cuda_fp8.gemv's)  vthreads: the unfused
// norm kernel's block (PRO 2; a multiple of 32, <= 1024)
template <typename T, int M, int PRO, int R, int MINB>
__global__ void __launch_bounds__(256, MINB) fp8_gemv_fused_kernel(
    T* __restrict__ y,                     // [M, N]
    T* __restrict__ res_out,               // [M, K] (PRO 2) or null
    const T* __restrict__ x,               // [M, K] ([M, 2K] for PRO 1)
    const T* __restrict__ residual,        // [M, K] or null (PRO 2)
    const T* __restrict__ norm_w,          // [K] (PRO 2) or null
    const unsigned char* __restrict__ qw,  // [N, K]
    const float* __restrict__ sw,          // [N]
    int N, int K, float eps, int vthreads) {
  constexpr int QC = PRO == 1 ? 4 : 2;  // a thread's words at Llama-3-8B's K (14336 / 4096)
  extern __shared__ uint4 fg_smem[];
  __shared__ float red[32], vred[32], scales[M];
  const int words = K / 16;
  uint4* codes = fg_smem;                             // [M, words]
  T* vals = reinterpret_cast<T*>(fg_smem + M * words);  // [K]: the row, then its values
  T* g = vals + K;                                    // [K] (PRO 2)
  if constexpr (PRO == 2) {
    // the norm weight of this thread's words, requested before the wait with the weights (no
    // kernel writes it); cp.async: no registers held while it flies
    for (int v = threadIdx.x; v < words; v += blockDim.x) {
      f8_cp_async16(g + 16 * v, norm_w + 16 * v, true);
      f8_cp_async16(g + 16 * v + 8, norm_w + 16 * v + 8, true);
    }
    f8_cp_async_commit();
  }
  auto enter = [&] {
    pdl_start();  // PDL: everything below may read or write what earlier kernels touch
#pragma unroll
    for (int m = 0; m < M; m++) {
      uint4* qrow = codes + m * words;
      float s;
      if constexpr (PRO == 0) {
        const T* row = x + (long)m * K;
        s = quantize_words16<T, QC>(words, red, qrow, vals, [&](int v, float* f) {
          load8(row + 16 * v, f);
          load8(row + 16 * v + 8, f + 8);
        });
      } else if constexpr (PRO == 1) {
        const T* gu = x + (long)m * 2 * K;
        s = quantize_words16<T, QC>(words, red, qrow, vals, [&](int v, float* f) {
          silu_mul8(gu, K, 2 * v, f);
          silu_mul8(gu, K, 2 * v + 1, f + 8);
        });
      } else {
        if (m > 0) __syncthreads();  // the previous row's values are read
        const float inv = fg_norm_pass<T>(
            vals, res_out + (long)m * K, x + (long)m * K,
            residual == nullptr ? nullptr : residual + (long)m * K, vred, K, eps, vthreads);
        if (m == 0) f8_cp_async_wait(0);  // this thread's words of g
        // vals holds the residual row; word v becomes h = T(res * inv * g) in place
        s = quantize_words16<T, QC>(words, red, qrow, vals, [&](int v, float* f) {
          float gf[16];
          load8(g + 16 * v, gf);
          load8(g + 16 * v + 8, gf + 8);
          load8(vals + 16 * v, f);
          load8(vals + 16 * v + 8, f + 8);
#pragma unroll
          for (int e = 0; e < 16; e++) f[e] = f[e] * inv * gf[e];
        });
      }
      if (threadIdx.x == 0) scales[m] = s;  // read after fp8_gemv_block's barrier
    }
  };
  fp8_gemv_block<T, M, R>(
      y, qw, sw, N, K, enter, [&](int m, int v) { return codes[m * words + v]; },
      [&](int m) { return scales[m]; });
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, M, PRO, R, MINB)                                                         \
  template __global__ void fp8_gemv_fused_kernel<T, M, PRO, R, MINB>(                           \
      T*, T*, const T*, const T*, const T*, const unsigned char*, const float*, int, int, float, \
      int);
INSTANTIATE(__nv_bfloat16, 1, 0, 4, 4)
INSTANTIATE(__nv_bfloat16, 1, 1, 4, 4)
INSTANTIATE(__nv_bfloat16, 1, 2, 4, 4)
INSTANTIATE(__nv_bfloat16, 1, 2, 4, 1)
INSTANTIATE(__nv_bfloat16, 1, 1, 8, 1)
INSTANTIATE(__nv_bfloat16, 1, 2, 16, 2)
INSTANTIATE(__half, 1, 1, 16, 2)
INSTANTIATE(__half, 4, 2, 4, 2)
INSTANTIATE(__half, 3, 1, 4, 2)
INSTANTIATE(__nv_bfloat16, 2, 0, 4, 2)
INSTANTIATE(__nv_bfloat16, 4, 1, 4, 2)
#endif
