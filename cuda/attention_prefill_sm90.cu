// Paged causal prefill attention for Hopper (sm_90a only; EXPERIMENTAL, not used by the engine
// until tools/kernel_check.py --only prefill90 holds it to the numpy twin on the device).
//
// The blocks, rows and work items of attention_prefill_gqa.cu (v2): one block per (kv head, tile
// of new tokens), row r = query head r / TOK at new token r % TOK. What changes is S = Q K^T: each
// warpgroup multiplies its 64-row Q tiles by the K tile with wgmma straight from shared memory
// (no ldmatrix, no per-warp copy of K fragments through registers). O += P V runs on mma.sync (P
// from registers, V by ldmatrix.trans from padded rows) or, with PVW = 1, on wgmma too (P from
// registers as the A operand, V from shared memory as an MN-major B operand). Warp w of a
// warpgroup owns rows 16 (w % 4) .. + 15 of each of its MI 64-row tiles, the rows wgmma's
// accumulators give it (the same fragment layout as mma.sync's, 8 columns per 4 registers).
// Q and K (and V with PVW) sit in shared memory in wgmma's unswizzled layout: 8 x 8 core matrices
// of 128 contiguous bytes (8 rows of 16 B: a row is 8 consecutive head_dim values of one query or
// key), head_dim-adjacent ones 128 B apart, 8-row groups HD x 16 B apart. For S = Q K^T, head_dim
// is K (LBO = 128, SBO = HD x 16); for P V the keys are K (LBO = HD x 16, SBO = 128).
#include "wgmma.cuh"


// Grid: (num_kv_heads, num_items)  Block: (NW * 32), NW a multiple of 4 (whole warpgroups)
// Dynamic shared memory: (BM + ST x BN) x HD elements (Q, ST stages of K) + ST x BN x (HD + 8)
// (V in padded rows) or, with PVW, ST x BN x HD (V in the core-matrix layout).
template <typename T, int HD, int MI, int NW, int BN, int ST, int PVW>
__global__ void __launch_bounds__(NW * 32) prefill_sm90_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ work,           // [W, 3]: seq, first new token, tokens (<= TOK)
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale_log2,
    int swap_desc) {  // bit 0: swap S's descriptors' LBO and SBO; bit 1: P V's
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = 16 * MI * NW, LD = HD + 8, THREADS = NW * 32, CPR = HD / 8;
  constexpr int GROUP_ELEMS = HD * 8;  // one 8-row group of the core-matrix layout
  static_assert(NW % 4 == 0 && BN == 64, "whole warpgroups; S tiles are m64n64");
  static_assert(BN * CPR % THREADS == 0, "a K/V tile splits evenly over the threads");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [BM / 8][HD / 8][8][8]
  T* k_s = q_s + BM * HD;                   // [ST][BN / 8][HD / 8][8][8]
  T* v_s = k_s + ST * BN * HD;  // [ST][BN][LD], or with PVW [ST][BN / 8][HD / 8][8][8]
  __shared__ int warp_hi[NW];

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

  // Copies in core-matrix order: 8 consecutive threads fill one 128-byte core matrix (rows
  // r .. r + 7 of one 16-byte column), so shared-memory writes are contiguous.
  for (int c = tid; c < BM * CPR; c += THREADS) {
    const int rr = c & 7, kc = (c >> 3) % CPR, rg = c / (8 * CPR), r = rg * 8 + rr;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    const bool valid = h < group && tok < ntok;
    const T* src =
        valid ? qkv + (long)(q0 + tok) * row_stride + (kvh * group + h) * HD + kc * 8 : qkv;
    cp_async16(q_s + rg * GROUP_ELEMS + kc * 64 + rr * 8, src, valid);
  }

  const int bs_shift = __ffs(block_size) - 1;
  const bool bs_pow2 = (block_size & (block_size - 1)) == 0;
  auto load_tile = [&](int t, int stage) {
    const int kb = t * BN;
#pragma unroll
    for (int i = 0; i < BN * CPR / THREADS; i++) {
      const int c = tid + i * THREADS;
      const int rr = c & 7, kc = (c >> 3) % CPR, rg = c / (8 * CPR), j = rg * 8 + rr;
      const int key = kb + j;
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
        off = (((long)table[bi] * num_kv_heads + kvh) * block_size + slot) * HD + kc * 8;
      }
      cp_async16(k_s + stage * BN * HD + rg * GROUP_ELEMS + kc * 64 + rr * 8, k_cache + off,
                 valid);
      cp_async16(PVW ? v_s + stage * BN * HD + rg * GROUP_ELEMS + kc * 64 + rr * 8
                     : v_s + (stage * BN + j) * LD + kc * 8,
                 v_cache + off, valid);
    }
    asm volatile("cp.async.commit_group;");
  };
  // ST stages: tiles t + 1 .. t + ST - 1 load while tile t is used. Every iteration commits one
  // cp.async group (empty past the last tile), so "all but the newest ST - 1 groups" is tile t.
  const int num_tiles = (kv_len + BN - 1) / BN;
