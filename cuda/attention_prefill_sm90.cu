// Paged causal prefill attention for Hopper on wgmma (sm_90a only).
//
// The blocks, rows and work items of attention_prefill_gqa.cu (v2): one block per (kv head, tile
// of new tokens), row r = query head r / TOK at new token r % TOK, so that a GQA group's query
// heads share every K/V tile the block loads. Each warpgroup owns 64 rows (BM = 16 NW); warp w of
// a warpgroup owns rows 16 (w % 4) .. + 15, the rows wgmma's accumulators give it (the fragment
// layout of mma.sync, 8 columns per 4 registers). Q lives in registers as wgmma's A operand for
// S = Q K^T (loaded once by ldmatrix: no shared-memory reads of Q per key tile), P as the A
// operand of O += P V, straight from the softmax's registers.
// K and V sit in shared memory in wgmma's unswizzled layout: 8 x 8 core matrices of 128 contiguous
// bytes (8 keys x 8 consecutive head_dim values), head_dim-adjacent ones 128 B apart, 8-key groups
// HD x 16 B apart. For S, head_dim is K (K-major: LBO = 128, SBO = HD x 16); for P V the keys are
// K and V is MN-major (LBO = HD x 16, SBO = 128; swap_desc bit 1 probes the other reading).
// Pipeline per warpgroup (the order of FlashAttention-3's intra-warpgroup overlap): S(t) runs on
// the tensor cores while O is rescaled, P(t-1) V(t-1) while the softmax turns S(t) into P(t);
// no instruction touches a register that an in-flight wgmma uses (ptxas would serialize every
// wgmma, C7513/C7514). K/V tiles of BN keys rotate through ST cp.async stages loaded D = ST - 2
// tiles ahead (BN = 64: 4 stages, BN = 128: 3, as shared memory allows): tile t + D overwrites
// tile t - 2's stage, whose P V every warpgroup has waited for before the barrier that precedes
// the overwrite. The other warpgroup fills the tensor cores' gaps.
// Every warpgroup walks every key tile of the block (its wgmma groups must pair up); keys past a
// row's position are masked, only in tiles that cross the warp's diagonal.
#include "wgmma.cuh"

// Grid: (num_kv_heads, num_items)  Block: (NW * 32), NW a multiple of 4
// Dynamic shared memory: 2 x ST x BN x HD (ST stages of K, of V) + BM x (HD + 8) (Q rows)
// elements, ST = 4 stages of 64 keys or 3 of 128.
template <typename T, int HD, int NW, int BN>
__global__ void __launch_bounds__(NW * 32, 1) prefill_sm90_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ work,           // [W, 3]: seq, first new token, tokens (<= TOK)
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale_log2,
    int swap_desc) {  // bit 1: swap LBO and SBO of V's descriptors (kernel_check's probe)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // D: tiles loaded ahead; tile t + D goes into tile t - 2's stage
  constexpr int ST = BN == 64 ? 4 : 3, D = ST - 2;
  constexpr int BM = 16 * NW, LD = HD + 8, THREADS = NW * 32, CPR = HD / 8;
  constexpr int GROUP_ELEMS = HD * 8;  // one 8-key group of the core-matrix layout
  static_assert(NW % 4 == 0 && (BN == 64 || BN == 128), "whole warpgroups; m64n64 or n128 S");
  static_assert(BN * CPR % THREADS == 0, "a K/V tile splits evenly over the threads");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);  // [ST][BN / 8][HD / 8][8][8]
  T* v_s = k_s + ST * BN * HD;              // [ST][BN / 8][HD / 8][8][8]
  T* q_s = v_s + ST * BN * HD;              // [BM][LD]

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

  // NOTE: block_size is a runtime value, commonly a power of two: shift and mask then.
  const int bs_shift = __ffs(block_size) - 1;
  const bool bs_pow2 = (block_size & (block_size - 1)) == 0;
  const int num_tiles = (kv_len + BN - 1) / BN;
  auto load_tile = [&](int t) {  // tile t into stage t % ST, or an empty group past the last
    if (t < num_tiles) {
      const int kb = t * BN, base = (t % ST) * BN * HD;
#pragma unroll
      for (int i = 0; i < BN * CPR / THREADS; i++) {
        // 8 consecutive threads fill one core matrix: contiguous shared-memory writes
        const int c = tid + i * THREADS;
        const int rr = c & 7, kc = (c >> 3) % CPR, rg = c / (8 * CPR), key = kb + rg * 8 + rr;
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
        const int dst = base + rg * GROUP_ELEMS + kc * 64 + rr * 8;
        cp_async16(k_s + dst, k_cache + off, valid);
        cp_async16(v_s + dst, v_cache + off, valid);
      }
    }
    asm volatile("cp.async.commit_group;");
  };

  // This lane's rows: row0 + (lane >> 2) + 8 half; their positions give the causal mask, the
  // warp's lowest valid position decides which tiles it masks.
  const int row0 = warp * 16;
  int pos[2];
  int lo = 0x7fffffff;
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    const int r = row0 + (lane >> 2) + 8 * hf;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    const bool valid = h < group && tok < ntok;
    pos[hf] = first_pos + (valid ? tok : 0);
    if (valid) lo = min(lo, pos[hf]);
  }
