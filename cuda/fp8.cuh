// FP8 (E4M3) helpers shared by fp8.cu and fp8_fused.cu: conversions (the twin is
// engine/model/fp8.py), 8-element row words, the two-pass row quantization and cp.async.
#pragma once
#include "common.cuh"

constexpr float E4M3_MAX = 448.f;

// E4M3 encoding: round to nearest even, +-inf and beyond +-448 saturate to +-448, NaN -> 0x7F.
// sm_89+ converts in hardware; older GPUs run the twin's integer algorithm. (No cuda_fp8.h: not
// every NVRTC ships it.)
__device__ __forceinline__ unsigned char encode_e4m3(float v) {
#if __CUDA_ARCH__ >= 890
  unsigned short pair;  // {cvt(a) high byte, cvt(b) low byte}
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.f), "f"(v));
  return (unsigned char)(pair & 0xFFu);
#else
  const unsigned bits = __float_as_uint(v), mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return 0x7F;
  const int code = mag < 0x3C800000u  // below 2^-6: subnormal steps of 2^-9
                       ? (int)rintf(fabsf(v) * 512.f)
                       : (int)((mag + 0x7FFFFu + ((mag >> 20) & 1u)) >> 20) - (120 << 3);
  return (unsigned char)(min(code, 0x7E) | ((bits >> 24) & 0x80u));
#endif
}

__device__ __forceinline__ float decode_e4m3(unsigned c) {
  // S.1111.111 is NaN (the twin's DECODE, sm_89's cvt), not 480: a NaN activation stays NaN
  if ((c & 0x7Fu) == 0x7Fu) return __uint_as_float(0x7FFFFFFFu);
  const unsigned e = (c >> 3) & 15u, m = c & 7u;
  const float v = e == 0 ? m * (1.f / 512.f) : __uint_as_float(((e + 120u) << 23) | (m << 20));
  return (c & 0x80u) ? -v : v;
}

// Two E4M3 codes (low byte first) -> two floats, exactly (every E4M3 value is exact in fp16).
__device__ __forceinline__ float2 decode_e4m3x2(unsigned short pair) {
#if __CUDA_ARCH__ >= 890
  unsigned h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(pair));
  return __half22float2(*reinterpret_cast<const __half2*>(&h2));
#else
  return make_float2(decode_e4m3(pair & 0xFFu), decode_e4m3(pair >> 8));
#endif
}

__device__ __forceinline__ float row_scale(float absmax) {
  const float s = absmax / E4M3_MAX;
  // 1 for an all-zero row, and for a subnormal s, whose 1 / s can overflow to inf (0 * inf = NaN
  // codes): engine/model/fp8.py's quantize_rows
  return s < 1.17549435e-38f ? 1.f : s;  // FLT_MIN
}

// ------------------------------------------------------------------------------ row words
// Rows are read as 16-byte words of 8 elements (K % 16 == 0, rows 16-byte aligned).

template <typename T>
__device__ __forceinline__ void load8(const T* p, float* f) {
  const uint4 w = *reinterpret_cast<const uint4*>(p);
  const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
  for (int e = 0; e < 8; e++) f[e] = to_float(h[e]);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float* f) {
  uint4 w;
  T* h = reinterpret_cast<T*>(&w);
#pragma unroll
  for (int e = 0; e < 8; e++) h[e] = from_float<T>(f[e]);
  *reinterpret_cast<uint4*>(p) = w;
}

// Round the 8 values to T (what an unfused kernel would store) and fold their |max| into amax.
template <typename T>
__device__ __forceinline__ void round8(float* f, float& amax) {
#pragma unroll
  for (int e = 0; e < 8; e++) {
    f[e] = to_float(from_float<T>(f[e]));
    amax = fmaxf(amax, fabsf(f[e]));
  }
}

// SiLU(gate) * up of a gate_up row's 8 values from word w: g is the row, gate then up (K each).
template <typename T>
__device__ __forceinline__ void silu_mul8(const T* g, int K, int w, float* f) {
  float u[8];
  load8(g + 8 * w, f);
  load8(g + K + 8 * w, u);
#pragma unroll
  for (int e = 0; e < 8; e++) f[e] = f[e] / (1.f + expf(-f[e])) * u[e];
}

// 8 values times the row's inverse scale (one rounding: no FMA contraction) -> codes
__device__ __forceinline__ void encode8(unsigned char* q, const float* f, float inv) {
  uint2 w;
  unsigned char* b = reinterpret_cast<unsigned char*>(&w);
#pragma unroll
  for (int e = 0; e < 8; e++) b[e] = encode_e4m3(__fmul_rn(f[e], inv));
  *reinterpret_cast<uint2*>(q) = w;
}

// 8 E4M3 codes (half of a 16-byte word: h = 0 low, 1 high) -> floats.
__device__ __forceinline__ void fp8x8_to_float(const uint4& w, int h, float* f) {
  const unsigned short* p = reinterpret_cast<const unsigned short*>(&w) + 4 * h;
#pragma unroll
  for (int e = 0; e < 4; e++) {
    const float2 v = decode_e4m3x2(p[e]);
    f[2 * e] = v.x;
    f[2 * e + 1] = v.y;
  }
}


