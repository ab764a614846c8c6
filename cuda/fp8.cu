// FP8 (E4M3) W8A8: per-row quantization of activations and weights (fused with the RMSNorm or the
// SiLU-mul that precedes a matrix product), the small-batch FP8 GEMV, and the epilogue that scales
// cuBLASLt's fp32 product. engine/model/fp8.py is the numpy twin that defines every value here:
//   quantize:  s = absmax(row) / 448 (1 if 0 or subnormal), q = e4m3_rn_satfinite(x * (1 / s))
//   product:   y[m, n] = (sum_k dec(qx[m, k]) * dec(qw[n, k])) * sx[m] * sw[n]
// NOTE: 1 / s and absmax / 448 are IEEE divisions (NVRTC's default -prec-div=true) and x * (1 / s)
// one rounded multiply, so the codes and scales are bit-identical to numpy's. Products of two
// E4M3 values are exact in fp32; only the order of the fp32 sums differs from the twin.
#include "fp8.cuh"

// ------------------------------------------------------------------------------ quantization
// A row's activations, made by what precedes the matrix product, quantized per row:
//   PRO 0: x (a row per token, or a weight's row per output channel)
//   PRO 1: silu(gate) * up of a gate_up row (2K), rounded to T as silu_and_mul_kernel rounds it:
//          the down projection's input never goes through memory in 16 bits
//   PRO 2: the residual add + RMSNorm of rms_norm_kernel (mode 1: residual = x; mode 2:
//          residual += x, rounded to T), h = norm(residual) * weight rounded to T, then h
//          quantized. h_out (null in the engine) stores h, so that tests hold the codes to the
//          twin's quantization of h bit for bit.
// -> codes and the row's scale. The row's words are split over C blocks (C > 1: a thread-block
// cluster, fp8_quantize_cluster_kernel; at one row a single block's latency is on the decode
// step's critical path), a thread's first QC in registers between the passes (quantize_words).
// The blocks' sums and absmax meet through distributed shared memory, summed in rank order.
// NOTE: PRO 2's sum of squares runs in a different order than rms_norm_kernel's (and than the
// one-block form's with C > 1), so h may differ from that kernel's output in the last bit.
// flags (every kernel here but fp8_scale_kernel): PDL_EARLY (common.cuh; cuda_kernels.PDL_EARLY)
template <typename T, int PRO, int QC, int C>
__device__ __forceinline__ void quantize_rows_body(
    unsigned char* __restrict__ q,   // [rows, K]
    float* __restrict__ scale,       // [rows]
    T* __restrict__ residual,        // [rows, K] (PRO 2)
    T* __restrict__ h_out,           // [rows, K] or null (PRO 2)
    const T* __restrict__ x,         // [rows, K], [rows, 2K] with PRO 1
    const T* __restrict__ weight,    // [K] (PRO 2)
    float eps, int K, int mode, int flags, int row, int rank) {
  const int words = K / 8, first = rank * blockDim.x + threadIdx.x, stride = C * blockDim.x;
  uint4 gw[QC];  // PRO 2: the norm weight (never written), requested before the wait
  if constexpr (PRO == 2) {
#pragma unroll
    for (int i = 0; i < QC; i++) {
      const int w = first + i * stride;
      if (w < words) gw[i] = *reinterpret_cast<const uint4*>(weight + 8 * w);
    }
  }
  pdl_enter(flags);  // PDL: everything below reads or writes what earlier kernels touch
  __shared__ float red[32];
  __shared__ float part_sum, part_max;  // this block's, for the cluster
  const long base = (long)row * K;
  float rr[PRO == 2 ? QC : 1][8], inv = 0.f;
  if constexpr (PRO == 2) {  // residual += x (stored rounded to T) and its sum of squares
    float ss = 0.f;
    auto add = [&](int w, float* f) {
      float r[8];
      load8(x + base + 8 * w, f);
      if (mode == 2) {
        load8(residual + base + 8 * w, r);
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] += r[e];
      }
      store8(residual + base + 8 * w, f);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        f[e] = to_float(from_float<T>(f[e]));
        ss += f[e] * f[e];
      }
    };
