// Paged decode attention on tensor cores: the same job and output as attention.cu's
// decode_attention_kernel (whose decode_reduce_kernel combines the splits of both; the grid
// differs: heads on x, decode items on y, GR heads a block, below), with far fewer
// instructions per key, so that the kernel is bound by the bandwidth of reading K and V.
//
// One block takes one sequence, one kv head and one context split, and up to GR query heads of
// that kv head as the rows of one m16 tile (GR = 8: rows 8..15 are padding and their softmax is
// skipped; tensor-core FLOPs cost next to nothing here). Each K/V byte is read once per step.
// Every warp streams its own tiles of DM_KEYS keys (warp w takes tiles w, w + NW, ...): cp.async
// copies them from the paged cache into the warp's own ST-stage ring in shared memory, so ST - 1
// tiles load while one is computed, and warps never wait for each other until the end. Per tile a
// warp runs S = Q K^T (HD / 16 x 2 mma.sync m16n8k16, K by ldmatrix), the online softmax in base 2
// on raw scores (scale * log2 e folded into one FMA before ex2, two quad shuffles per row max), and
// O += P V (P from the score registers, V by ldmatrix.trans). The warps merge in shared memory.
// With TR (the default where GR = 8: cuda_kernels.DECODE_MMA_TR) the tiles are transposed:
// S^T = K Q^T and O^T += V^T P^T, keys and dimensions as the 16 rows of each mma and the query
// heads as its 8 columns, so no row is padding, a key takes half the mma and the accumulators
// half the registers; movmatrix turns the scores into P^T, the next mma's operand.
// With TMA (sm_90, block sizes that are multiples of 16: cuda_kernels.DECODE_MMA_TMA) the stages
// fill by the copy engine instead: lane 0 issues 2 HD / 64 tensor copies of 16 keys x 64 values a
// tile, where cp.async takes HD / 8 copies a lane, completing on one mbarrier a stage that counts
// their bytes; the rows land unpadded in the 128-byte swizzle (tma.cuh), read conflict-free.
#include "decode_splits.cuh"
#include "mma.cuh"
#include "tma.cuh"

//
// CL > 1 (decode_mma_cluster_kernel, sm_90): the CL splits of a (sequence, kv head) are the CL
// blocks of one thread-block cluster; each block leaves its merged (max, sum, O) in its own shared
// memory and, after a cluster barrier, each block combines a 1/CL slice of the output from all CL
// blocks' shared memory (distributed shared memory), as decode_reduce_kernel would from part_out:
// no reduce launch. A split is ctx / CL keys rounded up to whole 16-key tiles, and CL is at most
// 8. Two kernels take it: decode_mma_cluster_kernel (cp.async, 8 warps: the short-context graphs,
// cuda_attention.SHORT_DECODE_CONTEXT) and decode_mma_cluster_tma_kernel (a split grid of 2..8
// splits on sm_90, cuda_attention.merge_cluster).
constexpr int DM_KEYS = 16;  // keys per warp tile: one k16 step of P V, two n8 tiles of Q K^T

// Grid: (num_kv_heads * passes, num_decode_items, num_splits)  Block: (NW * 32)
// The heads vary fastest: a sequence's blocks start together, not a head's blocks of every
// sequence before the next head's (H200, kernel_check --only attn, W1's batch-256 mix: 1.5-3%
// faster; listing the items longest context first gained no more than the noise).
// passes = ceil(group / GR). Dynamic shared memory: max(NW x ST x (K, V) x DM_KEYS x (HD + 8)
// 16-bit elements, NW x GR x HD floats for the merge). CL > 1: num_splits == CL, clusters of CL
// blocks along z.
// RoPE on two packed pairs: (lo, hi) = elements d, d + 1 and their partners d + HD / 2, d + 1 +
// HD / 2; (c, s) the pairs' cos and sin. The arithmetic and rounding of qk_rope_kv.cu's kernels.
template <typename T>
__device__ __forceinline__ void rope_pair(unsigned& lo, unsigned& hi, unsigned c, unsigned s, T) {
  T* a = reinterpret_cast<T*>(&lo);
  T* b = reinterpret_cast<T*>(&hi);
  const T* cv = reinterpret_cast<const T*>(&c);
  const T* sv = reinterpret_cast<const T*>(&s);
#pragma unroll
  for (int e = 0; e < 2; e++) {
    const float x1 = to_float(a[e]), x2 = to_float(b[e]);
    const float cj = to_float(cv[e]), sj = to_float(sv[e]);
    a[e] = from_float<T>(x1 * cj - x2 * sj);
    b[e] = from_float<T>(x2 * cj + x1 * sj);
  }
}

