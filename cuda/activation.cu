// SwiGLU's SiLU-and-multiply, and the bias add after a GEMM.
#include "common.cuh"

// NOTE: silu(g) * u is computed in fp32 and rounded once (HF rounds silu(g) first; the difference
// is below the dtype's resolution on average).
// Grid: (ceil(num_tokens * inter / 256))  Block: (256)
template <typename T>
__global__ void silu_and_mul_kernel(T* __restrict__ out,            // [num_tokens, inter]
                                    const T* __restrict__ gate_up,  // [num_tokens, 2 * inter]
                                    long n, int inter) {
  pdl_start();
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long t = i / inter, j = i % inter;
  const float g = to_float(gate_up[t * 2 * inter + j]);
  const float u = to_float(gate_up[t * 2 * inter + inter + j]);
  out[i] = from_float<T>(g / (1.f + expf(-g)) * u);
}

// The same products, 8 per thread through 16-byte loads and stores (inter % 8 == 0, 16-byte
// aligned rows; CudaOps.silu_and_mul checks): the kernel above pays a 64-bit divide per element
// and 2-byte accesses. Bit-identical to it (the same fp32 arithmetic per element).
// Grid: (ceil(num_tokens * inter / 8 / 256))  Block: (256)
template <typename T>
__global__ void silu_and_mul_vec8_kernel(T* __restrict__ out,            // [num_tokens, inter]
                                         const T* __restrict__ gate_up,  // [num_tokens, 2 * inter]
                                         long n8, int inter8) {          // n / 8, inter / 8
  pdl_start();
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;  // which 8 outputs
  if (i >= n8) return;
  const long t = i / inter8, j = i % inter8;
  const uint4* row = reinterpret_cast<const uint4*>(gate_up) + t * 2 * inter8;
  const uint4 g8 = row[j], u8 = row[inter8 + j];
  const T* g = reinterpret_cast<const T*>(&g8);
  const T* u = reinterpret_cast<const T*>(&u8);
  uint4 o8;
  T* o = reinterpret_cast<T*>(&o8);
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float gf = to_float(g[e]);
    o[e] = from_float<T>(gf / (1.f + expf(-gf)) * to_float(u[e]));
  }
  reinterpret_cast<uint4*>(out)[i] = o8;
}

// Grid: (ceil(num_tokens * width / 256))  Block: (256)
template <typename T>
__global__ void add_bias_kernel(T* __restrict__ y,           // [num_tokens, width], in place
                                const T* __restrict__ bias,  // [width]
                                long n, int width) {
  const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = from_float<T>(to_float(y[i]) + to_float(bias[i % width]));
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void silu_and_mul_kernel<__half>(__half*, const __half*, long, int);
template __global__ void silu_and_mul_kernel<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                                            long, int);
template __global__ void silu_and_mul_vec8_kernel<__half>(__half*, const __half*, long, int);
template __global__ void silu_and_mul_vec8_kernel<__nv_bfloat16>(__nv_bfloat16*,
                                                                 const __nv_bfloat16*, long, int);
template __global__ void add_bias_kernel<__half>(__half*, const __half*, long, int);
template __global__ void add_bias_kernel<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                                        long, int);
#endif
