// Sampling on the GPU: exactly engine/executor/ops/numpy_sampling.sample, one block per row.
//
// Per-row parameters arrive packed as 32-bit words (one upload per step):
//   [R, 10]: temperature (f32), top_k, top_p (f32), min_p (f32), seed low, seed high, step,
//            presence (f32), frequency (f32), repetition (f32)
// Results leave packed the same way (one download per step):
//   [R, 2 + 2 * num_logprobs]: token id, its raw logprob (f32), top ids, top raw logprobs (f32)
#include "sampling_common.cuh"
#include "sampling_penalty.cuh"
#include "sampling_select.cuh"

// Adds logit_bias pairs (sequentially per row, like np.add.at, so repeated ids add up in order).
// bias_after (may be null): an entry >= 0 adds only where the row's previous token last_ids[row]
// is that id (bad_words); -1 always adds.
// Grid: (R)  Block: (1)
__global__ void add_logit_bias_kernel(float* __restrict__ adjusted,         // [R, vocab]
                                      const int* __restrict__ bias_ids,     // [R, NB], -1 padded
                                      const float* __restrict__ bias_values,  // [R, NB]
                                      const int* __restrict__ bias_after,   // [R, NB] or null
                                      const int* __restrict__ last_ids,     // [R] or null
                                      int NB, int vocab) {
  const int last = bias_after ? last_ids[blockIdx.x] : -1;
  for (int i = 0; i < NB; i++) {
    const int id = bias_ids[blockIdx.x * NB + i];
    const int after = bias_after ? bias_after[blockIdx.x * NB + i] : -1;
    if (id >= 0 && id < vocab && (after < 0 || after == last))
      adjusted[(long)blockIdx.x * vocab + id] += bias_values[blockIdx.x * NB + i];
  }
}

// ---------------------------------------------------------------------------- the sampler
// One block per row (SAMPLE_THREADS threads; 512 for twopass above one row per SM,
// cuda_sampling.launch). Passes over the row (the probabilities are never stored:
// each pass recomputes p_i = exp((a_i - max) / T) / Z from the logits, the same float ops each
// time, so every pass sees the same p_i):
//   1. statistics: raw max and sum (online), the adjusted row's max, its Z, and its argmax.
//   2. (top-k or top-p only) a histogram of the row's p by their top float bits: SEL_BINS bins of
//      1/16 octave, with counts and masses. Non-negative floats order like their bits, so the bins
//      say which bin holds the k-th largest p and which holds top-p's cut; every p above the lower
//      of the two (one bin of margin for top-p's float sums) is a candidate for being kept.
//   3. when there are at most SEL_CAP candidates (a top-k of a few hundred, or a peaked row's
//      top-p): collect them into shared memory, sort them there, and do the exact thresholds
//      and the draw on them. When there are more (a top-p keeping thousands of tokens), the
//      window of bins that can hold each rule's cut usually still fits: collect and sort only
//      the window, count and sum every p above it (in a fixed order: no atomics), cut there,
//      and draw over the whole row (one more pass). A crowded window gets a second, finer
//      histogram of its own range first; only a row whose window overflows even then (a nearly
//      flat row) bisects p's bit patterns (~31 passes per rule).
// With top-k or min-p on, top-p takes its share of the mass they keep (vLLM's order): the
// candidates must then reach down past their cuts (no window), else the bisection runs.
// The shared-memory steps (bins, sorts, cuts) are in sampling_select.cuh.
// The passes read 8 elements per thread per step (16-byte loads where the rows allow), so a
// block keeps enough bytes in flight to approach the bandwidth.
struct RowDist {  // what every pass needs to recompute p_i
  const float* adjusted;
  const void* logits;
  long base;
  float smx, temp, inv_t, inv_z;  // inv_t: log2(e) / temp, 0 when not a normal float (divide)
  // Penalties read from the kept counts (no `adjusted` row) when `pen`: this row's slot, null
  // for a row without one (penalized() leaves its logits as they are, as numpy does).
  bool pen;
  const int* counts;          // [vocab] the slot's count words
  const unsigned char* seen;  // [vocab / 8] the slot's bitmap, 8 tokens a byte
  float rep, freq, pres;
};

