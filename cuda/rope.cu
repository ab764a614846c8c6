// Rotary position embedding, HF's half-split convention, in place on the q and k heads.
#include "common.cuh"

// x[j], x[j + half] <- x[j] cos - x[j + half] sin, x[j + half] cos + x[j] sin
// NOTE: cos_sin arrives in the compute dtype (as HF casts it) or fp32; the rotation runs in fp32.
// Grid: (num_tokens, num_heads + num_kv_heads)  Block: (head_dim / 2)
template <typename T, typename CS>
__global__ void rope_kernel(T* __restrict__ qkv,              // [num_tokens, (nh + 2 nkv) * hd]
                            const int* __restrict__ positions,  // [num_tokens]
                            const CS* __restrict__ cos_sin,   // [max_positions, hd]: cos, then sin
                            int num_heads, int num_kv_heads, int head_dim) {
  const int half = head_dim / 2, j = threadIdx.x;
  const long t = blockIdx.x;
  const long pos = positions[t];
  const float c = to_float(cos_sin[pos * head_dim + j]);
  const float s = to_float(cos_sin[pos * head_dim + half + j]);
  T* p = qkv + t * (num_heads + 2 * num_kv_heads) * head_dim + (long)blockIdx.y * head_dim;
  const float x1 = to_float(p[j]), x2 = to_float(p[j + half]);
  p[j] = from_float<T>(x1 * c - x2 * s);
  p[j + half] = from_float<T>(x2 * c + x1 * s);
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void rope_kernel<__half, __half>(__half*, const int*, const __half*, int, int,
                                                     int);
template __global__ void rope_kernel<__nv_bfloat16, float>(__nv_bfloat16*, const int*,
                                                           const float*, int, int, int);
#endif
