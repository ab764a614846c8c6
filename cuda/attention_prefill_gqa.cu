// Paged causal attention for prefill chunks, one block per (kv head, tile of new tokens): every
// query head of the kv group reads the K/V tiles the block loads once (GQA 4:1 loads a quarter of
// what one block per query head does).
//
// A block holds BM = 16 x MI x NW query rows: row r is query head kvh * group + r / TOK at new
// token r % TOK, TOK = BM / group (head-major, so a warp's rows are consecutive tokens of one head
// and share their causal bound). Rows past group x TOK or past the item's tokens are padding: zero
// Q, never stored, and left out of the warp's key bounds. Each warp owns MI m16 row tiles (MI = 2
// halves the shared-memory reads of K and V per FLOP; Q then comes from shared memory by ldmatrix).
// The block walks keys 0 .. last position in tiles of BN, gathered from the paged cache through
// the block table with cp.async (two stages: the next tile loads during this one's math). Warps
// skip key tiles wholly above their last row and mask only the tiles that cross a row's diagonal.
// The online softmax is base 2 on raw scores, scale folded into one FMA before ex2.
// Work items come from the host sorted by their last key, longest first (the causal tail).
#include "mma.cuh"

// Grid: (num_kv_heads, num_items)  Block: (NW * 32)
// Dynamic shared memory: (BM + 2 stages x (K, V) x BN) x (HD + 8) elements.
template <typename T, int HD, int MI, int NW, int BN>
__global__ void __launch_bounds__(NW * 32) prefill_gqa_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ work,           // [W, 3]: seq, first new token, tokens (<= TOK)
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale_log2) {
  constexpr int BM = 16 * MI * NW, LD = HD + 8, THREADS = NW * 32, CPR = HD / 8;
  static_assert(BN * CPR % THREADS == 0, "a K/V tile splits evenly over the threads");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* k_s = q_s + BM * LD;                   // [2][BN][LD]
  T* v_s = k_s + 2 * BN * LD;               // [2][BN][LD]

  const int kvh = blockIdx.x, item = blockIdx.y;
  const int group = num_heads / num_kv_heads, tok_per_head = BM / group;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int seq = work[item * 3], tile0 = work[item * 3 + 1], ntok = work[item * 3 + 2];
  const int q0 = query_start_loc[seq] + tile0;
  const int num_new = query_start_loc[seq + 1] - query_start_loc[seq];
  const int first_pos = context_lens[seq] - num_new + tile0;
  const int kv_len = first_pos + ntok;
  const long row_stride = (long)(num_heads + 2 * num_kv_heads) * HD;
  const int* table = block_tables + (long)seq * max_blocks;
  const T tag{};

  // Q rows -> shared memory (zeros for padding rows); they join tile 0's cp.async group.
  for (int c = tid; c < BM * CPR; c += THREADS) {
    const int r = c / CPR, d = (c % CPR) * 8;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    const bool valid = h < group && tok < ntok;
    const T* src = valid ? qkv + (long)(q0 + tok) * row_stride + (kvh * group + h) * HD + d : qkv;
    cp_async16(q_s + r * LD + d, src, valid);
  }

  // NOTE: block_size is a runtime value, commonly a power of two: shift and mask then, as an
  // integer division per 16-byte copy costs about as much as the copy's other address math.
  const int bs_shift = __ffs(block_size) - 1;
  const bool bs_pow2 = (block_size & (block_size - 1)) == 0;
  auto load_tile = [&](int t, int stage) {
    const int kb = t * BN;
#pragma unroll
    for (int i = 0; i < BN * CPR / THREADS; i++) {
      const int c = tid + i * THREADS;
      const int j = c / CPR, d = (c % CPR) * 8, key = kb + j;
      const bool valid = key < kv_len;
      long off = 0;
      if (valid) {
        int bi, slot;
        if (bs_pow2) {
          bi = key >> bs_shift;
          slot = key & (block_size - 1);
        } else {
          bi = key / block_size;
          slot = key - bi * block_size;
        }
        const long blk = table[bi];
        off = ((blk * num_kv_heads + kvh) * block_size + slot) * HD + d;
      }
      cp_async16(k_s + (stage * BN + j) * LD + d, k_cache + off, valid);
      cp_async16(v_s + (stage * BN + j) * LD + d, v_cache + off, valid);
    }
    asm volatile("cp.async.commit_group;");
  };
  const int num_tiles = (kv_len + BN - 1) / BN;
  load_tile(0, 0);

  // This lane's rows: row0 + mi * 16 + (lane >> 2) + 8 * half. Their positions give the causal
  // mask; the warp's lowest and highest valid position decide which tiles it masks and skips.
  const int row0 = warp * 16 * MI;
  int pos[MI][2];
  int lo = 0x7fffffff, hi = -1;
#pragma unroll
  for (int mi = 0; mi < MI; mi++) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int r = row0 + mi * 16 + (lane >> 2) + 8 * hf;
      const int h = r / tok_per_head, tok = r % tok_per_head;
      const bool valid = h < group && tok < ntok;
      pos[mi][hf] = first_pos + (valid ? tok : 0);
      if (valid) {
        lo = min(lo, pos[mi][hf]);
        hi = max(hi, pos[mi][hf]);
      }
    }
  }
