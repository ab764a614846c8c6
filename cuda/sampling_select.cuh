// The selection steps of sampling.cu's sample_kernel that work on shared memory: choosing the
// histogram bins that can hold each rule's cut, sorting the candidates, the exact cuts and the
// draw among the sorted candidates. Block- or warp-level device functions, no kernels.
#pragma once
#include "sampling_common.cuh"

constexpr int SEL_BINS = 2048;  // p's float bits >> SEL_SHIFT: p <= 1 has bits < 2^30
constexpr int SEL_SHIFT = 19;
constexpr int SEL_CAP = 2048;   // candidates sorted in shared memory (a power of two)
constexpr int NO_ID = 0x7fffffff;

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

// Warp 0, after a histogram whose range has c0 p summing to m0 above it (none at the first
// level): the lowest bin that can hold the kept set's smallest p, and how many p lie at or above
// it -> sel[0], sel[1]. Lane l owns the 64 bins below SEL_BINS - 64 l
// (lane 0 the largest p) and walks them downwards with the count and mass of every larger bin.
//   top-k: the bin where the count from the top reaches k (bin 0 when fewer than k p are > 0);
//   top-p: the lowest non-empty bin whose larger bins' mass is < top_p, then one non-empty bin
//          lower still: the float sums here and numpy's cumsum may round a boundary differently;
//   min-p: the bin of min_p * max p (b_m, from the caller).
// Also the window's top -> sel[5]: the highest bin that can hold a cut (top-k's bin; top-p's,
// or the non-empty bin above it, for the same rounding reason) - everything above is kept
// whatever the exact cuts are - and how many p lie in [sel[0], sel[5]] -> sel[6].
__device__ void select_bins(const int* cnt, const float* mass, int c0, float m0, bool use_k,
                            int top_k, bool use_p, float top_p, int b_m, int* sel) {
  constexpr int PER = SEL_BINS / 32;
  const int lane = threadIdx.x & 31, top = SEL_BINS - PER * lane;
  int c_own = 0;
  float m_own = 0.f;
  for (int b = top - PER; b < top; b++) { c_own += cnt[b]; m_own += mass[b]; }
  int c_above = warp_incl_int(c_own) - c_own + c0;
  float m_above = warp_incl(m_own) - m_own + m0;
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
  int below = -1, above = SEL_BINS;  // the nearest non-empty bins under and over b_p
  for (int b = top - 1; b >= top - PER; b--)
    if (b < b_p && cnt[b] > 0) { below = b; break; }
  for (int b = top - PER; b < top; b++)
    if (b > b_p && cnt[b] > 0) { above = b; break; }
  for (int o = 16; o > 0; o >>= 1) {
    below = max(below, __shfl_xor_sync(0xffffffffu, below, o));
    above = min(above, __shfl_xor_sync(0xffffffffu, above, o));
  }
  int b_low = b_m;
  if (use_k) b_low = max(b_low, max(b_k, 0));
  if (use_p) b_low = max(b_low, below >= 0 ? below : b_p);
  b_low = min(b_low, b_top);  // the largest p is always a candidate
  int b_high = b_low;
  if (use_k) b_high = max(b_high, b_k);
  if (use_p) b_high = max(b_high, above < SEL_BINS ? above : b_p);
  int c = 0, cw = 0;
  for (int b = max(top - PER, b_low); b < top; b++) {
    c += cnt[b];
    if (b <= b_high) cw += cnt[b];
  }
  c = warp_incl_int(c);
  cw = warp_incl_int(cw);
  if (lane == 31) { sel[0] = b_low; sel[1] = c + c0; sel[5] = b_high; sel[6] = cw; }
}

// Warp 0, on the candidates sorted by p (descending), below `base_c` p summing to `base_m`
// (everything above the window; 0 and 0 when the candidates reach the top): the exact
// thresholds as numpy_sampling defines them -> tau_out, and how many candidates they keep ->
// sel[2] (a prefix of the sorted order), or -1 when a cut lies above the window after all.
// `renorm`: top-p measures its mass on what top-k and min-p keep, so the candidates must be
// every p from the top down past those cuts (-1 when a window is all there is).
__device__ void exact_cut(const float* cand_p, int num_cand, int base_c, float base_m,
                          bool use_k, int top_k, bool use_p, float top_p, float tau_m,
                          bool renorm, int* sel, float* tau_out) {
  const int lane = threadIdx.x & 31;
  float tau = tau_m;
  bool above = false;
  if (use_k) {
    const int at = top_k - 1 - base_c;
    above |= at < 0;
    tau = fmaxf(tau, at >= 0 && at < num_cand ? cand_p[at] : 0.f);
  }
  if (use_p) {
    float limit = top_p;
    if (renorm && base_c > 0) {
      above = true;  // the mass top-k and min-p keep reaches above the window
    } else if (renorm && tau > 0.f) {
      // The mass top-k and min-p keep: top-p's share of it (the candidates cover it).
      float kept = 0.f;
      for (int i0 = 0; i0 < num_cand; i0 += 32) {
        const int i = i0 + lane;
        const float q = i < num_cand && cand_p[i] >= tau ? cand_p[i] : 0.f;
        kept += __shfl_sync(0xffffffffu, warp_incl(q), 31);
      }
      limit = __fmul_rn(top_p, kept);
    }
    // mass_before(i) = cumsum - p, as numpy computes it; the qualifying i form a prefix.
    int num_q = 0;
    float running = base_m;
    for (int i0 = 0; i0 < num_cand; i0 += 32) {
      const int i = i0 + lane;
      const float q = i < num_cand ? cand_p[i] : 0.f;
      const float incl = running + warp_incl(q);
      num_q += __popc(__ballot_sync(0xffffffffu, i < num_cand && incl - q < limit));
      running = __shfl_sync(0xffffffffu, incl, 31);
    }
    above |= num_q == 0 && base_c > 0;  // nothing in the window qualifies: the cut is higher
    tau = fmaxf(tau, cand_p[num_q > 0 ? num_q - 1 : 0]);
  }
  int num_keep = 0;
  for (int i0 = 0; i0 < num_cand; i0 += 32) {
    const int i = i0 + lane;
    num_keep += __popc(__ballot_sync(0xffffffffu, i < num_cand && cand_p[i] >= tau &&
                                                       cand_p[i] > 0.f));
  }
  if (lane == 0) {
    sel[2] = above ? -1 : num_keep;
    *tau_out = tau;
  }
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
