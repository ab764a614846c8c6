// L2 prefetch of weights that the next kernels of the step will read (engine/executor/ops/
// cuda_prefetch.py): a hint, nothing is written. At batch-1 decode the q/k-norm + RoPE kernel and
// the attention read a few MB for several microseconds while HBM idles; requesting the o, gate_up
// and down weights into L2 then takes their HBM reads off the GEMVs' critical path.
#include "common.cuh"

constexpr int PF_RANGES = 8;                 // (pointer, bytes) pairs per launch
constexpr unsigned PF_CHUNK = 64u * 1024u;   // bytes one request asks for (cuda_prefetch.CHUNK)

__device__ __forceinline__ void prefetch_l2(const char* p, unsigned bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // one bulk request; the TMA unit splits it (bytes and p are multiples of 16)
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#else
  for (unsigned off = 0; off < bytes; off += 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off) : "memory");
#endif
}

// Chunk c of PF_CHUNK bytes, numbered over the ranges in order, is requested by lane 0 of block
// c % gridDim.x: the requests spread over the SMs. Unused ranges have 0 bytes.
// PDL: it triggers its successor at once (it writes nothing, so the successor cannot race it)
// and waits for its predecessor before it exits, so that its completion still implies the
// predecessor's (common.cuh): the successor's pdl_wait() keeps its meaning.
// Grid: (min(chunks, cap))  Block: (32)
__global__ void l2_prefetch_kernel(const char* p0, const char* p1, const char* p2, const char* p3,
                                   const char* p4, const char* p5, const char* p6, const char* p7,
                                   unsigned long long n0, unsigned long long n1,
                                   unsigned long long n2, unsigned long long n3,
                                   unsigned long long n4, unsigned long long n5,
                                   unsigned long long n6, unsigned long long n7) {
  pdl_trigger();
  if (threadIdx.x == 0) {
    const char* p[PF_RANGES] = {p0, p1, p2, p3, p4, p5, p6, p7};
    const unsigned long long n[PF_RANGES] = {n0, n1, n2, n3, n4, n5, n6, n7};
    unsigned long long c = blockIdx.x;  // this block's next chunk, counted from range r's start
#pragma unroll
    for (int r = 0; r < PF_RANGES; r++) {
      const unsigned long long chunks = (n[r] + PF_CHUNK - 1) / PF_CHUNK;
      for (; c < chunks; c += gridDim.x) {
        const unsigned long long off = c * PF_CHUNK;
        const unsigned bytes = (unsigned)min(n[r] - off, (unsigned long long)PF_CHUNK) & ~15u;
        if (bytes) prefetch_l2(p[r] + off, bytes);
      }
      c -= chunks;  // c >= chunks here: its index in the next range
    }
  }
  pdl_wait();
}
