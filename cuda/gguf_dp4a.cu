// GGUF GEMV v3: the activation quantized to int8, integer dot products on the packed weights.
// The exact twin is engine/model/gguf_dot.py (the numpy backend multiplies these formats with it).
//
// Why: v2 (gguf.cu) turns every weight into a float and multiplies it by a float x read from
// shared memory: ~2.5 instructions and 4 bytes of shared memory per weight, which bounds Q4_K
// at 40-60% of the memory bandwidth. Here each block quantizes x once (per 32 values: int8 q,
// a float scale dx = amax / 127 and the integer sum of q), and four weights take one __dp4a on
// their raw nibbles or bytes; the weight's (sub-)block scales apply once per 32 values in float:
//   Q8_0  y += dx * d * (q_w . q_x)
//   Q4_K  y += dx * (a * (u . q_x) - b * sum q_x)     a = d * sc, b = dmin * mn (gguf_quants)
//   Q6_K  y += dx * d * (sc0 * ((u - 32) . q_x)_0 + sc1 * (...)_1)   int8 sc per 16 values
// The integer dot products are exact, so the kernel equals the twin up to float summation order.
// NOTE: x's quantization is the twin's bit for bit: id = 127 / amax and dx = amax / 127 are
// correctly rounded divisions, q = x * id (one rounding) rounded half to even (__float2int_rn,
// numpy's rint), |q| <= 127.
//
// Layout as v2: a warp step covers 2048 values of a weight row, lane l takes values 64 l ..
// 64 l + 63 of it; x's int8 copy sits in the lanes' read order (g3_pos), so a warp's 16-byte
// reads of x hit distinct banks; dx and the sums stay in value order (a lane reads its two as a
// float2 / int2). K must be a multiple of 2048; weights are read in 16-byte words straight into
// registers, a step ahead of the compute; the first ones before the PDL wait. Every format is a
// struct: WORDS 16-byte words a lane loads per step, STEPS steps per load, STAGE shared words
// per warp, BIG warps for the one-block-per-SM form at M = 1, load() and dot(). At M = 1 three
// blocks of G3_WARPS fit per SM (85 registers; 4 would spill).
#include "common.cuh"

typedef unsigned char u8;

constexpr int G3_WARPS = 8;     // warps per block (a GEMV's W: G3_WARPS, or F::BIG at M = 1)
constexpr int G3_CHUNK = 2048;  // values of a weight row per warp step: 64 a lane
// SPLIT's item sums a block holds: (outputs of the block) x (loads per row), at most
// (cuda_quant_gguf.G3_SPLIT_MAX)
constexpr int G3_SPLIT_MAX = 512;

// byte of x value k in the staged int8 copy: 16-byte word i (values 16 i .. of lane l's 64) of
// warp step s at word 128 s + 32 i + l
__device__ __forceinline__ int g3_pos(int k) {
  return (k & ~(G3_CHUNK - 1)) | ((k >> 4 & 3) << 9) | ((k >> 6 & 31) << 4) | (k & 15);
}

__device__ __forceinline__ uint4 g3_ldg16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ float g3_f16(unsigned bits) {
  return __half2float(__ushort_as_half((unsigned short)(bits & 0xFFFF)));
}