// The value the sampler sees for token i: its raw logit penalized from its count word.
__device__ __forceinline__ float pen_one(const RowDist& d, int i, float raw) {
  const int c = d.counts != nullptr && ((d.seen[i >> 3] >> (i & 7)) & 1) ? d.counts[i] : 0;
  return penalized(raw, c, d.rep, d.freq, d.pres);
}

// The same for tokens i0 .. i0 + 7 (i0 a multiple of 8: one byte of the bitmap). Unseen tokens
// (count 0) keep their values, when the frequency penalty is finite (x - f * 0 == x): a finite
// one is inside the clamp, and a -inf, +inf or NaN one stays as it is (penalized()).
__device__ __forceinline__ void pen8(const RowDist& d, int i0, float* f) {
  const unsigned bits = d.counts != nullptr ? d.seen[i0 >> 3] : 0u;
  if (bits == 0u && fabsf(d.freq) <= PS_FLT_MAX) return;
#pragma unroll
  for (int e = 0; e < 8; e++)
    f[e] = penalized(f[e], (bits >> e) & 1u ? d.counts[i0 + e] : 0, d.rep, d.freq, d.pres);
}

constexpr float LOG2E_S = 1.4426950408889634f;

// log2(e) / temperature when it and its product with any logit gap stay normal floats, else 0.
__device__ __forceinline__ float inverse_temperature(float temp) {
  return temp >= 1e-30f && temp <= 1e30f ? __fmul_rn(__frcp_rn(temp), LOG2E_S) : 0.f;
}

// (v - max) / temperature in base 2: exp((v - max) / T) = exp2(scaled_gap). NOTE: the max is
// subtracted first, so a denormal temperature (1e-40) sends the other logits to -inf instead of
// overflowing to inf - inf = nan. A multiply by log2(e) / T where that is safe: an IEEE
// division costs ~10 instructions per element per pass, and exp2f (one MUFU.EX2) a third of
// expf; together they differ from numpy's exp by ~1e-6 relative for the p that matter (gaps
// of a few units), and every pass computes p the same way.
__device__ __forceinline__ float scaled_gap(float v, float m, float temp, float inv_t) {
  const float gap = __fsub_rn(v, m);
  return inv_t != 0.f ? __fmul_rn(gap, inv_t) : __fmul_rn(__fdiv_rn(gap, temp), LOG2E_S);
}

template <typename T>
__device__ __forceinline__ float adjusted_at(const RowDist& d, int i) {
  if (d.adjusted) return d.adjusted[d.base + i];
  const float raw = to_float(static_cast<const T*>(d.logits)[d.base + i]);
  return d.pen ? pen_one(d, i, raw) : raw;
}

// p of an adjusted value, the same float ops in every pass (explicit _rn ops: no fused
// multiply-add), so that every pass sees the same value.
__device__ __forceinline__ float prob_of(const RowDist& d, float a) {
  return __fmul_rn(exp2f(scaled_gap(a, d.smx, d.temp, d.inv_t)), d.inv_z);
}

// An adjusted value under which prob_of(d, a) < p_lo for certain, so a pass can skip the
// exponential of most of the row: (a - smx) * inv_t < log2(p_lo * Z), less a margin of 2^-10
// in the exponent and 2^-20 of the magnitudes for the roundings of a - smx, the products and
// exp2f. -inf (no skipping) when p_lo is 0 or the temperature takes the division path.
__device__ __forceinline__ float logit_floor(const RowDist& d, float p_lo) {
  if (!(p_lo > 0.f) || d.inv_t == 0.f || d.smx == -INFINITY) return -INFINITY;
  const float gap = (log2f(p_lo) - log2f(d.inv_z) - 0x1p-10f) / d.inv_t;
  return d.smx + gap - (fabsf(d.smx) + fabsf(gap)) * 0x1p-20f;
}

template <typename T>
__device__ __forceinline__ float prob_at(const RowDist& d, int i) {
  return prob_of(d, adjusted_at<T>(d, i));
}

// Elements i .. i + 7 of a row as floats (i a multiple of 8, the row 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ row, int i, float* f) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(row + i));
    const float4 b = __ldg(reinterpret_cast<const float4*>(row + i) + 1);
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w; f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
  } else {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(row + i));
    const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int e = 0; e < 8; e++) f[e] = to_float(h[e]);
  }
}

