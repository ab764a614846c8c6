// Shared helpers for pagedserve's kernels: dtype conversion and reductions.
// Activations and weights are half or __nv_bfloat16; all arithmetic happens in fp32.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef INFINITY  // NVRTC does not include math.h
#define INFINITY __int_as_float(0x7f800000)
#endif
#define PS_FLT_MAX __int_as_float(0x7f7fffff)  // float.h's FLT_MAX / FLT_MIN, which NVRTC lacks
#define PS_FLT_MIN __int_as_float(0x00800000)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
// NOTE: both conversions round to nearest even, like numpy/ml_dtypes on the host.
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the whole block, returned to every thread. `smem` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int num_warps = (blockDim.x + 31) >> 5;
  v = lane < num_warps ? smem[lane] : 0.f;
  return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  const int num_warps = (blockDim.x + 31) >> 5;
  v = lane < num_warps ? smem[lane] : -INFINITY;
  return warp_max(v);
}

// Programmatic dependent launch (Hopper; cuda_kernels.launch with pdl=True inside
// cuda_kernels.programmatic_launches(), sm_90+; launch's default is a plain launch):
// such a kernel may be resident before the previous kernel on the stream has finished.
// pdl_wait() returns once that kernel has completed and its writes are visible. Every block of a
// kernel launched so calls it, early-exiting blocks too, before it reads anything an earlier
// kernel wrote and before it writes anything (the previous kernel may still read memory this one
// overwrites): then this grid's completion implies its predecessor's, and so on down the chain,
// which is what lets a kernel read the output of one launched two or more before it. Only reads
// of what no kernel writes may come before the wait: weights, tables (RoPE's cos/sin) and a
// step's inputs from the host (positions, slot mapping: copied before the first kernel of the
// chain, which starts after the copy has finished); and what only an earlier step's kernels wrote
// (attention_decode_mma.cu's cached keys and values: a step's chain starts after them).
// pdl_trigger() lets the next kernel launch (once every block of this one has called it or
// exited). It may come before the wait (pdl_enter with PDL_EARLY: the next kernel resident while
// this one waits, and a chain of such kernels runs as deep as the SMs hold them) - the next
// kernel still waits for this one's completion, and this one for its predecessor's.
// All of these are no-ops for a kernel launched plainly and before sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_start() {
  pdl_wait();
  pdl_trigger();
}

constexpr int PDL_EARLY = 1;  // a kernel's `flags` bit (cuda_kernels.PDL_EARLY): trigger first
// a `flags` bit of the GGUF GEMVs with the fused norm (cuda_norm.NORM_W_EARLY, on with
// PAGEDSERVE_NORM_VEC): the norm weight is loaded with x and the residual where the row takes one
// pass, instead of after the sum of squares (a memory latency more per launch); in qk_rope_kv.cu,
// its norm weights, bias, cos/sin and slot are read before the PDL wait
constexpr int NORM_W_EARLY = 2;

__device__ __forceinline__ void pdl_enter(int flags) {
  if (flags & PDL_EARLY) {
    pdl_trigger();
    pdl_wait();
  } else {
    pdl_start();
  }
}

// ------------------------------------------------------------------------------ clusters (sm_90)
// A kernel's compile-time cluster shape; nothing before sm_90 (no clusters: a kernel using the
// helpers below must not run there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define CLUSTER_DIMS(x, y, z)
#else
#define CLUSTER_DIMS(x, y, z) __cluster_dims__(x, y, z)
#endif

// Both cluster barriers: arrive with release, wait with acquire (every thread of every block).
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
               ::: "memory");
#endif
}

// The barrier in halves: after cluster_arrive() a block's threads may go on, and
// cluster_wait() returns once every thread of the cluster has arrived (a block whose shared
// memory others read must not exit before they are done: arrive after the last remote read,
// wait before exiting).
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
  return r;
}

// The float at p (this block's shared memory) in block `rank` of the cluster.
__device__ __forceinline__ float ld_cluster(const float* p, unsigned rank) {
  float v = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const unsigned a = (unsigned)__cvta_generic_to_shared(p);
  unsigned ra;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(ra) : "memory");
#endif
  return v;
}