#pragma unroll
  for (int x = 1; x < 32; x <<= 1) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, x));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, x));
  }
  // hi = -1: a warp of padding rows only, which skips every tile

  const int cq = (lane & 3) * 2;
  // ldmatrix address of this lane in a 16 x 16 A tile (Q) at row 0, column 0
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
  unsigned qf[MI == 1 ? HD / 16 : 1][4];  // MI = 1 keeps Q in registers

  float o[MI][HD / 8][4];
  float m[MI][2], l[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; mi++) {
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
    m[mi][0] = m[mi][1] = -INFINITY;
    l[mi][0] = l[mi][1] = 0.f;
  }

  for (int t = 0; t < num_tiles; t++) {
    if (t + 1 < num_tiles) {
      load_tile(t + 1, (t + 1) & 1);
      asm volatile("cp.async.wait_group 1;");
    } else {
      asm volatile("cp.async.wait_group 0;");
    }
    __syncthreads();
    if constexpr (MI == 1) {
      if (t == 0) {
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++)
          ldsm_x4(qf[kk], q_s + (row0 + a_row) * LD + kk * 16 + a_col);
      }
    }
    const int kb = t * BN;
    if (kb <= hi) {
      const T* kt = k_s + (t & 1) * BN * LD;
      const T* vt = v_s + (t & 1) * BN * LD;
      float s[MI][BN / 8][4];
#pragma unroll
      for (int mi = 0; mi < MI; mi++)
#pragma unroll
        for (int i = 0; i < BN / 8; i++) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < HD / 16; kk++) {
        unsigned a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
          if constexpr (MI == 1) {
#pragma unroll
            for (int e = 0; e < 4; e++) a[mi][e] = qf[kk][e];
          } else {
            ldsm_x4(a[mi], q_s + (row0 + mi * 16 + a_row) * LD + kk * 16 + a_col);
          }
        }
#pragma unroll
        for (int n2 = 0; n2 < BN / 16; n2++) {
          unsigned b[4];
          ldsm_x4(b, kt + (n2 * 16 + (lane & 7) + (lane >> 4) * 8) * LD + kk * 16 +
                         ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mi = 0; mi < MI; mi++) {
            mma16816(s[mi][2 * n2], a[mi], b[0], b[1], tag);
            mma16816(s[mi][2 * n2 + 1], a[mi], b[2], b[3], tag);
          }
        }
      }
      // Keys past kv_len lie past every valid row's position, so the causal test covers them.
      const bool need_mask = kb + BN - 1 > lo;
      unsigned pf[MI][BN / 16][4];  // P as the A operand: key columns 16j .. 16j + 15
