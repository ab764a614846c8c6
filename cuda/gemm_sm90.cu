// Skinny GEMM for Hopper (sm_90a only): y[M, N] = x[M, K] w[N, K]^T for M <= 256 rows (a decode
// step's tokens against a layer's weights), an experiment beside cuBLAS (kernel_check --only
// skinny; the engine takes it only with PAGEDSERVE_SKINNY_GEMM=1, cuda_gemm_sm90.py).
//
// Why: cuBLAS's tiles run over the token rows in steps of 128 or 256, so a graph of 144
// sequences may pay for 256; and a cuBLAS kernel starts only once the kernel before it has
// finished, while its weights never depended on that kernel. Here wgmma's M is the weights'
// rows and its N the tokens: a block takes 128 weight rows (two consumer warpgroups of 64)
// against BT token rows (M rounded up to a multiple of 64: 144 tokens compute 192), K in slices of
// 64 through ST stages of shared memory. Warpgroup 0's first thread copies the slices by TMA
// (128-byte swizzle): the first ST slices of w before the PDL wait, x's only after it. When
// N / 128 blocks would leave SMs idle, grid y cuts K into `splits` ranges whose fp32 partial sums
// gemm_sm90_reduce_kernel adds in a fixed order (deterministic).
// Epilogue: each consumer stages its 64 x BT tile in shared memory as [token][64 weight rows], so
// that a token's 64 outputs leave as 16-byte stores.
// GLU (w = [gate; up], 2 I rows): a block's 128 rows are gate rows j0..j0+63 (consumer 0) and the
// up rows I + j0.. (consumer 1), two TMA boxes a slice; the epilogue writes silu(g) * u for its
// 64 outputs of I (in fp32, rounded once, as activation.cu does), never the 2 I products.
#include "wgmma.cuh"

#define GEMM90_PRODUCER_REGS 40
#define GEMM90_CONSUMER_REGS 232

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void put(float* p, float v) { *p = v; }
template <typename V>
__device__ __forceinline__ void put(V* p, float v) { *p = from_float<V>(v); }

// Staged rows are padded by 16 bytes (TILE_LD values) so that a warp's stores of one
// accumulator register (8 weight rows x 4 tokens) fall in different banks.
template <typename V>
constexpr int TILE_LD = 64 + 16 / sizeof(V);

// One consumer warpgroup's 64 x BT accumulators (wgmma.cuh's layout: weight rows x tokens) into
// tile[token][TILE_LD], a token's 64 values side by side, as V (the output type, or fp32).
template <int BT, typename V>
__device__ __forceinline__ void stage_tile(V* tile, const float (&d)[BT / 2], int warp, int lane) {
  const int r = 16 * warp + (lane >> 2), cq = 2 * (lane & 3);
#pragma unroll
  for (int i = 0; i < BT / 8; i++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      put(tile + (8 * i + cq + (e & 1)) * TILE_LD<V> + r + 8 * (e >> 1), d[4 * i + e]);
}

// One arrival on the mbarrier at bar's offset in block `rank` of the cluster (this one too).
// Plain arrive: what it orders (the wgmma reads of a stage, finished by wgmma_wait) needs no
// release fence at cluster scope, which ncu saw stall each consumer warp 0 on MEMBAR / ERRBAR
// once a slice (13% of the pair kernel's samples). H200, session 18 (Llama-3-8B gate_up, 256
// rows): the pair kernel 157 us with it, 99 us without (one block a pair: 98.5; cuBLAS 92.7).
__device__ __forceinline__ void mbar_arrive_in(unsigned long long* bar, unsigned rank) {
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(bar)),
               "r"(rank));
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(remote) : "memory");
}

// tma_load_2d into the same offset of every block of the cluster in `mask`, each block's copy
// completing on its own mbarrier at bar's offset.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TmaMap* map, int column,
                                                      int row, unsigned long long* bar,
                                                      unsigned short mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(map)), "r"(column), "r"(row), "r"(smem_addr(bar)),
      "h"(mask)
      : "memory");
}

// A consumer warpgroup's own barrier (named barriers 2 and 3: constant ids, so that ptxas
// reserves no more).
__device__ __forceinline__ void warpgroup_sync(int cw) {
  if (cw == 0) {
    bar_sync(2, 128);
  } else {
    bar_sync(3, 128);
  }
}