// Q4_K: lane l takes block l / 4 of the step's 8 and in it sub-blocks 2p, 2p + 1 (p = l % 4):
// the 32 qs bytes of run p (low nibbles: sub-block 2p, high: 2p + 1) and the block's first
// 16 bytes (d, dmin, 12 scale bytes), which the block's 4 lanes load together.
struct G3_Q4_K {
  static constexpr int WORDS = 3, STEPS = 2, STAGE = 0, BIG = 24;  // 2 steps: 96 bytes a lane
  __device__ static void load(uint4* r, const u8* row, int step, int lane) {
    const u8* blk = row + (step * 8 + (lane >> 2)) * 144;
    r[0] = g3_ldg16(blk);
    r[1] = g3_ldg16(blk + 16 + 32 * (lane & 3));
    r[2] = g3_ldg16(blk + 32 + 32 * (lane & 3));
  }
  template <int M>
  __device__ static void dot(const uint4* r, const u8* xq, const float* xd, const int* xs, int K,
                             int step, int lane, uint4*, float* acc) {
    const int p = lane & 3;
    const uint4 hd = r[0];
    const float d = g3_f16(hd.x), dmin = g3_f16(hd.x >> 16);
    float a[2], b[2];
#pragma unroll
    for (int t = 0; t < 2; t++) {  // gguf_quants.k_scales for sub-block 2p + t, no branches
      const int sh = 8 * ((2 * p + t) & 3);
      const unsigned yb = (hd.y >> sh) & 255, zb = (hd.z >> sh) & 255, wb = (hd.w >> sh) & 255;
      const unsigned sc = p < 2 ? yb & 63 : (wb & 15) | (yb >> 6 << 4);
      const unsigned mn = p < 2 ? zb & 63 : (wb >> 4) | (zb >> 6 << 4);
      a[t] = __fmul_rn(d, (float)sc);
      b[t] = __fmul_rn(dmin, (float)mn);
    }
    const unsigned q[8] = {r[1].x, r[1].y, r[1].z, r[1].w, r[2].x, r[2].y, r[2].z, r[2].w};
#pragma unroll
    for (int m = 0; m < M; m++) {
      const uint4* xw = reinterpret_cast<const uint4*>(xq + (long)m * K) + step * 128 + lane;
      const uint4 x0 = xw[0], x1 = xw[32], x2 = xw[64], x3 = xw[96];
      const int xl[8] = {(int)x0.x, (int)x0.y, (int)x0.z, (int)x0.w,
                         (int)x1.x, (int)x1.y, (int)x1.z, (int)x1.w};
      const int xh[8] = {(int)x2.x, (int)x2.y, (int)x2.z, (int)x2.w,
                         (int)x3.x, (int)x3.y, (int)x3.z, (int)x3.w};
      int s0 = 0, s1 = 0;
#pragma unroll
      for (int j = 0; j < 8; j++) {
        s0 = __dp4a((int)(q[j] & 0x0F0F0F0Fu), xl[j], s0);
        s1 = __dp4a((int)((q[j] >> 4) & 0x0F0F0F0Fu), xh[j], s1);
      }
      const int i = (long)m * (K / 32) / 2 + step * 32 + lane;
      const float2 dx = reinterpret_cast<const float2*>(xd)[i];
      const int2 sx = reinterpret_cast<const int2*>(xs)[i];
      acc[m] += dx.x * (a[0] * (float)s0 - b[0] * (float)sx.x) +
                dx.y * (a[1] * (float)s1 - b[1] * (float)sx.y);
    }
  }
};

