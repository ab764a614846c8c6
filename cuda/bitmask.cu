// Structured outputs: tokens a row's grammar forbids get a logit of -inf before sampling.
// Twin: engine/executor/ops/numpy_ops.py NumpyOps.apply_token_bitmask.
#include "common.cuh"

// One thread per token: neighbouring threads write neighbouring logits, and the 32 threads of a
// warp read the same bitmask word (one broadcast load).
// NOTE: masked entries become -inf in the logits' own dtype (fp16 and bf16 both have -inf), so
// the sampler's softmax gives them probability 0 and logprob -inf.
// Grid: (R, ceil(vocab / 256))  Block: (256)
template <typename T>
__global__ void apply_token_bitmask_kernel(T* __restrict__ logits,         // [R, vocab]
                                           const int* __restrict__ bitmask,  // [R, words]
                                           int vocab, int words) {
  const int token = blockIdx.y * blockDim.x + threadIdx.x;
  if (token >= vocab) return;
  const long row = blockIdx.x;
  const unsigned int bits = (unsigned int)bitmask[row * words + (token >> 5)];
  if (!((bits >> (token & 31)) & 1u)) logits[row * vocab + token] = from_float<T>(-INFINITY);
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void apply_token_bitmask_kernel<float>(float*, const int*, int, int);
template __global__ void apply_token_bitmask_kernel<__half>(__half*, const int*, int, int);
template __global__ void apply_token_bitmask_kernel<__nv_bfloat16>(__nv_bfloat16*, const int*,
                                                                   int, int);
#endif