template <typename T, int HD, int GR, int NW, int ST, int CL, bool TR, bool TMA>
__device__ __forceinline__ void decode_mma_body(
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
    float scale_log2, int num_splits, int min_keys, int fresh,
    const T* __restrict__ rope_cs,      // ROPE FOLD (TR only): [max_positions, HD] or null
    const int* __restrict__ positions,  // [num_tokens], with rope_cs
    const TmaMap* k_map, const TmaMap* v_map) {  // TMA: the cache as TMA's 2-D tensors
  static_assert(GR == 8 || GR == 16, "one m16 tile of query heads");
  static_assert(!TMA || HD % 64 == 0, "whole 64-value boxes");
  constexpr int LD = TMA ? HD : HD + 8, CPR = HD / 8, TILE = DM_KEYS * LD;
  constexpr int CPL = DM_KEYS * CPR / 32;  // 16-byte copies per lane per tile, of K and of V
  extern __shared__ __align__(16) unsigned char smem_dyn[];
  // TMA: swizzle atoms start at 1024-byte boundaries (the launch adds 1024 bytes)
  unsigned char* smem_raw =
      TMA ? smem_dyn + ((1024 - (smem_addr(smem_dyn) & 1023)) & 1023) : smem_dyn;
  __shared__ float m_s[NW][GR], l_s[NW][GR];
  __shared__ __align__(8) unsigned long long full[TMA ? NW : 1][TMA ? ST : 1];  // TMA: each warp's stages
  // Under PDL, everything up to pdl_wait() below may run while the previous kernel (the q/k norm
  // + RoPE + KV write) still does: the step's metadata (uploaded before the step) and the keys and
  // values of earlier steps are read before the wait, so their memory latency hides behind it.
  // Only the keys this step writes and Q come after: the last `fresh` keys of a row's context
  // (1 for a decode; 1 + k when a verify step of k drafts runs as decode rows, whose row j reads
  // the j keys the rows before it wrote in the same step).

  const int group = num_heads / num_kv_heads, passes = (group + GR - 1) / GR;
  const int kvh = blockIdx.x / passes, g0 = (blockIdx.x % passes) * GR;
  const int item = blockIdx.y, split = blockIdx.z;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int seq = seqs[item];
  const int tok = query_start_loc[seq];
  const int ctx = context_lens[seq];
  // a cluster's blocks all take part in its barriers: a split past the context has no keys
  const int splits = CL > 1 ? CL : seq_splits(ctx, num_splits, min_keys);
  if (split >= splits) {  // the whole block: no barrier is skipped
    pdl_start();
    return;
  }
  const int per_split = ((ctx + splits - 1) / splits + DM_KEYS - 1) / DM_KEYS * DM_KEYS;
  const int k_begin = split * per_split, k_end = min(ctx, k_begin + per_split);
  const long row_stride = (long)(num_heads + 2 * num_kv_heads) * HD;
  const int* table = block_tables + (long)seq * max_blocks;
  const T tag{};
  // The RoPE fold (rope_cs given; TR, decode rows of one new token each, no q/k norm or bias:
  // cuda_attention.rope_folds): this kernel does qk_rope_kv.cu's job for its rows. Q is rotated
  // in registers; the row's own key (ctx - 1) is read from the qkv row by the warp whose tile
  // holds it (always that warp's last tile) right after the PDL wait, and rotated when that tile
  // is due: written into the tile's stage in place of the cache row and, in the block of the kv
  // head's first pass, into the cache for later steps. No kernel runs between the qkv GEMM and
  // this one.
  const bool fold = TR && rope_cs != nullptr;
  if (!TR && rope_cs != nullptr) __trap();  // cuda_attention.rope_folds never asks for it
  constexpr int FP = (HD / 2 + 63) / 64;  // rotary pairs of dims a lane takes: 2 l + 64 p, + HD / 2
  unsigned kr[FP][2], vr[FP][2];          // the fresh key's K and V there, packed
  unsigned kcs[FP][2];                    // the position's cos and sin there
  int fresh_tile = -1, fresh_row = 0;     // this warp's tile (and its row) of key ctx - 1
  long fresh_at = 0;                      // that key's row in the cache

  // [ST][DM_KEYS][LD]; TMA: [ST][HD / 64][DM_KEYS][64], swizzled (`at` below)
  T* k_s = reinterpret_cast<T*>(smem_raw) + warp * 2 * ST * TILE;
  T* v_s = k_s + ST * TILE;
  const int first = k_begin + warp * DM_KEYS;  // this warp's tiles: first + i * NW * DM_KEYS
  const int nt = first < k_end ? (k_end - first + NW * DM_KEYS - 1) / (NW * DM_KEYS) : 0;
  // Tiles start at multiples of DM_KEYS: when block_size is a multiple of it too (16, 32, ...),
  // a tile lies in one cache block, whose K rows are consecutive: one block-table read per tile.
  const bool tile_in_block = block_size % DM_KEYS == 0;
  if constexpr (TMA) {
    if (lane == 0) {
      for (int st = 0; st < ST; st++) mbar_init(&full[warp][st], 1);
      fence_mbar_init();
    }
    __syncwarp();
  }
  // Element (row, col) of a stage's K or V tile (col a multiple of 8): padded rows, or with TMA
  // HD / 64 boxes of [DM_KEYS][128 bytes], swizzled.
  auto at = [&](const T* tile, int row, int col) -> const T* {
    if constexpr (TMA)
      return reinterpret_cast<const T*>(reinterpret_cast<const unsigned char*>(tile) +
                                        (col / 64) * (DM_KEYS * 128) + sw128(row, col % 64 / 8));
    else
      return tile + row * LD + col;
  };
  // Tile i into stage i % ST; one commit group per call, empty past the last tile, so that
  // wait_group ST - 1 always means "tile i has landed". Before pdl_wait() (`early`) the rows of
  // keys ctx - fresh .. ctx - 1 are left out: they are loaded after the wait (below).
  // TMA: tile i's barrier is full[warp][i % ST], its (i / ST)-th phase, which expects the whole
  // tile's bytes. A tile holding any of this step's keys is left out before pdl_wait() (`early`)
  // and copied by the call after it (`late`).
  auto load_boxes = [&](int i, bool early, bool late) {
    if (i >= nt) return;
    const int kb = first + i * NW * DM_KEYS, st = i % ST;
    const bool own = !fold && kb + DM_KEYS > ctx - fresh;  // fold: the stage is patched
    if (late ? !own : (early && own)) return;
    if (lane == 0) {
      unsigned long long* bar = &full[warp][st];
      mbar_arrive_expect_tx(bar, 2 * DM_KEYS * HD * (int)sizeof(T));
      const int bi = kb / block_size;
      const int row0 = (table[bi] * num_kv_heads + kvh) * block_size + kb - bi * block_size;
#pragma unroll
      for (int a = 0; a < HD / 64; a++) {
        tma_load_2d(k_s + st * TILE + a * DM_KEYS * 64, k_map, a * 64, row0, bar);
        tma_load_2d(v_s + st * TILE + a * DM_KEYS * 64, v_map, a * 64, row0, bar);
      }
    }
  };
  auto load_tile = [&](int i, bool early) {
    if constexpr (TMA) {
      load_boxes(i, early, false);
      return;
    }
    if (i < nt) {
      const int kb = first + i * NW * DM_KEYS;
      T* ks = k_s + (i % ST) * TILE;
      T* vs = v_s + (i % ST) * TILE;
      long base = 0;  // element offset of key kb's row, when the tile lies in one cache block
      if (tile_in_block) {
        const int bi = kb / block_size;
        base = (((long)table[bi] * num_kv_heads + kvh) * block_size + kb - bi * block_size) * HD;
      }
#pragma unroll
      for (int c = 0; c < CPL; c++) {
        const int idx = lane + 32 * c, j = idx / CPR, d = (idx % CPR) * 8, key = kb + j;
        const bool valid = key < k_end;
        if (early && valid && key >= ctx - fresh) continue;
        long off = 0;
        if (valid) {
          if (tile_in_block) {
            off = base + j * HD + d;
          } else {
            const int bi = key / block_size, slot = key - bi * block_size;
            off = (((long)table[bi] * num_kv_heads + kvh) * block_size + slot) * HD + d;
          }
        }
        cp_async16(ks + j * LD + d, k_cache + off, valid);  // invalid keys: zeros
        cp_async16(vs + j * LD + d, v_cache + off, valid);
      }
    }
    asm volatile("cp.async.commit_group;");
  };
  // Tile i in its stage, visible to the whole warp, with tile i + ST - 1 requested.
  auto next_tile = [&](int i) {
    __syncwarp();  // every lane is done reading tile i - 1, whose stage tile i + ST - 1 takes
    load_tile(i + ST - 1, false);
    if constexpr (TMA)
      mbar_wait(&full[warp][i % ST], (i / ST) & 1);
    else
      asm volatile("cp.async.wait_group %0;" ::"n"(ST - 1));
    if constexpr (TMA) {  // V rows past the split's keys came as stale values: zeros instead
      const int valid = k_end - (first + i * NW * DM_KEYS);
      if (valid < DM_KEYS) {
        unsigned char* vt = reinterpret_cast<unsigned char*>(v_s + (i % ST) * TILE);
        for (int c = lane; c < (DM_KEYS - valid) * HD / 8; c += 32) {  // 16-byte chunks
          const int row = valid + c / (HD / 8), a = c % (HD / 8) / 8, w = c % 8;
          *reinterpret_cast<uint4*>(vt + a * DM_KEYS * 128 + row * 128 + w * 16) =
              make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
    if (fold && i == fresh_tile) {  // the fresh key's row, rotated here (fold: not in the cache)
      __syncwarp();  // every lane's copies of the tile have landed, the stale row's included
      const bool writer = blockIdx.x % passes == 0;
#pragma unroll
      for (int p = 0; p < FP; p++) {
        const int d = 2 * lane + 64 * p;
        if (d >= HD / 2) continue;
        rope_pair(kr[p][0], kr[p][1], kcs[p][0], kcs[p][1], tag);
        if (writer) {
          T* kc = const_cast<T*>(k_cache) + fresh_at;
          T* vc = const_cast<T*>(v_cache) + fresh_at;
          *reinterpret_cast<unsigned*>(kc + d) = kr[p][0];
          *reinterpret_cast<unsigned*>(kc + d + HD / 2) = kr[p][1];
          *reinterpret_cast<unsigned*>(vc + d) = vr[p][0];
          *reinterpret_cast<unsigned*>(vc + d + HD / 2) = vr[p][1];
        }
        T* kt = const_cast<T*>(at(k_s + (i % ST) * TILE, fresh_row, d & ~7)) + (d & 7);
        T* vt = const_cast<T*>(at(v_s + (i % ST) * TILE, fresh_row, d & ~7)) + (d & 7);
        T* kt2 = const_cast<T*>(at(k_s + (i % ST) * TILE, fresh_row, (d + HD / 2) & ~7)) + (d & 7);
        T* vt2 = const_cast<T*>(at(v_s + (i % ST) * TILE, fresh_row, (d + HD / 2) & ~7)) + (d & 7);
        *reinterpret_cast<unsigned*>(kt) = kr[p][0];
        *reinterpret_cast<unsigned*>(kt2) = kr[p][1];
        *reinterpret_cast<unsigned*>(vt) = vr[p][0];
        *reinterpret_cast<unsigned*>(vt2) = vr[p][1];
      }
    }
    __syncwarp();  // the other lanes' copies (and zeroed rows) of tile i are visible too
  };
#pragma unroll
  for (int i = 0; i < ST - 1; i++) load_tile(i, true);
  // fold: the position's cos and sin (never written by a kernel) before the wait: the fresh
  // key's dims here, Q's (qcs) in the TR branch below
  const long pos = fold ? positions[tok] : 0;
  if (fold) {
    const int kf = ctx - 1, rel = kf - first;
    if (kf >= k_begin && kf < k_end && rel >= 0 && rel % (NW * DM_KEYS) < DM_KEYS &&
        rel / (NW * DM_KEYS) < nt) {
      fresh_tile = rel / (NW * DM_KEYS);
      fresh_row = rel % (NW * DM_KEYS);
      const int bi = kf / block_size;
      fresh_at = (((long)table[bi] * num_kv_heads + kvh) * block_size + kf - bi * block_size) * HD;
    }
#pragma unroll
    for (int p = 0; p < FP; p++) {
      const int d = min(2 * lane + 64 * p, HD / 2 - 2);
      kcs[p][0] = *reinterpret_cast<const unsigned*>(rope_cs + pos * HD + d);
      kcs[p][1] = *reinterpret_cast<const unsigned*>(rope_cs + pos * HD + HD / 2 + d);
    }
  }
  pdl_start();
  if (fold && fresh_tile >= 0) {  // the fresh key's K and V from the qkv row: loads in flight
    const T* kq = qkv + tok * row_stride + (long)(num_heads + kvh) * HD;
    const T* vq = kq + (long)num_kv_heads * HD;
#pragma unroll
    for (int p = 0; p < FP; p++) {
      const int d = min(2 * lane + 64 * p, HD / 2 - 2);
      kr[p][0] = *reinterpret_cast<const unsigned*>(kq + d);
      kr[p][1] = *reinterpret_cast<const unsigned*>(kq + d + HD / 2);
      vr[p][0] = *reinterpret_cast<const unsigned*>(vq + d);
      vr[p][1] = *reinterpret_cast<const unsigned*>(vq + d + HD / 2);
    }
  }
  if constexpr (TMA) {  // the early tiles that hold this step's keys, now that they are written
#pragma unroll
    for (int i = 0; i < ST - 1; i++) load_boxes(i, true, true);
  } else {
    // The keys left out of the early tiles (this step's own): their rows by plain loads into the
    // stages (no copy in flight targets them); the loop's __syncwarp after wait_group publishes
    // them to the warp.
    for (int key = max(first, ctx - fresh); key < k_end && !fold; key++) {
      const int rel = key - first, ti = rel / (NW * DM_KEYS);
      if (rel % (NW * DM_KEYS) >= DM_KEYS || ti >= min(nt, ST - 1)) continue;
      const int j = rel % DM_KEYS, bi = key / block_size;
      const long row = (((long)table[bi] * num_kv_heads + kvh) * block_size + key -
                        bi * block_size) * HD;
      T* ks = k_s + (ti % ST) * TILE + j * LD;
      T* vs = v_s + (ti % ST) * TILE + j * LD;
      for (int d = lane * 8; d < HD; d += 32 * 8) {
        *reinterpret_cast<uint4*>(ks + d) =
            __ldcg(reinterpret_cast<const uint4*>(k_cache + row + d));
        *reinterpret_cast<uint4*>(vs + d) =
            __ldcg(reinterpret_cast<const uint4*>(v_cache + row + d));
      }
    }
  }

  float* o_s = reinterpret_cast<float*>(smem_raw);  // [NW][GR][HD], once the stages are done
  if constexpr (TR) {
    static_assert(GR == 8, "the transposed tiles take the query heads as the 8 columns of n8");
    // S^T = K Q^T and O^T += V^T P^T: keys and dimensions are the 16 rows of each mma, the GQA
    // group's query heads its 8 columns, so half as many mma per key as with the heads as rows
    // (the m16 tile of 8 padded rows below; Llama-3-8B's group of 4 fills 4 of 16 rows there, 4
    // of 8 columns here) and half the accumulators.
    // Q^T as the B operand, straight from global memory: this lane's column (query head g0 + r)
    // at dims 2 (lane % 4) + {0, 1} and + {8, 9} of each k16 step. Heads past the group: 0.
    const int r = lane >> 2, cq = (lane & 3) * 2;
    const bool head_ok = g0 + r < group;
    const T* qh = qkv + tok * row_stride + (long)(kvh * group + g0 + r) * HD + cq;
    unsigned qb[HD / 16][2];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      qb[kk][0] = head_ok ? *reinterpret_cast<const unsigned*>(qh + kk * 16) : 0u;
      qb[kk][1] = head_ok ? *reinterpret_cast<const unsigned*>(qh + kk * 16 + 8) : 0u;
    }
    if (fold) {  // RoPE: dims kk * 16 + cq (+ 8) and their partners HD / 2 on, the same lane's
#pragma unroll
      for (int kk = 0; kk < HD / 32; kk++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
          const T* cs = rope_cs + pos * HD + kk * 16 + cq + 8 * h;
          rope_pair(qb[kk][h], qb[kk + HD / 32][h], *reinterpret_cast<const unsigned*>(cs),
                    *reinterpret_cast<const unsigned*>(cs + HD / 2), tag);
        }
    }
    // ldmatrix lane addresses: K as the A operand (keys as rows); V^T by .trans, the A operand
    // of O^T += V^T P^T (dims as rows, keys as k)
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int vt_row = (lane & 7) + (lane >> 4) * 8, vt_col = ((lane >> 3) & 1) * 8;
    float ot[HD / 16][4];  // O^T: dims 16 d + r (0, 1) and + 8 (2, 3) x heads cq, cq + 1
#pragma unroll
    for (int d = 0; d < HD / 16; d++) ot[d][0] = ot[d][1] = ot[d][2] = ot[d][3] = 0.f;
    // heads cq, cq + 1: the raw-score max (every lane of a column the same), and this lane's
    // share of the sum (its keys r and r + 8 of every tile; summed over the column at the end)
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int i = 0; i < nt; i++) {
      next_tile(i);
      const T* kt = k_s + (i % ST) * TILE;
      const T* vt = v_s + (i % ST) * TILE;
      const int kb = first + i * NW * DM_KEYS;

      float s[4] = {0.f, 0.f, 0.f, 0.f};  // keys kb + r (0, 1) and + 8 (2, 3) x heads cq, cq + 1
#pragma unroll
      for (int kk = 0; kk < HD / 16; kk++) {
        unsigned a[4];
        ldsm_x4(a, at(kt, a_row, kk * 16 + a_col));
        mma16816(s, a, qb[kk][0], qb[kk][1], tag);
      }
      if (kb + DM_KEYS > k_end) {  // the warp's last tile may run past the split's keys
        if (kb + r >= k_end) s[0] = s[1] = -INFINITY;
        if (kb + r + 8 >= k_end) s[2] = s[3] = -INFINITY;
      }
      // Every tile holds at least one valid key, so the new maxima are finite.
      float alpha[2], p[4];
#pragma unroll
      for (int j = 0; j < 2; j++) {
        float mx = fmaxf(m[j], fmaxf(s[j], s[j + 2]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
        alpha[j] = fast_exp2((m[j] - mx) * scale_log2);  // 0 while m[j] is -inf
        const float sub = mx * scale_log2;
        m[j] = mx;
        p[j] = fast_exp2(fmaf(s[j], scale_log2, -sub));
        p[j + 2] = fast_exp2(fmaf(s[j + 2], scale_log2, -sub));
        l[j] = l[j] * alpha[j] + (p[j] + p[j + 2]);
      }
      // P^T as the B operand over the tile's 16 keys: each 8 x 8 half of the scores transposed
      const unsigned pb0 = movmatrix_trans(pack2(p[0], p[1], tag));  // keys kb .. kb + 7
      const unsigned pb1 = movmatrix_trans(pack2(p[2], p[3], tag));  // keys kb + 8 .. kb + 15
      // Past the first tiles a head's max rarely moves: skip the rescale when it moved nowhere.
      if (!__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {
#pragma unroll
        for (int d = 0; d < HD / 16; d++) {
          ot[d][0] *= alpha[0];
          ot[d][1] *= alpha[1];
          ot[d][2] *= alpha[0];
          ot[d][3] *= alpha[1];
        }
      }
#pragma unroll
      for (int d = 0; d < HD / 16; d++) {
        unsigned a[4];
        ldsm_x4_trans(a, at(vt, vt_row, d * 16 + vt_col));
        mma16816(ot[d], a, pb0, pb1, tag);
      }
    }
    asm volatile("cp.async.wait_group 0;");  // only empty groups remain; leave none behind

    // Merge the warps: each head's sum over its column's lanes, then (max, sum, O) per warp
    // through shared memory, which the stages held until every warp is past its loop.
#pragma unroll
    for (int x = 4; x < 32; x <<= 1) {
      l[0] += __shfl_xor_sync(0xffffffffu, l[0], x);
      l[1] += __shfl_xor_sync(0xffffffffu, l[1], x);
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < HD / 16; d++)
#pragma unroll
      for (int e = 0; e < 4; e++)
        o_s[(warp * GR + cq + (e & 1)) * HD + d * 16 + r + (e >> 1) * 8] = ot[d][e];
    if (r == 0) {
#pragma unroll
      for (int j = 0; j < 2; j++) {
        m_s[warp][cq + j] = m[j] * scale_log2;  // base 2 units, as the reduction expects
        l_s[warp][cq + j] = l[j];
      }
    }
  } else {
    // Q as the A operand, straight from global memory: this lane's rows r and r + 8 (query heads
    // g0 + r of the kv head), dims 2 (lane % 4) + {0, 1, 8, 9} of each k16 step. Padding rows: 0.
    const int r = lane >> 2, cq = (lane & 3) * 2;
    const bool row0_ok = g0 + r < group, row1_ok = GR == 16 && g0 + r + 8 < group;
    const T* q0 = qkv + tok * row_stride + (long)(kvh * group + g0 + r) * HD + cq;
    const T* q1 = q0 + 8 * HD;
    unsigned qf[HD / 16][4];
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
      qf[kk][0] = row0_ok ? *reinterpret_cast<const unsigned*>(q0 + kk * 16) : 0u;
      qf[kk][1] = row1_ok ? *reinterpret_cast<const unsigned*>(q1 + kk * 16) : 0u;
      qf[kk][2] = row0_ok ? *reinterpret_cast<const unsigned*>(q0 + kk * 16 + 8) : 0u;
      qf[kk][3] = row1_ok ? *reinterpret_cast<const unsigned*>(q1 + kk * 16 + 8) : 0u;
    }

    // ldmatrix lane addresses: K (B operand of Q K^T, keys as rows) and V (.trans, B of P V)
    const int kb_row = (lane & 7) + (lane >> 4) * 8, kb_col = ((lane >> 3) & 1) * 8;
    const int v_row = (lane & 7) + ((lane >> 3) & 1) * 8, v_col = (lane >> 4) * 8;
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // raw-score max, sum: rows r, r + 8

    for (int i = 0; i < nt; i++) {
      next_tile(i);
      const T* kt = k_s + (i % ST) * TILE;
      const T* vt = v_s + (i % ST) * TILE;
      const int kb = first + i * NW * DM_KEYS;

      float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int kk = 0; kk < HD / 16; kk++) {
        unsigned b[4];
        ldsm_x4(b, at(kt, kb_row, kk * 16 + kb_col));
        mma16816(s[0], qf[kk], b[0], b[1], tag);
        mma16816(s[1], qf[kk], b[2], b[3], tag);
      }
      if (kb + DM_KEYS > k_end) {  // the warp's last tile may run past the split's keys
#pragma unroll
        for (int n = 0; n < 2; n++)
#pragma unroll
          for (int e = 0; e < 4; e++)
            if (kb + n * 8 + cq + (e & 1) >= k_end) s[n][e] = -INFINITY;
      }
      // Every tile holds at least one valid key, so the new maxima are finite.
      float mx0 = fmaxf(m0, fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1])));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      const float alpha0 = fast_exp2((m0 - mx0) * scale_log2);  // 0 while m0 is -inf
      const float sub0 = mx0 * scale_log2;
      m0 = mx0;
      float p[2][4];
#pragma unroll
      for (int n = 0; n < 2; n++) {
        p[n][0] = fast_exp2(fmaf(s[n][0], scale_log2, -sub0));
        p[n][1] = fast_exp2(fmaf(s[n][1], scale_log2, -sub0));
      }
      l0 = l0 * alpha0 + (p[0][0] + p[0][1] + p[1][0] + p[1][1]);
      float alpha1 = 1.f;
      if constexpr (GR == 16) {
        float mx1 = fmaxf(m1, fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3])));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        alpha1 = fast_exp2((m1 - mx1) * scale_log2);
        const float sub1 = mx1 * scale_log2;
        m1 = mx1;
