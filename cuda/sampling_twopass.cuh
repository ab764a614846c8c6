// The two-pass top-k / top-p path of sampling.cu's sample_kernel (cuda_sampling.SAMPLER =
// "twopass"), included by sampling.cu after RowDist, prob_of and online_add8, which it uses.
//
// Where the time of a 256 x 152k step goes: with one block per row, each pass over the logits
// costs what its instructions per element cost (a row per SM-half, the SM's issue slots and its
// 16 exponentials per clock), not what its bytes cost. So:
//   pass 1 (stats) keeps the old outputs (raw log-sum-exp, Z at the temperature, argmax) with
//     about 10 instructions and 2 exponentials per element: one comparison per 8 values with
//     the running max and argmax, exponentials as one ex2.approx each (sums only);
//   each thread's max is a real element of the row, so the k-th largest of the block's thread
//     maxima is at most the row's k-th largest value: a histogram of the thread maxima in bins
//     of (max - a) gives a bin at or above which at least k values lie, so the row's top-k set
//     lies at or above it too (one bin of margin for p's rounding); likewise the bin where their
//     mass reaches top_p bounds top-p's kept set (a peaked row's: a spread one falls back). The
//     bins spread the thread maxima over SEL_BINS, between 1/16 and 1/4096 of a base-2 unit of
//     p wide (a flat row's top values are close together; the margin bin stays far wider than
//     p's rounding);
//   pass 2 reads the row once more, with one subtraction, multiply and compare per element,
//     and collects the few values in those bins (with their p) into shared memory, where the
//     old exact cuts and the draw run on them (sampling_select.cuh).
// A row whose bound is not found, or whose candidates overflow SEL_CAP, takes the old histogram
// steps (from the histogram on: pass 1 is not repeated).
#pragma once

// 2^x with one MUFU.EX2 (flushes denormal results to 0): for the sums of pass 1 only; every p
// that is cut or drawn is still prob_of's.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// online_add8 with the common case (no new max, finite max, multiply path) in straight-line code.
__device__ __forceinline__ void lean_add8(float& m, float& s, const float* v, float temp,
                                          float inv_t) {
  float hi = v[0];
#pragma unroll
  for (int e = 1; e < 8; e++) hi = fmaxf(hi, v[e]);
  if (hi > m || inv_t == 0.f || !(fabsf(m) < INFINITY)) {
    online_add8(m, s, v, temp, inv_t);  // a new max, -inf / inf, or the division path
    return;
  }
  float add = 0.f;
#pragma unroll
  for (int e = 0; e < 8; e++) add += ex2_ftz(__fmul_rn(__fsub_rn(v[e], m), inv_t));  // -inf: 0
  s += add;
}

// Running argmax over groups of 8 consecutive ids visited in increasing order: strictly larger
// only, so the lowest id wins ties (NaN never wins, as in `ahead`).
__device__ __forceinline__ void argmax8(const float* a, int i0, float& bv, int& bi) {
  float hi = a[0];
#pragma unroll
  for (int e = 1; e < 8; e++) hi = fmaxf(hi, a[e]);
  if (hi > bv) {
    int at = 7;
#pragma unroll
    for (int e = 7; e >= 0; e--)
      if (a[e] == hi) at = e;
    bv = hi;
    bi = i0 + at;
  }
}

// 8 raw logits as bits, fetched one step ahead of their use (two loads in flight per thread).
template <typename T>
struct Raw8 {
  uint4 w[sizeof(T) == 4 ? 2 : 1];
};

template <typename T>
__device__ __forceinline__ Raw8<T> fetch8(const T* __restrict__ row, int i) {
  Raw8<T> r;
  r.w[0] = __ldg(reinterpret_cast<const uint4*>(row + i));
  if constexpr (sizeof(T) == 4) r.w[1] = __ldg(reinterpret_cast<const uint4*>(row + i) + 1);
  return r;
}

template <typename T>
__device__ __forceinline__ void unpack8(const Raw8<T>& r, float* f) {
  const T* h = reinterpret_cast<const T*>(r.w);
#pragma unroll
  for (int e = 0; e < 8; e++) f[e] = to_float(h[e]);
}

