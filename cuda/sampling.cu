// Sampling on the GPU: exactly engine/ops/numpy_sampling.sample, one block per row.
//
// Per-row parameters arrive packed as 32-bit words (one upload per step):
//   [R, 10]: temperature (f32), top_k, top_p (f32), min_p (f32), seed low, seed high, step,
//            presence (f32), frequency (f32), repetition (f32)
// Results leave packed the same way (one download per step):
//   [R, 2 + 2 * num_logprobs]: token id, its raw logprob (f32), top ids, top raw logprobs (f32)
#include "sampling_common.cuh"

// Marks the tokens a row has seen: output tokens counted, prompt tokens flagged by bit 30.
// Grid: (R)  Block: (256)
__global__ void penalty_counts_kernel(int* __restrict__ counts,            // [R, vocab], zeroed
                                      const int* __restrict__ prompt_ids,  // [R, P], -1 padded
                                      const int* __restrict__ output_ids,  // [R, O], -1 padded
                                      int P, int O, int vocab) {
  int* row = counts + (long)blockIdx.x * vocab;
  for (int i = threadIdx.x; i < P; i += blockDim.x) {
    const int id = prompt_ids[(long)blockIdx.x * P + i];
    if (id >= 0) atomicOr(row + id, 1 << 30);
  }
  for (int i = threadIdx.x; i < O; i += blockDim.x) {
    const int id = output_ids[(long)blockIdx.x * O + i];
    if (id >= 0) atomicAdd(row + id, 1);
  }
}

// adjusted = penalized logits (vLLM's order: repetition, then frequency, then presence).
// NOTE: explicit _rn intrinsics keep the float32 rounding numpy does (no fused multiply-add).
// Grid: (R, ceil(vocab / 256))  Block: (256)
template <typename T>
__global__ void adjust_logits_kernel(float* __restrict__ adjusted,     // [R, vocab]
                                     const T* __restrict__ logits,     // [R, vocab]
                                     const int* __restrict__ counts,   // [R, vocab] or null
                                     const int* __restrict__ params,   // [R, NUM_PARAMS]
                                     int vocab) {
  const int v = blockIdx.y * blockDim.x + threadIdx.x;
  if (v >= vocab) return;
  const long at = (long)blockIdx.x * vocab + v;
  float l = to_float(logits[at]);
  if (counts != nullptr) {
    const int* p = params + blockIdx.x * NUM_PARAMS;
    const float presence = __int_as_float(p[7]), frequency = __int_as_float(p[8]);
    const float repetition = __int_as_float(p[9]);
    const int c = counts[at];
    const int n = c & ((1 << 30) - 1);
    if (repetition != 1.f && c != 0) {
      // NOTE: 1e-50 is 0 and 1e50 is inf in float32: clamped, as numpy_sampling does, so that
      // the penalized row stays finite (no x / 0, no 0 * inf).
      const float r = fminf(fmaxf(repetition, PS_FLT_MIN), PS_FLT_MAX);
      l = l > 0.f ? __fdiv_rn(l, r) : __fmul_rn(l, r);
    }
    l = __fsub_rn(l, __fmul_rn(frequency, (float)n));
    l = __fsub_rn(l, n > 0 ? presence : 0.f);
    l = fminf(fmaxf(l, -PS_FLT_MAX), PS_FLT_MAX);
  }
  adjusted[at] = l;
}

// Adds logit_bias pairs (sequentially per row, like np.add.at, so repeated ids add up in order).
// Grid: (R)  Block: (1)
__global__ void add_logit_bias_kernel(float* __restrict__ adjusted,         // [R, vocab]
                                      const int* __restrict__ bias_ids,     // [R, NB], -1 padded
                                      const float* __restrict__ bias_values,  // [R, NB]
                                      int NB, int vocab) {
  for (int i = 0; i < NB; i++) {
    const int id = bias_ids[blockIdx.x * NB + i];
    if (id >= 0) adjusted[(long)blockIdx.x * vocab + id] += bias_values[blockIdx.x * NB + i];
  }
}

// Greedy choice over the adjusted (or raw) row: largest value, lowest id on ties; every thread
// gets it, and 0x7fffffff when no value compares (all NaN).
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
  return bi;
}

