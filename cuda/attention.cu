// Paged decode attention: one new query per sequence over its whole paged cache. The decode rows
// of any batch come here or to attention_decode_mma.cu (cuda_attention.DECODE_KERNEL, "mma" by
// default); the prefill kernels (cuda_prefill.py) take sequences with several new tokens.
//
// Memory-bound: the kernel's job is to stream K and V once at full bandwidth. One block takes one
// sequence, one kv head and one context split, and computes G query heads of that kv head, so
// each K/V byte is read once for all of them. Each lane loads 16-byte vectors (8 elements): a key
// of HD elements spans LPK = HD / 8 lanes, so one warp-wide load covers KPW = 32 / LPK keys, and
// each warp keeps 2 * U such loads in flight before it computes. Dot products reduce across the
// LPK lanes of a key with shuffles; each warp runs its own online softmax (base 2) over its keys
// with fp32 accumulators in registers; the block's warps merge in shared memory at the end.
// attention_decode_mma.cu holds a tensor-core kernel for the same job (cuda_attention.py picks);
// decode_reduce_kernel below combines the splits of either.
#include "common.cuh"
#include "decode_splits.cuh"

constexpr int DEC_WARPS = 4;

// Grid: (num_decode_items, num_kv_heads * passes, num_splits)  Block: (32 * DEC_WARPS)
// passes = ceil(group / G): a block computes query heads g0 .. g0 + G - 1 of its kv head.
// A sequence that uses one split (seq_splits) writes its normalized result to `out`; otherwise
// each of its splits writes its unnormalized sum and (max, sum) in base 2 to the workspace and
// decode_reduce_kernel combines them.
template <typename T, int HD, int G, int U>
__global__ void __launch_bounds__(32 * DEC_WARPS) decode_attention_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    float* __restrict__ part_out,           // [num_splits, W, num_heads, HD]
    float* __restrict__ part_ml,            // [num_splits, W, num_heads, 2]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ seqs,           // [W] the sequence of each decode item
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_items, int num_heads, int num_kv_heads, int block_size,
    float scale_log2, int num_splits, int min_keys) {
  constexpr int LPK = HD / 8, KPW = 32 / LPK, CH = KPW * U;  // CH: keys per warp iteration
  __shared__ float o_s[DEC_WARPS][G][HD];
  __shared__ float m_s[DEC_WARPS][G], l_s[DEC_WARPS][G];
  pdl_start();

  const int group = num_heads / num_kv_heads, passes = (group + G - 1) / G;
  const int kvh = blockIdx.y / passes, g0 = (blockIdx.y % passes) * G;
  const int item = blockIdx.x, split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int slot = lane / LPK, sub = lane % LPK;  // which key of a load, which 8 dims of it
  const int seq = seqs[item];
  const int tok = query_start_loc[seq];
  const int ctx = context_lens[seq];
  const int splits = seq_splits(ctx, num_splits, min_keys);
  if (split >= splits) return;  // the whole block: no barrier is skipped
  const int per_split = ((ctx + splits - 1) / splits + CH - 1) / CH * CH;
  const int k_begin = split * per_split, k_end = min(ctx, k_begin + per_split);
  const long row_stride = (long)(num_heads + 2 * num_kv_heads) * HD;
  const int* table = block_tables + (long)seq * max_blocks;

  float q[G][8];
#pragma unroll
  for (int g = 0; g < G; g++) {
    const bool ok = g0 + g < group;
    const int head = kvh * group + (ok ? g0 + g : 0);
    const uint4 w = *reinterpret_cast<const uint4*>(qkv + tok * row_stride + head * HD + sub * 8);
    const T* h = reinterpret_cast<const T*>(&w);
#pragma unroll
    for (int e = 0; e < 8; e++) q[g][e] = ok ? to_float(h[e]) * scale_log2 : 0.f;
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; g++) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; e++) acc[g][e] = 0.f;
  }

  for (int kb = k_begin + warp * CH; kb < k_end; kb += DEC_WARPS * CH) {
    // Every load of the chunk is issued before the first use.
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const int key = kb + u * KPW + slot;
      kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      if (key < k_end) {
        const long blk = table[key / block_size];
        const long off =
            ((blk * num_kv_heads + kvh) * block_size + key % block_size) * HD + sub * 8;
        kr[u] = __ldg(reinterpret_cast<const uint4*>(k_cache + off));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(v_cache + off));
      }
    }
    float s[G][U];