#pragma unroll
    for (int i = 0; i < QC; i++)
      if (first + i * stride < words) add(first + i * stride, rr[i]);
    for (int w = first + QC * stride; w < words; w += stride) {
      float f[8];
      add(w, f);
    }
    float total = block_sum(ss, red);
    if constexpr (C > 1) {
      if (threadIdx.x == 0) part_sum = total;
      cluster_sync();
      total = 0.f;
#pragma unroll
      for (int r = 0; r < C; r++) total += ld_cluster(&part_sum, r);
    }
    inv = rsqrtf(total / K + eps);
  }
  const T* xrow = x + (PRO == 1 ? 2 * base : base);
  const float s = quantize_words<T, QC>(
      first, stride, words,
      [&](int w, int i, float* f) {
        if constexpr (PRO == 0) {
          load8(xrow + 8 * w, f);
        } else if constexpr (PRO == 1) {
          silu_mul8(xrow, K, w, f);
        } else {
          float g[8];
          if (i < QC) {
            const T* gh = reinterpret_cast<const T*>(&gw[i]);
#pragma unroll
            for (int e = 0; e < 8; e++) {
              f[e] = rr[i][e];
              g[e] = to_float(gh[e]);
            }
          } else {  // a thread re-reads only the residual words it wrote itself
            load8(residual + base + 8 * w, f);
            load8(weight + 8 * w, g);
          }
#pragma unroll
          for (int e = 0; e < 8; e++) f[e] = f[e] * inv * g[e];
        }
      },
      [&](int w, const float* f, float inv) {
        encode8(q + base + 8 * w, f, inv);
        if (PRO == 2 && h_out != nullptr) store8(h_out + base + 8 * w, f);
      },
      [&](float amax) {
        float m = block_max(amax, red);
        if constexpr (C > 1) {
          if (threadIdx.x == 0) part_max = m;
          cluster_sync();  // every block's parts are in its shared memory
          m = 0.f;
#pragma unroll
          for (int r = 0; r < C; r++) m = fmaxf(m, ld_cluster(&part_max, r));
          cluster_arrive();  // done reading the others' parts
        }
        return m;
      });
  if (rank == 0 && threadIdx.x == 0) scale[row] = s;
  if constexpr (C > 1) {
    __syncwarp();  // the .aligned barrier wants the warp converged
    cluster_wait();  // no block leaves while another may read its parts
  }
}

// A block per row: QC = 2 with a word per thread (the default launch), 4 for blocks of fewer,
// busier threads (cuda_fp8.QUANT_WORDS: more rows resident per SM at prefill sizes).
// Grid: (rows)  Block: (64..1024, a multiple of 32)
template <typename T, int PRO, int QC>
__global__ void __launch_bounds__(1024) fp8_quantize_kernel(
    unsigned char* __restrict__ q, float* __restrict__ scale, T* __restrict__ residual,
    T* __restrict__ h_out, const T* __restrict__ x, const T* __restrict__ weight, float eps,
    int K, int mode, int flags) {
  quantize_rows_body<T, PRO, QC, 1>(q, scale, residual, h_out, x, weight, eps, K, mode, flags,
                                    blockIdx.x, 0);
}

// A row over the C blocks of a cluster (cuda_fp8.CLUSTER_MAX_ROWS rows at most), about a word a
// thread. Grid: (C, rows)  Block: (64..1024, a multiple of 32)  Cluster: (C, 1, 1)
template <typename T, int PRO, int C>
__global__ void CLUSTER_DIMS(C, 1, 1) __launch_bounds__(1024) fp8_quantize_cluster_kernel(
    unsigned char* __restrict__ q, float* __restrict__ scale, T* __restrict__ residual,
    T* __restrict__ h_out, const T* __restrict__ x, const T* __restrict__ weight, float eps,
    int K, int mode, int flags) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // no clusters before sm_90: each block would quantize with its own part alone
#endif
  quantize_rows_body<T, PRO, 2, C>(q, scale, residual, h_out, x, weight, eps, K, mode, flags,
                                   blockIdx.y, blockIdx.x);
}