// ---------------------------------------------------------------------------- the sampler
// One block of SAMPLE_THREADS per row. Passes over the row (the probabilities are never stored:
// each pass recomputes p_i = exp((a_i - max) / T) / Z from the logits, the same float ops each
// time, so every pass sees the same p_i):
//   1. statistics: raw max and sum (online), the adjusted row's max, its Z, and its argmax.
//   2. (top-k or top-p only) a histogram of the row's p by their top float bits: SEL_BINS bins of
//      1/16 octave, with counts and masses. Non-negative floats order like their bits, so the bins
//      say which bin holds the k-th largest p and which holds top-p's cut; every p above the lower
//      of the two (one bin of margin for top-p's float sums) is a candidate for being kept.
//   3. when there are at most SEL_CAP candidates (a top-k of a few hundred, or a peaked row's
//      top-p): collect them into shared memory, sort them there, and do the exact thresholds
//      and the draw on them. Otherwise: exact thresholds by bisection over p's bit patterns
//      (~31 passes per rule), then the draw over the whole row (one pass).
constexpr int SEL_BINS = 2048;  // p's float bits >> SEL_SHIFT: p <= 1 has bits < 2^30
constexpr int SEL_SHIFT = 19;
constexpr int SEL_CAP = 2048;   // candidates sorted in shared memory (a power of two)
constexpr int NO_ID = 0x7fffffff;

struct RowDist {  // what every pass needs to recompute p_i
  const float* adjusted;
  const void* logits;
  long base;
  float smx, temp, inv_t, inv_z;  // inv_t 0: 1 / temp is not a normal float (divide instead)
};

// 1 / temperature when it and its product with any logit gap stay normal floats, else 0.
__device__ __forceinline__ float inverse_temperature(float temp) {
  return temp >= 1e-30f && temp <= 1e30f ? __frcp_rn(temp) : 0.f;
}

// (v - max) / temperature. NOTE: the max is subtracted first, so a denormal temperature (1e-40)
// sends the other logits to -inf instead of overflowing to inf - inf = nan. A multiply by 1/T
// where that is safe: an IEEE division costs ~10 instructions per element per pass; the two
// differ by an ulp of the exponent's argument, below expf's own difference from numpy's exp.
__device__ __forceinline__ float scaled_gap(float v, float m, float temp, float inv_t) {
  const float gap = __fsub_rn(v, m);
  return inv_t != 0.f ? __fmul_rn(gap, inv_t) : __fdiv_rn(gap, temp);
}

template <typename T>
__device__ __forceinline__ float adjusted_at(const RowDist& d, int i) {
  return d.adjusted ? d.adjusted[d.base + i] : to_float(static_cast<const T*>(d.logits)[d.base + i]);
}

// p_i, the same float ops in every pass (explicit _rn ops: no fused multiply-add), so that every
// pass sees the same value.
template <typename T>
__device__ __forceinline__ float prob_at(const RowDist& d, int i) {
  return __fmul_rn(expf(scaled_gap(adjusted_at<T>(d, i), d.smx, d.temp, d.inv_t)), d.inv_z);
}

// Online (max, sum of exp((v - max) / T)) of one thread, merged over the block at the end.
__device__ __forceinline__ void online_add(float& m, float& s, float v, float temp, float inv_t) {
  if (v == -INFINITY) return;  // contributes 0; and -inf - -inf would be nan
  if (v > m) {
    s = s * expf(scaled_gap(m, v, temp, inv_t)) + 1.f;  // 0 while m is -inf
    m = v;
  } else {
    s += expf(scaled_gap(v, m, temp, inv_t));
  }
}

__device__ __forceinline__ float online_merge(float m, float s, float temp, float inv_t,
                                              float* red, float& block_m) {
  block_m = block_max(m, red);
  const float mine = m == -INFINITY ? 0.f : s * expf(scaled_gap(m, block_m, temp, inv_t));
  return block_sum(mine, red);
}

// Is (pa, ia) ahead of (pb, ib) in "larger p first, then lower id"?
__device__ __forceinline__ bool p_ahead(float pa, int ia, float pb, int ib) {
  return pa > pb || (pa == pb && ia < ib);
}

// Bitonic sort of n (a power of two <= SEL_CAP) pairs in shared memory, by p (descending, ids
// ascending on ties) or by id alone (ascending). Every thread of the block calls it.
__device__ void bitonic_sort(float* p, int* id, int n, bool by_id) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool up = (lo & size) == 0;  // this run ends sorted forwards
        const bool hi_first = by_id ? id[hi] < id[lo] : p_ahead(p[hi], id[hi], p[lo], id[lo]);
        if (hi_first == up) {
          const float tp = p[lo]; p[lo] = p[hi]; p[hi] = tp;
          const int ti = id[lo]; id[lo] = id[hi]; id[hi] = ti;
        }
      }
      __syncthreads();
    }
  }
}

