// GGUF block formats on the GPU (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K): dequantization, the exact
// twin of engine/model/gguf_quants.py, and a small-batch GEMV that reads the packed blocks.
//
// Every format is described by one struct that splits a block into groups of 16 values, each
//   value = a * (u - OFFSET) + b        (b only for formats with a minimum: Q4_1, Q4_K, Q5_K)
// with u a small stored integer. The dequantize kernel evaluates that with the rounding of the
// numpy twin (__fmul_rn / __fadd_rn: no FMA contraction), so it is bit-exact in fp32; the GEMV
// factors a and b out of each group's dot product instead (a * (u . x) + (b - a * OFFSET) *
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
// VALUES / BYTES per block, GROUPS of GV values per block (GV = 16, or 32 where a scale covers 32:
// the K-quants' scale unpacking is then paid once per 32 weights), ALIGN of a block's start, TILE:
// blocks the GEMV stages per step (TILE * BYTES is a multiple of 16). group() gives group g's GV
// stored integers u (unsigned, one per byte of q[GV / 4], value i in byte i % 4 of q[i / 4]) and
// a, b with
//   value = a * (u - OFFSET) + b        (b = 0 unless HAS_MIN)
// Bytes are unpacked four at a time (shift and mask whole words), which keeps the GEMV's integer
// work per weight below what the memory system delivers.

struct Q8_0 {  // int8 q stored as u = q + 128
  static constexpr int VALUES = 32, BYTES = 34, GV = 16, ALIGN = 2, TILE = 16, OFFSET = 128;
  static constexpr bool HAS_MIN = false;
  __device__ static void group(const u8* blk, int g, unsigned* q, float& a, float& b) {
    const Bytes16 t = load16<2>(blk + 2 + 16 * g);
#pragma unroll
    for (int i = 0; i < 4; i++) q[i] = t.u[i] ^ 0x80808080u;
    a = f16_at(blk);
    b = 0.f;
  }
};

struct Q4_0 {  // group 0: low nibbles of the 16 bytes, group 1: high nibbles
  static constexpr int VALUES = 32, BYTES = 18, GV = 16, ALIGN = 2, TILE = 32, OFFSET = 8;
  static constexpr bool HAS_MIN = false;
  __device__ static void group(const u8* blk, int g, unsigned* q, float& a, float& b) {
    const Bytes16 t = load16<2>(blk + 2);
#pragma unroll
    for (int i = 0; i < 4; i++) q[i] = (t.u[i] >> (4 * g)) & 0x0F0F0F0Fu;
    a = f16_at(blk);
    b = 0.f;
  }
};

struct Q4_1 {
  static constexpr int VALUES = 32, BYTES = 20, GV = 16, ALIGN = 4, TILE = 32, OFFSET = 0;
  static constexpr bool HAS_MIN = true;
  __device__ static void group(const u8* blk, int g, unsigned* q, float& a, float& b) {
    const Bytes16 t = load16<4>(blk + 4);
#pragma unroll
    for (int i = 0; i < 4; i++) q[i] = (t.u[i] >> (4 * g)) & 0x0F0F0F0Fu;
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

// a = d * sc, b = -(dmin * mn): a * u + b rounds as (d * sc) * u - dmin * mn does.
__device__ __forceinline__ void k_affine(const u8* blk, int s, float& a, float& b) {
  int sc, mn;
  k_scale(blk, s, sc, mn);
  a = __fmul_rn(f16_at(blk), (float)sc);
  b = -__fmul_rn(f16_at(blk + 2), (float)mn);
}

struct Q4_K {  // group g = sub-block g; each 32-byte run holds 2 sub-blocks (low, high nibbles)
  static constexpr int VALUES = 256, BYTES = 144, GV = 32, ALIGN = 16, TILE = 4, OFFSET = 0;
  static constexpr bool HAS_MIN = true;
  __device__ static void group(const u8* blk, int g, unsigned* q, float& a, float& b) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const Bytes16 t = load16<16>(blk + 16 + (g >> 1) * 32 + 16 * h);
#pragma unroll
      for (int i = 0; i < 4; i++) q[4 * h + i] = (t.u[i] >> (4 * (g & 1))) & 0x0F0F0F0Fu;
    }
    k_affine(blk, g, a, b);
  }
};