// f(i0, raw[8], adjusted[8]) for every group of 8 of the row (16-byte rows only), the next
// group's raw logits in flight while this one is computed.
template <typename T, typename F>
__device__ __forceinline__ void for_each8_prefetch(const RowDist& d, int vocab, F f) {
  const T* row = static_cast<const T*>(d.logits) + d.base;
  const int step = blockDim.x * 8;
  int i0 = threadIdx.x * 8;
  if (i0 >= vocab) return;
  Raw8<T> cur = fetch8<T>(row, i0);
  for (; i0 < vocab; i0 += step) {
    const bool more = i0 + step < vocab;
    Raw8<T> nxt;
    if (more) nxt = fetch8<T>(row, i0 + step);
    float r8[8], a8[8];
    unpack8<T>(cur, r8);
    if (d.adjusted) {
      load8<float>(d.adjusted + d.base, i0, a8);
    } else {
#pragma unroll
      for (int e = 0; e < 8; e++) a8[e] = r8[e];
      if (d.pen) pen8(d, i0, a8);
    }
    f(i0, r8, a8);
    if (more) cur = nxt;
  }
}

// Pass 1 over a 16-byte row: the per-thread (raw max, raw sum), (adjusted max, its sum at the
// temperature) and argmax of the adjusted values, as sample_kernel's statistics pass leaves them.
template <typename T>
__device__ __forceinline__ void lean_stats(const RowDist& d, int vocab, bool sampling, float& rm,
                                           float& rs, float& am, float& asum, float& bv,
                                           int& bi) {
  for_each8_prefetch<T>(d, vocab, [&](int i0, const float* r8, const float* a8) {
    lean_add8(rm, rs, r8, 1.f, LOG2E_S);
    if (sampling) lean_add8(am, asum, a8, d.temp, d.inv_t);
    argmax8(a8, i0, bv, bi);
  });
}

// (max - a) * scale: the bins of the two-pass path. Monotone (non-increasing) in a, so a bound on
// the bin is a bound on a, and on p.
__device__ __forceinline__ float bin_gap(float smx, float a, float scale) {
  return __fmul_rn(__fsub_rn(smx, a), scale);
}

// The bins' scale: the farthest finite thread max (from the row's max) in bin SEL_BINS - 8, kept
// between 16 and 4096 bins per base-2 unit of p.
__device__ __forceinline__ float bin_scale(const RowDist& d, float bv, float* red) {
  const float coarse = __fmul_rn(d.inv_t, 16.f), fine = __fmul_rn(d.inv_t, 4096.f);
  const float far = block_max(fabsf(bv) < INFINITY ? __fsub_rn(d.smx, bv) : 0.f, red);
  const float fit = (float)(SEL_BINS - 8);
  return far > 0.f && __fmul_rn(far, coarse) < fit ? fminf(__fdiv_rn(fit, far), fine) : coarse;
}

// Every thread: a bin (of SEL_BINS) at or above which the row's kept set lies, from the block's
// thread maxima `bv` (each thread's max, a real value of the row): the bin where their count
// reaches k (at least k values lie at or above it), and with top-p the bin where their mass
// reaches top_p + TP_MARGIN (every value below it has at least that much mass above it: not
// kept); of the two found, the one nearer the top. -1 when neither is found above the last bin.
// TP_MARGIN: room for float32 sums here and in numpy's cumsum to round differently.
constexpr float TP_MARGIN = 1.f / 1024.f;

__device__ int thread_max_bin(const RowDist& d, float bv, float scale, bool use_k, int k,
                              bool use_p, float top_p, int* cnt, float* mass, int* sel) {
  for (int b = threadIdx.x; b < SEL_BINS; b += blockDim.x) { cnt[b] = 0; mass[b] = 0.f; }
  __syncthreads();
  const float g = bin_gap(d.smx, bv, scale);  // NaN and -inf thread maxima: the last bin
  const int bin = g < (float)(SEL_BINS - 1) ? (int)g : SEL_BINS - 1;
  atomicAdd(&cnt[bin], 1);
  if (use_p && bin < SEL_BINS - 1) atomicAdd(&mass[bin], prob_of(d, bv));
  __syncthreads();
  if (threadIdx.x < 32) {
    constexpr int PER = SEL_BINS / 32;
    const int lane = threadIdx.x, first = lane * PER;  // lane 0: the largest values
    const float reach = top_p + TP_MARGIN;
    int own = 0;
    float own_m = 0.f;
    for (int b = first; b < first + PER; b++) { own += cnt[b]; own_m += mass[b]; }
    int before = warp_incl_int(own) - own, found = SEL_BINS;
    float before_m = warp_incl(own_m) - own_m;
    if (use_k && before < k && before + own >= k) {
      for (int b = first; b < first + PER; b++) {
        before += cnt[b];
        if (before >= k) { found = b; break; }
      }
    }
    if (use_p && before_m < reach && before_m + own_m >= reach) {
      for (int b = first; b < first + PER; b++) {
        before_m += mass[b];
        if (before_m >= reach) { found = min(found, b); break; }
      }
    }
    for (int o = 16; o > 0; o >>= 1) found = min(found, __shfl_xor_sync(0xffffffffu, found, o));
    if (lane == 0) sel[0] = found < SEL_BINS - 1 ? found : -1;
  }
  __syncthreads();
  return sel[0];
}