// Inclusive prefix sum over the warp.
__device__ __forceinline__ float warp_incl(float v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// The draw over the whole row: the first id whose running sum (id order) of kept p exceeds
// u * total, kept meaning p >= tau and p > 0; the last kept id when rounding leaves no such id.
// Warp w owns ids [w * seg, (w + 1) * seg), its lanes interleaved (coalesced reads); the warps
// that may hold the crossing rescan their segment with warp prefix sums.
template <typename T>
__device__ int draw_row(const RowDist& d, int vocab, float tau, float u, float* red, int* redi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const int seg = ((vocab + num_warps - 1) / num_warps + 31) / 32 * 32;
  const int begin = min(vocab, warp * seg), end = min(vocab, begin + seg);
  float mine = 0.f;
  int last = -1;
  for (int i = begin + lane; i < end; i += 32) {
    const float q = prob_at<T>(d, i);
    if (q >= tau && q > 0.f) { mine += q; last = i; }
  }
  mine = warp_sum(mine);
  for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(0xffffffffu, last, o));
  __syncthreads();
  if (lane == 0) { red[warp] = mine; redi[warp] = last; }
  __syncthreads();
  float before = 0.f, total = 0.f;
  int last_kept = -1;
  for (int w = 0; w < num_warps; w++) {
    if (w < warp) before += red[w];
    total += red[w];
    last_kept = max(last_kept, redi[w]);
  }
  const float target = __fmul_rn(u, total);
  __shared__ int chosen;
  if (threadIdx.x == 0) chosen = NO_ID;
  __syncthreads();
  if (mine > 0.f && before + mine > target) {  // usually one warp scans far; later ones stop at once
    float running = before;
    for (int i0 = begin; i0 < end; i0 += 32) {
      const int i = i0 + lane;
      float q = i < end ? prob_at<T>(d, i) : 0.f;
      if (!(q >= tau && q > 0.f)) q = 0.f;
      const float incl = running + warp_incl(q);
      const unsigned hit = __ballot_sync(0xffffffffu, q > 0.f && incl > target);
      if (hit) {
        if (lane == 0) atomicMin(&chosen, i0 + __ffs(hit) - 1);
        break;
      }
      running = __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  return chosen != NO_ID ? chosen : last_kept;
}

// Largest bit pattern b with count(p >= b) >= k (the k-th largest p), by bisection.
template <typename T>
__device__ float bisect_top_k(const RowDist& d, int vocab, int k, float p_max, float* red) {
  unsigned lo = 0, hi = __float_as_uint(p_max);
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo + 1) / 2;
    const float t = __uint_as_float(mid);
    float c = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += prob_at<T>(d, i) >= t ? 1.f : 0.f;
    if (block_sum(c, red) >= (float)k) lo = mid; else hi = mid - 1;
  }
  return __uint_as_float(lo);
}

// Smallest bit pattern b with mass(p > b) < top_p (the smallest p top-p keeps), by bisection.
template <typename T>
__device__ float bisect_top_p(const RowDist& d, int vocab, float top_p, float p_max, float* red) {
  unsigned lo = 0, hi = __float_as_uint(p_max);
  while (lo < hi) {
    const unsigned mid = lo + (hi - lo) / 2;
    const float t = __uint_as_float(mid);
    float m = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float q = prob_at<T>(d, i);
      m += q > t ? q : 0.f;
    }
    if (block_sum(m, red) < top_p) hi = mid; else lo = mid + 1;
  }
  return __uint_as_float(lo);
}

__device__ __forceinline__ int pow2_at_least(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

__device__ __forceinline__ int warp_incl_int(int v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int n = __shfl_up_sync(0xffffffffu, v, o);
    if (lane >= o) v += n;
  }
  return v;
}