struct Q5_K {  // Q4_K's low 4 bits (at 48) plus bit g of qh byte l (at 16) as the fifth
  static constexpr int VALUES = 256, BYTES = 176, GV = 32, ALIGN = 16, TILE = 4, OFFSET = 0;
  static constexpr bool HAS_MIN = true;
  __device__ static void group(const u8* blk, int g, unsigned* q, float& a, float& b) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
      const Bytes16 lo = load16<16>(blk + 48 + (g >> 1) * 32 + 16 * h);
      const Bytes16 hi = load16<16>(blk + 16 + 16 * h);
#pragma unroll
      for (int i = 0; i < 4; i++)
        q[4 * h + i] =
            ((lo.u[i] >> (4 * (g & 1))) & 0x0F0F0F0Fu) | (((hi.u[i] >> g) & 0x01010101u) << 4);
    }
    k_affine(blk, g, a, b);
  }
};

struct Q6_K {  // halves of 128 values: low 4 bits in ql (at 0), high 2 in qh (at 128), int8
               // scales per 16 values (at 192), d (at 208)
  static constexpr int VALUES = 256, BYTES = 210, GV = 16, ALIGN = 2, TILE = 8, OFFSET = 32;
  static constexpr bool HAS_MIN = false;
  __device__ static void group(const u8* blk, int g, unsigned* q, float& a, float& b) {
    const int half = g >> 3, v0 = 16 * (g & 7);  // value v0 + i of the half
    const Bytes16 lo = load16<2>(blk + 64 * half + (v0 & 63));
    const Bytes16 hi = load16<2>(blk + 128 + 32 * half + (v0 & 31));
    const int lo_shift = 4 * (v0 >> 6), hi_shift = 2 * (v0 >> 5);
#pragma unroll
    for (int i = 0; i < 4; i++)
      q[i] = ((lo.u[i] >> lo_shift) & 0x0F0F0F0Fu) | (((hi.u[i] >> hi_shift) & 0x03030303u) << 4);
    a = __fmul_rn(f16_at(blk + 208), (float)(signed char)blk[192 + g]);
    b = 0.f;
  }
};

__device__ __forceinline__ int byte_of(const unsigned* q, int i) {
  return (q[i >> 2] >> (8 * (i & 3))) & 255;
}

// ------------------------------------------------------------------------------------ dequantize

// out (R, K) = the dequantized rows ids[r] (ids null: row r) of w (N, row_bytes).
// Grid: (ceil(K / 16 / 128), R)  Block: (128), one thread per group of GV values
template <class F, typename Out>
__global__ void gguf_dequant_kernel(Out* __restrict__ out, const u8* __restrict__ w,
                                    const int* __restrict__ ids, int K, int row_bytes) {
  const int r = blockIdx.y, gi = blockIdx.x * blockDim.x + threadIdx.x;
  constexpr int GROUPS = F::VALUES / F::GV;
  if (gi >= K / F::GV) return;
  const long src_row = ids ? ids[r] : r;
  const int blk = gi / GROUPS, g = gi % GROUPS;
  unsigned q[F::GV / 4];
  float a, b;
  F::group(w + src_row * row_bytes + (long)blk * F::BYTES, g, q, a, b);
  // NOTE: the GV outputs are assembled in registers and written with 16-byte stores; one
  // 2-byte store per value (32-byte stride across the warp) ran at ~200 GB/s.
  union {
    uint4 v[F::GV * sizeof(Out) / 16];
    Out o[F::GV];
  } vals;
#pragma unroll
  for (int i = 0; i < F::GV; i++) {
    const float u = (float)(byte_of(q, i) - F::OFFSET);  // exact
    const float v = F::HAS_MIN ? __fadd_rn(__fmul_rn(a, u), b) : __fmul_rn(a, u);
    vals.o[i] = from_float<Out>(v);
  }
  uint4* o = reinterpret_cast<uint4*>(out + (long)r * K + (long)gi * F::GV);
#pragma unroll
  for (int i = 0; i < F::GV * (int)sizeof(Out) / 16; i++) o[i] = vals.v[i];
}

