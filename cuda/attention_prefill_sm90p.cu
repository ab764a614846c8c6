// Pipelined Hopper prefill attention (sm_90a only; EXPERIMENTAL, not used by the engine until
// tools/kernel_check.py's prefill90 table holds it to the numpy twin on the device).
//
// v2's blocks, rows and work items (attention_prefill_gqa.cu), one 64-row tile per warpgroup
// (BM = 16 NW rows), both products on wgmma (the layouts of attention_prefill_sm90.cu with PVW),
// software-pipelined so that the tensor cores work during the softmax: while a warpgroup turns
// S(t) into P(t), S(t+1) = Q K(t+1)^T runs, and P(t) V(t) runs while the block syncs, loads tile
// t + 2 and issues S(t+2). K and V tiles rotate through 4 cp.async stages: tile t + 2 overwrites
// the stage of tile t - 2, whose P V every warpgroup has waited for before the barrier.
// Every warpgroup walks every key tile (no causal skip per warpgroup: its wgmma groups must pair
// up); rows past a tile's keys are masked, and warps whose rows lie before it get P = 0.
#include "wgmma.cuh"

// Grid: (num_kv_heads, num_items)  Block: (NW * 32), NW a multiple of 4
// Dynamic shared memory: (BM + 2 x 4 x 64) x HD elements (Q; 4 stages of K and of V).
template <typename T, int HD, int NW>
__global__ void __launch_bounds__(NW * 32) prefill_sm90p_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const int* __restrict__ work,           // [W, 3]: seq, first new token, tokens (<= TOK)
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale_log2,
    int swap_desc) {  // as attention_prefill_sm90.cu's (bit 0: S's descriptors, bit 1: P V's)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BN = 64, ST = 4, BM = 16 * NW, THREADS = NW * 32, CPR = HD / 8;
  constexpr int GROUP_ELEMS = HD * 8;  // one 8-row group of the core-matrix layout
  static_assert(NW % 4 == 0, "whole warpgroups");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [BM / 8][HD / 8][8][8]
  T* k_s = q_s + BM * HD;                   // [ST][BN / 8][HD / 8][8][8]
  T* v_s = k_s + ST * BN * HD;              // [ST][BN / 8][HD / 8][8][8]

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

  for (int c = tid; c < BM * CPR; c += THREADS) {  // core-matrix order, as in the sm90 kernel
    const int rr = c & 7, kc = (c >> 3) % CPR, rg = c / (8 * CPR), r = rg * 8 + rr;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    const bool valid = h < group && tok < ntok;
    const T* src =
        valid ? qkv + (long)(q0 + tok) * row_stride + (kvh * group + h) * HD + kc * 8 : qkv;
    cp_async16(q_s + rg * GROUP_ELEMS + kc * 64 + rr * 8, src, valid);
  }

  const int bs_shift = __ffs(block_size) - 1;
  const bool bs_pow2 = (block_size & (block_size - 1)) == 0;
  const int num_tiles = (kv_len + BN - 1) / BN;
  auto load_tile = [&](int t) {  // tile t into stage t % ST, or an empty group past the last
    if (t < num_tiles) {
      const int kb = t * BN, base = (t % ST) * BN * HD;
#pragma unroll
      for (int c = tid; c < BN * CPR; c += THREADS) {
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

  // This lane's rows: row_base + (lane >> 2) + 8 half, the rows wgmma's accumulators give it.
  const int wg = warp >> 2, row_base = wg * 64 + (warp & 3) * 16;
  int pos[2];
  int lo = 0x7fffffff;
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    const int r = row_base + (lane >> 2) + 8 * hf;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    const bool valid = h < group && tok < ntok;
    pos[hf] = first_pos + (valid ? tok : 0);
    if (valid) lo = min(lo, pos[hf]);
  }
#pragma unroll
  for (int x = 1; x < 32; x <<= 1) lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, x));

  const int cq = (lane & 3) * 2;
  float o[HD / 2];     // wgmma accumulator: element 4 i + e is row (e >> 1), column 8 i + cq + (e & 1)
  float cur[32], nxt[32];  // S(t) being turned into P(t); S(t + 1) in flight
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < HD / 2; i++) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < 32; i++) cur[i] = nxt[i] = 0.f;

  const T* q_tile = q_s + wg * 8 * GROUP_ELEMS;  // this warpgroup's 64 rows
  auto issue_s = [&](int t) {  // nxt = Q K(t)^T, one wgmma group
    fence_regs(nxt);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      const unsigned long long da =
          wgmma_desc(q_tile + kk * 128, 128, HD * 16, swap_desc & 1);
      const unsigned long long db =
          wgmma_desc(k_s + (t % ST) * BN * HD + kk * 128, 128, HD * 16, swap_desc & 1);
      wgmma_64x64x16(nxt, da, db, kk > 0, tag);
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  };

  load_tile(0);  // with Q
  load_tile(1);
  asm volatile("cp.async.wait_group 1;");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // cp.async writes -> wgmma reads
  __syncthreads();
  issue_s(0);
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");  // stands for P(-1) V(-1)

  for (int t = 0; t < num_tiles; t++) {
    const int kb = t * BN;
    // S(t) done; of the groups, only P(t-1) V(t-1) may still run: P(t-2) V(t-2) is done.
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    fence_regs(nxt);
#pragma unroll
    for (int i = 0; i < 32; i++) cur[i] = nxt[i];
    // Tile t + 1 is in and visible; after the barrier no warpgroup reads tile t - 2's stage.
    asm volatile("cp.async.wait_group 0;");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    load_tile(t + 2);
    if (t + 1 < num_tiles)
      issue_s(t + 1);
    else
      asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");

    // Softmax of S(t) into P(t) while S(t + 1) runs.
    if (kb + BN - 1 > lo) {
#pragma unroll
      for (int i = 0; i < BN / 8; i++)
#pragma unroll
        for (int e = 0; e < 4; e++)
          if (kb + i * 8 + cq + (e & 1) > pos[e >> 1]) cur[4 * i + e] = -INFINITY;
    }
    float mx0 = m[0], mx1 = m[1];
#pragma unroll
    for (int i = 0; i < BN / 8; i++) {
      mx0 = fmaxf(mx0, fmaxf(cur[4 * i], cur[4 * i + 1]));
      mx1 = fmaxf(mx1, fmaxf(cur[4 * i + 2], cur[4 * i + 3]));
    }
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
    }
    // NOTE: a valid row sees key 0 in tile 0, so its max is finite from then on.
    const float alpha0 = fast_exp2((m[0] - mx0) * scale_log2);
    const float alpha1 = fast_exp2((m[1] - mx1) * scale_log2);
    m[0] = mx0;
    m[1] = mx1;
    const float sub0 = mx0 * scale_log2, sub1 = mx1 * scale_log2;
    float sum0 = 0.f, sum1 = 0.f;
    unsigned pf[BN / 16][4];  // P as wgmma's register A operand: keys 16 j .. 16 j + 15
