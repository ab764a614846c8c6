// Hopper warpgroup MMA (wgmma, sm_90a only) helpers for the prefill attention kernel: shared
// memory matrix descriptors, D (+)= A B with A in registers, and the register fences around the
// asynchronous instructions.
#pragma once
#include "mma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Matrix descriptor of an unswizzled operand at `p` (bits 0-13 address / 16, 16-29 LBO / 16,
// 32-45 SBO / 16, swizzle mode 0 in bits 62-63). LBO: bytes between core matrices adjacent in K;
// SBO: in M or N (for K-major and MN-major operands alike). swap exchanges them (kernel_check's
// probe of that reading of the PTX manual for the MN-major V operand).
__device__ __forceinline__ unsigned long long wgmma_desc(const void* p, int lbo, int sbo,
                                                         int swap) {
  if (swap) {
    const int t = lbo;
    lbo = sbo;
    sbo = t;
  }
  return (unsigned long long)((smem_addr(p) & 0x3FFFF) >> 4) |
         ((unsigned long long)(lbo >> 4) << 16) | ((unsigned long long)(sbo >> 4) << 32);
}

#define PS_WGMMA_OUT                                                                           \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),          \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),  \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),            \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),            \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define PS_WGMMA_REGS                                                                          \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define PS_WGMMA_OUT64                                                                         \
  PS_WGMMA_OUT, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),  \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),            \
      "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]),            \
      "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),            \
      "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]),            \
      "+f"(d[62]), "+f"(d[63])
#define PS_WGMMA_REGS64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
  "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
  "%55, %56, %57, %58, %59, %60, %61, %62, %63}"
// One wgmma with A from registers: D (64 x N) = (ACC ? D : 0) + A B; TR = 1: B is MN-major. AB
// and SCALE_D name the operands after the N / 2 accumulators (a[0..3], b, TR; ACC). ACC and TR are
// immediates: a register defined for them inside the wgmma stage would serialize it (C7513).
#define PS_WGMMA_RS(N, TYPE, REGS, AB, SCALE_D, ...)                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SCALE_D ", 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TYPE "." TYPE " " REGS        \
               ", " AB ";\n}\n"                                                                \
               : __VA_ARGS__                                                                   \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(TR), "n"(ACC))
#define PS_AB64 "{%32, %33, %34, %35}, %36, p, 1, 1, %37"
#define PS_AB128 "{%64, %65, %66, %67}, %68, p, 1, 1, %69"

// d (64 x N fp32, this thread's N / 2: element 4 i + e is row 16 (warp % 4) + lane / 4 + 8 (e / 2),
// column 8 i + 2 (lane % 4) + e % 2) (+)= A (64 x 16: this warp's 16 rows in registers, as
// mma.sync's A fragment) B (16 x N from shared memory; TR = 1: MN-major); ACC = 0: d = A B.
// Asynchronous until wgmma.wait_group.
template <int N, int TR> struct WgmmaRS;
template <int TR> struct WgmmaRS<64, TR> {
  template <int ACC>
  __device__ static void run(float (&d)[32], const unsigned (&a)[4], unsigned long long b, __half) {
    PS_WGMMA_RS(64, "f16", PS_WGMMA_REGS, PS_AB64, "%38", PS_WGMMA_OUT);
  }
  template <int ACC>
  __device__ static void run(float (&d)[32], const unsigned (&a)[4], unsigned long long b, __nv_bfloat16) {
    PS_WGMMA_RS(64, "bf16", PS_WGMMA_REGS, PS_AB64, "%38", PS_WGMMA_OUT);
  }
};
template <int TR> struct WgmmaRS<128, TR> {
  template <int ACC>
  __device__ static void run(float (&d)[64], const unsigned (&a)[4], unsigned long long b, __half) {
    PS_WGMMA_RS(128, "f16", PS_WGMMA_REGS64, PS_AB128, "%70", PS_WGMMA_OUT64);
  }
  template <int ACC>
  __device__ static void run(float (&d)[64], const unsigned (&a)[4], unsigned long long b, __nv_bfloat16) {
    PS_WGMMA_RS(128, "bf16", PS_WGMMA_REGS64, PS_AB128, "%70", PS_WGMMA_OUT64);
  }
};

// Keep the compiler from moving the definitions or uses of wgmma's registers (accumulators, A
// fragments, descriptors) across the wgmma fence / wait: ptxas serializes every wgmma of a stage
// in which another instruction defines one of them (C7513, C7515).
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(unsigned (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+r"(d[i])::"memory");
}
template <int N>
__device__ __forceinline__ void fence_regs(unsigned long long (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; i++) asm volatile("" : "+l"(d[i])::"memory");
}
#endif
