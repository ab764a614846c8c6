// Hopper's asynchronous copies (sm_90): mbarriers that count the bytes of copies in flight, the
// TMA tensor copies that complete them, and the 128-byte swizzle TMA writes. Used by the
// warp-specialized kernels (wgmma.cuh) and by attention_decode_mma.cu's TMA form.
// Each asynchronous operation exists on sm_90 and later only; a file that is compiled for older
// GPUs too may name them in instances it never launches there (those trap).
#pragma once
#include "mma.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define PS_SM90_ASM(...) __trap()
#else
#define PS_SM90_ASM(...) asm volatile(__VA_ARGS__)
#endif

// A tensor map (CUtensorMap: what cuTensorMapEncodeTiled wrote on the host), passed by value as a
// __grid_constant__ kernel parameter.
struct alignas(64) TmaMap {
  unsigned long long words[16];
};

// ---------------------------------------------------------------- the 128-byte swizzle
// An operand tile of 16-bit values is stored as "atoms" of [rows][64 values]: 128 bytes a row,
// each atom 1024-byte aligned. Within a row, 16-byte chunk c sits at chunk c ^ (row % 8), so that
// the 8 rows of a core matrix group spread over all 32 banks (what wgmma's SWIZZLE_128B reads).
__device__ __forceinline__ int sw128(int row, int chunk) {  // byte offset inside an atom
  return row * 128 + ((chunk ^ (row & 7)) << 4);
}

// ---------------------------------------------------------------- mbarriers
__device__ __forceinline__ void mbar_init(unsigned long long* bar, int count) {
  PS_SM90_ASM("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count));
}
// The inits before it, visible to the asynchronous proxy (the copy engines) too.
__device__ __forceinline__ void fence_mbar_init() {
  PS_SM90_ASM("fence.mbarrier_init.release.cluster;" ::: "memory");
}
// Wait until the barrier's phase with this parity (0, 1, 0, ...: its completions so far, mod 2)
// has completed; acquires what the arriving threads wrote.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, int parity) {
  PS_SM90_ASM("{\n.reg .pred done;\nWAIT:\n"
              "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
              "@!done bra WAIT;\n}\n" ::"r"(smem_addr(bar)),
              "r"(parity)
              : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  PS_SM90_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// One arrival once every cp.async this thread issued so far has landed (counted in the barrier's
// initial count: .noinc).
__device__ __forceinline__ void mbar_arrive_cp_async(unsigned long long* bar) {
  PS_SM90_ASM("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(smem_addr(bar))
              : "memory");
}
// The mbarrier's current phase also waits for `bytes` more of asynchronous copies; one arrival.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  PS_SM90_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
              "r"(bytes)
              : "memory");
}

// ---------------------------------------------------------------- copies
// TMA: the box of `map` at (column, row) -> shared memory at dst (laid out, and swizzled, as the
// map says), completing its bytes on `bar`. Rows past the tensor's end arrive as zeros.
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaMap* map, int column, int row,
                                            unsigned long long* bar) {
  PS_SM90_ASM(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(column), "r"(row), "r"(smem_addr(bar))
      : "memory");
}
// Shared-memory writes of the generic proxy (cp.async, st.shared) -> visible to wgmma's reads.
__device__ __forceinline__ void fence_async_smem() {
  PS_SM90_ASM("fence.proxy.async.shared::cta;" ::: "memory");
}
