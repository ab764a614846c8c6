// Decode batches (M <= 8): the FP8 GEMV on tensor cores (sm_89+), fp8.cu's fp8_gemv_kernel
// without its per-weight work.
//
// fp8_gemv_kernel turns every weight byte into a float and multiplies it by a float: about 2.5
// instructions a byte, which an SM must issue at the rate HBM delivers (~18 bytes a cycle per SM
// on an H200), and the small products (qkv, o) reach 55-60% of the bandwidth. Here a warp hands
// its weight bytes to mma.sync m16n8k32 as they arrive: one 16-byte load per row and lane, one
// mma per 512 weight bytes; the activation rows are the mma's 8 columns (tokens past M are
// zeros), so every M up to 8 costs the same weight read.
//
// Layout. A block takes 16 weight rows (one m16 tile) and its NW warps split K: step s of warp w
// covers the 16-byte words v = 4 (s NW + w) + t of each row, t = lane % 4 (64 consecutive bytes of
// a row a warp, 64 NW a block). Lane (g = lane / 4, t) loads word v of rows g and g + 8: bytes
// 0-7 of those are one mma's k-slots 4t..4t+3 and 16+4t..16+4t+3 (a0/a2 row g, a1/a3 row g + 8),
// bytes 8-15 a second mma's. The mma's B operand gives k-slots 4t.. and 16+4t.. of column g to
// the same lane, so lane (g, t) passes word v of token g's codes: A and B name the same bytes of
// K, and the k-order inside an mma is immaterial to the dot product.
//
// Sums: each mma starts from zero and its four results are added to fp32 accumulators, so only
// the 32 products inside one mma are summed at the tensor cores' precision (about 14 bits on
// Hopper, cuda_blaslt.py's NOTE); the warps' partials meet in shared memory in warp order.
// y[m, n] = T(sum * sx[m] * sw[n]) as fp8_gemv_kernel (engine/model/fp8.py's fp8_linear).
//
// Under PDL a warp requests its first U steps of weights before it waits (weights are never
// written); the codes qx and scales sx come from the kernel before.
#include "fp8.cuh"

// D (16 x 8, fp32) = A (16 x 32, e4m3, row) . B (32 x 8, e4m3, col), from zero
__device__ __forceinline__ void mma_e4m3(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%10,%10,%10,%10};"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
#else
  d[0] = d[1] = d[2] = d[3] = 0.f;  // never launched below sm_89 (cuda_fp8.use_mma_gemv)
#endif
}

constexpr int F8M_MAX_WARPS = 16;

// Grid: (ceil(N / 16))  Block: (32 * NW), NW <= F8M_MAX_WARPS
template <typename T, int M, int U>
__global__ void __launch_bounds__(32 * F8M_MAX_WARPS) fp8_mma_gemv_kernel(
    T* __restrict__ y,                     // [M, N]
    const unsigned char* __restrict__ qx,  // [M, K]
    const float* __restrict__ sx,          // [M]
    const unsigned char* __restrict__ qw,  // [N, K]
    const float* __restrict__ sw,          // [N]
    int N, int K) {
  static_assert(M >= 1 && M <= 8, "the activation rows are the mma's 8 columns");
  __shared__ float part[F8M_MAX_WARPS][32][4];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3, n0 = blockIdx.x * 16, words = K / 16;
  const int steps = (words + 4 * nw - 1) / (4 * nw), batches = (steps + U - 1) / U;
  const uint4* w0 = reinterpret_cast<const uint4*>(qw + (long)min(n0 + g, N - 1) * K);
  const uint4* w1 = reinterpret_cast<const uint4*>(qw + (long)min(n0 + g + 8, N - 1) * K);
  const uint4* xr = reinterpret_cast<const uint4*>(qx + (long)min(g, M - 1) * K);
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  auto word = [&](int s) { return 4 * (s * nw + warp) + t; };

  uint4 cur[U][2], nxt[U][2];
  auto load = [&](uint4 (*r)[2], int b) {
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int v = word(b * U + u);
      r[u][0] = v < words ? __ldcs(w0 + v) : zero;  // read once
      r[u][1] = v < words ? __ldcs(w1 + v) : zero;
    }
  };
  uint4 xv[U], xn[U];  // token g's codes at the same words (zeros past M)
  auto load_x = [&](uint4* r, int b) {
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int v = word(b * U + u);
      r[u] = g < M && v < words ? __ldg(xr + v) : zero;
    }
  };
  load(cur, 0);
  pdl_start();  // PDL: qx and sx below come from the kernel before
  load_x(xv, 0);

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int b = 0; b < batches; b++) {
    if (b + 1 < batches) {
      load(nxt, b + 1);
      load_x(xn, b + 1);
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      float d[4];
      mma_e4m3(d, cur[u][0].x, cur[u][1].x, cur[u][0].y, cur[u][1].y, xv[u].x, xv[u].y);
#pragma unroll
      for (int e = 0; e < 4; e++) acc[e] += d[e];
      mma_e4m3(d, cur[u][0].z, cur[u][1].z, cur[u][0].w, cur[u][1].w, xv[u].z, xv[u].w);
#pragma unroll
      for (int e = 0; e < 4; e++) acc[e] += d[e];
    }
#pragma unroll
    for (int u = 0; u < U; u++) cur[u][0] = nxt[u][0], cur[u][1] = nxt[u][1], xv[u] = xn[u];
  }

  // D's element e of lane (g, t): row g + 8 (e / 2), column (token) 2 t + e % 2
#pragma unroll
  for (int e = 0; e < 4; e++) part[warp][lane][e] = acc[e];
  __syncthreads();
  for (int i = threadIdx.x; i < 16 * M; i += blockDim.x) {
    const int r = i / M, m = i % M, n = n0 + r;
    if (n >= N) continue;
    const int src = (r & 7) * 4 + m / 2, e = (r >> 3) * 2 + m % 2;
    float s = 0.f;
    for (int w = 0; w < nw; w++) s += part[w][src][e];
    y[(long)m * N + n] = from_float<T>(s * sx[m] * sw[n]);
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void fp8_mma_gemv_kernel<__nv_bfloat16, 1, 4>(
    __nv_bfloat16*, const unsigned char*, const float*, const unsigned char*, const float*, int,
    int);
template __global__ void fp8_mma_gemv_kernel<__half, 8, 2>(__half*, const unsigned char*,
                                                           const float*, const unsigned char*,
                                                           const float*, int, int);
#endif
