// Paged causal attention for sequences with several new tokens (prefill chunks), on tensor cores.
// v1, kept as the fallback (PAGEDSERVE_PREFILL_KERNEL=v1, or a kv group wider than v2's block)
// and as tools/kernel_check.py's timing baseline; the default is attention_prefill_sm90.cu on
// Hopper, attention_prefill_gqa.cu (v2) elsewhere (cuda_prefill.prefill_plan).
//
// FlashAttention-2 style: a block takes a tile of up to PF_M consecutive new tokens of one
// sequence and one query head; each of its 4 warps owns 16 query rows. The block walks the keys
// 0 .. last query position in tiles of PF_N, gathered from the paged cache through the block
// table into shared memory with cp.async (two stages: the next tile loads during this one's math).
// S = Q K^T and O += P V run on mma.sync m16n8k16 (fp32 accumulate); the online softmax (base 2)
// stays in registers. Warps skip key tiles that lie wholly above their diagonal.
#include "mma.cuh"

constexpr int PF_M = 64;   // query rows per block (4 warps x 16)
constexpr int PF_N = 64;   // keys per tile
constexpr int PF_THREADS = 128;
static_assert(PF_M == 16 * (PF_THREADS / 32), "each warp owns 16 query rows");

// Grid: (num_heads, num_prefill_items)  Block: (PF_THREADS)
// Dynamic shared memory: 2 stages x (K, V) x PF_N x (HD + 8) elements.
template <typename T, int HD>
__global__ void __launch_bounds__(PF_THREADS) prefill_attention_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ work,           // [W, 3]: seq, first new token, tokens (<= PF_M)
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale_log2) {
  constexpr int LD = HD + 8;  // padded row: ldmatrix rows fall in distinct banks
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);  // [2][PF_N][LD]
  T* v_s = k_s + 2 * PF_N * LD;             // [2][PF_N][LD]

  const int head = blockIdx.x;
  const int item = gridDim.y - 1 - blockIdx.y;  // the longest tiles (last in a sequence) first
  const int kvh = head / (num_heads / num_kv_heads);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int seq = work[item * 3], tile0 = work[item * 3 + 1], ntok = work[item * 3 + 2];
  const int q0 = query_start_loc[seq] + tile0;
  const int num_new = query_start_loc[seq + 1] - query_start_loc[seq];
  const int first_pos = context_lens[seq] - num_new + tile0;
  const int kv_len = first_pos + ntok;
  const long row_stride = (long)(num_heads + 2 * num_kv_heads) * HD;
  const int* table = block_tables + (long)seq * max_blocks;
  const T tag{};

  auto load_tile = [&](int t, int stage) {
    constexpr int CPR = HD / 8;  // 16-byte pieces per key row
    const int kb = t * PF_N;
#pragma unroll
    for (int i = 0; i < PF_N * CPR / PF_THREADS; i++) {
      const int c = tid + i * PF_THREADS;
      const int j = c / CPR, d = (c % CPR) * 8, key = kb + j;
      const bool valid = key < kv_len;
      long off = 0;
      if (valid) {
        const long blk = table[key / block_size];
        off = ((blk * num_kv_heads + kvh) * block_size + key % block_size) * HD + d;
      }
      cp_async16(k_s + (stage * PF_N + j) * LD + d, k_cache + off, valid);
      cp_async16(v_s + (stage * PF_N + j) * LD + d, v_cache + off, valid);
    }
    asm volatile("cp.async.commit_group;");
  };
  const int num_tiles = (kv_len + PF_N - 1) / PF_N;
  load_tile(0, 0);

  // Q fragments (A operand, 16 rows x HD) straight from global memory; rows past ntok are zero.
  const int ra = warp * 16 + (lane >> 2), rb = ra + 8;  // this lane's two rows in the tile
  const int cq = (lane & 3) * 2;
  unsigned qf[HD / 16][4];
  {
    const T* qa = qkv + (q0 + ra) * row_stride + head * HD + cq;
    const T* qb = qkv + (q0 + rb) * row_stride + head * HD + cq;
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      qf[kk][0] = ra < ntok ? *reinterpret_cast<const unsigned*>(qa + kk * 16) : 0u;
      qf[kk][1] = rb < ntok ? *reinterpret_cast<const unsigned*>(qb + kk * 16) : 0u;
      qf[kk][2] = ra < ntok ? *reinterpret_cast<const unsigned*>(qa + kk * 16 + 8) : 0u;
      qf[kk][3] = rb < ntok ? *reinterpret_cast<const unsigned*>(qb + kk * 16 + 8) : 0u;
    }
  }
  const int pos_a = first_pos + ra, pos_b = first_pos + rb;
  const int warp_first = first_pos + warp * 16, warp_last = warp_first + 15;

  float o[HD / 8][4];
