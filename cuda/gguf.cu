// GGUF block formats on the GPU (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K): dequantization, the exact
// twin of engine/model/gguf_quants.py, and a small-batch GEMV that reads the packed blocks.
//
// Every format is described by one struct that splits a block into groups of 16 values, each
//   value = a * q + b        (b only for formats with a minimum: Q4_1, Q4_K, Q5_K)
// with q a small integer held exactly in a float. The dequantize kernel evaluates that with the
// rounding of the numpy twin (__fmul_rn / __fadd_rn: no FMA contraction), so it is bit-exact in
// fp32; the GEMV factors a and b out of each group's dot product instead (sum a * (q . x) + b *
// sum x), which only reorders float sums.
//
// Weights: (N, row_bytes) bytes, each row its own run of blocks (K / VALUES blocks of BYTES).
#include "common.cuh"

typedef unsigned char u8;

// 16 bytes read from p with the alignment the format guarantees (A = 2, 4 or 16 bytes).
union Bytes16 {
  uint4 v;
  unsigned int u[4];
  unsigned short s[8];
  u8 b[16];
};

template <int A>
__device__ __forceinline__ Bytes16 load16(const u8* p) {
  Bytes16 t;
  if constexpr (A >= 16) {
    t.v = *reinterpret_cast<const uint4*>(p);
  } else if constexpr (A >= 4) {
#pragma unroll
    for (int i = 0; i < 4; i++) t.u[i] = reinterpret_cast<const unsigned int*>(p)[i];
  } else {
#pragma unroll
    for (int i = 0; i < 8; i++) t.s[i] = reinterpret_cast<const unsigned short*>(p)[i];
  }
  return t;
}

__device__ __forceinline__ float f16_at(const u8* p) {
  return __half2float(__ushort_as_half(*reinterpret_cast<const unsigned short*>(p)));
}

// ------------------------------------------------------------------------------------ formats
// VALUES / BYTES per block, GROUPS of 16 values per block, ALIGN of a block's start, TILE: blocks
// the GEMV stages per step (TILE * BYTES is a multiple of 16). group() gives group g's 16 q and
// its a (and b).

struct Q8_0 {
  static constexpr int VALUES = 32, BYTES = 34, GROUPS = 2, ALIGN = 2, TILE = 16;
  static constexpr bool HAS_MIN = false;
  __device__ static void group(const u8* blk, int g, float* q, float& a, float& b) {
    const Bytes16 t = load16<2>(blk + 2 + 16 * g);
#pragma unroll
    for (int i = 0; i < 16; i++) q[i] = (float)(signed char)t.b[i];
    a = f16_at(blk);
    b = 0.f;
  }
};

struct Q4_0 {  // group 0: low nibbles of the 16 bytes, group 1: high nibbles; q - 8
  static constexpr int VALUES = 32, BYTES = 18, GROUPS = 2, ALIGN = 2, TILE = 32;
  static constexpr bool HAS_MIN = false;
  __device__ static void group(const u8* blk, int g, float* q, float& a, float& b) {
    const Bytes16 t = load16<2>(blk + 2);
#pragma unroll
    for (int i = 0; i < 16; i++) q[i] = (float)((t.b[i] >> (4 * g)) & 15) - 8.f;
    a = f16_at(blk);
    b = 0.f;
  }
};

struct Q4_1 {
  static constexpr int VALUES = 32, BYTES = 20, GROUPS = 2, ALIGN = 4, TILE = 32;
  static constexpr bool HAS_MIN = true;
  __device__ static void group(const u8* blk, int g, float* q, float& a, float& b) {
    const Bytes16 t = load16<4>(blk + 4);
#pragma unroll
    for (int i = 0; i < 16; i++) q[i] = (float)((t.b[i] >> (4 * g)) & 15);
    a = f16_at(blk);
    b = f16_at(blk + 2);
  }
};

// 6-bit scale and min of sub-block s (0..7) from the 12 bytes S at blk + 4 (gguf_quants.k_scales)
__device__ __forceinline__ void k_scale(const u8* blk, int s, int& sc, int& mn) {
  const u8* S = blk + 4;
  if (s < 4) {
    sc = S[s] & 63;
    mn = S[s + 4] & 63;
  } else {
    sc = (S[s + 4] & 15) | ((S[s - 4] >> 6) << 4);
    mn = (S[s + 4] >> 4) | ((S[s] >> 6) << 4);
  }
}

// a = d * sc, b = -(dmin * mn): a * q + b rounds as (d * sc) * q - dmin * mn does.
__device__ __forceinline__ void k_affine(const u8* blk, int s, float& a, float& b) {
  int sc, mn;
  k_scale(blk, s, sc, mn);
  a = __fmul_rn(f16_at(blk), (float)sc);
  b = -__fmul_rn(f16_at(blk + 2), (float)mn);
}