#pragma unroll
        for (int n = 0; n < 2; n++) {
          p[n][2] = fast_exp2(fmaf(s[n][2], scale_log2, -sub1));
          p[n][3] = fast_exp2(fmaf(s[n][3], scale_log2, -sub1));
        }
        l1 = l1 * alpha1 + (p[0][2] + p[0][3] + p[1][2] + p[1][3]);
      } else {
#pragma unroll
        for (int n = 0; n < 2; n++) p[n][2] = p[n][3] = 0.f;  // padding rows 8..15
      }
      // P as the A operand over the tile's 16 keys (the score accumulators' layout).
      const unsigned pf[4] = {pack2(p[0][0], p[0][1], tag), pack2(p[0][2], p[0][3], tag),
                              pack2(p[1][0], p[1][1], tag), pack2(p[1][2], p[1][3], tag)};
      // Past the first tiles a row's max rarely moves: skip the rescale when it moved nowhere.
      if (!__all_sync(0xffffffffu, alpha0 == 1.f && alpha1 == 1.f)) {
#pragma unroll
        for (int d = 0; d < HD / 8; d++) {
          o[d][0] *= alpha0;
          o[d][1] *= alpha0;
          o[d][2] *= alpha1;
          o[d][3] *= alpha1;
        }
      }