// ------------------------------------------------------------------------------ row quantization
// Threads quantize one row of `words` 8-element words; a thread takes words first, first + stride,
// ... Pass 1 finds the row's absmax (row_max(amax) combines the threads' values), pass 2 encodes.
// A thread keeps its first QC words in registers between the passes; its other words are made
// again. make(w, i, f) gives word w's 8 values (before rounding to T), i the thread's register
// slot (QC past them); emit(w, f, inv) stores word w, f rounded to T, with inv = 1 / s the
// reciprocal of the row's scale s (an IEEE division, once a row). Returns s.
template <typename T, int QC, typename Make, typename Emit, typename RowMax>
__device__ __forceinline__ float quantize_words(int first, int stride, int words, Make make,
                                                Emit emit, RowMax row_max) {
  float c[QC][8], f[8], amax = 0.f;
#pragma unroll
  for (int i = 0; i < QC; i++) {
    const int w = first + i * stride;
    if (w < words) {
      make(w, i, c[i]);
      round8<T>(c[i], amax);
    }
  }
  for (int w = first + QC * stride; w < words; w += stride) {
    make(w, QC, f);
    round8<T>(f, amax);
  }
  const float s = row_scale(row_max(amax)), inv = 1.f / s;
#pragma unroll
  for (int i = 0; i < QC; i++) {
    const int w = first + i * stride;
    if (w < words) emit(w, c[i], inv);
  }
  for (int w = first + QC * stride; w < words; w += stride) {
    float dummy = 0.f;
    make(w, QC, f);
    round8<T>(f, dummy);
    emit(w, f, inv);
  }
  return s;
}

// A block quantizes one row: thread t takes words t, t + blockDim, ... (all of them in registers
// for K <= QC * 8 * blockDim; a longer row's other words are read or recomputed again, from
// L1/L2). make(w, f) gives word w's 8 values. Every thread of the block calls it (block
// reductions).
template <typename T, int QC, typename Make, typename Emit>
__device__ __forceinline__ float quantize_row(int words, float* red, Make make, Emit emit) {
  return quantize_words<T, QC>(
      threadIdx.x, blockDim.x, words, [&](int w, int, float* f) { make(w, f); }, emit,
      [&](float amax) { return block_max(amax, red); });
}

// ------------------------------------------------------------------------------ fused inputs
// A GEMV that quantizes its own input row (fp8_fused.cu's prologues) makes the row's codes and
// scale as the unfused quantize kernels of fp8.cu would:
//   PRO 0: x (K)                      -> quantize(x)
//   PRO 1: x = a gate_up row (2K)     -> quantize(T(silu(gate) * up))
//   PRO 2: x, residual (K), norm_w (K) -> res = T(x + residual) (x alone when residual is null),
//          stored to res_out unless null; quantize(T(rms_norm(res) * norm_w))
// into codes (K bytes, value order); returns the scale. Every thread of the block calls it.
// NOTE: PRO 2's sum of squares runs in its own order, so a code may differ from fp8.cu's
// add + RMSNorm quantize kernel's where h lands within an ulp of a rounding boundary.
template <typename T, int PRO, int QC>
__device__ __forceinline__ float fp8_stage_row(unsigned char* codes, float* red, const T* x,
                                               const T* residual, const T* norm_w, T* res_out,
                                               float eps, int K) {
  auto emit = [&](int w, const float* f, float inv) { encode8(codes + 8 * w, f, inv); };
  if constexpr (PRO == 0) {
    return quantize_row<T, QC>(K / 8, red, [&](int w, float* f) { load8(x + 8 * w, f); }, emit);
  } else if constexpr (PRO == 1) {
    return quantize_row<T, QC>(K / 8, red, [&](int w, float* f) { silu_mul8(x, K, w, f); },
                               emit);
  } else {
    // res = T(x + residual) as 8 floats: what fp8.cu's add + RMSNorm quantize kernel stores
    auto res8 = [&](int w, float* f) {
      load8(x + 8 * w, f);
      if (residual != nullptr) {
        float r[8];
        load8(residual + 8 * w, r);
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = to_float(from_float<T>(f[e] + r[e]));
      }
    };
    float f[8], ss = 0.f;
    for (int w = threadIdx.x; w < K / 8; w += blockDim.x) {
      res8(w, f);
      if (res_out != nullptr) store8(res_out + 8 * w, f);
#pragma unroll
      for (int e = 0; e < 8; e++) ss += f[e] * f[e];
    }
    const float inv = rsqrtf(block_sum(ss, red) / K + eps);
    return quantize_row<T, QC>(
        K / 8, red,
        [&](int w, float* out) {
          float g[8];
          res8(w, out);
          load8(norm_w + 8 * w, g);
#pragma unroll
          for (int e = 0; e < 8; e++) out[e] = out[e] * inv * g[e];
        },
        emit);
  }
}

// ------------------------------------------------------------------------------ cp.async
// 16-byte global -> shared copies that hold no registers while in flight (sm_80+; a plain copy
// before). valid = false writes zeros and reads nothing.
__device__ __forceinline__ void f8_cp_async16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(
                   (unsigned)__cvta_generic_to_shared(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#else
  *reinterpret_cast<uint4*>(dst) =
      valid ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

__device__ __forceinline__ void f8_cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most n (0..7, uniform) of this thread's committed groups are still in flight.
__device__ __forceinline__ void f8_cp_async_wait(int n) {
#if __CUDA_ARCH__ >= 800
  switch (n) {
#define F8_WAIT(k) \
  case k: asm volatile("cp.async.wait_group " #k ";" ::: "memory"); break;
    F8_WAIT(1) F8_WAIT(2) F8_WAIT(3) F8_WAIT(4) F8_WAIT(5) F8_WAIT(6) F8_WAIT(7)
#undef F8_WAIT
    default: asm volatile("cp.async.wait_group 0;" ::: "memory");
  }
#endif
}