// The first `rows` rows of tile[row][TILE_LD] (64 values each) to dst's rows, `stride` values
// apart, 16 bytes a thread.
template <typename V>
__device__ __forceinline__ void copy_rows(V* dst, long stride, const V* tile, int rows, int tid,
                                          int threads) {
  constexpr int PER = 16 / sizeof(V), CHUNKS = 64 / PER;  // values a chunk, chunks a row
  for (int c = tid; c < rows * CHUNKS; c += threads) {
    const int t = c / CHUNKS, ch = c % CHUNKS;
    *reinterpret_cast<uint4*>(dst + t * stride + ch * PER) =
        *reinterpret_cast<const uint4*>(tile + t * TILE_LD<V> + ch * PER);
  }
}
#endif

// gemm_sm90_pair_kernel (CL = 2): blocks 2j and 2j + 1 (neighbouring weight rows, the same K
// range) form a cluster that shares x: each block copies half of a slice's token rows into both
// blocks' stages (TMA multicast), so the L2 serves each x slice once per pair instead of once per
// block. A stage is then refilled only once the consumers of both blocks have released it (empty
// counts 4), and no block exits before its partner is done arriving on its barriers (a cluster
// barrier at the end).
// Grid: (N / 128, splits), N / 128 even when CL = 2  Block: 384 threads (3 warpgroups).
// Dynamic shared memory: 1024 (alignment) + ST x (128 + BT) x 128 bytes + 16 ST (barriers).
// w_map: w as a 2-D tensor [N rows][K], boxes of 128 rows x 64 (GLU: 64 rows); x_map: x [M
// rows][K], boxes of BT / CL rows x 64 (rows past M arrive as zeros). K % 64 == 0, N % 128 ==
// 0, M <= BT; out is [M, N] (GLU: [M, N / 2]).
template <typename T, int BT, int ST, bool GLU, int CL>
__device__ __forceinline__ void gemm_sm90_body(
    T* __restrict__ out,             // [M, N] when splits == 1
    float* __restrict__ partial,     // [splits, M, N] when splits > 1
    const TmaMap* w_map, const TmaMap* x_map, int M, int N, int K, int splits) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int W_BYTES = 128 * 128, X_BYTES = BT * 128, STAGE = W_BYTES + X_BYTES;
  static_assert(BT % 64 == 0 && BT <= 256, "64..256 token rows");
  static_assert(CL == 1 || CL == 2, "x shared by a pair of blocks at most");
  static_assert(ST >= 2, "slice i is released once slice i + 1's products are issued");
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + ST * STAGE);
  unsigned long long* empty = full + ST;
  const int n0 = blockIdx.x * (GLU ? 64 : 128), split = blockIdx.y;
  // this split's K slices: [s0, s0 + nk), at least one each (splits <= K / 64)
  const int k_slices = K / 64, s0 = split * k_slices / splits;
  const int nk = (split + 1) * k_slices / splits - s0;
  const int tid = threadIdx.x, wg = tid >> 7;

  const unsigned rank = CL > 1 ? cluster_rank() : 0;
  if (tid == 0) {
    for (int s = 0; s < ST; s++) {
      mbar_init(full + s, 1);        // the producer's arrival, with the stage's bytes
      mbar_init(empty + s, 2 * CL);  // one arrival per consumer warpgroup of the cluster
    }
    if (CL > 1) fence_mbar_init();
  }
  if (CL > 1) {
    cluster_sync();  // the partner's barriers exist before anything arrives on them
  } else {
    __syncthreads();
  }

  if (wg == 0) {  // ----------------------------------------------------------- producer
    regs_dec<GEMM90_PRODUCER_REGS>();
    if (tid == 0) {
      auto load_w = [&](int i, int s) {  // slice i of the block's weight rows into stage s
        if (GLU) {  // gate rows n0.., up rows N / 2 + n0..
          tma_load_2d(smem + s * STAGE, w_map, (s0 + i) * 64, n0, full + s);
          tma_load_2d(smem + s * STAGE + W_BYTES / 2, w_map, (s0 + i) * 64, N / 2 + n0, full + s);
        } else {
          tma_load_2d(smem + s * STAGE, w_map, (s0 + i) * 64, n0, full + s);
        }
      };
      for (int i = 0; i < min(ST, nk); i++) {  // weights first: they wait for no kernel
        mbar_arrive_expect_tx(full + i, STAGE);
        load_w(i, i);
      }
      pdl_wait();  // x is the previous kernel's output
      pdl_trigger();  // the next kernel may launch (and fetch its own weights) from here on
      for (int i = 0; i < nk; i++) {
        const int s = i % ST;
        if (i >= ST) {
          // the consumers (of both blocks, CL = 2) are done with the stage's last use
          mbar_wait(empty + s, (i / ST - 1) & 1);
          mbar_arrive_expect_tx(full + s, STAGE);
          load_w(i, s);
        }
        if (CL > 1) {  // this block's half of the token rows, into both blocks
          tma_load_2d_multicast(smem + s * STAGE + W_BYTES + rank * (X_BYTES / CL), x_map,
                                (s0 + i) * 64, rank * (BT / CL), full + s, (1 << CL) - 1);
        } else {
          tma_load_2d(smem + s * STAGE + W_BYTES, x_map, (s0 + i) * 64, 0, full + s);
        }
      }
    }
    __syncwarp();
    if (CL > 1) cluster_sync();  // every thread of both blocks, once
    return;
  }

  // --------------------------------------------------------------------------- consumers
  regs_inc<GEMM90_CONSUMER_REGS>();
  pdl_wait();  // (the products wait for x anyway; common.cuh's rule, before any write)
  const int cw = wg - 1, ctid = tid - 128 * wg, warp = ctid >> 5, lane = tid & 31;
  const T tag{};
  float d[BT / 2];  // 64 weight rows x BT tokens (wgmma.cuh's accumulator layout)