// Pass 2: every value whose bin_gap is below `limit` into (cand_p, cand_id), p as prob_of gives
// it; the number of such values -> sel[4], exact up to SEL_CAP, else only some count above it
// (once it is above, nothing more is counted: a flat row does not queue 152k atomics on it).
template <typename T>
__device__ void collect_top(const RowDist& d, int vocab, bool vec, float scale, float limit,
                            float* cand_p, int* cand_id, int* sel) {
  if (threadIdx.x == 0) sel[4] = 0;
  __syncthreads();
  auto push = [&](int i, float a) {
    if (*reinterpret_cast<volatile int*>(&sel[4]) > SEL_CAP) return;
    const int slot = atomicAdd(&sel[4], 1);
    if (slot < SEL_CAP) { cand_p[slot] = prob_of(d, a); cand_id[slot] = i; }
  };
  if (vec) {
    for_each8_prefetch<T>(d, vocab, [&](int i0, const float*, const float* a8) {
#pragma unroll
      for (int e = 0; e < 8; e++)
        if (bin_gap(d.smx, a8[e], scale) < limit) push(i0 + e, a8[e]);
    });
  } else {
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float a = adjusted_at<T>(d, i);
      if (bin_gap(d.smx, a, scale) < limit) push(i, a);
    }
  }
  __syncthreads();
}

// The two-pass cut and draw of one row with top-k and/or top-p (block-uniform): the drawn id
// (-1: none kept, the argmax), or -2 when this path does not apply (the caller takes the old
// steps): the thread maxima bound neither rule (a top-k above half the block, a top-p whose
// kept set is spread over more values than the block has threads), or too many candidates.
// With `renorm` (top-p measured on what top-k and min-p keep) only top-k's bound will do: the
// candidates must hold the whole top-k set.
template <typename T>
__device__ int twopass_cut(const RowDist& d, int vocab, bool vec, float bv, bool use_k,
                           int top_k, bool use_p, float top_p, float tau_m, bool renorm, float u,
                           int* cnt, float* mass, float* cand_p, int* cand_id, int* sel,
                           float* tau_s, float* red) {
  const bool bound_k = use_k && top_k <= (int)blockDim.x / 2;
  const bool bound_p = use_p && !renorm;
  if (d.inv_t == 0.f || !(fabsf(d.smx) < INFINITY) || !(bound_k || bound_p)) return -2;
  const float scale = bin_scale(d, bv, red);
  const int b = thread_max_bin(d, bv, scale, bound_k, top_k, bound_p, top_p, cnt, mass, sel);
  if (b < 0) return -2;
  // One bin of margin: a value just below the bound's bin may round to the same p.
  collect_top<T>(d, vocab, vec, scale, (float)(b + 2), cand_p, cand_id, sel);
  const int num = sel[4];
  if (num > SEL_CAP) return -2;
  const int n = pow2_at_least(num);
  for (int i = num + threadIdx.x; i < n; i += blockDim.x) { cand_p[i] = -1.f; cand_id[i] = NO_ID; }
  __syncthreads();
  bitonic_sort(cand_p, cand_id, n, false);
  // The candidates are every value from the top down: nothing above them (0, 0).
  if (threadIdx.x < 32)
    exact_cut(cand_p, num, 0, 0.f, use_k, top_k, use_p, top_p, tau_m, renorm, sel, tau_s);
  __syncthreads();
  const int num_keep = sel[2];
  const int n2 = pow2_at_least(num_keep);
  for (int i = num_keep + threadIdx.x; i < n2; i += blockDim.x) { cand_p[i] = 0.f; cand_id[i] = NO_ID; }
  __syncthreads();
  bitonic_sort(cand_p, cand_id, n2, true);
  if (threadIdx.x < 32) draw_sorted(cand_p, cand_id, num_keep, u, sel);
  __syncthreads();
  return sel[3];
}