#pragma unroll
  for (int x = 1; x < 32; x <<= 1) lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, x));

  const int cq = (lane & 3) * 2;
  unsigned qf[HD / 16][4];  // Q as wgmma's register A operand, head_dim 16 kk .. 16 kk + 15
  unsigned pf[BN / 16][4];  // P likewise, keys 16 j .. 16 j + 15
  float o[HD / 2];          // O accumulator, element 4 i + e: row (e >> 1), column 8 i + cq + (e & 1)
  float s[BN / 2];          // S accumulator, the same layout over the tile's BN keys
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};
#pragma unroll
  for (int i = 0; i < HD / 2; i++) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < BN / 2; i++) s[i] = 0.f;

  auto issue_s = [&](int t) {  // s = Q K(t)^T, one wgmma group
    unsigned long long db[HD / 16];  // head_dim 16 kk ..: 2 kk core matrices further
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++)
      db[kk] = wgmma_desc(k_s + (t % ST) * BN * HD + kk * 128, 128, HD * 16, 0);
    fence_regs(db);
    fence_regs(s);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    WgmmaRS<BN, 0>::template run<0>(s, qf[0], db[0], tag);
#pragma unroll
    for (int kk = 1; kk < HD / 16; kk++) WgmmaRS<BN, 0>::template run<1>(s, qf[kk], db[kk], tag);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };
  auto issue_pv = [&](int t) {  // o += P V(t), one wgmma group, after O's rescale
    if (!__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {
      // Past the first tiles a row's max rarely moves: skip the multiplies when none moved
#pragma unroll
      for (int i = 0; i < HD / 8; i++) {
        o[4 * i] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
      }
    }
    unsigned long long dv[BN / 16];  // keys 16 j ..: 2 j 8-key groups further
#pragma unroll
    for (int j = 0; j < BN / 16; j++)
      dv[j] = wgmma_desc(v_s + (t % ST) * BN * HD + 2 * j * GROUP_ELEMS, HD * 16, 128,
                         swap_desc & 2);
    fence_regs(dv);
#pragma unroll
    for (int j = 0; j < BN / 16; j++) fence_regs(pf[j]);
    fence_regs(o);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int j = 0; j < BN / 16; j++) WgmmaRS<HD, 1>::template run<1>(o, pf[j], dv[j], tag);
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };
  // S(t) -> unnormalized P(t) in place (fp32), the running max and sum, alpha: O's rescale.
  auto softmax = [&](int t) {
    const int kb = t * BN;
    if (kb + BN - 1 > lo) {  // the tile crosses the diagonal of a row of this warp
#pragma unroll
      for (int i = 0; i < BN / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (kb + i * 8 + cq + (e & 1) > pos[e >> 1]) s[4 * i + e] = -INFINITY;
    }
    float mx0 = m[0], mx1 = m[1];
#pragma unroll
    for (int i = 0; i < BN / 8; i++) {
      mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
      mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
    }
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
    }
    // NOTE: a row sees key 0 in tile 0 (padding rows stand at the item's first position), so
    // its max is finite from then on and a fully masked tile gives p = 0, alpha = 1.
    alpha[0] = fast_exp2((m[0] - mx0) * scale_log2);
    alpha[1] = fast_exp2((m[1] - mx1) * scale_log2);
    m[0] = mx0;
    m[1] = mx1;
    const float sub0 = mx0 * scale_log2, sub1 = mx1 * scale_log2;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int i = 0; i < BN / 8; i++) {
      s[4 * i] = fast_exp2(fmaf(s[4 * i], scale_log2, -sub0));
      s[4 * i + 1] = fast_exp2(fmaf(s[4 * i + 1], scale_log2, -sub0));
      s[4 * i + 2] = fast_exp2(fmaf(s[4 * i + 2], scale_log2, -sub1));
      s[4 * i + 3] = fast_exp2(fmaf(s[4 * i + 3], scale_log2, -sub1));
      sum0 += s[4 * i] + s[4 * i + 1];
      sum1 += s[4 * i + 2] + s[4 * i + 3];
    }
    l[0] = l[0] * alpha[0] + sum0;
    l[1] = l[1] * alpha[1] + sum1;
  };
  auto pack_p = [&]() {  // NOTE: only once the P V reading the last P is done
#pragma unroll
    for (int j = 0; j < BN / 16; j++) {  // n8 tiles 2 j and 2 j + 1
      pf[j][0] = pack2(s[8 * j], s[8 * j + 1], tag);
      pf[j][1] = pack2(s[8 * j + 2], s[8 * j + 3], tag);
      pf[j][2] = pack2(s[8 * j + 4], s[8 * j + 5], tag);
      pf[j][3] = pack2(s[8 * j + 6], s[8 * j + 7], tag);
    }
  };
  // Tile t landed (every cp.async group but the newest D - 1) and is visible to wgmma; after the
  // barrier no warpgroup reads tile t - 2's stage any more.
  auto tile_ready = [&]() {
    asm volatile("cp.async.wait_group %0;" ::"n"(D - 1));
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async writes -> wgmma
    __syncthreads();
  };