#pragma unroll
    for (int u = 0; u < U; u++) {
      const T* kh = reinterpret_cast<const T*>(&kr[u]);
      float kf[8];
#pragma unroll
      for (int e = 0; e < 8; e++) kf[e] = to_float(kh[e]);
#pragma unroll
      for (int g = 0; g < G; g++) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; e++) d += q[g][e] * kf[e];
        s[g][u] = d;
      }
    }
#pragma unroll
    for (int o = 1; o < LPK; o <<= 1)
#pragma unroll
      for (int g = 0; g < G; g++)
#pragma unroll
        for (int u = 0; u < U; u++) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], o);
#pragma unroll
    for (int u = 0; u < U; u++)
      if (kb + u * KPW + slot >= k_end)
#pragma unroll
        for (int g = 0; g < G; g++) s[g][u] = -INFINITY;
#pragma unroll
    for (int g = 0; g < G; g++) {
      float cm = s[g][0];
#pragma unroll
      for (int u = 1; u < U; u++) cm = fmaxf(cm, s[g][u]);
#pragma unroll
      for (int o = LPK; o < 32; o <<= 1) cm = fmaxf(cm, __shfl_xor_sync(0xffffffffu, cm, o));
      const float m_new = fmaxf(m[g], cm);  // finite: the chunk's first key is always valid
      const float alpha = exp2f(m[g] - m_new);  // 0 while m[g] is -inf
      m[g] = m_new;
      l[g] *= alpha;
#pragma unroll
      for (int e = 0; e < 8; e++) acc[g][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; u++) s[g][u] = exp2f(s[g][u] - m_new);  // masked keys -> 0
    }
#pragma unroll
    for (int u = 0; u < U; u++) {
      const T* vh = reinterpret_cast<const T*>(&vr[u]);
      float vf[8];
#pragma unroll
      for (int e = 0; e < 8; e++) vf[e] = to_float(vh[e]);
#pragma unroll
      for (int g = 0; g < G; g++) {
        l[g] += s[g][u];
#pragma unroll
        for (int e = 0; e < 8; e++) acc[g][e] += s[g][u] * vf[e];
      }
    }
  }

  // Each lane summed its own key slot; the slots of a warp share one max, so they add up plainly.
#pragma unroll
  for (int o = LPK; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < G; g++) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int e = 0; e < 8; e++) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
    }
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
      for (int e = 0; e < 8; e++) o_s[warp][g][sub * 8 + e] = acc[g][e];
      if (sub == 0) {
        m_s[warp][g] = m[g];
        l_s[warp][g] = l[g];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < G * HD; i += 32 * DEC_WARPS) {
    const int g = i / HD, d = i % HD;
    if (g0 + g >= group) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; w++) mx = fmaxf(mx, m_s[w][g]);
    float num = 0.f, den = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < DEC_WARPS; w++) {
        const float a = exp2f(m_s[w][g] - mx);
        num += a * o_s[w][g][d];
        den += a * l_s[w][g];
      }
    }
    const int head = kvh * group + g0 + g;
    if (splits == 1) {
      out[((long)tok * num_heads + head) * HD + d] = from_float<T>(den > 0.f ? num / den : 0.f);
    } else {
      const long at = ((long)split * num_items + item) * num_heads + head;
      part_out[at * HD + d] = num;
      if (d == 0) {
        part_ml[at * 2] = mx;
        part_ml[at * 2 + 1] = den;
      }
    }
  }
}

