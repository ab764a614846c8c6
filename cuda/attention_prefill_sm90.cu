// Paged causal prefill attention for Hopper (sm_90a only): warp-specialized, on wgmma.
//
// Blocks and rows as in attention_prefill_gqa.cu (v2): one block per (kv head, tile of new
// tokens), BM = 128 query rows, row r = query head kvh * group + r / TOK at new token r % TOK
// (TOK = BM / group), so a GQA group's query heads share every K/V tile the block loads.
// Three warpgroups with different jobs (FlashAttention-3's layout):
// - warpgroup 0, the producer, gathers Q once (cp.async); then its first warp brings K and V tiles
//   of BN keys from the paged cache into ST stages of shared memory by TMA: lane j copies box j of
//   a tile, `box` keys x 64 values (a cache block, or the part of one that fits a tile), found
//   through the block table (the next tile's table reads go out before the wait for its stage);
//   boxes past the sequence's last block are read past the tensor's end, which TMA fills with
//   zeros. (Block sizes that are no multiple of 8 make box = 0: the producer's 128 threads gather
//   the tiles by cp.async instead, 2.5x slower at 8k.) A tile's arrival is an mbarrier its copies
//   complete ("full"); a stage is refilled only once both consumers have released it ("empty").
//   The producer keeps few registers (setmaxnreg) and gives the rest to:
// - warpgroups 1 and 2, the consumers, 64 rows each. Per key tile t: S(t) = Q K(t)^T (wgmma, Q and
//   K from shared memory), then O += P(t-1) V(t-1) (P from registers, V read transposed), both
//   asynchronous; the softmax turns S(t) into P(t) while P(t-1) V(t-1) still runs, and O is
//   rescaled once that is done. The two consumers take turns issuing their wgmmas (named
//   barriers 1 and 2, "ping-pong"), so one's softmax runs while the other's products keep the
//   tensor cores busy.
// Shared memory: every operand in 128-byte-swizzled atoms of [rows][64 values] (wgmma.cuh), Q
// [HD / 64][BM], each stage's K and V [HD / 64][BN]. Both consumers walk every key tile (for a
// group that is a power of two, 2 or more, their rows are the same tokens of different heads;
// with 1, consumer 1 has the later 64 tokens); keys past a row's position are masked, only in
// tiles that cross the diagonal of a row of the warp. The softmax is base 2 on raw scores, the
// scale folded into one FMA before ex2.
#include "wgmma.cuh"

#define PREFILL90_PRODUCER_REGS 40
#define PREFILL90_CONSUMER_REGS 232