#pragma unroll
      for (int d2 = 0; d2 < HD / 16; d2++) {
        unsigned b[4];
        ldsm_x4_trans(b, at(vt, v_row, d2 * 16 + v_col));
        mma16816(o[2 * d2], pf, b[0], b[1], tag);
        mma16816(o[2 * d2 + 1], pf, b[2], b[3], tag);
      }
    }
    asm volatile("cp.async.wait_group 0;");  // only empty groups remain; leave none behind

    // Merge the warps: row sums over the quad, then (max, sum, O) per warp through shared memory,
    // which the stages held until every warp is past its loop.
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) {
      l0 += __shfl_xor_sync(0xffffffffu, l0, x);
      l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < HD / 8; d++) {
      *reinterpret_cast<float2*>(o_s + (warp * GR + r) * HD + d * 8 + cq) =
          make_float2(o[d][0], o[d][1]);
      if constexpr (GR == 16)
        *reinterpret_cast<float2*>(o_s + (warp * GR + r + 8) * HD + d * 8 + cq) =
            make_float2(o[d][2], o[d][3]);
    }
    if ((lane & 3) == 0) {
      m_s[warp][r] = m0 * scale_log2;  // base 2 units, as the reduction expects; -inf stays
      l_s[warp][r] = l0;
      if constexpr (GR == 16) {
        m_s[warp][r + 8] = m1 * scale_log2;
        l_s[warp][r + 8] = l1;
      }
    }
  }
  __syncthreads();
  // CL > 1: the block's merged partial, for the cluster's blocks to combine
  __shared__ float fin_o[CL > 1 ? GR * HD : 1], fin_m[CL > 1 ? GR : 1], fin_l[CL > 1 ? GR : 1];
  for (int idx = threadIdx.x; idx < GR * HD; idx += NW * 32) {
    const int g = idx / HD, d = idx % HD;
    if (g0 + g >= group) continue;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; w++) mx = fmaxf(mx, m_s[w][g]);
    float num = 0.f, den = 0.f;
    if (mx != -INFINITY) {
#pragma unroll
      for (int w = 0; w < NW; w++) {
        const float a = exp2f(m_s[w][g] - mx);  // a warp that saw no key: 0
        num += a * o_s[(w * GR + g) * HD + d];
        den += a * l_s[w][g];
      }
    }
    const int head = kvh * group + g0 + g;
    if constexpr (CL > 1) {
      fin_o[idx] = num;
      if (d == 0) {
        fin_m[g] = mx;
        fin_l[g] = den;
      }
    } else if (splits == 1) {
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
  if constexpr (CL > 1) {
    cluster_sync();  // every block's partial is in its shared memory
    const unsigned rank = cluster_rank();
    constexpr int SLICE = GR * HD / CL;
    for (int idx = rank * SLICE + threadIdx.x; idx < (rank + 1) * SLICE; idx += NW * 32) {
      const int g = idx / HD, d = idx % HD;
      if (g0 + g >= group) continue;
      float m[CL], mx = -INFINITY;
#pragma unroll
      for (int c = 0; c < CL; c++) {
        m[c] = ld_cluster(&fin_m[g], c);
        mx = fmaxf(mx, m[c]);
      }
      float num = 0.f, den = 0.f;
      if (mx != -INFINITY) {
#pragma unroll
        for (int c = 0; c < CL; c++) {
          const float a = exp2f(m[c] - mx);  // a split without keys: 0
          num += a * ld_cluster(&fin_o[idx], c);
          den += a * ld_cluster(&fin_l[g], c);
        }
      }
      out[((long)tok * num_heads + kvh * group + g0 + g) * HD + d] =
          from_float<T>(den > 0.f ? num / den : 0.f);
    }
    cluster_sync();  // no block leaves while another still reads its shared memory
  }
}

