// Paged causal attention over a mixed batch (decode and prefill chunks), split over the context.
//
// A work item is a tile of consecutive new tokens of one sequence. One block takes one work item,
// one kv head and one context split, and handles all `group` query heads that read this kv head,
// for every token of the tile: rows = tile_tokens * group <= ROWS, so each K/V tile is read once
// for all of them. Decode items have one token (rows = group). Scores, the online softmax and the
// output accumulate in fp32; K/V tiles are converted to fp32 in shared memory.
#include "common.cuh"

constexpr int KC = 32;     // keys per tile (one per lane in the softmax step)
constexpr int NT = 128;    // threads per block
constexpr int ROWS = 16;   // query rows per block

// Grid: (num_work_items, num_kv_heads, num_splits)  Block: (NT)
// With num_splits == 1 the normalized result goes to `out`; otherwise each split writes its
// unnormalized partial sum and (max, sum) to the workspace and attention_reduce_kernel combines.
template <typename T, int HD>
__global__ void __launch_bounds__(NT) paged_attention_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    float* __restrict__ part_out,           // [num_splits, num_tokens, num_heads, HD]
    float* __restrict__ part_ml,            // [num_splits, num_tokens, num_heads, 2]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ work,           // [num_work_items, 3]: seq, first new token, tokens
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_tokens, int num_heads, int num_kv_heads, int block_size, float scale,
    int num_splits) {
  __shared__ float q_s[ROWS][HD];
  __shared__ float k_s[KC][HD + 1];  // +1: the score loop reads rows of k_s across lanes
  __shared__ float v_s[KC][HD];
  __shared__ float p_s[ROWS][KC + 1];
  __shared__ float m_s[ROWS], l_s[ROWS], a_s[ROWS];

  const int group = num_heads / num_kv_heads;
  const int kvh = blockIdx.y, split = blockIdx.z, tid = threadIdx.x;
  const int seq = work[blockIdx.x * 3], tile0 = work[blockIdx.x * 3 + 1];
  const int ntok = work[blockIdx.x * 3 + 2];
  const int q0 = query_start_loc[seq] + tile0;  // flat index of the tile's first token
  const int num_new = query_start_loc[seq + 1] - query_start_loc[seq];
  const int first_pos = context_lens[seq] - num_new + tile0;
  const int nrows = ntok * group;
  const int kv_len = first_pos + ntok;  // keys seen by the tile's last query
  const int per_split = ((kv_len + num_splits - 1) / num_splits + KC - 1) / KC * KC;
  const int k_begin = split * per_split, k_end = min(kv_len, k_begin + per_split);
  const long row_stride = (long)(num_heads + 2 * num_kv_heads) * HD;
  const int* table = block_tables + (long)seq * max_blocks;

  // Row r = token * group + g is query head kvh * group + g of token q0 + token.
  for (int i = tid; i < ROWS * HD; i += NT) {
    const int r = i / HD, d = i % HD;
    float v = 0.f;
    if (r < nrows)
      v = to_float(qkv[(q0 + r / group) * row_stride + (kvh * group + r % group) * HD + d]) * scale;
    q_s[r][d] = v;
  }
  if (tid < ROWS) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  constexpr int PER = ROWS * HD / NT;  // output elements per thread
  float acc[PER];
#pragma unroll
  for (int i = 0; i < PER; i++) acc[i] = 0.f;
  __syncthreads();

  constexpr int WPR = HD / 8;            // 16-byte words per key row
  constexpr int NV = KC * WPR / NT;      // words per thread per tile, for K and for V
  for (int kb = k_begin; kb < k_end; kb += KC) {
    // Issue every load of the tile before the first use, to keep many bytes in flight.
    uint4 kr[NV], vr[NV];
#pragma unroll
    for (int i = 0; i < NV; i++) {
      const int w = tid + i * NT, key = kb + w / WPR;
      kr[i] = vr[i] = make_uint4(0u, 0u, 0u, 0u);
      if (key < k_end) {
        const long blk = table[key / block_size];
        const long off = ((blk * num_kv_heads + kvh) * block_size + key % block_size) * HD +
                         (w % WPR) * 8;
        kr[i] = *reinterpret_cast<const uint4*>(k_cache + off);
        vr[i] = *reinterpret_cast<const uint4*>(v_cache + off);
      }
    }
#pragma unroll
    for (int i = 0; i < NV; i++) {
      const int w = tid + i * NT, j = w / WPR, d = (w % WPR) * 8;
      const T* kh = reinterpret_cast<const T*>(&kr[i]);
      const T* vh = reinterpret_cast<const T*>(&vr[i]);
#pragma unroll
      for (int e = 0; e < 8; e++) {
        k_s[j][d + e] = to_float(kh[e]);
        v_s[j][d + e] = to_float(vh[e]);
      }
    }
    __syncthreads();
    for (int i = tid; i < nrows * KC; i += NT) {
      const int r = i / KC, j = i % KC, key = kb + j;
      float s = -INFINITY;
      if (key < k_end && key <= first_pos + r / group) {  // causal: key position <= query position
        s = 0.f;
#pragma unroll 16
        for (int d = 0; d < HD; d++) s += q_s[r][d] * k_s[j][d];
      }
      p_s[r][j] = s;
    }
    __syncthreads();
    // Online softmax, one warp per row: lane j owns key kb + j.
    for (int r = tid >> 5; r < nrows; r += NT / 32) {
      const int lane = tid & 31;
      const float m_old = m_s[r];
      const float s = p_s[r][lane];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float p = m_new == -INFINITY ? 0.f : expf(s - m_new);
      const float sum = warp_sum(p);
      p_s[r][lane] = p;
      if (lane == 0) {
        const float a = m_old == -INFINITY ? 0.f : expf(m_old - m_new);
        a_s[r] = a;
        l_s[r] = l_s[r] * a + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < PER; i++) {
      const int idx = tid + i * NT, r = idx / HD, d = idx % HD;
      if (r < nrows) {
        float o = acc[i] * a_s[r];
#pragma unroll 8
        for (int j = 0; j < KC; j++) o += p_s[r][j] * v_s[j][d];
        acc[i] = o;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < PER; i++) {
    const int idx = tid + i * NT, r = idx / HD, d = idx % HD;
    if (r >= nrows) continue;
    const long t = q0 + r / group;
    const int head = kvh * group + r % group;
    if (num_splits == 1) {
      out[(t * num_heads + head) * HD + d] = from_float<T>(l_s[r] > 0.f ? acc[i] / l_s[r] : 0.f);
    } else {
      const long at = ((long)split * num_tokens + t) * num_heads + head;
      part_out[at * HD + d] = acc[i];
      if (d == 0) {
        part_ml[at * 2] = m_s[r];
        part_ml[at * 2 + 1] = l_s[r];
      }
    }
  }
}

// Combines the splits: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
// Grid: (num_tokens, num_heads)  Block: (HD)
template <typename T, int HD>
__global__ void attention_reduce_kernel(T* __restrict__ out,             // [num_tokens, nh, HD]
                                        const float* __restrict__ part_out,  // [S, num_tokens, nh, HD]
                                        const float* __restrict__ part_ml,   // [S, num_tokens, nh, 2]
                                        int num_tokens, int num_heads, int num_splits) {
  const long th = (long)blockIdx.x * num_heads + blockIdx.y;
  const long stride = (long)num_tokens * num_heads;
  float m = -INFINITY;
  for (int s = 0; s < num_splits; s++) m = fmaxf(m, part_ml[(s * stride + th) * 2]);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < num_splits; s++) {
    const float ms = part_ml[(s * stride + th) * 2];
    if (ms == -INFINITY) continue;  // this split saw no key for this query
    const float w = expf(ms - m);
    num += w * part_out[(s * stride + th) * HD + threadIdx.x];
    den += w * part_ml[(s * stride + th) * 2 + 1];
  }
  out[th * HD + threadIdx.x] = from_float<T>(den > 0.f ? num / den : 0.f);
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, HD)                                                                      \
  template __global__ void paged_attention_kernel<T, HD>(                                       \
      T*, float*, float*, const T*, const T*, const T*, const int*, const int*, const int*,     \
      const int*, int, int, int, int, int, float, int);                                         \
  template __global__ void attention_reduce_kernel<T, HD>(T*, const float*, const float*, int, \
                                                          int, int);
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)
#endif
