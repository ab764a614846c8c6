// Penalties for sampling.cu: the count table kept per sequence (rebuilt from ids, counted by
// the draws) and the penalized logit of a token from its count word. Kernels and device
// functions; compiled as part of sampling.cu.
#pragma once
#include "sampling_common.cuh"

// A token's count word in a slot of the table: times drawn (low 30 bits), PROMPT_BIT when the
// prompt holds it (numpy_sampling.TokenCounts). The bitmap beside it has bit t set when word t
// is not 0, so the sampler's passes read 1 bit per token and the word only where it is set.
constexpr int PROMPT_BIT = 1 << 30;

// A logit after vLLM's penalties (repetition, then frequency, then presence) from its count word.
// NOTE: explicit _rn intrinsics keep the float32 rounding numpy does (no fused multiply-add); a
// repetition of 1e-50 is 0 and 1e50 is inf in float32: clamped, as numpy_sampling does, so that
// the penalized row stays finite (no x / 0, no 0 * inf). A -inf logit is a ban (min_tokens'
// bias on a stop id, a grammar's mask) and stays -inf, and a NaN or +inf (a broken model, an
// fp16 overflow) stays as it is (fmaxf would make NaN -FLT_MAX, fminf +inf FLT_MAX: numbers
// the row then samples around), as in numpy_sampling.apply_penalties: such a row takes the
// argmax of the rest, penalized or not. So a finite count-0 logit comes back unchanged.
__device__ __forceinline__ float penalized(float l, int c, float repetition, float frequency,
                                           float presence) {
  if (!(fabsf(l) < INFINITY)) return l;
  const int n = c & (PROMPT_BIT - 1);
  if (repetition != 1.f && c != 0) {
    const float r = fminf(fmaxf(repetition, PS_FLT_MIN), PS_FLT_MAX);
    l = l > 0.f ? __fdiv_rn(l, r) : __fmul_rn(l, r);
  }
  l = __fsub_rn(l, __fmul_rn(frequency, (float)n));
  l = __fsub_rn(l, n > 0 ? presence : 0.f);
  return fminf(fmaxf(l, -PS_FLT_MAX), PS_FLT_MAX);
}

// Resets the slots of the rows being rebuilt from their token ids (-1 padded; ids past vocab
// are ignored): output tokens counted, prompt tokens flagged, the bitmap to match.
// Grid: (R)  Block: (256)
__global__ void rebuild_counts_kernel(int* __restrict__ counts,            // [S, vocab]
                                      unsigned* __restrict__ seen,         // [S, words]
                                      const int* __restrict__ slots,       // [2, R] slot, rebuild
                                      const int* __restrict__ prompt_ids,  // [R, P]
                                      const int* __restrict__ output_ids,  // [R, O]
                                      int num_rows, int P, int O, int vocab, int words) {
  const int r = blockIdx.x, slot = slots[r];
  if (slot < 0 || !slots[num_rows + r]) return;
  int* row = counts + (long)slot * vocab;
  unsigned* bits = seen + (long)slot * words;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) row[i] = 0;
  for (int i = threadIdx.x; i < words; i += blockDim.x) bits[i] = 0u;
  __syncthreads();  // the zeros land before any thread's atomics
  for (int i = threadIdx.x; i < P + O; i += blockDim.x) {
    const int id = i < P ? prompt_ids[(long)r * P + i] : output_ids[(long)r * O + i - P];
    if (id < 0 || id >= vocab) continue;
    if (i < P) atomicOr(row + id, PROMPT_BIT);
    else atomicAdd(row + id, 1);
    atomicOr(bits + id / 32, 1u << (id % 32));
  }
}

// Each row with a slot counts the token it drew (rows have distinct slots).
// Grid: (ceil(R / 256))  Block: (256)
__global__ void count_drawn_kernel(int* __restrict__ counts,        // [S, vocab]
                                   unsigned* __restrict__ seen,     // [S, words]
                                   const int* __restrict__ slots,   // [2, R] slot, rebuild
                                   const int* __restrict__ result,  // [R, width] id first
                                   int num_rows, int width, int vocab, int words) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= num_rows || slots[r] < 0) return;
  const int id = result[(long)r * width], slot = slots[r];
  if (id < 0 || id >= vocab) return;
  counts[(long)slot * vocab + id] += 1;
  seen[(long)slot * words + id / 32] |= 1u << (id % 32);
}

// adjusted = penalized logits, for the steps that also add a logit bias or restrict rows to
// allowed ids (or run the bisect sampler).
// With a bias it runs twice: raw logits out (counts null), the bias added, then over `adjusted`
// in place (T = float) with the penalties: vLLM penalizes the biased logits.
// Grid: (R, ceil(vocab / 256))  Block: (256)
template <typename T>
__global__ void adjust_logits_kernel(float* adjusted,                 // [R, vocab]
                                     const T* logits,                  // [R, vocab], may be it
                                     const int* __restrict__ counts,   // [S, vocab] or null
                                     const int* __restrict__ slots,    // [2, R] or null
                                     const int* __restrict__ params,   // [R, NUM_PARAMS]
                                     int vocab) {
  const int v = blockIdx.y * blockDim.x + threadIdx.x;
  if (v >= vocab) return;
  const long at = (long)blockIdx.x * vocab + v;
  float l = to_float(logits[at]);
  if (counts != nullptr) {
    const int* p = params + blockIdx.x * NUM_PARAMS;
    const int slot = slots[blockIdx.x];
    const int c = slot >= 0 ? counts[(long)slot * vocab + v] : 0;
    l = penalized(l, c, __int_as_float(p[9]), __int_as_float(p[8]), __int_as_float(p[7]));
  }
  adjusted[at] = l;
}