// f(i, adjusted value) for every element of the row, each thread 8 consecutive ones at a time
// when `vec` (every row 16-byte aligned), else one at a time.
template <typename T, typename F>
__device__ __forceinline__ void for_each_value(const RowDist& d, int vocab, bool vec, F f) {
  if (vec) {
    for (int i0 = threadIdx.x * 8; i0 < vocab; i0 += blockDim.x * 8) {
      float a[8];
      if (d.adjusted) {
        load8<float>(d.adjusted + d.base, i0, a);
      } else {
        load8<T>(static_cast<const T*>(d.logits) + d.base, i0, a);
        if (d.pen) pen8(d, i0, a);
      }
#pragma unroll
      for (int e = 0; e < 8; e++) f(i0 + e, a[e]);
    }
  } else {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) f(i, adjusted_at<T>(d, i));
  }
}

// Online (max, sum of exp((v - max) / T)) of one thread, merged over the block at the end.
// Eight values at a time: one comparison with the running max per eight, and eight independent
// exponentials (no chain through m from value to value).
__device__ __forceinline__ void online_add8(float& m, float& s, const float* v, float temp,
                                            float inv_t) {
  float hi = v[0];
#pragma unroll
  for (int e = 1; e < 8; e++) hi = fmaxf(hi, v[e]);
  if (hi == -INFINITY) {  // all contribute 0 (and -inf - -inf would be nan); a NaN among them
#pragma unroll              // (fmaxf skips it) makes the sum NaN, as in the other groups
    for (int e = 0; e < 8; e++) s = v[e] != v[e] ? v[e] : s;
    return;
  }
  if (hi > m) {
    s = m == -INFINITY && s == s ? 0.f : s * exp2f(scaled_gap(m, hi, temp, inv_t));
    m = hi;
  }
  float add = 0.f;
#pragma unroll
  for (int e = 0; e < 8; e++)  // v == m also covers m = +inf (inf - inf would be nan)
    add += v[e] == m ? 1.f : v[e] == -INFINITY ? 0.f : exp2f(scaled_gap(v[e], m, temp, inv_t));
  s += add;
}

__device__ __forceinline__ void online_add(float& m, float& s, float v, float temp, float inv_t) {
  if (v == -INFINITY) return;  // contributes 0; and -inf - -inf would be nan
  if (v > m) {
    s = s * exp2f(scaled_gap(m, v, temp, inv_t)) + 1.f;  // 0 while m is -inf
    m = v;
  } else {
    s += exp2f(scaled_gap(v, m, temp, inv_t));
  }
}

__device__ __forceinline__ float online_merge(float m, float s, float temp, float inv_t,
                                              float* red, float& block_m) {
  block_m = block_max(m, red);
  // NOTE: a NaN summed (a broken model's logit) leaves s NaN whatever m is, also in a thread
  // whose every other value was -inf or NaN (m still -inf): kept, so that the row's sum is NaN
  // exactly when the row holds a NaN (sample_kernel then takes the argmax, as numpy does).
  const float mine = m == -INFINITY && s == s ? 0.f
                                              : s * exp2f(scaled_gap(m, block_m, temp, inv_t));
  // NOTE: a row holding +inf sums to NaN (inf - inf in numpy's and torch's log_softmax, and in
  // the other kernels), so its logprobs are NaN: the online sums counted the infs instead.
  const float sum = block_sum(mine, red);
  return block_m == INFINITY ? __int_as_float(0x7fffffff) : sum;
}