// Q8_0: a warp step's 64 blocks are 2176 bytes (136 words: 34-byte blocks leave no lane a
// 16-byte aligned block of its own), loaded by the warp word after word and passed through
// shared memory, from which lane l reads blocks 2l, 2l + 1 as 17 32-bit words (68 l bytes in:
// a 17-word stride, no bank conflict). Block 2l's quants start 2 bytes into a word: one byte
// permute realigns each 4. Rows start on 16 bytes (K a multiple of 2048: row_bytes of 2176).
struct G3_Q8_0 {
  static constexpr int WORDS = 5, STEPS = 1, STAGE = 136, BIG = 32;
  __device__ static void load(uint4* r, const u8* row, int step, int lane) {
    const u8* src = row + step * 2176 + 16 * lane;
#pragma unroll
    for (int i = 0; i < 4; i++) r[i] = g3_ldg16(src + 512 * i);
    if (lane < 8) r[4] = g3_ldg16(src + 2048);
  }
  template <int M>
  __device__ static void dot(const uint4* r, const u8* xq, const float* xd, const int*, int K,
                             int step, int lane, uint4* stage, float* acc) {
    __syncwarp();  // every lane has read the previous step's words
#pragma unroll
    for (int i = 0; i < 4; i++) stage[lane + 32 * i] = r[i];
    if (lane < 8) stage[128 + lane] = r[4];
    __syncwarp();
    const unsigned* src = reinterpret_cast<const unsigned*>(stage) + 17 * lane;
    unsigned u[17];
#pragma unroll
    for (int i = 0; i < 17; i++) u[i] = src[i];
    const float d0 = g3_f16(u[0]), d1 = g3_f16(u[8] >> 16);
    int w0[8];  // block 2l's 32 quants, realigned
#pragma unroll
    for (int j = 0; j < 8; j++) w0[j] = (int)__byte_perm(u[j], u[j + 1], 0x5432);
#pragma unroll
    for (int m = 0; m < M; m++) {
      const uint4* xw = reinterpret_cast<const uint4*>(xq + (long)m * K) + step * 128 + lane;
      const uint4 x0 = xw[0], x1 = xw[32], x2 = xw[64], x3 = xw[96];
      const int xa[8] = {(int)x0.x, (int)x0.y, (int)x0.z, (int)x0.w,
                         (int)x1.x, (int)x1.y, (int)x1.z, (int)x1.w};
      const int xb[8] = {(int)x2.x, (int)x2.y, (int)x2.z, (int)x2.w,
                         (int)x3.x, (int)x3.y, (int)x3.z, (int)x3.w};
      int s0 = 0, s1 = 0;
#pragma unroll
      for (int j = 0; j < 8; j++) {
        s0 = __dp4a(w0[j], xa[j], s0);
        s1 = __dp4a((int)u[9 + j], xb[j], s1);
      }
      const float2 dx = reinterpret_cast<const float2*>(xd)[(long)m * (K / 32) / 2 +
                                                             step * 32 + lane];
      acc[m] += dx.x * (d0 * (float)s0) + dx.y * (d1 * (float)s1);
    }
  }
};

// Q6_K: a warp step's 8 blocks are 1680 bytes (105 words; 210-byte blocks start on 2 bytes),
// loaded by the warp word after word and passed through shared memory. Lane l takes block
// b = l / 4 and in it values 64 p .. 64 p + 63 (p = l % 4), i.e. of half h = p / 2 the values
// 64 s .. 64 s + 63 (s = p % 2): nibble s of the 64 ql bytes at 64 h, bits 4 s and 4 s + 2 of
// the 32 qh bytes at 128 + 32 h, the 4 int8 scales at 192 + 8 h + 4 s, d at 208. An odd
// block starts 2 bytes into a word: each word is a funnel shift of two (the 16 lanes' distinct
// ql addresses fall on distinct banks). Per 16 values (u - 32) . q = u . q - 32 sum q, the sum
// by a dp4a with ones.
struct G3_Q6_K {
  // the stage holds one word more than the step: block 7's d is read as half of a pair
  static constexpr int WORDS = 4, STEPS = 1, STAGE = 106, BIG = 24;
  __device__ static void load(uint4* r, const u8* row, int step, int lane) {
    const u8* src = row + step * 1680 + 16 * lane;
#pragma unroll
    for (int i = 0; i < 3; i++) r[i] = g3_ldg16(src + 512 * i);
    if (lane < 9) r[3] = g3_ldg16(src + 1536);
  }
  template <int M>
  __device__ static void dot(const uint4* r, const u8* xq, const float* xd, const int*, int K,
                             int step, int lane, uint4* stage, float* acc) {
    __syncwarp();  // every lane has read the previous step's words
#pragma unroll
    for (int i = 0; i < 3; i++) stage[lane + 32 * i] = r[i];
    if (lane < 9) stage[96 + lane] = r[3];
    __syncwarp();
    const unsigned* S = reinterpret_cast<const unsigned*>(stage);
    const int b = lane >> 2, h = (lane >> 1) & 1, s = lane & 1;
    const int w0 = (210 * b) >> 2, sh = 8 * ((210 * b) & 3);  // sh: 0 or 16
    auto word = [&](int off) {  // the 4 bytes at block byte off (a multiple of 4)
      return __funnelshift_r(S[w0 + off / 4], S[w0 + off / 4 + 1], sh);
    };
    const float d = g3_f16(word(208));
    const unsigned scw = word(192 + 8 * h + 4 * s);
    int sc[4];
#pragma unroll
    for (int g = 0; g < 4; g++) sc[g] = (int)(signed char)(scw >> (8 * g));
    int q[16];  // the lane's 64 stored 6-bit values u, 4 a word
#pragma unroll
    for (int i = 0; i < 8; i++) {
      const unsigned hi = word(128 + 32 * h + 4 * i) >> (4 * s);
      q[i] = (int)(((word(64 * h + 4 * i) >> (4 * s)) & 0x0F0F0F0Fu) | ((hi & 0x03030303u) << 4));
      q[8 + i] = (int)(((word(64 * h + 32 + 4 * i) >> (4 * s)) & 0x0F0F0F0Fu) |
                       (((hi >> 2) & 0x03030303u) << 4));
    }
#pragma unroll
    for (int m = 0; m < M; m++) {
      const uint4* xw = reinterpret_cast<const uint4*>(xq + (long)m * K) + step * 128 + lane;
      int isum[2] = {0, 0};  // per 32 values: sum of sc * (u - 32) . q over its two 16s
#pragma unroll
      for (int g = 0; g < 4; g++) {
        const uint4 xv = xw[32 * g];
        const int x4[4] = {(int)xv.x, (int)xv.y, (int)xv.z, (int)xv.w};
        int dq = 0, dsum = 0;
#pragma unroll
        for (int t = 0; t < 4; t++) {
          dq = __dp4a(q[4 * g + t], x4[t], dq);
          dsum = __dp4a(0x01010101, x4[t], dsum);
        }
        isum[g >> 1] += sc[g] * (dq - 32 * dsum);
      }
      const float2 dx = reinterpret_cast<const float2*>(xd)[(long)m * (K / 32) / 2 +
                                                             step * 32 + lane];
      acc[m] += dx.x * (d * (float)isum[0]) + dx.y * (d * (float)isum[1]);
    }
  }
};