#pragma unroll
  for (int t = 0; t < D; t++) load_tile(t);  // Q joins tile 0's group
  tile_ready();
  // ldmatrix address of this lane in a 16 x 16 A tile: rows row0 + (lane & 7) + 8 ((lane >> 3) & 1)
#pragma unroll
  for (int kk = 0; kk < HD / 16; kk++)
    ldsm_x4(qf[kk], q_s + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + kk * 16 +
                        (lane >> 4) * 8);
  issue_s(0);
  load_tile(D);
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_regs(s);
  softmax(0);
  pack_p();
  // Key tile t: S(t) runs while O is rescaled, P(t-1) V(t-1) while the softmax turns S(t) into
  // P(t) (the order that keeps every register an in-flight wgmma uses untouched: ptxas would
  // serialize); the loads go out once the tensor cores have work.
  for (int t = 1; t < num_tiles; t++) {
    tile_ready();
    issue_s(t);
    issue_pv(t - 1);
    load_tile(t + D);
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");  // S(t) done
    fence_regs(s);
    softmax(t);
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");  // P(t-1) V(t-1) done
    fence_regs(o);
    pack_p();
  }
  issue_pv(num_tiles - 1);
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_regs(o);

#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    float sum = l[hf];
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
    const int r = row0 + (lane >> 2) + 8 * hf;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    if (h >= group || tok >= ntok) continue;
    const float inv = 1.f / sum;  // >= 1: the row's max term contributes 2^0
    T* dst = out + ((long)(q0 + tok) * num_heads + kvh * group + h) * HD + cq;
#pragma unroll
    for (int i = 0; i < HD / 8; i++)
      *reinterpret_cast<unsigned*>(dst + i * 8) =
          pack2(o[4 * i + 2 * hf] * inv, o[4 * i + 2 * hf + 1] * inv, tag);
  }
#endif
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, HD, NW, BN)                                                             \
  template __global__ void prefill_sm90_kernel<T, HD, NW, BN>(                                 \
      T*, const T*, const T*, const T*, const int*, const int*, const int*, const int*, int,   \
      int, int, int, float, int);
INSTANTIATE(__half, 128, 8, 64)
INSTANTIATE(__half, 64, 8, 64)
INSTANTIATE(__nv_bfloat16, 64, 8, 64)
INSTANTIATE(__nv_bfloat16, 128, 8, 64)
INSTANTIATE(__nv_bfloat16, 64, 8, 128)
INSTANTIATE(__nv_bfloat16, 128, 8, 128)
#endif