// Warp 0, after the histogram: the lowest bin that can hold the kept set's smallest p, and how
// many p lie at or above it -> sel[0], sel[1]. Lane l owns the 64 bins below SEL_BINS - 64 l
// (lane 0 the largest p) and walks them downwards with the count and mass of every larger bin.
//   top-k: the bin where the count from the top reaches k (bin 0 when fewer than k p are > 0);
//   top-p: the lowest non-empty bin whose larger bins' mass is < top_p, then one non-empty bin
//          lower still: the float sums here and numpy's cumsum may round a boundary differently;
//   min-p: the bin of min_p * max p.
__device__ void select_bins(const int* cnt, const float* mass, bool use_k, int top_k, bool use_p,
                            float top_p, float tau_m, int* sel) {
  constexpr int PER = SEL_BINS / 32;
  const int lane = threadIdx.x & 31, top = SEL_BINS - PER * lane;
  int c_own = 0;
  float m_own = 0.f;
  for (int b = top - PER; b < top; b++) { c_own += cnt[b]; m_own += mass[b]; }
  int c_above = warp_incl_int(c_own) - c_own;
  float m_above = warp_incl(m_own) - m_own;
  int b_k = -1, b_p = SEL_BINS, b_top = -1;
  for (int b = top - 1; b >= top - PER; b--) {
    if (use_k && c_above < top_k && c_above + cnt[b] >= top_k) b_k = b;
    if (cnt[b] > 0) {
      if (m_above < top_p) b_p = b;
      b_top = max(b_top, b);
    }
    c_above += cnt[b];
    m_above += mass[b];
  }
  for (int o = 16; o > 0; o >>= 1) {
    b_k = max(b_k, __shfl_xor_sync(0xffffffffu, b_k, o));
    b_p = min(b_p, __shfl_xor_sync(0xffffffffu, b_p, o));
    b_top = max(b_top, __shfl_xor_sync(0xffffffffu, b_top, o));
  }
  if (b_p == SEL_BINS) b_p = b_top;  // top_p <= 0 keeps the largest p only
  int below = -1;  // the highest non-empty bin under b_p
  for (int b = top - 1; b >= top - PER; b--)
    if (b < b_p && cnt[b] > 0) { below = b; break; }
  for (int o = 16; o > 0; o >>= 1) below = max(below, __shfl_xor_sync(0xffffffffu, below, o));
  int b_low = tau_m > 0.f ? (int)(__float_as_uint(tau_m) >> SEL_SHIFT) : 0;
  if (use_k) b_low = max(b_low, max(b_k, 0));
  if (use_p) b_low = max(b_low, below >= 0 ? below : b_p);
  b_low = min(b_low, b_top);  // the largest p is always a candidate
  int c = 0;
  for (int b = max(top - PER, b_low); b < top; b++) c += cnt[b];
  c = warp_incl_int(c);
  if (lane == 31) { sel[0] = b_low; sel[1] = c; }
}

// Warp 0, on the candidates sorted by p (descending): the exact thresholds as numpy_sampling
// defines them, and how many candidates they keep -> sel[2] (a prefix of the sorted order).
__device__ void exact_cut(const float* cand_p, int num_cand, bool use_k, int top_k, bool use_p,
                          float top_p, float tau_m, int* sel) {
  const int lane = threadIdx.x & 31;
  float tau = tau_m;
  if (use_k) tau = fmaxf(tau, top_k <= num_cand ? cand_p[top_k - 1] : 0.f);
  if (use_p) {
    // mass_before(i) = cumsum - p, as numpy computes it; the qualifying i form a prefix.
    int num_q = 0;
    float running = 0.f;
    for (int i0 = 0; i0 < num_cand; i0 += 32) {
      const int i = i0 + lane;
      const float q = i < num_cand ? cand_p[i] : 0.f;
      const float incl = running + warp_incl(q);
      num_q += __popc(__ballot_sync(0xffffffffu, i < num_cand && incl - q < top_p));
      running = __shfl_sync(0xffffffffu, incl, 31);
    }
    tau = fmaxf(tau, cand_p[num_q > 0 ? num_q - 1 : 0]);
  }
  int num_keep = 0;
  for (int i0 = 0; i0 < num_cand; i0 += 32) {
    const int i = i0 + lane;
    num_keep += __popc(__ballot_sync(0xffffffffu, i < num_cand && cand_p[i] >= tau &&
                                                       cand_p[i] > 0.f));
  }
  if (lane == 0) sel[2] = num_keep;
}

