// Helpers shared by the samplers (sampling.cu, sampling_bisect.cu, sampling_greedy.cu): the
// parameter count (the layout of the parameters and results: sampling.cu's header), the
// counter-based uniform draw, and the (value desc, id asc) argmax.
#pragma once
#include "common.cuh"

constexpr int SAMPLE_THREADS = 1024;
constexpr int NUM_PARAMS = 10;

// SplitMix64's finalizer and the counter-based uniform of numpy_sampling (bit-identical draws).
__device__ __forceinline__ unsigned long long mix64(unsigned long long x) {
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ float uniform01(unsigned long long seed, unsigned int step) {
  const unsigned long long key = mix64(seed) + (unsigned long long)step * 0x9E3779B97F4A7C15ull;
  return (float)(mix64(key) >> 40) * 5.9604644775390625e-08f;  // 2^-24
}

// Is (v, i) ahead of (bv, bi) in the order "larger value first, then lower id"?
__device__ __forceinline__ bool ahead(float v, int i, float bv, int bi) {
  return v > bv || (v == bv && i < bi);
}

__device__ void block_argmax(float& v, int& id, float* sv, int* si) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (ahead(ov, oi, v, id)) { v = ov; id = oi; }
  }
  __syncthreads();
  if (lane == 0) { sv[warp] = v; si[warp] = id; }
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  v = lane < num_warps ? sv[lane] : -INFINITY;
  id = lane < num_warps ? si[lane] : 0x7fffffff;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    if (ahead(ov, oi, v, id)) { v = ov; id = oi; }
  }
}
