// Flash-decoding's split rule, shared by the decode kernels (attention.cu, attention_decode_mma.cu)
// and the reduction that combines their splits: decode_reduce_kernel (attention.cu), or the last
// split block of a (sequence, kv head) itself (merge_splits below, PAGEDSERVE_DECODE_FUSED_REDUCE).
#pragma once
#include "common.cuh"

// decode_reduce_kernel's block, and the most splits a sequence may use: each of its threads takes
// one split's weight, so that the reduction's order (which merge_splits repeats) is fixed.
constexpr int RED_THREADS = 512, MAX_SPLITS = 512;

// How many of the grid's `num_splits` context splits a sequence of `ctx` keys uses: about
// `min_keys` keys or more each, so a short sequence takes one split (and skips the reduction)
// while one long sequence spreads over every split the grid has. The kernels compute it from the
// device's context_lens, so a CUDA graph captured with the largest split count replays correctly
// for any mix of lengths; a split beyond it exits at once.
__device__ __forceinline__ int seq_splits(int ctx, int num_splits, int min_keys) {
  return max(1, min(num_splits, (ctx + min_keys - 1) / min_keys));
}

// Called by every thread of a split block once its partial (out, m, l) is written: true in the
// block that finishes last among the `splits` blocks counting on `*counter`, which then reads the
// others' partials. That block sets the counter back to 0, so the next launch (a CUDA graph's
// next replay) finds it as the first did.
// NOTE: the threadfence before the count publishes this block's partials to the other SMs before
// the last block can see the count (the classic threadFenceReduction pattern); the one after it,
// with the barrier, orders the last block's reads of the others' partials after their count.
__device__ __forceinline__ bool finish_split(int* counter, int splits) {
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    is_last = atomicAdd(counter, 1) == splits - 1;
    if (is_last) *counter = 0;  // every other block has counted: nobody else touches it now
    __threadfence();
  }
  __syncthreads();
  return is_last;
}

// The combination of one query head's splits (out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M)
// l_s), in exactly decode_reduce_kernel's order of float operations, so that the fused and the
// two-kernel paths agree bit for bit:
// - the weights' sum: thread s of the reduce block holds split s's w_s l_s; a warp sums its 32
//   by warp_sum, then warp_sum again over the 16 warp sums (lanes 16..31 add zeros);
// - each output dimension: RED_SUB = RED_THREADS / HD chains, chain c summing splits
//   c, c + RED_SUB, ... by fma in that order; then chain 0 + chain 1 + ... in order.
// Partials of other blocks are read through L2 (__ldcg): this SM's L1 is not coherent with theirs.
// The block has NT threads; `w_s` is scratch of ng x splits floats in shared memory.
// Grid: the caller's  Block: (NT)
template <typename T, int HD, int NT>
__device__ void merge_splits(
    T* __restrict__ out,              // [num_tokens, num_heads, HD]
    const float* part_out,            // [num_splits, W, num_heads, HD]
    const float* part_ml,             // [num_splits, W, num_heads, 2]
    float* w_s,                       // shared [ng][splits]
    int splits, int item, int num_items, int num_heads, int head0, int ng, long tok) {
  constexpr int RED_SUB = RED_THREADS / HD, NWARPS = NT / 32;
  static_assert(RED_THREADS % HD == 0 && NT % 32 == 0, "whole chains, whole warps");
  __shared__ float den_s[16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const long stride = (long)num_items * num_heads;
  for (int g = warp; g < ng; g += NWARPS) {
    const long ih = (long)item * num_heads + head0 + g;
    float mx = -INFINITY;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, __ldcg(part_ml + (s * stride + ih) * 2));
    mx = warp_max(mx);
    float den = 0.f;  // lane c: the sum of reduce warp c's splits 32c .. 32c + 31
    for (int c = 0; c * 32 < splits; c++) {
      const int s = c * 32 + lane;
      float t = 0.f;
      if (s < splits) {
        const float ms = __ldcg(part_ml + (s * stride + ih) * 2);
        const float w = ms == -INFINITY ? 0.f : exp2f(ms - mx);  // a split that saw no key: 0
        w_s[g * splits + s] = w;
        t = __fmul_rn(w, __ldcg(part_ml + (s * stride + ih) * 2 + 1));
      }
      t = warp_sum(t);
      if (lane == c) den = t;
    }
    den = warp_sum(den);
    if (lane == 0) den_s[g] = den;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ng * HD; idx += NT) {
    const int g = idx / HD, d = idx % HD;
    const float* po = part_out + ((long)item * num_heads + head0 + g) * HD + d;
    const float* w = w_s + g * splits;
    float acc[RED_SUB];
#pragma unroll
    for (int c = 0; c < RED_SUB; c++) acc[c] = 0.f;
#pragma unroll 2
    for (int s0 = 0; s0 < splits; s0 += RED_SUB) {
#pragma unroll
      for (int c = 0; c < RED_SUB; c++)
        if (s0 + c < splits) acc[c] = fmaf(w[s0 + c], __ldcg(po + (s0 + c) * stride * HD), acc[c]);
    }
    float num = acc[0];
#pragma unroll
    for (int c = 1; c < RED_SUB; c++) num += acc[c];
    const float den = den_s[g];
    out[(tok * num_heads + head0 + g) * HD + d] = from_float<T>(den > 0.f ? num / den : 0.f);
  }
}