struct Q4_K {  // group g: sub-block s = g / 2, values 16 (g % 2) ..; 32-byte runs hold 2 sub-blocks
  static constexpr int VALUES = 256, BYTES = 144, GROUPS = 16, ALIGN = 16, TILE = 4;
  static constexpr bool HAS_MIN = true;
  __device__ static void group(const u8* blk, int g, float* q, float& a, float& b) {
    const int s = g >> 1, h = g & 1;
    const Bytes16 t = load16<16>(blk + 16 + (s >> 1) * 32 + 16 * h);
#pragma unroll
    for (int i = 0; i < 16; i++) q[i] = (float)((t.b[i] >> (4 * (s & 1))) & 15);
    k_affine(blk, s, a, b);
  }
};

struct Q5_K {  // Q4_K's low 4 bits (at 48) plus bit s of qh byte l (at 16) as the fifth
  static constexpr int VALUES = 256, BYTES = 176, GROUPS = 16, ALIGN = 16, TILE = 4;
  static constexpr bool HAS_MIN = true;
  __device__ static void group(const u8* blk, int g, float* q, float& a, float& b) {
    const int s = g >> 1, h = g & 1;
    const Bytes16 lo = load16<16>(blk + 48 + (s >> 1) * 32 + 16 * h);
    const Bytes16 hi = load16<16>(blk + 16 + 16 * h);
#pragma unroll
    for (int i = 0; i < 16; i++)
      q[i] = (float)(((lo.b[i] >> (4 * (s & 1))) & 15) | (((hi.b[i] >> s) & 1) << 4));
    k_affine(blk, s, a, b);
  }
};

struct Q6_K {  // halves of 128 values: low 4 bits in ql (at 0), high 2 in qh (at 128), int8
               // scales per 16 values (at 192), d (at 208); q - 32
  static constexpr int VALUES = 256, BYTES = 210, GROUPS = 16, ALIGN = 2, TILE = 8;
  static constexpr bool HAS_MIN = false;
  __device__ static void group(const u8* blk, int g, float* q, float& a, float& b) {
    const int half = g >> 3, v0 = 16 * (g & 7);  // value v0 + i of the half
    const Bytes16 lo = load16<2>(blk + 64 * half + (v0 & 63));
    const Bytes16 hi = load16<2>(blk + 128 + 32 * half + (v0 & 31));
    const int lo_shift = 4 * (v0 >> 6), hi_shift = 2 * (v0 >> 5);
#pragma unroll
    for (int i = 0; i < 16; i++)
      q[i] = (float)((((lo.b[i] >> lo_shift) & 15) | (((hi.b[i] >> hi_shift) & 3) << 4)) - 32);
    a = __fmul_rn(f16_at(blk + 208), (float)(signed char)blk[192 + g]);
    b = 0.f;
  }
};

// ------------------------------------------------------------------------------------ dequantize

// out (R, K) = the dequantized rows ids[r] (ids null: row r) of w (N, row_bytes).
// Grid: (ceil(K / 16 / 128), R)  Block: (128), one thread per group of 16 values
template <class F, typename Out>
__global__ void gguf_dequant_kernel(Out* __restrict__ out, const u8* __restrict__ w,
                                    const int* __restrict__ ids, int K, int row_bytes) {
  const int r = blockIdx.y, gi = blockIdx.x * blockDim.x + threadIdx.x;
  if (gi >= K / 16) return;
  const long src_row = ids ? ids[r] : r;
  const int blk = gi / F::GROUPS, g = gi % F::GROUPS;
  float q[16], a, b;
  F::group(w + src_row * row_bytes + (long)blk * F::BYTES, g, q, a, b);
  Out* o = out + (long)r * K + (long)gi * 16;
#pragma unroll
  for (int i = 0; i < 16; i++) {
    const float v = F::HAS_MIN ? __fadd_rn(__fmul_rn(a, q[i]), b) : __fmul_rn(a, q[i]);
    o[i] = from_float<Out>(v);
  }
}

// ------------------------------------------------------------------------------------ GEMV

constexpr int GG_WARPS = 4;  // most warps per block, splitting K (tiles round-robin)

template <typename T>
__device__ __forceinline__ void load_x16(const T* p, float* f) {
  const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
  const uint4 c = __ldg(reinterpret_cast<const uint4*>(p) + 1);
  const T* ha = reinterpret_cast<const T*>(&a);
  const T* hc = reinterpret_cast<const T*>(&c);
#pragma unroll
  for (int e = 0; e < 8; e++) {
    f[e] = to_float(ha[e]);
    f[8 + e] = to_float(hc[e]);
  }
}