#pragma unroll
  for (int st = 0; st < ST - 1; st++) {
    if (st < num_tiles)
      load_tile(st, st);
    else
      asm volatile("cp.async.commit_group;");
  }

  const int wg = warp >> 2;
  auto row_base = [&](int mi) { return wg * 64 * MI + mi * 64 + (warp & 3) * 16; };
  int pos[MI][2];
  int lo = 0x7fffffff, hi = -1;
#pragma unroll
  for (int mi = 0; mi < MI; mi++) {
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const int r = row_base(mi) + (lane >> 2) + 8 * hf;
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
  if (lane == 0) warp_hi[warp] = hi;  // read after the first barrier: the warpgroup's bound
  int wg_hi = -1;

  const int cq = (lane & 3) * 2;
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
  float o[MI][HD / 8][4];  // as wgmma's accumulator (PVW): element 4 i + e is o[mi][i][e]
  float s[32];  // an S tile as wgmma's accumulator: element 4 n + e = mma.sync's s[n][e]
  float m[MI][2], l[MI][2];
#pragma unroll
  for (int mi = 0; mi < MI; mi++) {
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[mi][i][0] = o[mi][i][1] = o[mi][i][2] = o[mi][i][3] = 0.f;
    m[mi][0] = m[mi][1] = -INFINITY;
    l[mi][0] = l[mi][1] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 32; i++) s[i] = 0.f;

  for (int t = 0, stage = 0; t < num_tiles; t++, stage = stage + 1 == ST ? 0 : stage + 1) {
    const int next = t + ST - 1;  // into the stage tile t - 1 used, free since the last barrier
    if (next < num_tiles)
      load_tile(next, next % ST);
    else
      asm volatile("cp.async.commit_group;");
    asm volatile("cp.async.wait_group %0;" ::"n"(ST - 1));
    // NOTE: cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    if (t == 0)
      wg_hi = max(max(warp_hi[wg * 4], warp_hi[wg * 4 + 1]),
                  max(warp_hi[wg * 4 + 2], warp_hi[wg * 4 + 3]));
    const int kb = t * BN;
    // One S tile (32 registers) at a time: its wgmma, then its softmax into P fragments.
    // NOTE: wgmma is warpgroup-wide (every warp issues each one); the softmax and P V are per
    // warp, skipped by warps whose rows all lie before this tile.
    if (kb <= wg_hi) {
      const T* vt = v_s + stage * BN * LD;
      const bool need_mask = kb + BN - 1 > lo;
      unsigned pf[MI][BN / 16][4];
#pragma unroll
      for (int mi = 0; mi < MI; mi++) {
        fence_regs(s);
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
          const unsigned long long da = wgmma_desc(
              q_s + (wg * 64 * MI + mi * 64) / 8 * GROUP_ELEMS + kk * 128, 128, HD * 16,
              swap_desc & 1);
          const unsigned long long db =
              wgmma_desc(k_s + stage * BN * HD + kk * 128, 128, HD * 16, swap_desc & 1);
          wgmma_64x64x16(s, da, db, kk > 0, tag);
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        fence_regs(s);
        if (!PVW && kb > hi) continue;  // PVW: every warp's P feeds the warpgroup's wgmma
        float mx0 = m[mi][0], mx1 = m[mi][1];
#pragma unroll
        for (int i = 0; i < BN / 8; i++) {
          if (need_mask) {
#pragma unroll
            for (int e = 0; e < 4; e++)
              if (kb + i * 8 + cq + (e & 1) > pos[mi][e >> 1]) s[4 * i + e] = -INFINITY;
          }
          mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
          mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
        }
#pragma unroll
        for (int x = 1; x < 4; x <<= 1) {
          mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
          mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
        }
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
            const float* sv = &s[4 * (2 * j + h)];
            p[h][0] = fast_exp2(fmaf(sv[0], scale_log2, -sub0));
            p[h][1] = fast_exp2(fmaf(sv[1], scale_log2, -sub0));
            p[h][2] = fast_exp2(fmaf(sv[2], scale_log2, -sub1));
            p[h][3] = fast_exp2(fmaf(sv[3], scale_log2, -sub1));
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
      if constexpr (PVW) {
#pragma unroll
        for (int mi = 0; mi < MI; mi++) fence_regs(reinterpret_cast<float(&)[HD / 2]>(o[mi]));
        asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
        for (int mi = 0; mi < MI; mi++) {
#pragma unroll
          for (int j = 0; j < BN / 16; j++) {  // keys 16 j .. 16 j + 15: two 8-key groups
            const unsigned long long dv = wgmma_desc(
                v_s + stage * BN * HD + 2 * j * GROUP_ELEMS, HD * 16, 128, swap_desc & 2);
            WgmmaRS<HD>::run(reinterpret_cast<float(&)[HD / 2]>(o[mi]), pf[mi][j], dv, tag);
          }
        }
        asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
        for (int mi = 0; mi < MI; mi++) fence_regs(reinterpret_cast<float(&)[HD / 2]>(o[mi]));
      } else if (kb <= hi) {
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
      const int r = row_base(mi) + (lane >> 2) + 8 * hf;
      const int h = r / tok_per_head, tok = r % tok_per_head;
      if (h >= group || tok >= ntok) continue;
      const float inv = 1.f / sum;
      T* dst = out + ((long)(q0 + tok) * num_heads + kvh * group + h) * HD + cq;
#pragma unroll
      for (int i = 0; i < HD / 8; i++)
        *reinterpret_cast<unsigned*>(dst + i * 8) =
            pack2(o[mi][i][2 * hf] * inv, o[mi][i][2 * hf + 1] * inv, tag);
    }
  }
#endif
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, HD, MI, NW, BN, ST, PVW)                                                \
  template __global__ void prefill_sm90_kernel<T, HD, MI, NW, BN, ST, PVW>(                    \
      T*, const T*, const T*, const T*, const int*, const int*, const int*, const int*, int,   \
      int, int, int, float, int);
INSTANTIATE(__half, 128, 2, 8, 64, 2, 0)
INSTANTIATE(__half, 128, 2, 8, 64, 2, 1)
INSTANTIATE(__half, 64, 2, 8, 64, 2, 1)
INSTANTIATE(__nv_bfloat16, 64, 2, 8, 64, 2, 0)
INSTANTIATE(__nv_bfloat16, 64, 2, 8, 64, 2, 1)
INSTANTIATE(__nv_bfloat16, 128, 2, 8, 64, 2, 0)
INSTANTIATE(__nv_bfloat16, 128, 2, 8, 64, 3, 0)
INSTANTIATE(__nv_bfloat16, 128, 2, 8, 64, 3, 1)
INSTANTIATE(__nv_bfloat16, 128, 2, 8, 64, 2, 1)
INSTANTIATE(__nv_bfloat16, 128, 1, 8, 64, 2, 1)
INSTANTIATE(__nv_bfloat16, 128, 2, 4, 64, 2, 0)
#endif