// ------------------------------------------------------------------------------------ GEMV

constexpr int GG_WARPS = 4;  // warps per GEMV block, each with row groups of its own

// Stored integer i of q as a float without an int-to-float conversion (a quarter-rate instruction
// that would bound the GEMV below the memory bandwidth): one byte permute builds the float's bits.
//   narrow (u < 128): bits 0x40 u 00 00 = 2 + u / 64 exactly; the caller takes out the 2 and 1/64
//     (sum (2 + u/64) x = 2 sum x + sum u x / 64, no cancellation worth a bit at these sizes);
//   WIDE: bits 0x4B 00 00 u = 2^23 + u exactly, minus 2^23 + OFFSET: u - OFFSET.
template <bool WIDE, int OFFSET>
__device__ __forceinline__ float weight_float(const unsigned* q, int i) {
  if (WIDE)
    return __uint_as_float(__byte_perm(q[i >> 2], 0x4B000000u, 0x7650 | (i & 3))) -
           (8388608.f + (float)OFFSET);
  return __uint_as_float(__byte_perm(q[i >> 2], 0x40000000u, 0x7054 | ((i & 3) << 8)));
}

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

// 16 bytes global -> shared without passing through registers (sm_80+), so a warp keeps many
// tiles in flight: a decode GEMV reads each weight once, and only bytes in flight hide latency.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

constexpr int GG_STAGE_BYTES = 8192;  // shared memory per warp for tiles in flight