#pragma unroll
    for (int j = 0; j < BN / 16; j++) {
      float p[2][4];
#pragma unroll
      for (int h = 0; h < 2; h++) {
        const float* sv = &cur[4 * (2 * j + h)];
        p[h][0] = fast_exp2(fmaf(sv[0], scale_log2, -sub0));
        p[h][1] = fast_exp2(fmaf(sv[1], scale_log2, -sub0));
        p[h][2] = fast_exp2(fmaf(sv[2], scale_log2, -sub1));
        p[h][3] = fast_exp2(fmaf(sv[3], scale_log2, -sub1));
        sum0 += p[h][0] + p[h][1];
        sum1 += p[h][2] + p[h][3];
      }
      pf[j][0] = pack2(p[0][0], p[0][1], tag);
      pf[j][1] = pack2(p[0][2], p[0][3], tag);
      pf[j][2] = pack2(p[1][0], p[1][1], tag);
      pf[j][3] = pack2(p[1][2], p[1][3], tag);
    }
    l[0] = l[0] * alpha0 + sum0;
    l[1] = l[1] * alpha1 + sum1;

    // O is P(t-1) V(t-1)'s accumulator: wait for it (only S(t + 1) may still run), rescale,
    // then P(t) V(t) as one more group.
    asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
    fence_regs(o);
    if (!__all_sync(0xffffffffu, alpha0 == 1.f && alpha1 == 1.f)) {
#pragma unroll
      for (int i = 0; i < HD / 8; i++) {
        o[4 * i] *= alpha0;
        o[4 * i + 1] *= alpha0;
        o[4 * i + 2] *= alpha1;
        o[4 * i + 3] *= alpha1;
      }
    }
    fence_regs(o);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int j = 0; j < BN / 16; j++) {  // keys 16 j .. 16 j + 15: two 8-key groups
      const unsigned long long dv = wgmma_desc(v_s + (t % ST) * BN * HD + 2 * j * GROUP_ELEMS,
                                               HD * 16, 128, swap_desc & 2);
      WgmmaRS<HD>::run(o, pf[j], dv, tag);
    }
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
  }
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  fence_regs(o);

#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    float sum = l[hf];
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
    const int r = row_base + (lane >> 2) + 8 * hf;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    if (h >= group || tok >= ntok) continue;
    const float inv = 1.f / sum;
    T* dst = out + ((long)(q0 + tok) * num_heads + kvh * group + h) * HD + cq;
#pragma unroll
    for (int i = 0; i < HD / 8; i++)
      *reinterpret_cast<unsigned*>(dst + i * 8) =
          pack2(o[4 * i + 2 * hf] * inv, o[4 * i + 2 * hf + 1] * inv, tag);
  }
#endif
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, HD, NW)                                                                 \
  template __global__ void prefill_sm90p_kernel<T, HD, NW>(                                    \
      T*, const T*, const T*, const T*, const int*, const int*, const int*, const int*, int,   \
      int, int, int, float, int);
INSTANTIATE(__half, 128, 8)
INSTANTIATE(__nv_bfloat16, 64, 8)
INSTANTIATE(__nv_bfloat16, 128, 8)
INSTANTIATE(__nv_bfloat16, 128, 12)
INSTANTIATE(__nv_bfloat16, 128, 4)
#endif