// 8 values of T from p (16-byte aligned) as stored: sizeof(T) / 2 words
template <typename T>
__device__ __forceinline__ void g3_raw8(const T* p, uint4* r) {
#pragma unroll
  for (int i = 0; i < (int)sizeof(T) / 2; i++) r[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
}

template <typename T>
__device__ __forceinline__ void g3_float8(const uint4* r, float* f) {
  const T* h = reinterpret_cast<const T*>(r);
#pragma unroll
  for (int e = 0; e < 8; e++) f[e] = to_float(h[e]);
}

// max(a, b), NaN if either is (the twin's np.max): fmaxf would drop a NaN of x, which then
// quantized to 0 in a group of finite dx, and the product came out finite where the twin's (and
// the float GEMVs') is NaN. One instruction, as fmaxf, from sm_80.
__device__ __forceinline__ float g3_max_nan(float a, float b) {
#if __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a != a || b != b ? __int_as_float(0x7FFFFFFF) : fmaxf(a, b);
#endif
}

// Values k .. k + 7 of row m (held by this thread; threads 4 t .. 4 t + 3 of a warp hold 32
// values from a multiple of 32) quantized into the staged copy (module NOTE); returns their
// group's dx, and with qv their quantized values. A group holding a NaN (inf) has amax and dx
// NaN (inf), id 0 and every q 0 (cvt takes the NaN of inf * 0 to 0): its products are NaN.
__device__ __forceinline__ float g3_quantize8(const float* f, int m, int k, int K, u8* xq,
                                              float* xd, int* xs, int* qv = nullptr) {
  float amax = 0.f;
#pragma unroll
  for (int e = 0; e < 8; e++) amax = g3_max_nan(amax, fabsf(f[e]));
  amax = g3_max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
  amax = g3_max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
  const float id = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
  unsigned w[2] = {0u, 0u};
  int s = 0;
#pragma unroll
  for (int e = 0; e < 8; e++) {
    const int q = __float2int_rn(__fmul_rn(f[e], id));
    if (qv != nullptr) qv[e] = q;
    s += q;
    w[e >> 2] |= (unsigned)(q & 255) << (8 * (e & 3));
  }
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  *reinterpret_cast<uint2*>(xq + (long)m * K + g3_pos(k)) = make_uint2(w[0], w[1]);
  const float dx = __fdiv_rn(amax, 127.f);
  if ((threadIdx.x & 3) == 0) {
    xd[m * (K / 32) + k / 32] = dx;
    xs[m * (K / 32) + k / 32] = s;
  }
  return dx;
}

// X2 (the lm_head, whose x stays unquantized elsewhere): x as two int8 terms, row 0 its
// quantization q0 (dx0) and row 1 the quantization of what that leaves, r = x - q0 dx0 (each
// product and difference rounded to float once). |r| <= dx0 / 2 + rounding, so q0 dx0 + q1 dx1
// is x within ~amax / 32,000: closer than x's own 16-bit rounding; the GEMV sums both rows'
// products into one output (gguf_gemv3_kernel, M = 2).
__device__ __forceinline__ void g3_quantize8_x2(const float* f, int k, int K, u8* xq, float* xd,
                                                int* xs) {
  int q[8];
  const float dx = g3_quantize8(f, 0, k, K, xq, xd, xs, q);
  float r[8];
#pragma unroll
  for (int e = 0; e < 8; e++) r[e] = __fsub_rn(f[e], __fmul_rn((float)q[e], dx));
  g3_quantize8(r, 1, k, K, xq, xd, xs);
}

// x (M, K) quantized into xq / xd / xs (rows >= `rows` as zeros), or with NORM (M = 1)
// rms_norm(x + residual) * norm_w, each value rounded to T where rms_norm_kernel rounds it, with
// block 0 writing x + residual to res_out; `scratch` (K floats) holds the sum between the passes.
// flags: NORM_W_EARLY (common.cuh), where EARLY (blocks of <= 768 threads: at 1024 the
// registers would spill). X2 (M = 2, not NORM): x's one row as two terms (g3_quantize8_x2).
// Ends with a barrier.
template <typename T, int M, bool NORM, bool EARLY, bool X2 = false>
__device__ __forceinline__ void g3_stage_x(u8* xq, float* xd, int* xs, float* scratch,
                                           const T* __restrict__ x, int K, int rows,
                                           const T* __restrict__ residual,
                                           const T* __restrict__ norm_w, T* __restrict__ res_out,
                                           float eps, int flags) {
  __shared__ float red[32];
  // K % 2048 == 0: a warp's 256 values are all in or all out, so the shuffles see full warps
  const int STRIDE = 8 * blockDim.x;
  // U strides' loads in flight before any is used (2 with NORM: its residual loads too)
  constexpr int U = NORM ? 2 : 4, W = sizeof(T) / 2;
  const bool w_early = NORM && EARLY && (flags & NORM_W_EARLY) && K <= U * STRIDE;
  uint4 g[U][W];  // the norm weight with w_early, from the first pass to the second
  static_assert(!X2 || (M == 2 && !NORM), "X2 stages one row of x as the two rows of M = 2");
  for (int m = 0; m < (X2 ? 1 : M); m++) {
    float ss = 0.f;
    for (int k0 = 8 * threadIdx.x; k0 < K; k0 += U * STRIDE) {
      uint4 a[U][W], b[U][W];  // x; the residual (NORM)
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int k = k0 + u * STRIDE;
        if (m >= rows || k >= K) continue;
        g3_raw8(x + (long)m * K + k, a[u]);
        if (NORM && residual != nullptr) g3_raw8(residual + (long)m * K + k, b[u]);
        if (w_early) g3_raw8(norm_w + k, g[u]);
      }
#pragma unroll
      for (int u = 0; u < U; u++) {
        const int k = k0 + u * STRIDE;
        if (k >= K) break;  // the same for the whole warp
        float f[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (m < rows) g3_float8<T>(a[u], f);
        if constexpr (NORM) {
          union {
            uint4 v[W];
            T h[8];
          } sum;
          float r[8];
          if (residual != nullptr) g3_float8<T>(b[u], r);
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
          float4* dst = reinterpret_cast<float4*>(scratch + k);
          dst[0] = make_float4(f[0], f[1], f[2], f[3]);
          dst[1] = make_float4(f[4], f[5], f[6], f[7]);
        } else if constexpr (X2) {
          g3_quantize8_x2(f, k, K, xq, xd, xs);
        } else {
          g3_quantize8(f, m, k, K, xq, xd, xs);
        }
      }
    }
    if constexpr (NORM) {  // each thread rescales the values it staged itself
      const float inv = rsqrtf(block_sum(ss, red) / K + eps);
      for (int k0 = 8 * threadIdx.x; k0 < K; k0 += U * STRIDE) {
#pragma unroll
        for (int u = 0; u < U; u++)
          if (!w_early && k0 + u * STRIDE < K) g3_raw8(norm_w + k0 + u * STRIDE, g[u]);
#pragma unroll
        for (int u = 0; u < U; u++) {
          const int k = k0 + u * STRIDE;
          if (k >= K) break;
          const float4* src = reinterpret_cast<const float4*>(scratch + k);
          const float4 lo = src[0], hi = src[1];
          float f[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w}, w8[8];
          g3_float8<T>(g[u], w8);
#pragma unroll
          for (int e = 0; e < 8; e++) f[e] = to_float(from_float<T>(f[e] * inv * w8[e]));
          g3_quantize8(f, m, k, K, xq, xd, xs);
        }
      }
    }
  }
  __syncthreads();
}

// Shared memory of the kernels below, in this order: xq (M K bytes), xd (M K / 32 floats), xs
// (M K / 32 ints), each warp's F::STAGE words, with NORM K floats of scratch
// (cuda_quant_gguf.gemv3_smem).
template <int M>
__device__ __forceinline__ void g3_carve(uint4* smem, int K, u8*& xq, float*& xd, int*& xs,
                                         uint4*& rest) {
  xq = reinterpret_cast<u8*>(smem);
  xd = reinterpret_cast<float*>(xq + M * K);
  xs = reinterpret_cast<int*>(xd + M * (K / 32));
  rest = reinterpret_cast<uint4*>(xs + M * (K / 32));
}

// y (rows, N) = x (rows, K) @ dequantized(w)^T with x quantized (module comment), rows <= M; x as
// NORM makes it (g3_stage_x; the extra arguments null without NORM). Warp gw of the grid takes
// outputs gw, gw + (warps in the grid), ...; each row is K / 2048 warp steps, loaded F::STEPS at
// a time one load ahead of the compute (across rows).
// GLU (w = [gate (N / 2 rows); up (N / 2 rows)], the MLP's gate_up): y is (rows, N / 2) =
// silu(gate) * up, output o from rows o and N / 2 + o, one after the other in one warp; each
// rounded to T first and combined as silu_and_mul_kernel does, so y is bit for bit the unfused
// GEMV followed by activation.cu.
// W warps per block: G3_WARPS, several blocks per SM, or F::BIG, one block per SM (x staged
// once per SM, and as many warps resident as the registers allow).
// X2 (M = 2, rows = 1): x's one row staged as two int8 terms (g3_quantize8_x2), y (1, N) the
// sum of both rows' products: the lm_head's product at nearly x's own precision.
// SPLIT (M = 1, a plain product): block b takes outputs b N / G .. (b + 1) N / G - 1 of the
// G blocks, and its warps share the loads of those rows (each a warp step, or F::STEPS) evenly:
// a row's loads are summed in shared memory, in order, once the block is done. Where rows are
// few for the warps (Q4_K down: 4096 rows of 7 steps on 132 x 24 warps) each warp then reads 6
// loads instead of 8 (2 rows on 86 SMs under the even grid).
// NOTE: device run B measured, at M = 1: one block per SM faster for Q4_K and Q6_K (and Q8_0 at
// K = 14336: 18.5 vs 23.0 us in a PDL chain), slower for Q8_0 at K = 4096
// (cuda_quant_gguf.use_big); rows streamed into L2 ahead by bulk prefetches slower everywhere.
// Grid: (at most what stays resident, cuda_quant_gguf.gemv3)  Block: (32 * W)
template <class F, typename T, int M, bool NORM, int W, bool GLU, bool X2 = false,
          bool SPLIT = false>
__global__ void __launch_bounds__(32 * W, W != G3_WARPS ? 1 : M == 1 ? 3 : 2)
gguf_gemv3_kernel(T* __restrict__ y, const T* __restrict__ x, const u8* __restrict__ w, int N,
                  int K, int rows, int row_bytes, const T* __restrict__ residual,
                  const T* __restrict__ norm_w, T* __restrict__ res_out, float eps, int flags) {
  static_assert(!SPLIT || (M == 1 && !NORM && !GLU && !X2), "SPLIT: plain products at M = 1");
  extern __shared__ uint4 g3_smem[];
  __shared__ float g3_parts[SPLIT ? G3_SPLIT_MAX : 1];
  u8* xq;
  float* xd;
  int* xs;
  uint4* rest;
  g3_carve<M>(g3_smem, K, xq, xd, xs, rest);
  const int wb = threadIdx.x >> 5;  // warp of the block
  uint4* stage = rest + wb * F::STAGE;
  float* scratch = reinterpret_cast<float*>(rest + W * F::STAGE);
  const int lane = threadIdx.x & 31;
  const int total_warps = gridDim.x * W, gw = blockIdx.x * W + wb;
  const int steps = K / G3_CHUNK, per_row = (steps + F::STEPS - 1) / F::STEPS;
  constexpr int PARTS = GLU ? 2 : 1;  // weight rows per output
  const int outs = N / PARTS, per_out = PARTS * per_row;
  // SPLIT: outputs r0 .. r1 - 1 are the block's, and its warps share their (output, load)
  // items, item i to warp i % W
  const int r0 = SPLIT ? (int)((long)blockIdx.x * outs / gridDim.x) : 0;
  const int r1 = SPLIT ? (int)((long)(blockIdx.x + 1) * outs / gridDim.x) : 0;
  const int block_items = (r1 - r0) * per_row;
  const int items = SPLIT ? (wb < block_items ? (block_items - wb + W - 1) / W : 0)
                    : gw < outs ? (outs - gw + total_warps - 1) / total_warps * per_out : 0;
  // this warp's item j: its output, and which of that output's per_out loads it is
  auto out_of = [&](int j) {
    return SPLIT ? r0 + (wb + j * W) / per_row : gw + j / per_out * total_warps;
  };
  auto load_of = [&](int j) { return SPLIT ? (wb + j * W) % per_row : j % per_out; };
  uint4 cur[F::STEPS][F::WORDS], nxt[F::STEPS][F::WORDS];
  auto load = [&](uint4 (*r)[F::WORDS], int j) {
    const int l = load_of(j);
    const u8* row = w + (long)(out_of(j) + l / per_row * outs) * row_bytes;
    const int s0 = l % per_row * F::STEPS;
#pragma unroll
    for (int s = 0; s < F::STEPS; s++)
      if (s0 + s < steps) F::load(r[s], row, s0 + s, lane);
  };
  if (items > 0) load(cur, 0);  // weights are never written: they may stream before the wait
  if (flags & PDL_EARLY) pdl_trigger();
  pdl_wait();
  g3_stage_x<T, M, NORM, W <= 24, X2>(xq, xd, xs, scratch, x, K, rows, residual, norm_w,
                                      res_out, eps, flags);
  if (!(flags & PDL_EARLY)) pdl_trigger();
  float acc[M], gate[M];
#pragma unroll
  for (int m = 0; m < M; m++) acc[m] = gate[m] = 0.f;
  for (int j = 0; j < items; j++) {
    if (j + 1 < items) load(nxt, j + 1);
    const int l = load_of(j), s0 = l % per_row * F::STEPS;
#pragma unroll
    for (int s = 0; s < F::STEPS; s++)
      if (s0 + s < steps) F::template dot<M>(cur[s], xq, xd, xs, K, s0 + s, lane, stage, acc);
    if (SPLIT) {  // the item's sum, kept until the block adds its output's items in order
      const float v = warp_sum(acc[0]);
      acc[0] = 0.f;
      if (lane == 0) g3_parts[(out_of(j) - r0) * per_row + l] = v;
    } else if (X2 && l % per_row == per_row - 1) {  // both terms' products into one output
      const float v = warp_sum(acc[0] + acc[M - 1]);
      acc[0] = acc[M - 1] = 0.f;
      if (lane == 0) y[out_of(j)] = from_float<T>(v);
    } else if (l % per_row == per_row - 1) {  // the row is done (warp-uniform)
      const int o = out_of(j);
      const bool is_gate = GLU && l / per_row == 0;
#pragma unroll
      for (int m = 0; m < M; m++) {
        const float v = to_float(from_float<T>(warp_sum(acc[m])));
        acc[m] = 0.f;
        if (is_gate) {
          gate[m] = v;
        } else if (lane == 0 && m < rows) {
          y[(long)m * outs + o] =
              from_float<T>(GLU ? gate[m] / (1.f + expf(-gate[m])) * v : v);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < F::STEPS; s++)
#pragma unroll
      for (int i = 0; i < F::WORDS; i++) cur[s][i] = nxt[s][i];
  }
  if (SPLIT) {
    __syncthreads();
    for (int t = threadIdx.x; t < r1 - r0; t += blockDim.x) {
      float v = 0.f;
      for (int l = 0; l < per_row; l++) v += g3_parts[t * per_row + l];
      y[r0 + t] = from_float<T>(v);
    }
  }
}

// The staged x of gguf_gemv3_kernel written out in value order, for the twin test of the
// quantization: q (rows, K) int8, dx and sums (rows, K / 32); the other arguments as the GEMV's.
// Grid: (1)  Block: (32 * G3_WARPS)
template <typename T, int M, bool NORM>
__global__ void __launch_bounds__(32 * G3_WARPS)
gguf_quantize_x_kernel(signed char* __restrict__ q, float* __restrict__ dx, int* __restrict__ sx,
                       const T* __restrict__ x, int K, int rows, const T* __restrict__ residual,
                       const T* __restrict__ norm_w, T* __restrict__ res_out, float eps,
                       int flags) {
  extern __shared__ uint4 g3_smem[];
  u8* xq;
  float* xd;
  int* xs;
  uint4* rest;
  g3_carve<M>(g3_smem, K, xq, xd, xs, rest);
  pdl_start();
  g3_stage_x<T, M, NORM, true>(xq, xd, xs, reinterpret_cast<float*>(rest), x, K, rows,
                               residual, norm_w, res_out, eps, flags);
  for (int i = threadIdx.x; i < rows * K; i += blockDim.x) {
    const int m = i / K, k = i % K;
    q[i] = (signed char)xq[(long)m * K + g3_pos(k)];
    if (k % 32 == 0) {
      dx[i / 32] = xd[i / 32];
      sx[i / 32] = xs[i / 32];
    }
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void gguf_gemv3_kernel<G3_Q4_K, __nv_bfloat16, 1, true, 24, true>(
    __nv_bfloat16*, const __nv_bfloat16*, const u8*, int, int, int, int, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, float, int);
template __global__ void gguf_gemv3_kernel<G3_Q4_K, __nv_bfloat16, 2, false, 8, false, true>(
    __nv_bfloat16*, const __nv_bfloat16*, const u8*, int, int, int, int, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, float, int);
template __global__ void gguf_gemv3_kernel<G3_Q4_K, __nv_bfloat16, 1, false, 24, false, false,
                                           true>(
    __nv_bfloat16*, const __nv_bfloat16*, const u8*, int, int, int, int, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, float, int);
template __global__ void gguf_gemv3_kernel<G3_Q8_0, __half, 4, false, 8, false>(
    __half*, const __half*, const u8*, int, int, int, int, const __half*, const __half*, __half*,
    float, int);
template __global__ void gguf_quantize_x_kernel<__nv_bfloat16, 1, true>(
    signed char*, float*, int*, const __nv_bfloat16*, int, int, const __nv_bfloat16*,
    const __nv_bfloat16*, __nv_bfloat16*, float, int);
#endif