#pragma unroll
  for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;

  for (int t = 0; t < num_tiles; t++) {
    if (t + 1 < num_tiles) {
      load_tile(t + 1, (t + 1) & 1);
      asm volatile("cp.async.wait_group 1;");
    } else {
      asm volatile("cp.async.wait_group 0;");
    }
    __syncthreads();
    const int kb = t * PF_N;
    if (kb <= warp_last) {
      const T* kt = k_s + (t & 1) * PF_N * LD;
      const T* vt = v_s + (t & 1) * PF_N * LD;
      float s[PF_N / 8][4];
#pragma unroll
      for (int i = 0; i < PF_N / 8; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
        for (int n2 = 0; n2 < PF_N / 16; n2++) {
          unsigned b[4];
          ldsm_x4(b, kt + (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 +
                         ((lane >> 3) & 1) * 8);
          mma16816(s[2 * n2], qf[kk], b[0], b[1], tag);
          mma16816(s[2 * n2 + 1], qf[kk], b[2], b[3], tag);
        }
      }
      const bool need_mask = kb + PF_N - 1 > warp_first || kb + PF_N > kv_len;
      float mx_a = m_a, mx_b = m_b;
#pragma unroll
      for (int i = 0; i < PF_N / 8; i++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          float v = s[i][e] * scale_log2;
          if (need_mask) {
            const int key = kb + i * 8 + cq + (e & 1);
            if (key > (e < 2 ? pos_a : pos_b) || key >= kv_len) v = -INFINITY;
          }
          s[i][e] = v;
        }
        mx_a = fmaxf(mx_a, fmaxf(s[i][0], s[i][1]));
        mx_b = fmaxf(mx_b, fmaxf(s[i][2], s[i][3]));
      }
#pragma unroll
      for (int x = 1; x < 4; x <<= 1) {
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, x));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, x));
      }
      // A row sees key 0 in the first tile, so its max is finite from then on.
      const float alpha_a = exp2f(m_a - mx_a), alpha_b = exp2f(m_b - mx_b);
      m_a = mx_a;
      m_b = mx_b;
      l_a *= alpha_a;
      l_b *= alpha_b;
#pragma unroll
      for (int i = 0; i < HD / 8; i++) {
        o[i][0] *= alpha_a;
        o[i][1] *= alpha_a;
        o[i][2] *= alpha_b;
        o[i][3] *= alpha_b;
      }
      // P as the A operand: the score fragments of key columns 16j .. 16j + 15.
      unsigned pf[PF_N / 16][4];
#pragma unroll
      for (int j = 0; j < PF_N / 16; j++) {
        float p[2][4];
#pragma unroll
        for (int h = 0; h < 2; h++) {
          p[h][0] = exp2f(s[2 * j + h][0] - m_a);
          p[h][1] = exp2f(s[2 * j + h][1] - m_a);
          p[h][2] = exp2f(s[2 * j + h][2] - m_b);
          p[h][3] = exp2f(s[2 * j + h][3] - m_b);
          l_a += p[h][0] + p[h][1];
          l_b += p[h][2] + p[h][3];
        }
        pf[j][0] = pack2(p[0][0], p[0][1], tag);
        pf[j][1] = pack2(p[0][2], p[0][3], tag);
        pf[j][2] = pack2(p[1][0], p[1][1], tag);
        pf[j][3] = pack2(p[1][2], p[1][3], tag);
      }
#pragma unroll
      for (int j = 0; j < PF_N / 16; j++) {
#pragma unroll
        for (int d2 = 0; d2 < HD / 16; d2++) {
          unsigned b[4];
          ldsm_x4_trans(b, vt + (j * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + d2 * 16 +
                               (lane >> 4) * 8);
          mma16816(o[2 * d2], pf[j], b[0], b[1], tag);
          mma16816(o[2 * d2 + 1], pf[j], b[2], b[3], tag);
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }

#pragma unroll
  for (int x = 1; x < 4; x <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, x);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, x);
  }
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  T* oa = out + ((long)(q0 + ra) * num_heads + head) * HD + cq;
  T* ob = out + ((long)(q0 + rb) * num_heads + head) * HD + cq;
#pragma unroll
  for (int i = 0; i < HD / 8; i++) {
    if (ra < ntok)
      *reinterpret_cast<unsigned*>(oa + i * 8) = pack2(o[i][0] * inv_a, o[i][1] * inv_a, tag);
    if (rb < ntok)
      *reinterpret_cast<unsigned*>(ob + i * 8) = pack2(o[i][2] * inv_b, o[i][3] * inv_b, tag);
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, HD)                                                                     \
  template __global__ void prefill_attention_kernel<T, HD>(                                    \
      T*, const T*, const T*, const T*, const int*, const int*, const int*, const int*, int,   \
      int, int, int, float);
INSTANTIATE(__half, 64)
INSTANTIATE(__half, 128)
INSTANTIATE(__nv_bfloat16, 64)
INSTANTIATE(__nv_bfloat16, 128)
#endif