// Grid: (num_kv_heads, num_items)  Block: 384 threads (3 warpgroups)
// Dynamic shared memory: 1024 (alignment) + (BM + 2 ST BN) x HD x 2 bytes + 8 (1 + 4 ST)
// (barriers). k_map / v_map: the layer's K / V cache as a 2-D tensor of [num_blocks x nkv x
// block_size] rows of HD values, boxes of `box` = gcd(block_size, BN) rows x 64 values, 128-byte
// swizzle (cuda_prefill.tma_map); box = 0: no maps, cp.async from k_cache / v_cache. `flags`
// (kernel_check's experiments; 0 in the engine): bit 0, the producer copies no K/V (the
// consumers' time alone, on stale tiles); bit 1, no ping-pong.
template <typename T, int HD, int BN, int ST>
__global__ void __launch_bounds__(384, 1) prefill_sm90_kernel(
    T* __restrict__ out,                    // [num_tokens, num_heads, HD]
    const T* __restrict__ qkv,              // [num_tokens, (num_heads + 2 nkv) * HD]
    const T* __restrict__ k_cache,          // [num_blocks, nkv, block_size, HD]
    const T* __restrict__ v_cache,          // [num_blocks, nkv, block_size, HD]
    const __grid_constant__ TmaMap k_map, const __grid_constant__ TmaMap v_map,
    const int* __restrict__ work,           // [W, 3]: seq, first new token, tokens (<= TOK)
    const int* __restrict__ query_start_loc,  // [B + 1]
    const int* __restrict__ context_lens,     // [B]
    const int* __restrict__ block_tables,     // [B, max_blocks]
    int max_blocks, int num_heads, int num_kv_heads, int block_size, float scale_log2,
    int cache_rows,  // rows of k_map / v_map: a box there is past the end (zeros)
    int box, int flags) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int BM = 128, CPR = HD / 8;
  constexpr int Q_BYTES = BM * HD * 2, TILE_BYTES = BN * HD * 2;
  static_assert(HD % 64 == 0 && (BN == 64 || BN == 128), "whole atoms; m64n64 or n128 S");
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned char* q_s = smem;                     // [ATOMS][BM][128 B]
  unsigned char* k_s = q_s + Q_BYTES;            // [ST][ATOMS][BN][128 B]
  unsigned char* v_s = k_s + ST * TILE_BYTES;    // [ST][ATOMS][BN][128 B]
  unsigned long long* bars = reinterpret_cast<unsigned long long*>(v_s + ST * TILE_BYTES);
  unsigned long long* q_full = bars;             // [1]
  unsigned long long* k_full = bars + 1;         // [ST]
  unsigned long long* v_full = k_full + ST;      // [ST]
  unsigned long long* k_empty = v_full + ST;     // [ST]
  unsigned long long* v_empty = k_empty + ST;    // [ST]

  const int kvh = blockIdx.x, item = blockIdx.y;
  const int group = num_heads / num_kv_heads, tok_per_head = BM / group;
  const int tid = threadIdx.x, wg = tid >> 7;
  const int seq = work[item * 3], tile0 = work[item * 3 + 1], ntok = work[item * 3 + 2];
  const int q0 = query_start_loc[seq] + tile0;
  const int num_new = query_start_loc[seq + 1] - query_start_loc[seq];
  const int first_pos = context_lens[seq] - num_new + tile0;
  const int kv_len = first_pos + ntok;
  const int num_tiles = (kv_len + BN - 1) / BN;
  const T tag{};

  if (tid == 0) {
    mbar_init(q_full, 128);  // the producer's 128 threads, each once its copies landed
    for (int s = 0; s < ST; s++) {  // TMA: one arrival and the tile's bytes; else 128 threads
      mbar_init(k_full + s, box ? 1 : 128);
      mbar_init(v_full + s, box ? 1 : 128);
      mbar_init(k_empty + s, 256);  // every consumer thread, once its wgmmas read the stage
      mbar_init(v_empty + s, 256);
    }
  }
  __syncthreads();

  if (wg == 0) {  // ------------------------------------------------------------- producer
    regs_dec<PREFILL90_PRODUCER_REGS>();
    const long row_stride = (long)(num_heads + 2 * num_kv_heads) * HD;
    for (int c = tid; c < BM * CPR; c += 128) {  // Q; padding rows are zeros
      const int r = c / CPR, ch = c % CPR;
      const int h = r / tok_per_head, tok = r % tok_per_head;
      const bool valid = h < group && tok < ntok;
      const T* src = valid ? qkv + (long)(q0 + tok) * row_stride + (kvh * group + h) * HD + ch * 8
                           : qkv;
      cp_async16(q_s + (ch >> 3) * BM * 128 + sw128(r, ch & 7), src, valid);
    }
    mbar_arrive_cp_async(q_full);
    const int* table = block_tables + (long)seq * max_blocks;
    if (!box) {  // cp.async: 16 consecutive threads copy one key's 256 contiguous bytes (HD 128)
      auto gather = [&](unsigned char* dst, const T* cache, int kb) {
#pragma unroll 4
        for (int c = tid; c < BN * CPR; c += 128) {
          const int j = c / CPR, ch = c % CPR, key = kb + j;
          const bool valid = key < kv_len;  // past the end: zeros (masked, and 0 x 0 in P V)
          long off = 0;
          if (valid) {
            const int bi = key / block_size;
            off = (((long)table[bi] * num_kv_heads + kvh) * block_size + key - bi * block_size) *
                      HD + ch * 8;
          }
          cp_async16(dst + (ch >> 3) * BN * 128 + sw128(j, ch & 7), cache + off, valid);
        }
      };
      for (int t = 0; t < num_tiles; t++) {
        const int s = t % ST, parity = (t / ST - 1) & 1;  // of the stage's previous use
        if (t >= ST) mbar_wait(k_empty + s, parity);
        gather(k_s + s * TILE_BYTES, k_cache, t * BN);
        mbar_arrive_cp_async(k_full + s);
        if (t >= ST) mbar_wait(v_empty + s, parity);
        gather(v_s + s * TILE_BYTES, v_cache, t * BN);
        mbar_arrive_cp_async(v_full + s);
      }
    } else if (tid < 32) {
      // Lane j copies the tile's box j (BN / box <= 16 of them): the block-table reads of a tile
      // go out together, and those of tile t + 1 before the wait for its stage.
      const unsigned bytes = (flags & 1) ? 0 : TILE_BYTES;
      const bool copies = bytes && tid < BN / box;
      auto row_of = [&](int t) {  // the cache row of this lane's box in tile t
        const int key = t * BN + tid * box, bi = key / block_size;
        if (!copies || t >= num_tiles) return 0;
        return key < kv_len ? (table[bi] * num_kv_heads + kvh) * block_size + key - bi * block_size
                            : cache_rows;  // past the sequence: zeros
      };
      auto load = [&](unsigned char* dst, const TmaMap* map, unsigned long long* bar, int row) {
        if (tid == 0) mbar_arrive_expect_tx(bar, bytes);
        __syncwarp();
        if (copies) {
#pragma unroll
          for (int a = 0; a < HD / 64; a++)
            tma_load_2d(dst + a * BN * 128 + tid * box * 128, map, a * 64, row, bar);
        }
      };
      int row = row_of(0);
      for (int t = 0; t < num_tiles; t++) {
        const int s = t % ST, parity = (t / ST - 1) & 1;  // of the stage's previous use
        const int next = row_of(t + 1);
        if (t >= ST) mbar_wait(k_empty + s, parity);
        load(k_s + s * TILE_BYTES, &k_map, k_full + s, row);
        if (t >= ST) mbar_wait(v_empty + s, parity);
        load(v_s + s * TILE_BYTES, &v_map, v_full + s, row);
        row = next;
      }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    return;
  }

  // ------------------------------------------------------------------------------- consumers
  regs_inc<PREFILL90_CONSUMER_REGS>();
  const int cw = wg - 1, ctid = tid - 128 * wg, warp = ctid >> 5, lane = tid & 31;
  // This lane's rows: 64 cw + 16 warp + lane / 4 + 8 hf; their positions give the causal mask,
  // the warp's lowest valid position decides which tiles it masks.
  int pos[2];
  int lo = 0x7fffffff;
#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    const int r = 64 * cw + 16 * warp + (lane >> 2) + 8 * hf;
    const int h = r / tok_per_head, tok = r % tok_per_head;
    const bool valid = h < group && tok < ntok;
    pos[hf] = first_pos + (valid ? tok : 0);  // padding rows see key 0: a finite max
    if (valid) lo = min(lo, pos[hf]);
  }
