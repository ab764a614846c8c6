// Hopper (sm_90a only) building blocks for the warp-specialized kernels (attention_prefill_sm90.cu,
// gemm_sm90.cu): warpgroup MMA (wgmma) on 128-byte-swizzled shared memory, the register fences
// around it, mbarriers that cp.async and TMA copies complete, named barriers and register
// reallocation.
#pragma once
#include "mma.cuh"
#include "tma.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Matrix descriptor of a 128B-swizzled operand starting at `p` (bits 0-13: address / 16, 16-29:
// LBO / 16, 32-45: SBO / 16, 62-63: 1 = 128-byte swizzle). SBO = 1024: 8 rows of 128 B (the next
// 8 rows of a K-major operand, the next 8 K values of an MN-major one). LBO matters only for an
// MN-major operand wider than 64 values: the bytes from one atom to the next along N.
__device__ __forceinline__ unsigned long long sw128_desc(const void* p, int lbo, int sbo = 1024) {
  return (unsigned long long)((smem_addr(p) & 0x3FFFF) >> 4) |
         ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// ---------------------------------------------------------------- wgmma
#define PS_WGMMA_OUT32                                                                         \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),          \
      "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),  \
      "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]),            \
      "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]),            \
      "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define PS_WGMMA_REGS32                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define PS_WGMMA_OUT64                                                                         \
  PS_WGMMA_OUT32, "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]),             \
      "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]),            \
      "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),            \
      "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),            \
      "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),            \
      "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define PS_WGMMA_REGS64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "     \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, " \
  "%37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, " \
  "%55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define PS_WGMMA_OUT96                                                                         \
  PS_WGMMA_OUT64, \
      "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), \
      "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), \
      "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), \
      "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
      "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), \
      "+f"(d[94]), "+f"(d[95])
#define PS_WGMMA_OUT128                                                                        \
  PS_WGMMA_OUT96, \
      "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), \
      "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), \
      "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), \
      "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
      "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), \
      "+f"(d[126]), "+f"(d[127])
#define PS_WGMMA_REGS96 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, " \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, " \
  "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, " \
  "%87, %88, %89, %90, %91, %92, %93, %94, %95}"
#define PS_WGMMA_REGS128 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, " \
  "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, " \
  "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, " \
  "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, " \
  "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, " \
  "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, " \
  "%104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, " \
  "%118, %119, %120, %121, %122, %123, %124, %125, %126, %127}"
#define PS_WGMMA_REGS(N) PS_WGMMA_REGS##N
#define PS_WGMMA_OUT(N) PS_WGMMA_OUT##N

// D (64 x N fp32) (+)= A (64 x 16) B (16 x N). The accumulator layout: a thread holds N / 2
// values, element 4 i + e at row 16 (warp % 4) + lane / 4 + 8 (e / 2), column 8 i + 2 (lane % 4)
// + e % 2. ACC = 0: D = A B. Both operands K-major in shared memory (SS), or A in registers as
// mma.sync's A fragment of the warp's 16 rows and B MN-major (RS, transposed). Asynchronous until
// wgmma.wait_group. ACC and the transpose are immediates: a register set for them inside the
// wgmma stage would make ptxas serialize it.
#define PS_WGMMA_SS(M_N, TYPE, ND)                                                             \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" PS_NEXT2_##ND ", 0;\n"                      \
               "wgmma.mma_async.sync.aligned.m64n" #M_N "k16.f32." TYPE "." TYPE " "           \
               PS_WGMMA_REGS(ND) ", %" #ND ", %" PS_NEXT1_##ND ", p, 1, 1, 0, 0;\n}\n"         \
               : PS_WGMMA_OUT(ND)                                                              \
               : "l"(da), "l"(db), "n"(ACC))
#define PS_WGMMA_RS_T(M_N, TYPE, ND)                                                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" PS_NEXT6_##ND ", 0;\n"                     \
               "wgmma.mma_async.sync.aligned.m64n" #M_N "k16.f32." TYPE "." TYPE " "           \
               PS_WGMMA_REGS(ND) ", {%" #ND ", %" PS_NEXT1_##ND ", %" PS_NEXT2_##ND            \
               ", %" PS_NEXT3_##ND "}, %" PS_NEXT4_##ND ", p, 1, 1, 1;\n}\n"                   \
               : PS_WGMMA_OUT(ND)                                                              \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(ACC))
#define PS_NEXT1_32 "33"
#define PS_NEXT2_32 "34"
#define PS_NEXT3_32 "35"
#define PS_NEXT4_32 "36"
#define PS_NEXT6_32 "37"
#define PS_NEXT1_64 "65"
#define PS_NEXT2_64 "66"
#define PS_NEXT3_64 "67"
#define PS_NEXT4_64 "68"
#define PS_NEXT6_64 "69"
#define PS_NEXT1_96 "97"
#define PS_NEXT2_96 "98"
#define PS_NEXT1_128 "129"
#define PS_NEXT2_128 "130"

template <typename T> struct IsHalf {
  static constexpr bool value = false;
};
template <> struct IsHalf<__half> {
  static constexpr bool value = true;
};

template <int N>  // output columns: 64 or 128 (both forms), 192 or 256 (SS only)
struct Wgmma {
  static_assert(N == 64 || N == 128 || N == 192 || N == 256, "the m64n64 .. m64n256 forms");
  template <int ACC, typename T>  // T (__half or __nv_bfloat16) picks the form by its tag
  __device__ static void ss(float (&d)[N / 2], unsigned long long da, unsigned long long db, T) {
    if constexpr (N == 64 && IsHalf<T>::value) PS_WGMMA_SS(64, "f16", 32);
    else if constexpr (N == 64) PS_WGMMA_SS(64, "bf16", 32);
    else if constexpr (N == 128 && IsHalf<T>::value) PS_WGMMA_SS(128, "f16", 64);
    else if constexpr (N == 128) PS_WGMMA_SS(128, "bf16", 64);
    else if constexpr (N == 192 && IsHalf<T>::value) PS_WGMMA_SS(192, "f16", 96);
    else if constexpr (N == 192) PS_WGMMA_SS(192, "bf16", 96);
    else if constexpr (IsHalf<T>::value) PS_WGMMA_SS(256, "f16", 128);
    else PS_WGMMA_SS(256, "bf16", 128);
  }
  template <int ACC, typename T>
  __device__ static void rs_t(float (&d)[N / 2], const unsigned (&a)[4], unsigned long long db, T) {
    static_assert(N <= 128, "the RS forms: n64 and n128");
    if constexpr (N == 64 && IsHalf<T>::value) PS_WGMMA_RS_T(64, "f16", 32);
    else if constexpr (N == 64) PS_WGMMA_RS_T(64, "bf16", 32);
    else if constexpr (IsHalf<T>::value) PS_WGMMA_RS_T(128, "f16", 64);
    else PS_WGMMA_RS_T(128, "bf16", 64);
  }
};

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(PENDING) : "memory");
}

// Keep the compiler from moving the definitions or uses of wgmma's registers across the wgmma
// fence / wait: ptxas serializes every wgmma of a stage in which another instruction defines one
// of them (C7513, C7515).
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

// ---------------------------------------------------------------- barriers, registers
// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads: wait, or only arrive.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// A warpgroup gives registers back to the block's pool, or takes them (waiting until there).
template <int REGS>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(REGS));
}
template <int REGS>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(REGS));
}
#endif