#define DM_PARAMS                                                                              \
  T *__restrict__ out, float *__restrict__ part_out, float *__restrict__ part_ml,              \
      const T *__restrict__ qkv, const T *__restrict__ k_cache, const T *__restrict__ v_cache, \
      const int *__restrict__ seqs, const int *__restrict__ query_start_loc,                   \
      const int *__restrict__ context_lens, const int *__restrict__ block_tables, int max_blocks, \
      int num_items, int num_heads, int num_kv_heads, int block_size, float scale_log2,        \
      int num_splits, int min_keys, int fresh, const T *__restrict__ rope_cs,                  \
      const int *__restrict__ positions
#define DM_ARGS                                                                                \
  out, part_out, part_ml, qkv, k_cache, v_cache, seqs, query_start_loc, context_lens,         \
      block_tables, max_blocks, num_items, num_heads, num_kv_heads, block_size, scale_log2,    \
      num_splits, min_keys, fresh, rope_cs, positions

// TR = 1: the transposed tiles (GR = 8 only: query heads as the n8 columns); TR = 2 (the
// engine's default): the same, registers capped for 18 / NW blocks an SM (3 blocks of 6 warps,
// 4 of 4).
template <typename T, int HD, int GR, int NW, int ST, int TR = 0>
__global__ void __launch_bounds__(NW * 32, TR == 2 ? 18 / NW : (NW <= 12 ? 12 / NW : 1))
decode_mma_kernel(DM_PARAMS) {
  decode_mma_body<T, HD, GR, NW, ST, 1, TR != 0, false>(DM_ARGS, nullptr, nullptr);
}