// Warp 0, on the kept candidates sorted by id: the first id whose running sum of p exceeds
// u * total, else the last kept id -> sel[3].
__device__ void draw_sorted(const float* cand_p, const int* cand_id, int num_keep, float u,
                            int* sel) {
  const int lane = threadIdx.x & 31;
  // NOTE: summed in the same order as the search below, so the search ends inside the set.
  float total = 0.f;
  for (int i0 = 0; i0 < num_keep; i0 += 32) {
    const int i = i0 + lane;
    total += __shfl_sync(0xffffffffu, warp_incl(i < num_keep ? cand_p[i] : 0.f), 31);
  }
  const float target = __fmul_rn(u, total);
  int chosen = num_keep - 1;
  float running = 0.f;
  for (int i0 = 0; i0 < num_keep; i0 += 32) {
    const int i = i0 + lane;
    const float incl = running + warp_incl(i < num_keep ? cand_p[i] : 0.f);
    const unsigned hit = __ballot_sync(0xffffffffu, i < num_keep && incl > target);
    if (hit) { chosen = i0 + __ffs(hit) - 1; break; }
    running = __shfl_sync(0xffffffffu, incl, 31);
  }
  if (lane == 0) sel[3] = num_keep > 0 ? cand_id[chosen] : -1;  // none kept: the argmax
}

