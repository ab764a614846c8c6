// Greedy sampling of rows without penalties, bias or top logprobs: the argmax (lowest id on
// ties) and its raw logprob, exactly sample_kernel's answer for such rows. sample_kernel gives a
// row one block, which leaves most of the GPU idle at small batches (one block for batch-1
// decode streams 300 KB of logits through one SM); here a row is split over C blocks that each
// reduce a chunk to (max, sum of exp(x - max), argmax), and the last block of the row to finish
// merges the C partials. Results are laid out as sample_kernel's: [R, 2] id, logprob bits.
#include "sampling_common.cuh"

constexpr int GREEDY_THREADS = 256;
constexpr int GREEDY_NO_ID = 0x7fffffff;
constexpr float LOG2E_F = 1.4426950408889634f;

// The merge of two (max, sum) pairs of the online log-sum-exp (base-2 exponent of x * log2 e).
// NOTE: a NaN summed (a broken model's logit) leaves s NaN whatever m is, also where every other
// value was -inf or NaN (m still -inf): kept, so that the row's logprob is NaN exactly when the
// row holds a NaN, as numpy_sampling.log_softmax's (sample_kernel's online_merge does the same).
__device__ __forceinline__ void lse_merge(float& m, float& s, float om, float os) {
  if (om == -INFINITY && os == os) return;
  if (m == -INFINITY && s == s) { m = om; s = os; return; }
  const float hi = fmaxf(m, om);
  s = s * exp2f((m - hi) * LOG2E_F) + os * exp2f((om - hi) * LOG2E_F);
  m = hi;
}

// Grid: (R, C)  Block: (GREEDY_THREADS)
// chunk: a multiple of 8; with `vec` (vocab % 8 == 0, logits 16-byte aligned) 16-byte loads.
template <typename T>
__global__ void __launch_bounds__(GREEDY_THREADS) greedy_kernel(
    int* __restrict__ result,          // [R, 2] token id, raw logprob (f32 bits)
    float* __restrict__ partial,       // [R, C, 4] max, sum, argmax id (bits), its value
    int* __restrict__ done,            // [R] blocks finished per row; 0 before, 0 after
    const T* __restrict__ logits,      // [R, vocab]
    int vocab, int chunk, int vec) {
  __shared__ float red_v[32];
  __shared__ int red_i[32];
  __shared__ bool last;
  const int r = blockIdx.x, c = blockIdx.y, num_chunks = gridDim.y;
  const T* row = logits + (long)r * vocab;
  const int begin = c * chunk, end = min(vocab, begin + chunk);
  float m = -INFINITY, s = 0.f, bv = -INFINITY;
  int bi = GREEDY_NO_ID;
  auto visit = [&](int i, float v) {
    if (ahead(v, i, bv, bi)) { bv = v; bi = i; }
    if (v == -INFINITY) return;  // adds 0; and -inf - -inf would be nan
    if (v > m) {
      s = s * exp2f((m - v) * LOG2E_F) + 1.f;  // 0 while m is -inf
      m = v;
    } else {
      s += exp2f((v - m) * LOG2E_F);
    }
  };
  if (vec) {
    for (int i0 = begin + threadIdx.x * 8; i0 < end; i0 += GREEDY_THREADS * 8) {
      const uint4 w = __ldg(reinterpret_cast<const uint4*>(row + i0));
      if constexpr (sizeof(T) == 4) {
        const uint4 w2 = __ldg(reinterpret_cast<const uint4*>(row + i0) + 1);
        const float* f = reinterpret_cast<const float*>(&w);
        const float* f2 = reinterpret_cast<const float*>(&w2);
#pragma unroll
        for (int e = 0; e < 4; e++) visit(i0 + e, f[e]);
#pragma unroll
        for (int e = 0; e < 4; e++) visit(i0 + 4 + e, f2[e]);
      } else {
        const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
        for (int e = 0; e < 8; e++) visit(i0 + e, to_float(h[e]));
      }
    }
  } else {
    for (int i = begin + threadIdx.x; i < end; i += GREEDY_THREADS) visit(i, to_float(row[i]));
  }
  // The block's (max, sum) and argmax.
  const float block_m = block_max(m, red_v);
  float mine = m == -INFINITY && s == s ? 0.f : s * exp2f((m - block_m) * LOG2E_F);
  const float block_s = block_sum(mine, red_v);
  block_argmax(bv, bi, red_v, red_i);
  float* out = partial + ((long)r * num_chunks + c) * 4;
  if (threadIdx.x == 0) {
    out[0] = block_m;
    out[1] = block_s;
    out[2] = __int_as_float(bi);
    out[3] = bv;
    __threadfence();  // the partial is visible before the count says so
    last = atomicAdd(done + r, 1) == num_chunks - 1;
  }
  __syncthreads();
  if (!last) return;
  // The row's last block: merge the chunks (one warp; C <= 64).
  __threadfence();
  if (threadIdx.x >= 32) return;
  float rm = -INFINITY, rs = 0.f, rv = -INFINITY;
  int ri = GREEDY_NO_ID;
  for (int k = threadIdx.x; k < num_chunks; k += 32) {
    const float* p = partial + ((long)r * num_chunks + k) * 4;
    const float pv = __ldcg(p + 3);
    const int pi = __float_as_int(__ldcg(p + 2));
    lse_merge(rm, rs, __ldcg(p), __ldcg(p + 1));
    if (ahead(pv, pi, rv, ri)) { rv = pv; ri = pi; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffffu, rm, o);
    const float os = __shfl_xor_sync(0xffffffffu, rs, o);
    lse_merge(rm, rs, om, os);
    const float ov = __shfl_xor_sync(0xffffffffu, rv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, ri, o);
    if (ahead(ov, oi, rv, ri)) { rv = ov; ri = oi; }
  }
  if (threadIdx.x == 0) {
    // A row whose only numbers are -inf (or NaN: no id at all) answers 0, as numpy's argmax
    // (NaN as -inf) does, even where id 0 is a NaN.
    const int token = rv == -INFINITY ? 0 : ri;
    result[r * 2] = token;
    result[r * 2 + 1] = __float_as_int(to_float(row[token]) - rm - logf(rs));
    done[r] = 0;  // ready for the next launch (CUDA-graph replays reuse the counters)
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void greedy_kernel<float>(int*, float*, int*, const float*, int, int, int);
template __global__ void greedy_kernel<__half>(int*, float*, int*, const __half*, int, int, int);
template __global__ void greedy_kernel<__nv_bfloat16>(int*, float*, int*, const __nv_bfloat16*,
                                                      int, int, int);
#endif