// Combines the splits: out = sum_s 2^(m_s - M) o_s / sum_s 2^(m_s - M) l_s, for the sequences
// that used more than one (the others were written by the decode kernel itself).
// A sequence may use up to MAX_SPLITS splits: the block's threads first take one split each for
// the weights 2^(m_s - M) (kept in shared memory), then RED_SUB threads per output dimension sum
// strided subsets of the splits, so no thread walks all of them one dependent load at a time.
// Grid: (W, num_heads)  Block: (RED_THREADS)
constexpr int RED_THREADS = 512, MAX_SPLITS = 256;
template <typename T, int HD>
__global__ void __launch_bounds__(RED_THREADS) decode_reduce_kernel(
    T* __restrict__ out,                      // [num_tokens, nh, HD]
    const float* __restrict__ part_out,       // [S, W, nh, HD]
    const float* __restrict__ part_ml,        // [S, W, nh, 2]
    const int* __restrict__ seqs,             // [W]
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    int num_items, int num_heads, int num_splits, int min_keys) {
  constexpr int RED_SUB = RED_THREADS / HD, PRE = 8;
  __shared__ float w_s[MAX_SPLITS];
  __shared__ float red[32];
  __shared__ float num_s[RED_SUB][HD];
  // The step's metadata (uploaded before it) is read before the PDL wait, and each thread's first
  // PRE partial outputs are requested with the (max, sum) pairs right after it: at batch 1 this
  // kernel is a chain of memory latencies, now two instead of four.
  const int seq = seqs[blockIdx.x];
  const int splits = min(seq_splits(context_lens[seq], num_splits, min_keys), MAX_SPLITS);
  const long tok = query_start_loc[seq];
  pdl_start();
  if (splits == 1) return;
  const long ih = (long)blockIdx.x * num_heads + blockIdx.y;
  const long stride = (long)num_items * num_heads;
  const int d = threadIdx.x % HD, sub = threadIdx.x / HD;
  float pre[PRE];
#pragma unroll
  for (int k = 0; k < PRE; k++) {
    const int s = sub + k * RED_SUB;
    pre[k] = s < splits ? part_out[(s * stride + ih) * HD + d] : 0.f;
  }
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += RED_THREADS)
    mx = fmaxf(mx, part_ml[(s * stride + ih) * 2]);
  mx = block_max(mx, red);
  float den = 0.f;
  for (int s = threadIdx.x; s < splits; s += RED_THREADS) {
    const float ms = part_ml[(s * stride + ih) * 2];
    const float w = ms == -INFINITY ? 0.f : exp2f(ms - mx);  // a split that saw no key: 0
    w_s[s] = w;
    den += w * part_ml[(s * stride + ih) * 2 + 1];
  }
  den = block_sum(den, red);  // its barriers also publish w_s
  float num = 0.f;
#pragma unroll
  for (int k = 0; k < PRE; k++) {
    const int s = sub + k * RED_SUB;
    if (s < splits) num += w_s[s] * pre[k];
  }
#pragma unroll 8
  for (int s = sub + PRE * RED_SUB; s < splits; s += RED_SUB)
    num += w_s[s] * part_out[(s * stride + ih) * HD + d];
  num_s[sub][d] = num;
  __syncthreads();
  if (sub == 0) {
    for (int k = 1; k < RED_SUB; k++) num += num_s[k][d];
    out[(tok * num_heads + blockIdx.y) * HD + d] = from_float<T>(den > 0.f ? num / den : 0.f);
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE_DEC(T, HD, G)                                                               \
  template __global__ void decode_attention_kernel<T, HD, G, 2>(              \
      T*, float*, float*, const T*, const T*, const T*, const int*, const int*, const int*,     \
      const int*, int, int, int, int, int, float, int, int);
#define INSTANTIATE(T, HD)                                                                      \
  INSTANTIATE_DEC(T, HD, 1)                                                                     \
  INSTANTIATE_DEC(T, HD, 2)                                                                     \
  INSTANTIATE_DEC(T, HD, 4)                                                                     \
  INSTANTIATE_DEC(T, HD, 8)                                                                     \
  template __global__ void decode_reduce_kernel<T, HD>(T*, const float*, const float*,          \
                                                       const int*, const int*, const int*,  \
                                                       int, int, int, int);
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)
#endif