// TMA (sm_90, block sizes that are multiples of 16): the stages fill by TMA tensor copies.
// k_map / v_map: the layer's K / V cache as a 2-D tensor of [num_blocks x nkv x block_size] rows
// of HD values, boxes of 16 rows x 64 values, 128-byte swizzle (cuda_prefill.tma_map). Dynamic
// shared memory: 1024 (alignment) + max(NW x ST x (K, V) x 16 x HD 16-bit values, the merge's).
template <typename T, int HD, int GR, int NW, int ST, int TR = 0>
__global__ void __launch_bounds__(NW * 32, TR == 2 ? 18 / NW : (NW <= 12 ? 12 / NW : 1))
decode_mma_tma_kernel(DM_PARAMS, const __grid_constant__ TmaMap k_map,
                      const __grid_constant__ TmaMap v_map) {
  decode_mma_body<T, HD, GR, NW, ST, 1, TR != 0, true>(DM_ARGS, &k_map, &v_map);
}

// Grid: (num_kv_heads * passes, num_decode_items, CL)  Block: (NW * 32), clusters of (1, 1, CL)
template <typename T, int HD, int GR, int NW, int ST, int CL>
__global__ void CLUSTER_DIMS(1, 1, CL) __launch_bounds__(NW * 32, NW <= 12 ? 12 / NW : 1)
decode_mma_cluster_kernel(DM_PARAMS) {
  static_assert(CL >= 2 && CL <= 8 && (GR * HD) % CL == 0, "a portable cluster");
  decode_mma_body<T, HD, GR, NW, ST, CL, false, false>(DM_ARGS, nullptr, nullptr);
}