#pragma unroll
  for (int i = 0; i < BT / 2; i++) d[i] = 0.f;
  // Slice i's products, one wgmma group of 4 steps of 16 K values (32 bytes further in the
  // 128-byte rows each); the first slice's first step starts d afresh (ACC 0). nk >= 1.
  auto operands = [&](int i, unsigned long long& da, unsigned long long& db) {
    const int s = i % ST;
    mbar_wait(full + s, (i / ST) & 1);
    da = sw128_desc(smem + s * STAGE + cw * 64 * 128, 0);  // this warpgroup's 64 weight rows
    db = sw128_desc(smem + s * STAGE + W_BYTES, 0);
    fence_regs(d);
    wgmma_fence();
  };
  auto rest = [&](unsigned long long da, unsigned long long db) {  // steps 1..3, commit
#pragma unroll
    for (int kk = 1; kk < 4; kk++) Wgmma<BT>::template ss<1>(d, da + 2 * kk, db + 2 * kk, tag);
    wgmma_commit();
  };
  unsigned long long da, db;
  operands(0, da, db);
  Wgmma<BT>::template ss<0>(d, da, db, tag);
  rest(da, db);
  for (int i = 1; i < nk; i++) {
    operands(i, da, db);
    Wgmma<BT>::template ss<1>(d, da, db, tag);
    rest(da, db);
    wgmma_wait<1>();  // slice i - 1's products are done: release its stage
    fence_regs(d);
    if (ctid == 0 && CL == 1) mbar_arrive(empty + (i - 1) % ST);
    if (ctid == 0 && CL > 1) {  // both blocks' copies of the stage: each block refills both
#pragma unroll
      for (unsigned r = 0; r < CL; r++) mbar_arrive_in(empty + (i - 1) % ST, r);
    }
  }
  wgmma_wait<0>();
  fence_regs(d);

  // Epilogue: both consumers are past their last products before either overwrites the stages.
  bar_sync(1, 256);
  const int rows = min(M, BT);
  if (!GLU && splits == 1) {
    T* tile = reinterpret_cast<T*>(smem) + cw * BT * TILE_LD<T>;
    stage_tile<BT>(tile, d, warp, lane);
    warpgroup_sync(cw);
    copy_rows(out + n0 + cw * 64, N, tile, rows, ctid, 128);
  } else if (!GLU) {
    float* tile = reinterpret_cast<float*>(smem) + cw * BT * TILE_LD<float>;  // partial sums
    stage_tile<BT>(tile, d, warp, lane);
    warpgroup_sync(cw);
    copy_rows(partial + (long)split * M * N + n0 + cw * 64, N, tile, rows, ctid, 128);
  } else {
    float* g_s = reinterpret_cast<float*>(smem);  // consumer 0's gate, then consumer 1's up
    stage_tile<BT>(g_s + cw * BT * TILE_LD<float>, d, warp, lane);
    bar_sync(2, 256);  // both staged
    const float* u_s = g_s + BT * TILE_LD<float>;
    for (int c = tid - 128; c < rows * 8; c += 256) {  // 8 outputs a thread, 16-byte stores
      const int at = (c >> 3) * TILE_LD<float> + (c & 7) * 8;
      alignas(16) T v[8];
#pragma unroll
      for (int j = 0; j < 8; j++) {
        const float g = g_s[at + j];
        v[j] = from_float<T>(g / (1.f + expf(-g)) * u_s[at + j]);
      }
      *reinterpret_cast<uint4*>(out + (long)(c >> 3) * (N / 2) + n0 + (c & 7) * 8) =
          *reinterpret_cast<const uint4*>(v);
    }
  }
  __syncwarp();
  if (CL > 1) cluster_sync();  // the partner may still arrive on this block's barriers
