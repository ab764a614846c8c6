// Row gather: the embedding lookup and the selection of the rows that sample; and the
// placeholder ids of an overlapped step, gathered from the previous step's sampled ids.
#include "common.cuh"

// Copies whole rows in 16-byte words, so it serves every dtype.
// NOTE: ids are not range-checked here; the wrapper's callers produce them from the tokenizer.
// Grid: (num_out_rows)  Block: (cuda_norm.gather_threads: 32..512, 128 without NORM_VEC)
__global__ void gather_rows_kernel(uint4* __restrict__ out,        // [num_out_rows, words]
                                   const uint4* __restrict__ src,  // [num_src_rows, words]
                                   const int* __restrict__ idx,    // [num_out_rows]
                                   int words) {
  pdl_start();
  const long row = idx[blockIdx.x];
  for (int w = threadIdx.x; w < words; w += blockDim.x)
    out[(long)blockIdx.x * words + w] = src[row * words + w];
}

// In place: each id <= -2 is a placeholder for row -2 - id of the previous step's sampled ids
// (engine/executor/step_inputs.py); other ids (tokens, -1 padding) stay. The numpy twin is
// numpy_ops.resolve_placeholders.
// Grid: (ceil(n / 256))  Block: (256)
__global__ void resolve_placeholders_kernel(int* __restrict__ ids,            // [n]
                                            const int* __restrict__ sampled,  // [rows, stride]
                                            int n, int stride) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    const int id = ids[i];
    if (id <= -2) ids[i] = sampled[(long)(-2 - id) * stride];  // column 0: the sampled id
  }
}

// fp32 -> compute dtype, for weights made or uploaded in fp32.
// Grid: (ceil(n / 256))  Block: (256)
template <typename T>
__global__ void from_float_kernel(T* __restrict__ out, const float* __restrict__ in, long n) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = from_float<T>(in[i]);
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void from_float_kernel<__half>(__half*, const float*, long);
template __global__ void from_float_kernel<__nv_bfloat16>(__nv_bfloat16*, const float*, long);
#endif