// The split grid's form with its merge in a cluster (PAGEDSERVE_DECODE_CLUSTER_MERGE): the CL
// splits of a (sequence, kv head) as one cluster, stages filled by TMA, tiles transposed where TR
// (so the RoPE fold runs here as in decode_mma_tma_kernel); no reduce launch.
template <typename T, int HD, int GR, int NW, int ST, int CL, int TR>
__global__ void CLUSTER_DIMS(1, 1, CL)
    __launch_bounds__(NW * 32, TR == 2 ? 18 / NW : (NW <= 12 ? 12 / NW : 1))
decode_mma_cluster_tma_kernel(DM_PARAMS, const __grid_constant__ TmaMap k_map,
                              const __grid_constant__ TmaMap v_map) {
  static_assert(CL >= 2 && CL <= 8 && (GR * HD) % CL == 0, "a portable cluster");
  decode_mma_body<T, HD, GR, NW, ST, CL, TR != 0, true>(DM_ARGS, &k_map, &v_map);
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define DM_SIG(T)                                                                              \
  (T*, float*, float*, const T*, const T*, const T*, const int*, const int*, const int*,       \
   const int*, int, int, int, int, int, float, int, int, int, const T*, const int*)
#define INSTANTIATE(KERNEL, T, ...) template __global__ void KERNEL<T, __VA_ARGS__> DM_SIG(T);
INSTANTIATE(decode_mma_kernel, __half, 64, 8, 4, 2)
INSTANTIATE(decode_mma_kernel, __half, 128, 16, 4, 2)
INSTANTIATE(decode_mma_kernel, __nv_bfloat16, 64, 16, 4, 2)
INSTANTIATE(decode_mma_kernel, __nv_bfloat16, 128, 8, 4, 2)
INSTANTIATE(decode_mma_kernel, __nv_bfloat16, 128, 8, 4, 3)
INSTANTIATE(decode_mma_kernel, __nv_bfloat16, 128, 8, 8, 2)
INSTANTIATE(decode_mma_kernel, __nv_bfloat16, 128, 8, 6, 2, 1)
INSTANTIATE(decode_mma_kernel, __nv_bfloat16, 128, 8, 6, 2, 2)
INSTANTIATE(decode_mma_kernel, __nv_bfloat16, 128, 8, 4, 2, 1)
INSTANTIATE(decode_mma_kernel, __half, 64, 8, 4, 2, 1)
#define DM_TMA_SIG(T)                                                                          \
  (T*, float*, float*, const T*, const T*, const T*, const int*, const int*, const int*,       \
   const int*, int, int, int, int, int, float, int, int, int, const T*, const int*,           \
   const __grid_constant__ TmaMap, \
   const __grid_constant__ TmaMap)
template __global__ void decode_mma_tma_kernel<__nv_bfloat16, 128, 8, 4, 2, 2> DM_TMA_SIG(
    __nv_bfloat16);
template __global__ void decode_mma_tma_kernel<__nv_bfloat16, 128, 8, 6, 3, 2> DM_TMA_SIG(
    __nv_bfloat16);
template __global__ void decode_mma_tma_kernel<__half, 128, 16, 4, 2, 0> DM_TMA_SIG(__half);
template __global__ void decode_mma_tma_kernel<__half, 64, 8, 4, 2, 0> DM_TMA_SIG(__half);
INSTANTIATE(decode_mma_cluster_kernel, __nv_bfloat16, 128, 8, 8, 2, 4)
INSTANTIATE(decode_mma_cluster_kernel, __half, 64, 16, 8, 2, 8)
template __global__ void decode_mma_cluster_tma_kernel<__nv_bfloat16, 128, 8, 4, 2, 2, 2>
    DM_TMA_SIG(__nv_bfloat16);
template __global__ void decode_mma_cluster_tma_kernel<__nv_bfloat16, 128, 8, 4, 2, 8, 2>
    DM_TMA_SIG(__nv_bfloat16);
template __global__ void decode_mma_cluster_tma_kernel<__half, 64, 16, 4, 2, 4, 0>
    DM_TMA_SIG(__half);
#endif