#pragma unroll
      for (int mi = 0; mi < MI; mi++) {
        float mx0 = m[mi][0], mx1 = m[mi][1];
#pragma unroll
        for (int i = 0; i < BN / 8; i++) {
          if (need_mask) {
#pragma unroll
            for (int e = 0; e < 4; e++)
              if (kb + i * 8 + cq + (e & 1) > pos[mi][e >> 1]) s[mi][i][e] = -INFINITY;
          }
          mx0 = fmaxf(mx0, fmaxf(s[mi][i][0], s[mi][i][1]));
          mx1 = fmaxf(mx1, fmaxf(s[mi][i][2], s[mi][i][3]));
        }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
        }
        // NOTE: a valid row sees key 0 in tile 0, so its running max is finite from then on; a
        // padding row may produce NaN here, which stays in its own row (mma rows are independent).
        const float alpha0 = fast_exp2((m[mi][0] - mx0) * scale_log2);
        const float alpha1 = fast_exp2((m[mi][1] - mx1) * scale_log2);
        m[mi][0] = mx0;
        m[mi][1] = mx1;
        const float sub0 = mx0 * scale_log2, sub1 = mx1 * scale_log2;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 16; j++) {
          float p[2][4];
#pragma unroll
          for (int h = 0; h < 2; h++) {
            p[h][0] = fast_exp2(fmaf(s[mi][2 * j + h][0], scale_log2, -sub0));
            p[h][1] = fast_exp2(fmaf(s[mi][2 * j + h][1], scale_log2, -sub0));
            p[h][2] = fast_exp2(fmaf(s[mi][2 * j + h][2], scale_log2, -sub1));
            p[h][3] = fast_exp2(fmaf(s[mi][2 * j + h][3], scale_log2, -sub1));
            sum0 += p[h][0] + p[h][1];
            sum1 += p[h][2] + p[h][3];
          }
          pf[mi][j][0] = pack2(p[0][0], p[0][1], tag);
          pf[mi][j][1] = pack2(p[0][2], p[0][3], tag);
          pf[mi][j][2] = pack2(p[1][0], p[1][1], tag);
          pf[mi][j][3] = pack2(p[1][2], p[1][3], tag);
        }
        l[mi][0] = l[mi][0] * alpha0 + sum0;
        l[mi][1] = l[mi][1] * alpha1 + sum1;
        // Past the first tiles a row's max rarely moves (alpha is exactly 1): skip the HD / 2
        // multiplies per lane when it moved in no row of the warp.
        if (!__all_sync(0xffffffffu, alpha0 == 1.f && alpha1 == 1.f)) {
#pragma unroll
          for (int i = 0; i < HD / 8; i++) {
            o[mi][i][0] *= alpha0;
            o[mi][i][1] *= alpha0;
            o[mi][i][2] *= alpha1;
            o[mi][i][3] *= alpha1;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < BN / 16; j++) {
#pragma unroll
        for (int d2 = 0; d2 < HD / 16; d2++) {
          unsigned b[4];
          ldsm_x4_trans(b, vt + (j * 16 + a_row) * LD + d2 * 16 + a_col);
#pragma unroll
          for (int mi = 0; mi < MI; mi++) {
            mma16816(o[mi][2 * d2], pf[mi][j], b[0], b[1], tag);
            mma16816(o[mi][2 * d2 + 1], pf[mi][j], b[2], b[3], tag);
          }
        }
      }
    }
    __syncthreads();  // the next iteration's load overwrites this stage
  }

#pragma unroll
  for (int mi = 0; mi < MI; mi++) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      float sum = l[mi][hf];
#pragma unroll
      for (int x = 1; x < 4; x <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
      const int r = row0 + mi * 16 + (lane >> 2) + 8 * hf;
      const int h = r / tok_per_head, tok = r % tok_per_head;
      if (h >= group || tok >= ntok) continue;
      const float inv = 1.f / sum;  // >= 1: the row's max term contributes 2^0
      T* dst = out + ((long)(q0 + tok) * num_heads + kvh * group + h) * HD + cq;
#pragma unroll
      for (int i = 0; i < HD / 8; i++)
        *reinterpret_cast<unsigned*>(dst + i * 8) =
            pack2(o[mi][i][2 * hf] * inv, o[mi][i][2 * hf + 1] * inv, tag);
    }
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, HD, MI, NW, BN)                                                         \
  template __global__ void prefill_gqa_kernel<T, HD, MI, NW, BN>(                              \
      T*, const T*, const T*, const T*, const int*, const int*, const int*, const int*, int,   \
      int, int, int, float);
INSTANTIATE(__half, 64, 2, 8, 64)
INSTANTIATE(__half, 128, 2, 8, 64)
INSTANTIATE(__nv_bfloat16, 64, 2, 8, 64)
INSTANTIATE(__nv_bfloat16, 128, 2, 8, 64)
INSTANTIATE(__nv_bfloat16, 128, 2, 4, 64)
INSTANTIATE(__nv_bfloat16, 128, 1, 8, 64)
INSTANTIATE(__nv_bfloat16, 128, 1, 4, 64)
#endif