// The draw over the whole row: the first id whose running sum (id order) of kept p exceeds
// u * total, kept meaning p >= tau and p > 0; the last kept id when rounding leaves no such id.
// Warp w owns ids [w * seg, (w + 1) * seg); its lanes take W consecutive ids each (8 with `vec`,
// one 16-byte load), 32 W per step. The warps that may hold the crossing rescan their segment
// with warp prefix sums over the lanes' sums; the lane that crosses walks its own W ids.
template <typename T>
__device__ int draw_row(const RowDist& d, int vocab, bool vec, float tau, float u, float* red,
                        int* redi) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
  const int W = vec ? 8 : 1, step = 32 * W;
  const int seg = ((vocab + num_warps - 1) / num_warps + step - 1) / step * step;
  const int begin = min(vocab, warp * seg), end = min(vocab, begin + seg);
  // q[e]: the kept p of id i + e (0 where not kept, and for e >= W); i < end, i + W <= end.
  const float a_tau = logit_floor(d, tau);  // below it p < tau: no exponential needed
  auto kept = [&](int i, float* q) {
    if (vec) {
      if (d.adjusted) {
        load8<float>(d.adjusted + d.base, i, q);
      } else {
        load8<T>(static_cast<const T*>(d.logits) + d.base, i, q);
        if (d.pen) pen8(d, i, q);
      }
    } else {
      q[0] = adjusted_at<T>(d, i);
    }
#pragma unroll
    for (int e = 0; e < 8; e++) {
      const float p = e < W && q[e] >= a_tau ? prob_of(d, q[e]) : 0.f;
      q[e] = p >= tau && p > 0.f ? p : 0.f;
    }
  };
  float mine = 0.f;
  int last = -1;
  for (int i = begin + lane * W; i < end; i += step) {
    float q[8];
    kept(i, q);
#pragma unroll
    for (int e = 0; e < 8; e++)
      if (q[e] > 0.f) { mine += q[e]; last = i + e; }
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
    for (int i0 = begin; i0 < end; i0 += step) {
      const int i = i0 + lane * W;
      float q[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, own = 0.f;
      if (i < end) {
        kept(i, q);
#pragma unroll
        for (int e = 0; e < 8; e++) own += q[e];
      }
      const float incl = running + warp_incl(own);
      const unsigned hit = __ballot_sync(0xffffffffu, own > 0.f && incl > target);
      if (hit) {
        if (lane == __ffs(hit) - 1) {
          float r = incl - own;
          int pick = -1, lane_last = -1;
#pragma unroll
          for (int e = 0; e < 8; e++) {
            if (q[e] <= 0.f) continue;
            lane_last = i + e;
            r += q[e];
            if (pick < 0 && r > target) pick = i + e;
          }
          atomicMin(&chosen, pick >= 0 ? pick : lane_last);  // rounding: the lane's last kept
        }
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

// The mass of the p >= tau (what top-k and min-p keep, for top-p's share of it).
template <typename T>
__device__ float mass_from(const RowDist& d, int vocab, float tau, float* red) {
  float m = 0.f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float q = prob_at<T>(d, i);
    m += q >= tau ? q : 0.f;
  }
  return block_sum(m, red);
}

#include "sampling_twopass.cuh"  // uses RowDist, prob_of, online_add8 above

// Penalties come either in `adjusted` (with a logit bias or allowed ids) or from the count table:
// `counts` non-null and `adjusted` null. `twopass`: the leaner statistics pass and, for rows with a
// top-k or top-p that the block's thread maxima bound, the two-pass cut of sampling_twopass.cuh;
// 0 keeps the older steps above exactly.
// Grid: (R)  Block: (SAMPLE_THREADS, or any multiple of 32 below it)
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_kernel(
    int* __restrict__ result,             // [R, 2 + 2 * num_logprobs]
    const T* __restrict__ logits,         // [R, vocab] raw
    const float* __restrict__ adjusted,   // [R, vocab] penalized + biased, or null (= raw)
    const int* __restrict__ params,       // [R, NUM_PARAMS]
    const int* __restrict__ counts,       // [S, vocab] count words, or null
    const unsigned* __restrict__ seen,    // [S, words] their bitmap
    const int* __restrict__ slots,        // [2, R]: each row's slot (-1: none), rebuild flags
    int words, int vocab, int num_logprobs, int twopass) {
  __shared__ float red[32];
  __shared__ int redi[32];
  __shared__ int cnt[SEL_BINS];
  __shared__ float mass[SEL_BINS];
  __shared__ float cand_p[SEL_CAP];
  __shared__ int cand_id[SEL_CAP];
  // low bin, candidates, candidates kept, chosen id, collect counter, window top, its count
  __shared__ int sel[7];
  __shared__ float tau_s;
  const long base = (long)blockIdx.x * vocab;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int* p = params + blockIdx.x * NUM_PARAMS;
  const float temperature = __int_as_float(p[0]);
  const bool sampling = temperature != 0.f;
  // NOTE: an inf temperature is FLT_MAX, so (v - max) / T stays a number.
  const float temp = sampling ? fminf(temperature, PS_FLT_MAX) : 1.f;
  const float inv_t = inverse_temperature(temp);
  const bool vec = vocab % 8 == 0 &&  // 16-byte loads of every row
                   (reinterpret_cast<unsigned long long>(logits) & 15) == 0 &&
                   (reinterpret_cast<unsigned long long>(adjusted) & 15) == 0;
  RowDist d{adjusted, logits, base, -INFINITY, temp, inv_t, 0.f, counts != nullptr && !adjusted,
            nullptr, nullptr, __int_as_float(p[9]), __int_as_float(p[8]), __int_as_float(p[7])};
  if (d.pen && slots[blockIdx.x] >= 0) {
    d.counts = counts + (long)slots[blockIdx.x] * vocab;
    d.seen = reinterpret_cast<const unsigned char*>(seen + (long)slots[blockIdx.x] * words);
  }

  // 1. Statistics in one pass: raw log-sum-exp (logprobs come from the raw logits), the
  //    adjusted row's max and normalizer at this temperature, and its argmax (greedy rows).
  float rm = -INFINITY, rs = 0.f, am = -INFINITY, asum = 0.f, bv = -INFINITY;
  int bi = NO_ID;
  auto stat = [&](int i, float raw, float a) {
    online_add(rm, rs, raw, 1.f, LOG2E_S);
    if (sampling) online_add(am, asum, a, temp, inv_t);
    if (ahead(a, i, bv, bi)) { bv = a; bi = i; }
  };
  if (vec && twopass) {
    lean_stats<T>(d, vocab, sampling, rm, rs, am, asum, bv, bi);
  } else if (vec) {
    for (int i0 = tid * 8; i0 < vocab; i0 += blockDim.x * 8) {
      float r8[8], a8[8];
      load8<T>(logits + base, i0, r8);
      if (adjusted) {
        load8<float>(adjusted + base, i0, a8);
      } else {
#pragma unroll
        for (int e = 0; e < 8; e++) a8[e] = r8[e];
        if (d.pen) pen8(d, i0, a8);
      }
      online_add8(rm, rs, r8, 1.f, LOG2E_S);
      if (sampling) online_add8(am, asum, a8, temp, inv_t);
#pragma unroll
      for (int e = 0; e < 8; e++)
        if (ahead(a8[e], i0 + e, bv, bi)) { bv = a8[e]; bi = i0 + e; }
    }
  } else {
    for (int i = tid; i < vocab; i += blockDim.x) {
      const float raw = to_float(logits[base + i]);
      stat(i, raw, adjusted ? adjusted[base + i] : d.pen ? pen_one(d, i, raw) : raw);
    }
  }
  float raw_max, smx = -INFINITY;
  const float log_sum = logf(online_merge(rm, rs, 1.f, LOG2E_S, red, raw_max));
  const float z = sampling ? online_merge(am, asum, temp, inv_t, red, smx) : 1.f;
  const float thread_max = bv;  // the two-pass cut's bound
  block_argmax(bv, bi, red, redi);
  // NOTE: a row whose only numbers are -inf (or that has none) takes id 0, even where id 0 is a
  // NaN, as numpy_sampling.argmax (NaN as -inf) does; the per-element `ahead` took the lowest
  // -inf id, argmax8 (twopass) no id at all.
  if (bv == -INFINITY) bi = 0;
  d.smx = smx;
  d.inv_z = __frcp_rn(z);

  // -2: not drawn yet, -1: nothing kept (the argmax). Block-uniform throughout: every branch
  // below is taken by all threads.
  int token = -2;
  // A row whose every token is banned has no distribution, nor one holding an inf or a NaN (a
  // broken model; every path of the statistics pass sums exp2(NaN) into z, and online_merge
  // keeps it, so z != z exactly then): such a row takes the argmax of the rest, as
  // numpy_sampling's `not isfinite(row.max())` does (a thread whose only values were NaN used to
  // drop its sum, and the row was drawn over NaN probabilities).
  if (sampling && fabsf(smx) < INFINITY && z == z) {
    const float p_max = d.inv_z;  // the largest p is exp(0) / Z
    const int top_k = p[1];
    const float top_p = __int_as_float(p[2]), min_p = __int_as_float(p[3]);
    const bool use_k = top_k > 0 && top_k < vocab, use_p = top_p < 1.f;
    const float tau_m = min_p > 0.f ? __fmul_rn(min_p, p_max) : 0.f;
    // vLLM's order: top-p measures its mass on what top-k and min-p keep (renormalized).
    const bool renorm = use_p && (use_k || tau_m > 0.f);
    const bool cut_p = use_p && !renorm;  // top-p's own bins bound the candidates
    const float u = uniform01(((unsigned long long)(unsigned)p[5] << 32) | (unsigned)p[4],
                              (unsigned)p[6]);
    float tau = tau_m;
    if (twopass && (use_k || use_p))  // -2 where it does not apply
      token = twopass_cut<T>(d, vocab, vec, thread_max, use_k, top_k, use_p, top_p, tau_m,
                             renorm, u, cnt, mass, cand_p, cand_id, sel, &tau_s, red);
    if (token != -2) {
      // drawn by the two-pass cut
    } else if (use_k || use_p) {
      // A p below `p_floor` is never kept, so the histogram and the window skip it: below
      // min-p's cut, or below top-p's: all the p under (1 - top_p) / vocab sum to less than
      // 1 - top_p, so the mass above that reaches top_p (halved: a margin for float sums).
      // With renorm every p top-k and min-p keep counts towards top-p's mass: min-p's floor only.
      float p_floor = tau_m;
      if (cut_p) p_floor = fmaxf(p_floor, __fmul_rn(1.f - top_p, 0.5f / vocab));
      p_floor = fminf(p_floor, p_max);
      // 2. Histograms: bin(p) = (bits(p) - lo) >> shift over SEL_BINS bins. The first level
      //    covers every p <= 1 in 1/16 octaves; when its window of cuts overflows SEL_CAP, a
      //    second level spreads just that window over the bins (the p above it counted).
      unsigned lo = 0;
      int shift = SEL_SHIFT, b_low = 0, b_high = 0, num_cand = 0, num_win = 0;
      for (int level = 0; level < 2; level++) {
        for (int b = tid; b < SEL_BINS; b += blockDim.x) { cnt[b] = 0; mass[b] = 0.f; }
        __syncthreads();
        float out_c = 0.f, out_m = 0.f;  // over the range (a second level only)
        const float a_floor = logit_floor(d, fmaxf(p_floor, __uint_as_float(lo)));
        for_each_value<T>(d, vocab, vec, [&](int, float a) {
          if (a < a_floor) return;  // p below the range: no exponential needed
          const float q = prob_of(d, a);
          const unsigned bits = __float_as_uint(q);
          if (q > 0.f && q >= p_floor && bits >= lo) {
            const unsigned b = (bits - lo) >> shift;
            if (b >= SEL_BINS) {
              out_c += 1.f;
              out_m += q;
            } else {
              atomicAdd(&cnt[b], 1);
              if (cut_p) atomicAdd(&mass[b], q);
            }
          }
        });
        const int c0 = (int)block_sum(out_c, red);  // exact: counts stay below 2^24
        const float m0 = block_sum(out_m, red);  // its barriers publish the histogram
        const unsigned m_bits = __float_as_uint(tau_m);
        const int b_m =
            tau_m <= 0.f || m_bits < lo ? 0 : min(SEL_BINS - 1, (int)((m_bits - lo) >> shift));
        if (warp == 0) select_bins(cnt, mass, c0, m0, use_k, top_k, cut_p, top_p, b_m, sel);
        __syncthreads();
        b_low = sel[0], num_cand = sel[1], b_high = sel[5], num_win = sel[6];
        // (renorm needs every candidate from the top: a window would end in the bisection)
        if (num_cand <= SEL_CAP || (!renorm && num_win <= SEL_CAP) || level == 1) break;
        // The next level's range: bins b_low .. b_high of this one.
        const unsigned range = (unsigned)(b_high - b_low + 1) << shift;
        lo += (unsigned)b_low << shift;
        shift = max(0, 32 - __clz(range - 1) - 11);  // ceil(log2(range)) - log2(SEL_BINS)
      }
      // Every candidate from b_low up when they fit; else the window [b_low, b_high], with
      // the p above it counted and summed.
      const bool from_top = num_cand <= SEL_CAP;
      const unsigned cand_lo = lo + ((unsigned)b_low << shift);
      const unsigned cand_hi = from_top ? 0xffffffffu : lo + ((unsigned)(b_high + 1) << shift);
      int num_keep = -1;
      float base_c = 0.f;
      if (tid == 0) sel[4] = 0;
      __syncthreads();
      if (from_top || num_win <= SEL_CAP) {
        // 3. Collect the candidates, then the cuts happen in shared memory.
        float above_c = 0.f, above_m = 0.f;  // each thread in its own fixed order
        const float a_floor = logit_floor(d, fmaxf(p_floor, __uint_as_float(cand_lo)));
        for_each_value<T>(d, vocab, vec, [&](int i, float a) {
          if (a < a_floor) return;  // p below the candidates
          const float q = prob_of(d, a);
          const unsigned bits = __float_as_uint(q);
          if (q > 0.f && q >= p_floor && bits >= cand_lo) {
            if (bits >= cand_hi) {
              above_c += 1.f;
              above_m += q;
            } else {
              const int slot = atomicAdd(&sel[4], 1);
              if (slot < SEL_CAP) { cand_p[slot] = q; cand_id[slot] = i; }
            }
          }
        });
        base_c = block_sum(above_c, red);  // exact: counts stay below 2^24
        const float base_m = block_sum(above_m, red);  // its barriers publish the candidates
        const int num = from_top ? num_cand : num_win;
        const int n = pow2_at_least(num);
        for (int i = num + tid; i < n; i += blockDim.x) { cand_p[i] = -1.f; cand_id[i] = NO_ID; }
        __syncthreads();
        bitonic_sort(cand_p, cand_id, n, false);
        if (warp == 0)
          exact_cut(cand_p, num, (int)base_c, base_m, use_k, top_k, use_p, top_p, tau_m,
                    renorm, sel, &tau_s);
        __syncthreads();
        num_keep = sel[2];
        tau = tau_s;
      }
      if (num_keep >= 0 && base_c == 0.f) {
        // Every kept p is a candidate: the draw in shared memory too.
        const int n2 = pow2_at_least(num_keep);
        for (int i = num_keep + tid; i < n2; i += blockDim.x) { cand_p[i] = 0.f; cand_id[i] = NO_ID; }
        __syncthreads();
        bitonic_sort(cand_p, cand_id, n2, true);
        if (warp == 0) draw_sorted(cand_p, cand_id, num_keep, u, sel);
        __syncthreads();
        token = sel[3];
      } else if (num_keep >= 0) {
        token = draw_row<T>(d, vocab, vec, tau, u, red, redi);  // the kept p reach above the window
      } else {
        // The window overflows (a nearly flat row): bisect the exact thresholds.
        tau = tau_m;
        if (use_k) tau = fmaxf(tau, bisect_top_k<T>(d, vocab, top_k, p_max, red));
        if (use_p) {
          const float limit =
              renorm && tau > 0.f ? __fmul_rn(top_p, mass_from<T>(d, vocab, tau, red)) : top_p;
          tau = fmaxf(tau, bisect_top_p<T>(d, vocab, limit, p_max, red));
        }
        token = draw_row<T>(d, vocab, vec, tau, u, red, redi);
      }
    } else {
      token = draw_row<T>(d, vocab, vec, tau, u, red, redi);  // temperature and min-p only
    }
  }
  if (token < 0) token = bi;  // greedy, an all-banned row, or nothing kept

  // Results: the token's raw logprob, then the top raw logprobs (next_top's order).
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
template __global__ void adjust_logits_kernel<float>(float*, const float*, const int*, const int*,
                                                     const int*, int);
template __global__ void adjust_logits_kernel<__nv_bfloat16>(float*, const __nv_bfloat16*,
                                                             const int*, const int*, const int*,
                                                             int);
#define INSTANTIATE_SAMPLE(T)                                                                   \
  template __global__ void sample_kernel<T>(int*, const T*, const float*, const int*, const int*, \
                                            const unsigned*, const int*, int, int, int, int);
INSTANTIATE_SAMPLE(float)
INSTANTIATE_SAMPLE(__half)
INSTANTIATE_SAMPLE(__nv_bfloat16)
#endif
