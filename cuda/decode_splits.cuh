// Flash-decoding's split rule, shared by the decode kernels (attention.cu, attention_decode_mma.cu)
// and the reduction that combines their splits.
#pragma once

// How many of the grid's `num_splits` context splits a sequence of `ctx` keys uses: about
// `min_keys` keys or more each, so a short sequence takes one split (and skips the reduction)
// while one long sequence spreads over every split the grid has. The kernels compute it from the
// device's context_lens, so a CUDA graph captured with the largest split count replays correctly
// for any mix of lengths; a split beyond it exits at once.
__device__ __forceinline__ int seq_splits(int ctx, int num_splits, int min_keys) {
  return max(1, min(num_splits, (ctx + min_keys - 1) / min_keys));
}
