// Per-request token choices of the sampler, launched only for the rows that make them:
// allowed_token_ids (sample among some tokens) and logprob_token_ids / logprobs = -1 (the
// logprobs of chosen tokens, or of every token, instead of the top-k).
// numpy twins: numpy_sampling.allow_only and numpy_sampling.row_logprobs.
#include "common.cuh"

// Each listed row keeps only its allowed ids: every other adjusted logit becomes -inf (after
// penalties and bias, before the draw; raw logprobs never read this buffer).
// Grid: (ceil(vocab / 256), M)  Block: (256)
__global__ void allow_only_kernel(float* __restrict__ adjusted,       // [R, vocab]
                                  const int* __restrict__ rows,       // [M] rows of adjusted
                                  const int* __restrict__ allowed,    // [M, A] ascending, padded
                                                                      // with INT_MAX
                                  int A, int vocab) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= vocab) return;
  const int* ids = allowed + (long)blockIdx.y * A;
  int lo = 0, hi = A;  // the first position whose id is >= i
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (ids[mid] < i) lo = mid + 1; else hi = mid;
  }
  if (lo == A || ids[lo] != i) adjusted[(long)rows[blockIdx.y] * vocab + i] = -INFINITY;
}

// Raw logprobs (log_softmax of the logits, as numpy_sampling.log_softmax computes it:
// (x - max) - log(sum(exp(x - max)))) of some rows at their chosen ids (-1: -inf), or with
// `ids` null at every token (W == vocab).
// Grid: (N)  Block: (1024)
template <typename T>
__global__ void row_logprobs_kernel(float* __restrict__ out,        // [N, W]
                                    const T* __restrict__ logits,   // [R, vocab] raw
                                    const int* __restrict__ rows,   // [N] rows of logits
                                    const int* __restrict__ ids,    // [N, W] padded with -1,
                                                                    // or null
                                    int W, int vocab) {
  __shared__ float red[32];
  const long base = (long)rows[blockIdx.x] * vocab;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_float(logits[base + i]));
  m = block_max(m, red);
  float s = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(to_float(logits[base + i]) - m);
  const float log_s = logf(block_sum(s, red));
  float* o = out + (long)blockIdx.x * W;
  for (int j = threadIdx.x; j < W; j += blockDim.x) {
    const int id = ids ? ids[(long)blockIdx.x * W + j] : j;
    o[j] = id >= 0 && id < vocab ? (to_float(logits[base + id]) - m) - log_s : -INFINITY;
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void row_logprobs_kernel<float>(float*, const float*, const int*, const int*,
                                                    int, int);
template __global__ void row_logprobs_kernel<__half>(float*, const __half*, const int*,
                                                     const int*, int, int);
template __global__ void row_logprobs_kernel<__nv_bfloat16>(float*, const __nv_bfloat16*,
                                                            const int*, const int*, int, int);
#endif