#endif
}

#define GEMM90_PARAMS                                                                          \
  T *__restrict__ out, float *__restrict__ partial, const __grid_constant__ TmaMap w_map,      \
      const __grid_constant__ TmaMap x_map, int M, int N, int K, int splits

template <typename T, int BT, int ST, bool GLU>
__global__ void __launch_bounds__(384, 1) gemm_sm90_kernel(GEMM90_PARAMS) {
  gemm_sm90_body<T, BT, ST, GLU, 1>(out, partial, &w_map, &x_map, M, N, K, splits);
}

// Grid x even: blocks 2j and 2j + 1 are one cluster.
template <typename T, int BT, int ST, bool GLU>
__global__ void CLUSTER_DIMS(2, 1, 1) __launch_bounds__(384, 1) gemm_sm90_pair_kernel(
    GEMM90_PARAMS) {
  gemm_sm90_body<T, BT, ST, GLU, 2>(out, partial, &w_map, &x_map, M, N, K, splits);
}

// y[i] = sum over s of partial[s][i], s in order (M * N % 4 == 0). Grid: ceil(M N / 4 / 256).
template <typename T>
__global__ void __launch_bounds__(256) gemm_sm90_reduce_kernel(
    T* __restrict__ out, const float* __restrict__ partial, long size, int splits) {
  pdl_start();
  const long i = ((long)blockIdx.x * 256 + threadIdx.x) * 4;
  if (i >= size) return;
  float4 acc = *reinterpret_cast<const float4*>(partial + i);
  for (int s = 1; s < splits; s++) {
    const float4 v = *reinterpret_cast<const float4*>(partial + (long)s * size + i);
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  out[i] = from_float<T>(acc.x);
  out[i + 1] = from_float<T>(acc.y);
  out[i + 2] = from_float<T>(acc.z);
  out[i + 3] = from_float<T>(acc.w);
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(KERNEL, T, BT, GLU)                                                        \
  template __global__ void KERNEL<T, BT, 4, GLU>(T*, float*, const __grid_constant__ TmaMap,    \
                                                 const __grid_constant__ TmaMap, int, int, int, \
                                                 int);
INSTANTIATE(gemm_sm90_kernel, __nv_bfloat16, 64, false)
INSTANTIATE(gemm_sm90_kernel, __nv_bfloat16, 192, false)
INSTANTIATE(gemm_sm90_kernel, __nv_bfloat16, 256, false)
INSTANTIATE(gemm_sm90_kernel, __half, 128, false)
INSTANTIATE(gemm_sm90_kernel, __nv_bfloat16, 192, true)
INSTANTIATE(gemm_sm90_kernel, __nv_bfloat16, 256, true)
INSTANTIATE(gemm_sm90_kernel, __half, 64, true)
INSTANTIATE(gemm_sm90_pair_kernel, __nv_bfloat16, 256, false)
INSTANTIATE(gemm_sm90_pair_kernel, __half, 64, false)
INSTANTIATE(gemm_sm90_pair_kernel, __nv_bfloat16, 128, true)
template __global__ void gemm_sm90_reduce_kernel<__nv_bfloat16>(__nv_bfloat16*, const float*,
                                                                  long, int);
#endif
