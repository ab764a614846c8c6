// GGUF block formats on the GPU (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K): dequantization, the exact
// twin of engine/model/gguf_quants.py, and a small-batch GEMV that reads the packed blocks.
//
// Every format is described by one struct that splits a block into groups of GV values (16; 32
// for Q4_K and Q5_K), each
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

// ------------------------------------------------------------------------------------ GEMV v2
// A second decode GEMV for Q4_K and Q8_0 ("auto" takes it where cuda_quant_gguf.gemv_version
// says, PAGEDSERVE_GGUF_GEMV=v2 forces it),
// built to be bound by the memory system rather than by instructions or latency:
// - x (M rows) is staged once per block in shared memory as float, in the order the lanes read
//   it (g2_pos): a warp step covers 2048 values of a weight row, 64 per lane, and lane l's i-th
//   float4 sits at 128 * i + 4 * l floats, so a warp's 16-byte reads hit 32 distinct banks and
//   every offset is a compile-time constant. Sums of x per 32 values are staged with it.
// - every lane loads 16-byte words of the packed row straight into registers, and the next
//   warp step's words are in flight while it computes on the current ones (one row after the
//   other, a warp keeps streaming across row boundaries); several blocks per SM.
// - the weight's stored integers become floats by one byte permute each (weight_float's tricks),
//   scales are unpacked once per 32 or 64 values, and each weight serves the M rows of x.
// K must be a multiple of 2048 (Llama-3-8B's 4096 and 14336 are); other shapes take the first GEMV.

constexpr int G2_WARPS = 8;     // warps per block
constexpr int G2_CHUNK = 2048;  // values of a weight row per warp step: 64 a lane

// where x value k (of one row) sits in the staged copy
__device__ __forceinline__ int g2_pos(int k) {
  return (k & ~(G2_CHUNK - 1)) | ((k & 63) >> 2 << 7) | ((k >> 6 & 31) << 2) | (k & 3);
}

__device__ __forceinline__ uint4 ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ unsigned word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// 2 + u / 64 for the stored integer u < 128 in byte e of v (weight_float's narrow form)
__device__ __forceinline__ float narrow_float(unsigned v, int e) {
  return __uint_as_float(__byte_perm(v, 0x40000000u, 0x7054 | (e << 8)));
}