// y (rows, N) = x (rows, K) @ dequantized(w)^T, rows <= M. Each block computes R outputs, so each
// x load serves R weight rows (R = cuda_kernels.GGUF_GEMV_R; others compiled for kernel_check).
// Each warp stages a tile (TILE blocks) of its R weight rows in shared memory with 16-byte
// loads, the next tile's loads in flight while it computes on this one; lanes take groups of 16.
// A row that does not start on 16 bytes is read from the 16-byte word holding its first byte and
// sits `shift` bytes into the staged tile: shift is a multiple of the format's ALIGN (row_bytes
// is a multiple of BYTES), so blocks keep their alignment in shared memory. The last row's last
// word may cover up to 15 bytes past the weight, inside the 512-byte-rounded allocation.
// Grid: (ceil(N / R))  Block: (32 * warps), warps <= GG_WARPS
template <class F, typename T, int M, int R>
__global__ void __launch_bounds__(32 * GG_WARPS)
gguf_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const u8* __restrict__ w, int N,
                 int K, int rows, int row_bytes) {
  constexpr int TILE_WORDS = F::TILE * F::BYTES / 16;  // + 1 staged for a row's shift
  constexpr int PER_LANE = (TILE_WORDS + 1 + 31) / 32;
  __shared__ uint4 tile[GG_WARPS][R][TILE_WORDS + 1];
  __shared__ float red[GG_WARPS][R * M];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int n0 = blockIdx.x * R;
  const int nb = K / F::VALUES;
  const int ntiles = (nb + F::TILE - 1) / F::TILE;
  const uint4* src[R];
  int shift[R], words[R];
#pragma unroll
  for (int r = 0; r < R; r++) {
    const long start = (long)min(n0 + r, N - 1) * row_bytes;
    src[r] = reinterpret_cast<const uint4*>(w + (start & ~15L));
    shift[r] = (int)(start & 15);
    words[r] = (shift[r] + row_bytes + 15) / 16;
  }

  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int m = 0; m < M; m++) acc[r][m] = 0.f;
  uint4 next[R][PER_LANE];
  auto fetch = [&](int t) {
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int i = 0; i < PER_LANE; i++) {
        const int wi = lane + 32 * i, gw = t * TILE_WORDS + wi;
        next[r][i] = (wi <= TILE_WORDS && gw < words[r]) ? __ldcs(src[r] + gw)  // read once
                                                         : make_uint4(0u, 0u, 0u, 0u);
      }
  };
  if (warp < ntiles) fetch(warp);
  for (int t = warp; t < ntiles; t += warps) {
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
      for (int i = 0; i < PER_LANE; i++)
        if (lane + 32 * i <= TILE_WORDS) tile[warp][r][lane + 32 * i] = next[r][i];
    __syncwarp();
    if (t + warps < ntiles) fetch(t + warps);
    const int groups = min(F::TILE, nb - t * F::TILE) * F::GROUPS;
    for (int gi = lane; gi < groups; gi += 32) {
      const int b = gi / F::GROUPS, g = gi % F::GROUPS;
      float q[R][16], a[R], bm[R];
#pragma unroll
      for (int r = 0; r < R; r++)
        F::group(reinterpret_cast<const u8*>(tile[warp][r]) + shift[r] + b * F::BYTES, g, q[r],
                 a[r], bm[r]);
      const int k0 = (t * F::TILE + b) * F::VALUES + 16 * g;
#pragma unroll
      for (int m = 0; m < M; m++) {
        if (m < rows) {
          float xv[16], sx = 0.f;
          load_x16(x + (long)m * K + k0, xv);
#pragma unroll
          for (int i = 0; i < 16; i++) sx += xv[i];
#pragma unroll
          for (int r = 0; r < R; r++) {
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < 16; i++) s = fmaf(q[r][i], xv[i], s);
            acc[r][m] = fmaf(a[r], s, acc[r][m]);
            if (F::HAS_MIN) acc[r][m] = fmaf(bm[r], sx, acc[r][m]);
          }
        }
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int m = 0; m < M; m++) {
      const float v = warp_sum(acc[r][m]);
      if (lane == 0) red[warp][r * M + m] = v;
    }
  __syncthreads();
  const int r = threadIdx.x / M, m = threadIdx.x % M;
  if (threadIdx.x < R * M && m < rows && n0 + r < N) {
    float s = 0.f;
    for (int i = 0; i < warps; i++) s += red[i][r * M + m];
    y[(long)m * N + n0 + r] = from_float<T>(s);
  }
}
