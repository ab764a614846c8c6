// The previous GPU sampler (bisection over bit patterns), kept as the baseline that
// tools/kernel_check.py times sampling.cu's sample_kernel against, and as a fallback switch
// (engine/executor/ops/cuda_sampling.py: SAMPLER = "bisect"). Same semantics; its p come from
// expf and a division, sample_kernel's from exp2f (sampling.cu's scaled_gap), so a draw at a
// rounding boundary may differ.
#include "sampling_common.cuh"

// Greedy choice over the adjusted (or raw) row: largest value, lowest id on ties; every thread
// gets it, and 0 when the row's only numbers are -inf (or it has none), as numpy_sampling.argmax
// (NaN as -inf) answers, even where id 0 is a NaN.
template <typename T>
__device__ int row_argmax(const T* __restrict__ logits, const float* __restrict__ adjusted,
                          long base, int vocab, float* sv, int* si) {
  float bv = -INFINITY;
  int bi = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = adjusted ? adjusted[base + i] : to_float(logits[base + i]);
    if (ahead(v, i, bv, bi)) { bv = v; bi = i; }
  }
  block_argmax(bv, bi, sv, si);
  return bv == -INFINITY ? 0 : bi;
}

// The previous sampler, kept as the baseline tools/kernel_check.py times sample_kernel against
// (cuda_sampling.SAMPLER = "bisect" selects it): probabilities written to a workspace, and each
// threshold found by bisection over bit patterns (~31 passes over the row per rule).
// Grid: (R)  Block: (SAMPLE_THREADS)
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_bisect_kernel(
    int* __restrict__ result,             // [R, 2 + 2 * num_logprobs]
    float* __restrict__ probs,            // [R, vocab] workspace; null when every row is greedy
    const T* __restrict__ logits,         // [R, vocab] raw
    const float* __restrict__ adjusted,   // [R, vocab] penalized + biased, or null (= raw)
    const int* __restrict__ params,       // [R, NUM_PARAMS]
    int vocab, int num_logprobs) {
  __shared__ float red[32];
  __shared__ int redi[32];
  __shared__ int chosen_first, chosen_last;
  const long base = (long)blockIdx.x * vocab;
  const int tid = threadIdx.x;
  const int* p = params + blockIdx.x * NUM_PARAMS;
  const float temperature = __int_as_float(p[0]);

  // 1. Raw log_softmax statistics (logprobs are taken before any adjustment).
  float mx = -INFINITY;
  for (int i = tid; i < vocab; i += blockDim.x) mx = fmaxf(mx, to_float(logits[base + i]));
  const float raw_max = block_max(mx, red);
  float se = 0.f;
  for (int i = tid; i < vocab; i += blockDim.x) se += expf(to_float(logits[base + i]) - raw_max);
  const float log_sum = logf(block_sum(se, red));

  // The adjusted row's max; a row whose every token is banned (-inf) has no distribution.
  float smx = -INFINITY;
  if (temperature != 0.f) {
    for (int i = tid; i < vocab; i += blockDim.x)
      smx = fmaxf(smx, adjusted ? adjusted[base + i] : to_float(logits[base + i]));
    smx = block_max(smx, red);
  }
  int token = -1;  // block-uniform throughout: every branch below is taken by all threads
  if (temperature != 0.f && smx > -INFINITY) {
    // 2. probs = softmax(adjusted / temperature), written out for the threshold passes.
    // NOTE: the max is subtracted before dividing, so a denormal temperature (1e-40) sends the
    // other logits to -inf instead of overflowing to inf - inf = nan; an inf one is FLT_MAX.
    const float temp = fminf(temperature, PS_FLT_MAX);
    float z = 0.f;
    for (int i = tid; i < vocab; i += blockDim.x) {
      const float v = adjusted ? adjusted[base + i] : to_float(logits[base + i]);
      const float e = expf(__fdiv_rn(__fsub_rn(v, smx), temp));
      probs[base + i] = e;
      z += e;
    }
    z = block_sum(z, red);
    for (int i = tid; i < vocab; i += blockDim.x) probs[base + i] = __fdiv_rn(probs[base + i], z);
    const float p_max = __fdiv_rn(1.f, z);  // the largest prob is exp(0) / z
    __syncthreads();

    // 3. Keep p >= tau, tau the largest of the three thresholds. Non-negative floats order like
    //    their bit patterns, so each threshold is a bisection over bit patterns of the value range.
    float tau = 0.f;
    const int top_k = p[1];
    const float top_p = __int_as_float(p[2]), min_p = __int_as_float(p[3]);
    if (top_k > 0 && top_k < vocab) {
      // largest b with count(p >= b) >= top_k: that is the k-th largest value
      unsigned lo = 0, hi = __float_as_uint(p_max);
      while (lo < hi) {
        const unsigned mid = lo + (hi - lo + 1) / 2;
        const float t = __uint_as_float(mid);
        float c = 0.f;
        for (int i = tid; i < vocab; i += blockDim.x) c += probs[base + i] >= t ? 1.f : 0.f;
        if (block_sum(c, red) >= (float)top_k) lo = mid; else hi = mid - 1;
      }
      tau = fmaxf(tau, __uint_as_float(lo));
    }
    if (min_p > 0.f) tau = fmaxf(tau, __fmul_rn(min_p, p_max));
    if (top_p < 1.f) {
      // Top-p measures its mass on what top-k and min-p keep (vLLM's order).
      float limit = top_p;
      if (tau > 0.f) {
        float kept = 0.f;
        for (int i = tid; i < vocab; i += blockDim.x) {
          const float q = probs[base + i];
          kept += q >= tau ? q : 0.f;
        }
        limit = __fmul_rn(top_p, block_sum(kept, red));
      }
      // smallest b with mass(p > b) < limit: that is the smallest kept value
      unsigned lo = 0, hi = __float_as_uint(p_max);
      while (lo < hi) {
        const unsigned mid = lo + (hi - lo) / 2;
        const float t = __uint_as_float(mid);
        float m = 0.f;
        for (int i = tid; i < vocab; i += blockDim.x) {
          const float q = probs[base + i];
          m += q > t ? q : 0.f;
        }
        if (block_sum(m, red) < limit) hi = mid; else lo = mid + 1;
      }
      tau = fmaxf(tau, __uint_as_float(lo));
    }

    // 4. Inverse-CDF draw in id order: thread t owns the contiguous ids [t * chunk, ...).
    const int chunk = (vocab + blockDim.x - 1) / blockDim.x;
    const int begin = min(vocab, tid * chunk), end = min(vocab, begin + chunk);
    float mine = 0.f;
    int last_kept = -1;
    for (int i = begin; i < end; i++) {
      const float q = probs[base + i];
      if (q >= tau && q > 0.f) { mine += q; last_kept = i; }
    }
    // Exclusive scan of the per-thread sums: within the warp, then over warps.
    const int lane = tid & 31, warp = tid >> 5;
    float incl = mine;
    for (int o = 1; o < 32; o <<= 1) {
      const float n = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) red[warp] = incl;
    if (tid == 0) { chosen_first = 0x7fffffff; chosen_last = -1; }
    __syncthreads();
    float warp_base = 0.f, total = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) {
      if (w < warp) warp_base += red[w];
      total += red[w];
    }
    const float target = __fmul_rn(uniform01(((unsigned long long)(unsigned)p[5] << 32) |
                                              (unsigned)p[4], (unsigned)p[6]), total);
    float running = warp_base + incl - mine;
    for (int i = begin; i < end; i++) {
      const float q = probs[base + i];
      if (q >= tau && q > 0.f) {
        running += q;
        if (running > target) { atomicMin(&chosen_first, i); break; }
      }
    }
    if (last_kept >= 0) atomicMax(&chosen_last, last_kept);
    __syncthreads();
    // Float rounding can leave the target at or past the total: take the last kept id then.
    token = chosen_first != 0x7fffffff ? chosen_first : chosen_last;
  }
  if (token < 0) token = row_argmax(logits, adjusted, base, vocab, red, redi);  // greedy, or
                                                                               // nothing kept

  // 5. Results: the token's raw logprob, then the top raw logprobs (next_top's order).
  const int width = 2 + 2 * num_logprobs;
  int* out = result + blockIdx.x * width;
  if (tid == 0) {
    out[0] = token;
    out[1] = __float_as_int(to_float(logits[base + token]) - raw_max - log_sum);
  }
  float top_v = INFINITY;
  int top_i = -1;
  for (int n = 0; n < num_logprobs; n++) {
    next_top(logits + base, vocab, top_v, top_i, red, redi);
    if (tid == 0) {
      out[2 + n] = top_i;
      out[2 + num_logprobs + n] = __float_as_int(top_v - raw_max - log_sum);
    }
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void sample_bisect_kernel<__half>(int*, float*, const __half*, const float*,
                                                      const int*, int, int);
template __global__ void sample_bisect_kernel<float>(int*, float*, const float*, const float*,
                                                     const int*, int, int);
#endif