#pragma unroll
  for (int x = 1; x < 32; x <<= 1) lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, x));
  const int cq = (lane & 3) * 2;

  float o[HD / 2];  // O accumulator (wgmma layout, wgmma.cuh), HD columns
  float s[BN / 2];  // S, then the unnormalized P in fp32, BN key columns
  unsigned pf[BN / 16][4];  // P as the A operand of P V: keys 16 j .. 16 j + 15
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, alpha[2] = {1.f, 1.f};
#pragma unroll
  for (int i = 0; i < HD / 2; i++) o[i] = 0.f;
#pragma unroll
  for (int i = 0; i < BN / 2; i++) s[i] = 0.f;

  // Ping-pong: consumer cw issues after waiting on barrier 1 + cw, then lets the other go.
  // Consumer 1 starts by letting consumer 0 go and skips the release after its last issue (the
  // counts of both barriers pair up: n + 1 issues each).
  const bool pingpong = !(flags & 2);
  const int my_bar = 1 + cw, other_bar = 2 - cw;
  if (cw == 1 && pingpong) bar_arrive(1, 256);

  auto issue_s = [&](int t) {  // s = Q K(t)^T, one wgmma group
    const unsigned char* kt = k_s + (t % ST) * TILE_BYTES;
    const unsigned char* qt = q_s + cw * 64 * 128;
    fence_regs(s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {  // head_dim 16 kk ..: atom kk / 4, 32 B a step in it
      const unsigned long long da = sw128_desc(qt + (kk >> 2) * BM * 128 + (kk & 3) * 32, 0);
      const unsigned long long db = sw128_desc(kt + (kk >> 2) * BN * 128 + (kk & 3) * 32, 0);
      if (kk == 0) {
        Wgmma<BN>::template ss<0>(s, da, db, tag);
      } else {
        Wgmma<BN>::template ss<1>(s, da, db, tag);
      }
    }
    wgmma_commit();
  };
  auto issue_pv = [&](int t) {  // o += P V(t), one wgmma group (after O's rescale)
    const unsigned char* vt = v_s + (t % ST) * TILE_BYTES;
#pragma unroll
    for (int j = 0; j < BN / 16; j++) fence_regs(pf[j]);
    fence_regs(o);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < BN / 16; j++)  // keys 16 j ..: 16 rows of 128 B further
      Wgmma<HD>::template rs_t<1>(o, pf[j], sw128_desc(vt + j * 16 * 128, BN * 128), tag);
    wgmma_commit();
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
  auto rescale_o = [&]() {  // past the first tiles a row's max rarely moves: skip when none did
    if (!__all_sync(0xffffffffu, alpha[0] == 1.f && alpha[1] == 1.f)) {
#pragma unroll
      for (int i = 0; i < HD / 8; i++) {
        o[4 * i] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
      }
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int j = 0; j < BN / 16; j++) {  // n8 tiles 2 j and 2 j + 1
      pf[j][0] = pack2(s[8 * j], s[8 * j + 1], tag);
      pf[j][1] = pack2(s[8 * j + 2], s[8 * j + 3], tag);
      pf[j][2] = pack2(s[8 * j + 4], s[8 * j + 5], tag);
      pf[j][3] = pack2(s[8 * j + 6], s[8 * j + 7], tag);
    }
  };

  mbar_wait(q_full, 0);
  mbar_wait(k_full, 0);
  fence_async_smem();
  if (pingpong) bar_sync(my_bar, 256);
  issue_s(0);
  if (pingpong) bar_arrive(other_bar, 256);
  wgmma_wait<0>();
  fence_regs(s);
  mbar_arrive(k_empty);
  softmax(0);
  pack_p();
  for (int t = 1; t < num_tiles; t++) {
    mbar_wait(k_full + t % ST, (t / ST) & 1);
    fence_async_smem();
    if (pingpong) bar_sync(my_bar, 256);
    issue_s(t);
    mbar_wait(v_full + (t - 1) % ST, ((t - 1) / ST) & 1);
    fence_async_smem();
    issue_pv(t - 1);
    if (pingpong) bar_arrive(other_bar, 256);
    wgmma_wait<1>();  // S(t) done
    fence_regs(s);
    mbar_arrive(k_empty + t % ST);
    softmax(t);
    wgmma_wait<0>();  // P(t-1) V(t-1) done
    fence_regs(o);
    mbar_arrive(v_empty + (t - 1) % ST);
    rescale_o();
    pack_p();
  }
  const int last = num_tiles - 1, first_past = kv_len - last * BN;
  mbar_wait(v_full + last % ST, (last / ST) & 1);
  // Keys past kv_len (only the last tile has them): their P is 0, but a TMA box that starts
  // inside the sequence copies the rest of its cache block, slots this sequence never wrote,
  // which may hold anything, and 0 x NaN is NaN. Zero those rows of V (both consumers write the
  // same zeros; each fences and syncs its own warpgroup before its wgmma reads them).
  if (first_past < BN) {
    unsigned char* vt = v_s + (last % ST) * TILE_BYTES;
    for (int c = ctid; c < (BN - first_past) * CPR; c += 128) {
      const int r = first_past + c / CPR, ch = c % CPR;  // all 8 chunks of the row: any swizzle
      *reinterpret_cast<uint4*>(vt + (ch >> 3) * BN * 128 + r * 128 + (ch & 7) * 16) =
          make_uint4(0u, 0u, 0u, 0u);
    }
  }
  fence_async_smem();
  if (first_past < BN) bar_sync(3 + cw, 128);
  if (pingpong) bar_sync(my_bar, 256);
  issue_pv(last);
  if (cw == 0 && pingpong) bar_arrive(other_bar, 256);
  wgmma_wait<0>();
  fence_regs(o);

#pragma unroll
  for (int hf = 0; hf < 2; hf++) {
    float sum = l[hf];
#pragma unroll
    for (int x = 1; x < 4; x <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, x);
    const int r = 64 * cw + 16 * warp + (lane >> 2) + 8 * hf;
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
#define INSTANTIATE(T, HD, BN, ST)                                                             \
  template __global__ void prefill_sm90_kernel<T, HD, BN, ST>(                                 \
      T*, const T*, const T*, const T*, const __grid_constant__ TmaMap,                        \
      const __grid_constant__ TmaMap, const int*, const int*, const int*, const int*, int,     \
      int, int, int, float, int, int, int);
INSTANTIATE(__half, 128, 128, 2)
INSTANTIATE(__half, 64, 128, 2)
INSTANTIATE(__nv_bfloat16, 64, 128, 2)
INSTANTIATE(__nv_bfloat16, 128, 128, 2)
#endif