// Grid: (R)  Block: (SAMPLE_THREADS)
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_kernel(
    int* __restrict__ result,             // [R, 2 + 2 * num_logprobs]
    const T* __restrict__ logits,         // [R, vocab] raw
    const float* __restrict__ adjusted,   // [R, vocab] penalized + biased, or null (= raw)
    const int* __restrict__ params,       // [R, NUM_PARAMS]
    int vocab, int num_logprobs) {
  __shared__ float red[32];
  __shared__ int redi[32];
  __shared__ int cnt[SEL_BINS];
  __shared__ float mass[SEL_BINS];
  __shared__ float cand_p[SEL_CAP];
  __shared__ int cand_id[SEL_CAP];
  __shared__ int sel[5];  // low bin, candidates, candidates kept, chosen id, collect counter
  const long base = (long)blockIdx.x * vocab;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int* p = params + blockIdx.x * NUM_PARAMS;
  const float temperature = __int_as_float(p[0]);
  const bool sampling = temperature != 0.f;
  // NOTE: an inf temperature is FLT_MAX, so (v - max) / T stays a number.
  const float temp = sampling ? fminf(temperature, PS_FLT_MAX) : 1.f;
  const float inv_t = inverse_temperature(temp);

  // 1. Statistics in one pass: raw log-sum-exp (logprobs come from the raw logits), the
  //    adjusted row's max and normalizer at this temperature, and its argmax (greedy rows).
  float rm = -INFINITY, rs = 0.f, am = -INFINITY, asum = 0.f, bv = -INFINITY;
  int bi = NO_ID;
  for (int i = tid; i < vocab; i += blockDim.x) {
    const float raw = to_float(logits[base + i]);
    const float a = adjusted ? adjusted[base + i] : raw;
    online_add(rm, rs, raw, 1.f, 1.f);
    if (sampling) online_add(am, asum, a, temp, inv_t);
    if (ahead(a, i, bv, bi)) { bv = a; bi = i; }
  }
  float raw_max, smx = -INFINITY;
  const float log_sum = logf(online_merge(rm, rs, 1.f, 1.f, red, raw_max));
  const float z = sampling ? online_merge(am, asum, temp, inv_t, red, smx) : 1.f;
  block_argmax(bv, bi, red, redi);
  const RowDist d{adjusted, logits, base, smx, temp, inv_t, __frcp_rn(z)};

  int token = -1;  // block-uniform throughout: every branch below is taken by all threads
  if (sampling && smx > -INFINITY) {  // a row whose every token is banned has no distribution
    const float p_max = d.inv_z;  // the largest p is exp(0) / Z
    const int top_k = p[1];
    const float top_p = __int_as_float(p[2]), min_p = __int_as_float(p[3]);
    const bool use_k = top_k > 0 && top_k < vocab, use_p = top_p < 1.f;
    const float tau_m = min_p > 0.f ? __fmul_rn(min_p, p_max) : 0.f;
    const float u = uniform01(((unsigned long long)(unsigned)p[5] << 32) | (unsigned)p[4],
                              (unsigned)p[6]);
    float tau = tau_m;
    if (use_k || use_p) {
      // 2. Histogram of p's top bits.
      for (int b = tid; b < SEL_BINS; b += blockDim.x) { cnt[b] = 0; mass[b] = 0.f; }
      if (tid == 0) sel[4] = 0;
      __syncthreads();
      for (int i = tid; i < vocab; i += blockDim.x) {
        const float q = prob_at<T>(d, i);
        if (q > 0.f) {
          const int b = __float_as_uint(q) >> SEL_SHIFT;
          atomicAdd(&cnt[b], 1);
          if (use_p) atomicAdd(&mass[b], q);
        }
      }
      __syncthreads();
      if (warp == 0) select_bins(cnt, mass, use_k, top_k, use_p, top_p, tau_m, sel);
      __syncthreads();
      const int b_low = sel[0], num_cand = sel[1];
      if (num_cand <= SEL_CAP) {
        // 3. Collect the candidates, then everything else happens in shared memory.
        for (int i = tid; i < vocab; i += blockDim.x) {
          const float q = prob_at<T>(d, i);
          if (q > 0.f && (int)(__float_as_uint(q) >> SEL_SHIFT) >= b_low) {
            const int slot = atomicAdd(&sel[4], 1);
            if (slot < SEL_CAP) { cand_p[slot] = q; cand_id[slot] = i; }
          }
        }
        __syncthreads();
        const int n = pow2_at_least(num_cand);
        for (int i = num_cand + tid; i < n; i += blockDim.x) { cand_p[i] = -1.f; cand_id[i] = NO_ID; }
        __syncthreads();
        bitonic_sort(cand_p, cand_id, n, false);
        if (warp == 0) exact_cut(cand_p, num_cand, use_k, top_k, use_p, top_p, tau_m, sel);
        __syncthreads();
        const int num_keep = sel[2];
        const int n2 = pow2_at_least(num_keep);
        for (int i = num_keep + tid; i < n2; i += blockDim.x) { cand_p[i] = 0.f; cand_id[i] = NO_ID; }
        __syncthreads();
        bitonic_sort(cand_p, cand_id, n2, true);
        if (warp == 0) draw_sorted(cand_p, cand_id, num_keep, u, sel);
        __syncthreads();
        token = sel[3];
      } else {
        // Too many candidates (a flat row's top-p, a huge top-k): bisect the exact thresholds.
        if (use_k) tau = fmaxf(tau, bisect_top_k<T>(d, vocab, top_k, p_max, red));
        if (use_p) tau = fmaxf(tau, bisect_top_p<T>(d, vocab, top_p, p_max, red));
        token = draw_row<T>(d, vocab, tau, u, red, redi);
      }
    } else {
      token = draw_row<T>(d, vocab, tau, u, red, redi);  // temperature and min-p only
    }
  }
  if (token < 0) token = bi;  // greedy, an all-banned row, or nothing kept
  if (token >= vocab) token = 0;  // only a row of NaN logits has no argmax

  // Results: the token's raw logprob, then the top raw logprobs (value desc, id asc).
  const int width = 2 + 2 * num_logprobs;
  int* out = result + blockIdx.x * width;
  if (tid == 0) {
    out[0] = token;
    out[1] = __float_as_int(to_float(logits[base + token]) - raw_max - log_sum);
  }
  float prev_v = INFINITY;
  int prev_i = -1;
  for (int n = 0; n < num_logprobs; n++) {
    float v_best = -INFINITY;
    int i_best = NO_ID;
    for (int i = tid; i < vocab; i += blockDim.x) {
      const float v = to_float(logits[base + i]);
      if (ahead(prev_v, prev_i, v, i) && ahead(v, i, v_best, i_best)) { v_best = v; i_best = i; }
    }
    block_argmax(v_best, i_best, red, redi);
    if (tid == 0) {
      out[2 + n] = i_best;
      out[2 + num_logprobs + n] = __float_as_int(v_best - raw_max - log_sum);
    }
    prev_v = v_best;
    prev_i = i_best;
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void adjust_logits_kernel<float>(float*, const float*, const int*, const int*,
                                                     int);
template __global__ void adjust_logits_kernel<__nv_bfloat16>(float*, const __nv_bfloat16*,
                                                             const int*, const int*, int);
template __global__ void sample_kernel<float>(int*, const float*, const float*, const int*, int,
                                              int);
template __global__ void sample_kernel<__half>(int*, const __half*, const float*, const int*, int,
                                               int);
template __global__ void sample_kernel<__nv_bfloat16>(int*, const __nv_bfloat16*, const float*,
                                                      const int*, int, int);
#endif
