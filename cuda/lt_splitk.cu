// The epilogue of a split-K FP8 product (engine/executor/ops/cuda_fp8_splitk.py): cuBLASLt wrote
// S partial products over K / S features each, fp32 with scales 1, as one strided batch, so that
// a decode batch's product fills the GPU with S times the tiles of one output;
//   y[m, n] = (acc[0, m, n] + ... + acc[S - 1, m, n]) * sx[m] * sw[n], rounded to T.
// engine/model/fp8.py's product is the twin: products of two E4M3 values are exact in fp32, only
// the order of the fp32 sums differs.
#include "common.cuh"

// Grid: (ceil(M * N / 256))  Block: (256)
template <typename T>
__global__ void fp8_splitk_scale_kernel(T* __restrict__ y,              // [M, N]
                                        const float* __restrict__ acc,  // [S, M, N]
                                        const float* __restrict__ sx,   // [M]
                                        const float* __restrict__ sw,   // [N]
                                        long total, int N, int S) {
  pdl_start();
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  float sum = acc[i];
  for (int s = 1; s < S; ++s) sum += acc[(long)s * total + i];
  y[i] = from_float<T>(sum * sx[i / N] * sw[i % N]);
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void fp8_splitk_scale_kernel<__nv_bfloat16>(__nv_bfloat16*, const float*,
                                                                const float*, const float*, long,
                                                                int, int);
template __global__ void fp8_splitk_scale_kernel<__half>(__half*, const float*, const float*,
                                                         const float*, long, int, int);
#endif