// y (rows, N) = x (rows, K) @ dequantized(w)^T, rows <= M.
// Work: row groups of R weight rows (each x load serves the R rows; R = cuda_kernels.GGUF_GEMV_R,
// others compiled for kernel_check), each cut into tiles of TILE blocks. Every warp owns the row
// groups gwarp, gwarp + total warps, ... and streams their tiles, one row group after the other,
// through a ring of STAGES shared-memory slots with cp.async: STAGES - 1 tiles stay in flight
// while it computes on one, across row-group boundaries, so the grid runs as a stream (device run
// 2: a warp that loaded one tile and then computed left the GPU waiting, ~30% of bandwidth).
// Lanes take groups; a finished row group is summed over the warp and written by lane 0.
// A row that does not start on 16 bytes is read from the 16-byte word holding its first byte and
// sits `shift` bytes into the staged tile: shift is a multiple of the format's ALIGN (row_bytes
// is a multiple of BYTES), so blocks keep their alignment in shared memory. The last row's last
// word may cover up to 15 bytes past the weight, inside the 512-byte-rounded allocation.
// Grid: (a few blocks per SM, at most ceil(N / R / GG_WARPS))  Block: (32 * GG_WARPS)
template <class F, typename T, int M, int R>
__global__ void __launch_bounds__(32 * GG_WARPS)
gguf_gemv_kernel(T* __restrict__ y, const T* __restrict__ x, const u8* __restrict__ w, int N,
                 int K, int rows, int row_bytes) {
  constexpr bool WIDE = F::OFFSET >= 128;  // stored integers up to 255 (Q8_0)
  constexpr bool NEED_SUM = !WIDE || F::HAS_MIN;  // C != 0: the group needs sum(x)
  constexpr int GROUPS = F::VALUES / F::GV;
  constexpr int TILE_WORDS = F::TILE * F::BYTES / 16 + 1;  // + 1 for a row's shift
  constexpr int FIT = GG_STAGE_BYTES / (R * TILE_WORDS * 16);
  constexpr int STAGES = FIT < 2 ? 2 : (FIT > 8 ? 8 : FIT);
  __shared__ uint4 tile[GG_WARPS][STAGES][R][TILE_WORDS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int total_warps = gridDim.x * GG_WARPS, gwarp = blockIdx.x * GG_WARPS + warp;
  const int num_groups = (N + R - 1) / R;
  const int nb = K / F::VALUES;
  const int ntiles = (nb + F::TILE - 1) / F::TILE;
  const int items = gwarp < num_groups ? (num_groups - gwarp + total_warps - 1) / total_warps
                                             * ntiles : 0;
  // item j (row group gwarp + (j / ntiles) * total_warps, tile j % ntiles) into slot j % STAGES;
  // one commit group each, empty ones too, so that the wait count stays uniform
  auto issue = [&](int j) {
    if (j < items) {
      const int rg = gwarp + (j / ntiles) * total_warps, t = j % ntiles;
#pragma unroll
      for (int r = 0; r < R; r++) {
        const long start = (long)min(rg * R + r, N - 1) * row_bytes;
        const uint4* src = reinterpret_cast<const uint4*>(w + (start & ~15L));
        const int row_words = (int)(((start + row_bytes + 15) >> 4) - (start >> 4));
        for (int wi = lane; wi < TILE_WORDS; wi += 32) {
          const int gw = t * (TILE_WORDS - 1) + wi;  // tiles advance by whole tile bytes
          if (gw < row_words) cp_async16(&tile[warp][j % STAGES][r][wi], src + gw);
        }
      }
    }
    cp_async_commit();
  };

  float acc[R][M];
#pragma unroll
  for (int r = 0; r < R; r++)
#pragma unroll
    for (int m = 0; m < M; m++) acc[r][m] = 0.f;
#pragma unroll
  for (int j = 0; j < STAGES - 1; j++) issue(j);
  for (int j = 0; j < items; j++) {
    issue(j + STAGES - 1);        // into the slot freed by the previous item
    cp_async_wait<STAGES - 1>();  // this lane's copies of item j have landed
    __syncwarp();                 // and every lane's
    const int rg = gwarp + (j / ntiles) * total_warps, t = j % ntiles;
    const int groups = min(F::TILE, nb - t * F::TILE) * GROUPS;
    for (int gi = lane; gi < groups; gi += 32) {
      const int b = gi / GROUPS, g = gi % GROUPS;
      unsigned q[R][F::GV / 4];
      float A[R], C[R];  // the group adds A * s + C * sum(x), s as below
#pragma unroll
      for (int r = 0; r < R; r++) {
        const int shift = (int)(((long)min(rg * R + r, N - 1) * row_bytes) & 15);
        float a, bm;
        F::group(reinterpret_cast<const u8*>(tile[warp][j % STAGES][r]) + shift + b * F::BYTES,
                 g, q[r], a, bm);
        A[r] = WIDE ? a : 64.f * a;
        C[r] = WIDE ? bm : bm - a * (float)(F::OFFSET + 128);
      }
      const int k0 = (t * F::TILE + b) * F::VALUES + F::GV * g;
#pragma unroll
      for (int m = 0; m < M; m++) {
        if (m < rows) {
          // two interleaved partial sums halve the dependent chains
          float xv[F::GV], sx[2] = {0.f, 0.f};
#pragma unroll
          for (int i = 0; i < F::GV; i += 16) load_x16(x + (long)m * K + k0 + i, xv + i);
          if (NEED_SUM) {
#pragma unroll
            for (int i = 0; i < F::GV; i++) sx[i & 1] += xv[i];
          }
#pragma unroll
          for (int r = 0; r < R; r++) {
            float sw[2] = {0.f, 0.f};
#pragma unroll
            for (int i = 0; i < F::GV; i++)
              sw[i & 1] = fmaf(weight_float<WIDE, F::OFFSET>(q[r], i), xv[i], sw[i & 1]);
            const float base = NEED_SUM ? fmaf(C[r], sx[0] + sx[1], acc[r][m]) : acc[r][m];
            acc[r][m] = fmaf(A[r], sw[0] + sw[1], base);
          }
        }
      }
    }
    __syncwarp();  // the slot is read before a later issue() overwrites it
    if (t == ntiles - 1) {  // the row group is done (warp-uniform branch)
#pragma unroll
      for (int r = 0; r < R; r++)
#pragma unroll
        for (int m = 0; m < M; m++) {
          const float v = warp_sum(acc[r][m]);
          acc[r][m] = 0.f;
          if (lane == 0 && m < rows && rg * R + r < N)
            y[(long)m * N + rg * R + r] = from_float<T>(v);
        }
    }
  }
  cp_async_wait<0>();
}