// ------------------------------------------------------------------------------ products

constexpr int F8_R = 4;  // weight rows per GEMV block (8 measured slower on the H200)
constexpr int F8_U = 2;  // 16-byte weight words per row in flight per thread
constexpr int F8_MAX_WARPS = 8;

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
                                                       int N, int K, int flags) {
  __shared__ float red[F8_MAX_WARPS][M * F8_R];
  const int n0 = blockIdx.x * F8_R, words = K / 16;
  // Thread i < M * F8_R writes output (i / F8_R, n0 + i % F8_R): its two scales are requested
  // early (the weight's before the PDL wait, the row's right after it), not after the sums
  // (at batch 1 a memory latency on the step's critical path, four a layer).
  const int mi = threadIdx.x / F8_R, ri = threadIdx.x % F8_R;
  const bool writes = threadIdx.x < M * F8_R && n0 + ri < N;  // blockDim.x >= 64 >= M * F8_R
  const float swi = writes ? sw[n0 + ri] : 0.f;
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

  uint4 wr[F8_U][F8_R];
  auto load_w = [&](int base) {
#pragma unroll
    for (int u = 0; u < F8_U; u++) {
      const int v = base + u * blockDim.x;
#pragma unroll
      for (int r = 0; r < F8_R; r++)
        wr[u][r] = v < words ? __ldcs(wrow[r] + v) : make_uint4(0u, 0u, 0u, 0u);  // read once
    }
  };
  // The first weight words are requested before the PDL wait: under PDL they stream while the
  // previous kernel (the activation's quantization) finishes; at K = 4096 (64 threads,
  // cuda_fp8.FP8_GEMV_WORDS = 4 words a row each) they are half of a thread's words. Only qx and
  // sx, read after it, come from an earlier kernel.
  load_w(threadIdx.x);
  pdl_enter(flags);
  const float sxi = writes ? sx[mi] : 0.f;
  for (int base = threadIdx.x; base < words; base += F8_U * blockDim.x) {
    if (base != threadIdx.x) load_w(base);
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
  if (writes) {
    float s = 0.f;
    for (int k = 0; k < (int)(blockDim.x >> 5); k++) s += red[k][threadIdx.x];
    y[(long)mi * N + n0 + ri] = from_float<T>(s * sxi * swi);
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
  pdl_start();
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < total) y[i] = from_float<T>(acc[i] * sx[i / N] * sw[i % N]);
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define F8_Q_ARGS(T) unsigned char*, float*, T*, T*, const T*, const T*, float, int, int, int
template __global__ void fp8_quantize_kernel<__nv_bfloat16, 0, 2>(F8_Q_ARGS(__nv_bfloat16));
template __global__ void fp8_quantize_kernel<__half, 1, 4>(F8_Q_ARGS(__half));
template __global__ void fp8_quantize_kernel<__nv_bfloat16, 2, 4>(F8_Q_ARGS(__nv_bfloat16));
template __global__ void fp8_quantize_kernel<__nv_bfloat16, 2, 2>(F8_Q_ARGS(__nv_bfloat16));
template __global__ void fp8_quantize_cluster_kernel<__nv_bfloat16, 2, 8>(F8_Q_ARGS(__nv_bfloat16));
template __global__ void fp8_quantize_cluster_kernel<__half, 1, 4>(F8_Q_ARGS(__half));
template __global__ void fp8_quantize_cluster_kernel<__nv_bfloat16, 0, 8>(F8_Q_ARGS(__nv_bfloat16));
template __global__ void fp8_gemv_kernel<__nv_bfloat16, 1>(__nv_bfloat16*, const unsigned char*,
                                                           const float*, const unsigned char*,
                                                           const float*, int, int, int);
template __global__ void fp8_gemv_kernel<__half, 8>(__half*, const unsigned char*, const float*,
                                                    const unsigned char*, const float*, int, int,
                                                    int);
template __global__ void fp8_scale_kernel<__nv_bfloat16>(__nv_bfloat16*, const float*,
                                                         const float*, const float*, long, int);
#endif