// Q4_K: lane l takes block l / 4 of the warp step's 8 and in it the 64 values of sub-blocks
// 2p, 2p + 1 (p = l % 4): qs words 2p and 2p + 1 (low nibbles: sub-block 2p, high: 2p + 1) and
// the block's first word (d, dmin, the 12 scale bytes), which the block's 4 lanes load together.
// R weight rows at once share each x read from shared memory (R = 1: 4 bytes of x per weight
// read from shared memory, which bounds the product before the memory does).
template <int R>
struct G2_Q4_K {
  static constexpr int ROWS = R, WORDS = 3 * R, STAGE = 0;
  static constexpr int STEPS = R == 1 ? 2 : 1;  // warp steps loaded at once: 96 bytes a lane
  __device__ static void load(uint4* r, const u8* const* rows, int step, int lane) {
#pragma unroll
    for (int ri = 0; ri < R; ri++) {
      const u8* blk = rows[ri] + (step * 8 + (lane >> 2)) * 144;
      r[3 * ri] = ldg16(blk);
      r[3 * ri + 1] = ldg16(blk + 16 + 32 * (lane & 3));
      r[3 * ri + 2] = ldg16(blk + 32 + 32 * (lane & 3));
    }
  }
  template <int M>
  __device__ static void dot(const uint4* r, const float* xs, const float* xsum, int K, int step,
                             int lane, uint4*, float* acc) {
    const int p = lane & 3;
    float A[R][2], C[R][2];  // sub-block t adds A * sum (2 + u / 64) x + C * sum x (64 a, b - 128 a)
#pragma unroll
    for (int ri = 0; ri < R; ri++) {
      const uint4 hd = r[3 * ri];
      const float d = __half2float(__ushort_as_half((unsigned short)(hd.x & 0xFFFF)));
      const float dmin = __half2float(__ushort_as_half((unsigned short)(hd.x >> 16)));
#pragma unroll
      for (int t = 0; t < 2; t++) {  // gguf_quants.k_scales for sub-block 2p + t, no branches
        const int sh = 8 * ((2 * p + t) & 3);
        const unsigned yb = (hd.y >> sh) & 255, zb = (hd.z >> sh) & 255, wb = (hd.w >> sh) & 255;
        const unsigned sc = p < 2 ? yb & 63 : (wb & 15) | (yb >> 6 << 4);
        const unsigned mn = p < 2 ? zb & 63 : (wb >> 4) | (zb >> 6 << 4);
        const float a = __fmul_rn(d, (float)sc), b = -__fmul_rn(dmin, (float)mn);
        A[ri][t] = 64.f * a;
        C[ri][t] = b - 128.f * a;
      }
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
      const float4* x4 = reinterpret_cast<const float4*>(xs + (long)m * K) + step * 512 + lane;
      float s[R][2][2];  // [row][sub-block][partial]
#pragma unroll
      for (int ri = 0; ri < R; ri++) s[ri][0][0] = s[ri][0][1] = s[ri][1][0] = s[ri][1][1] = 0.f;
#pragma unroll
      for (int h = 0; h < 2; h++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
          const float4 xl = x4[(4 * h + i) * 32], xh = x4[(8 + 4 * h + i) * 32];
          const int c = i & 1;
#pragma unroll
          for (int ri = 0; ri < R; ri++) {
            const unsigned q = word_of(r[3 * ri + 1 + h], i);
            const unsigned lo = q & 0x0F0F0F0Fu, hi = (q >> 4) & 0x0F0F0F0Fu;
            float(&t)[2][2] = s[ri];
            t[0][c] = fmaf(narrow_float(lo, 0), xl.x, t[0][c]);
            t[1][c] = fmaf(narrow_float(hi, 0), xh.x, t[1][c]);
            t[0][c] = fmaf(narrow_float(lo, 1), xl.y, t[0][c]);
            t[1][c] = fmaf(narrow_float(hi, 1), xh.y, t[1][c]);
            t[0][c] = fmaf(narrow_float(lo, 2), xl.z, t[0][c]);
            t[1][c] = fmaf(narrow_float(hi, 2), xh.z, t[1][c]);
            t[0][c] = fmaf(narrow_float(lo, 3), xl.w, t[0][c]);
            t[1][c] = fmaf(narrow_float(hi, 3), xh.w, t[1][c]);
          }
        }
      const float2 sx =
          reinterpret_cast<const float2*>(xsum + (long)m * (K / 32))[step * 32 + lane];
#pragma unroll
      for (int ri = 0; ri < R; ri++) {
        float& a = acc[ri * M + m];
        a = fmaf(A[ri][0], s[ri][0][0] + s[ri][0][1], fmaf(C[ri][0], sx.x, a));
        a = fmaf(A[ri][1], s[ri][1][0] + s[ri][1][1], fmaf(C[ri][1], sx.y, a));
      }
    }
  }
};

