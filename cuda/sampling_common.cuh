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

// The lowest NaN id past `after` (-1: from the start) of a row, 0x7fffffff when none; every
// thread gets it. Out of line: only a broken model's row gets here.
template <typename T>
__device__ __noinline__ int next_nan(const T* __restrict__ row, int vocab, int after, float* sv,
                                     int* si) {
  int id = 0x7fffffff;
  for (int i = min(after, vocab - 1) + 1 + threadIdx.x; i < vocab; i += blockDim.x)
    if (to_float(row[i]) != to_float(row[i])) { id = i; break; }
  float found = id != 0x7fffffff ? 0.f : -INFINITY;  // the lowest id among equal keys
  block_argmax(found, id, sv, si);
  return id;
}

// The id after (prev_v, prev_i) in the order of the top logprobs: value desc, id asc, then the
// NaN in id order (numpy_sampling's argsort(-logits, kind="stable")); start from (INFINITY, -1).
// Every thread gets it in (prev_v, prev_i). NOTE: without the NaN step a row of a broken model
// ranked its numbers and then answered 0x7fffffff as an id (`ahead` never takes a NaN).
template <typename T>
__device__ void next_top(const T* __restrict__ row, int vocab, float& prev_v, int& prev_i,
                         float* sv, int* si) {
  float v = -INFINITY;
  int id = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {  // none after a NaN
    const float x = to_float(row[i]);
    if (ahead(prev_v, prev_i, x, i) && ahead(x, i, v, id)) { v = x; id = i; }
  }
  block_argmax(v, id, sv, si);
  if (id == 0x7fffffff) {  // only NaN left
    id = next_nan(row, vocab, prev_v == prev_v ? -1 : prev_i, sv, si);
    v = __int_as_float(0x7fffffff);
  }
  prev_v = v;
  prev_i = id;
}