// Q8_0: a warp step's 64 blocks are 2176 bytes (136 words; 34-byte blocks leave no lane a
// 16-byte aligned block of its own), loaded by the warp word after word (words l, l + 32, ...)
// and passed through shared memory, from which lane l reads blocks 2l, 2l + 1 as 17 32-bit
// words (68 l bytes in: a 17-word stride, no bank conflict). Rows start on 16 bytes: K is a
// multiple of 2048, so row_bytes of 2176.
struct G2_Q8_0 {
  static constexpr int ROWS = 1, WORDS = 5, STEPS = 1, STAGE = 136;
  __device__ static void load(uint4* r, const u8* const* rows, int step, int lane) {
    const u8* src = rows[0] + step * 2176 + 16 * lane;
#pragma unroll
    for (int i = 0; i < 4; i++) r[i] = ldg16(src + 512 * i);
    if (lane < 8) r[4] = ldg16(src + 2048);
  }
  template <int M>
  __device__ static void dot(const uint4* r, const float* xs, const float*, int K, int step,
                             int lane, uint4* stage, float* acc) {
    __syncwarp();  // every lane has read the previous step's words
#pragma unroll
    for (int i = 0; i < 4; i++) stage[lane + 32 * i] = r[i];
    if (lane < 8) stage[128 + lane] = r[4];
    __syncwarp();
    const unsigned* src = reinterpret_cast<const unsigned*>(stage) + 17 * lane;
    const float d0 = __half2float(__ushort_as_half((unsigned short)(src[0] & 0xFFFF)));
    const float d1 = __half2float(__ushort_as_half((unsigned short)(src[8] >> 16)));
    unsigned u[17];  // the stored integers + 128, as unsigned bytes
#pragma unroll
    for (int i = 0; i < 17; i++) u[i] = src[i] ^ 0x80808080u;
#pragma unroll
    for (int m = 0; m < M; m++) {
      const float4* x4 = reinterpret_cast<const float4*>(xs + (long)m * K) + step * 512 + lane;
      float s[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [block][partial]
#pragma unroll
      for (int g = 0; g < 8; g++) {  // values 4g .. 4g + 3 of both blocks
        const float4 x0 = x4[g * 32], x1 = x4[(8 + g) * 32];
        const float xa[4] = {x0.x, x0.y, x0.z, x0.w}, xb[4] = {x1.x, x1.y, x1.z, x1.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int j = 4 * g + e, c = e & 1;  // block 0's value j is byte 2 + j, block 1's 36 + j
          const float w0 = __uint_as_float(__byte_perm(u[(2 + j) >> 2], 0x4B000000u,
                                                       0x7650 | ((2 + j) & 3))) - 8388736.f;
          const float w1 =
              __uint_as_float(__byte_perm(u[9 + (j >> 2)], 0x4B000000u, 0x7650 | (j & 3))) -
              8388736.f;
          s[0][c] = fmaf(w0, xa[e], s[0][c]);
          s[1][c] = fmaf(w1, xb[e], s[1][c]);
        }
      }
      acc[m] = fmaf(d0, s[0][0] + s[0][1], fmaf(d1, s[1][0] + s[1][1], acc[m]));
    }
  }
};

// 8 values of T from p (16-byte aligned) as they are stored: W = sizeof(T) / 2 words
template <typename T>
__device__ __forceinline__ void load_raw8(const T* p, uint4* r) {
#pragma unroll
  for (int i = 0; i < (int)sizeof(T) / 2; i++) r[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
}

template <typename T>
__device__ __forceinline__ void raw_to_float8(const uint4* r, float* f) {
  const T* h = reinterpret_cast<const T*>(r);
#pragma unroll
  for (int e = 0; e < 8; e++) f[e] = to_float(h[e]);
}

// x's staged copy (module comment): x (M, K) itself, or with NORM (add_rms_norm_linear)
// rms_norm(x + residual) * norm_w, with block 0 writing x + residual to res_out; each value
// rounded to T where rms_norm_kernel rounds it, so the product sees what add_rms_norm would hand
// the GEMV. flags: NORM_W_EARLY (common.cuh). Ends with a barrier.
template <typename T, int M, bool NORM>
__device__ __forceinline__ void g2_stage_x(float* xs, float* xsum, const T* __restrict__ x,
                                           int K, int rows, const T* __restrict__ residual,
                                           const T* __restrict__ norm_w, T* __restrict__ res_out,
                                           float eps, int flags) {
  __shared__ float red[32];
  constexpr int STRIDE = 8 * 32 * G2_WARPS;  // every thread runs the same count (K % 2048 == 0)
  // NOTE: a thread's loads for U strides are issued before any is used: one at a time, the 7
  // strides of K = 14336 cost 7 L2 round trips before the first product. (A SiLU-and-mul fused
  // here the same way stayed 1-3 us slower than its own launch on the device, runs 2 and 3:
  // every block recomputes it, K = 14336 exponentials.)
  constexpr int U = NORM ? 2 : 4, W = sizeof(T) / 2;  // W: 16-byte words of 8 values
  auto put_sums = [&](int m, int k, const float* f) {  // sums of 32 values: 4 threads' 8
    float s = ((f[0] + f[1]) + (f[2] + f[3])) + ((f[4] + f[5]) + (f[6] + f[7]));
    s += __shfl_xor_sync(0xffffffffu, s, 1);
    s += __shfl_xor_sync(0xffffffffu, s, 2);
    if ((threadIdx.x & 3) == 0) xsum[m * (K / 32) + k / 32] = s;
  };
  const bool w_early = NORM && (flags & NORM_W_EARLY) && K <= U * STRIDE;
  uint4 g[U][W];  // the norm weight with w_early, from the first pass to the second
  for (int m = 0; m < M; m++) {
    float ss = 0.f;
    for (int k0 = 8 * threadIdx.x; k0 < K; k0 += U * STRIDE) {
      uint4 a[U][W], b[U][W];  // x; the residual (NORM)
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int k = k0 + u * STRIDE;
        if (m >= rows || k >= K) continue;
        load_raw8(x + (long)m * K + k, a[u]);
        if (NORM && residual != nullptr) load_raw8(residual + (long)m * K + k, b[u]);
        if (w_early) load_raw8(norm_w + k, g[u]);
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int k = k0 + u * STRIDE;
        if (k >= K) break;  // the same for the whole block
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (m < rows) {
          raw_to_float8<T>(a[u], f);
          if constexpr (NORM) {
            union {
              uint4 v[W];
              T h[8];
            } sum;
            float r[8];
            if (residual != nullptr) raw_to_float8<T>(b[u], r);
#pragma unroll
            for (int e = 0; e < 8; e++) {
              sum.h[e] = from_float<T>(residual != nullptr ? f[e] + r[e] : f[e]);
              f[e] = to_float(sum.h[e]);
              ss += f[e] * f[e];
            }
            if (blockIdx.x == 0) {
#pragma unroll
              for (int i = 0; i < W; i++)
                reinterpret_cast<uint4*>(res_out + (long)m * K + k)[i] = sum.v[i];
            }
          }
        }
        float4* dst = reinterpret_cast<float4*>(xs + m * K + g2_pos(k));
        dst[0] = make_float4(f[0], f[1], f[2], f[3]);
        dst[32] = make_float4(f[4], f[5], f[6], f[7]);  // values k + 4 .. k + 7: the next float4
        if constexpr (!NORM) put_sums(m, k, f);
      }
    }
    if constexpr (NORM) {  // each thread rescales the values it staged itself
      const float inv = rsqrtf(block_sum(ss, red) / K + eps);
      for (int k0 = 8 * threadIdx.x; k0 < K; k0 += U * STRIDE) {
#pragma unroll
        for (int u = 0; u < U; u++)
          if (!w_early && k0 + u * STRIDE < K) load_raw8(norm_w + k0 + u * STRIDE, g[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
          const int k = k0 + u * STRIDE;
          if (k >= K) break;
          float4* dst = reinterpret_cast<float4*>(xs + m * K + g2_pos(k));
          const float4 lo = dst[0], hi = dst[32];
          float f[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w}, w8[8];
          raw_to_float8<T>(g[u], w8);
#pragma unroll
          for (int e = 0; e < 8; e++) f[e] = to_float(from_float<T>(f[e] * inv * w8[e]));
          dst[0] = make_float4(f[0], f[1], f[2], f[3]);
          dst[32] = make_float4(f[4], f[5], f[6], f[7]);
          put_sums(m, k, f);
        }
      }
    }
  }
  __syncthreads();
}

// y (rows, N) = x (rows, K) @ dequantized(w)^T, rows <= M, x as NORM makes it (g2_stage_x; the
// extra arguments are null without NORM). Warp gw of the grid takes the groups of
// F::ROWS weight rows gw, gw + (warps in the grid), ...; each group is K / 2048 warp steps,
// loaded F::STEPS at a time one load ahead of the compute. Dynamic shared memory: M K floats of x, M K / 32 sums,
// G2_WARPS * F::STAGE words (cuda_quant_gguf.gemv2_smem).
// Grid: (at most what stays resident, cuda_quant_gguf.gemv2)  Block: (32 * G2_WARPS)
template <class F, typename T, int M, bool NORM>
__global__ void __launch_bounds__(32 * G2_WARPS, M == 1 ? 3 : 2)
gguf_gemv2_kernel(T* __restrict__ y, const T* __restrict__ x, const u8* __restrict__ w, int N,
                  int K, int rows, int row_bytes, const T* __restrict__ residual,
                  const T* __restrict__ norm_w, T* __restrict__ res_out, float eps, int flags) {
  extern __shared__ uint4 g2_smem[];
  float* xs = reinterpret_cast<float*>(g2_smem);
  float* xsum = xs + M * K;
  uint4* stage = reinterpret_cast<uint4*>(xsum + M * (K / 32)) + (threadIdx.x >> 5) * F::STAGE;
  const int lane = threadIdx.x & 31;
  const int total_warps = gridDim.x * G2_WARPS, gw = blockIdx.x * G2_WARPS + (threadIdx.x >> 5);
  constexpr int R = F::ROWS;  // weight rows a warp takes at once: row group g is rows R g ..
  const int steps = K / G2_CHUNK, per_row = (steps + F::STEPS - 1) / F::STEPS;
  const int groups = (N + R - 1) / R;
  const int items = gw < groups ? (groups - gw + total_warps - 1) / total_warps * per_row : 0;
  uint4 cur[F::STEPS][F::WORDS], nxt[F::STEPS][F::WORDS];
  auto load = [&](uint4 (*r)[F::WORDS], int j) {
    const int g = gw + j / per_row * total_warps;
    const u8* rows[R];  // a group past N's last row reads that row again (and writes nothing)
#pragma unroll
    for (int i = 0; i < R; i++) rows[i] = w + (long)min(g * R + i, N - 1) * row_bytes;
    const int s0 = j % per_row * F::STEPS;
#pragma unroll
    for (int s = 0; s < F::STEPS; s++)
      if (s0 + s < steps) F::load(r[s], rows, s0 + s, lane);
  };
  if (items > 0) load(cur, 0);  // weights are never written: they may stream before the wait
  pdl_wait();
  g2_stage_x<T, M, NORM>(xs, xsum, x, K, rows, residual, norm_w, res_out, eps, flags);
  pdl_trigger();
  float acc[R * M];  // [row of the group][m]
#pragma unroll
  for (int i = 0; i < R * M; i++) acc[i] = 0.f;
  for (int j = 0; j < items; j++) {
    if (j + 1 < items) load(nxt, j + 1);
    const int s0 = j % per_row * F::STEPS;
#pragma unroll
    for (int s = 0; s < F::STEPS; s++)
      if (s0 + s < steps) F::template dot<M>(cur[s], xs, xsum, K, s0 + s, lane, stage, acc);
    if (j % per_row == per_row - 1) {  // the row group is done (warp-uniform)
      const int row0 = (gw + j / per_row * total_warps) * R;
#pragma unroll
      for (int i = 0; i < R; i++)
#pragma unroll
        for (int m = 0; m < M; m++) {
          const float v = warp_sum(acc[i * M + m]);
          acc[i * M + m] = 0.f;
          if (lane == 0 && m < rows && row0 + i < N) y[(long)m * N + row0 + i] = from_float<T>(v);
        }
    }
#pragma unroll
    for (int s = 0; s < F::STEPS; s++)
#pragma unroll
      for (int i = 0; i < F::WORDS; i++) cur[s][i] = nxt[s][i];
  }
}
