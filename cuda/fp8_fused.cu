// Decode batches (M <= 4): the streaming FP8 GEMV, with the activation's quantization fused in.
//
// A decode step is a chain of short kernels; a GEMV of 17-25 MB (Llama-3-8B's o and qkv) lasts a
// few microseconds, and fp8.cu's GEMV (a block per 4 rows, its words in registers) spends a third
// of that ramping up and draining: only the blocks that fit in the registers have loads in flight,
// the later ones start after them. This kernel is persistent: one block per SM, each warp streams
// its own weight rows through shared memory with cp.async, STAGES chunks ahead, and it requests
// them before the PDL wait: at the first instruction up to ~190 KB per SM (25 MB on an H200) are
// in flight, so the previous kernel's tail, the launch and this kernel's prologue hide behind the
// weight stream instead of preceding it.
// Measured on the H200 (device run B) it is correct but slower than fp8.cu's GEMV + quantize pair
// (qkv 12.9 vs 10.8 us PDL-chained, gate_up 37.0 vs 31.2): one block of 16 warps per SM, each
// lane's dependent FMA chains, does not consume the stream as fast as HBM delivers it. Opt-in:
// cuda_fp8.STREAM (PAGEDSERVE_FP8_STREAM=1).
//
// The prologue builds the M quantized activation rows in shared memory (every block recomputes
// them from L2, once per SM rather than once per 4 weight rows as a per-row-group grid would):
// PRO 0..2 as fp8.cuh's fp8_stage_row (block 0 stores PRO 2's res_out); PRO 3: codes qx (M, K)
// and scales sx (M) given (fp8.cu's quantize kernels ran before);
//   y[m, n] = T((sum_k dec(q[m, k]) * dec(qw[n, k])) * s[m] * sw[n])
// Semantics are fp8.cu's (engine/model/fp8.py). The products are exact in fp32 and summed in
// fp32, two partial sums per lane.
//
// Work: warp g of the grid (G warps in all) takes row pairs g, g + G, ...; a pair is streamed in
// chunks of FS_WORDS 16-byte words per row (the last one partial), lane l copying and later
// reading words l, l + 32, ... of each chunk: a lane reads only what it copied itself, so the
// pipeline needs no barrier, only cp.async.wait_group.
#include "fp8.cuh"

constexpr int FS_WORDS = 128;                  // 16-byte words of a row per chunk (2 KB)
constexpr int FS_SLOTS = FS_WORDS / 32;        // words per lane per chunk
constexpr int FS_ROWS = 2;                     // weight rows a warp multiplies at once
constexpr int FS_STAGE = FS_ROWS * FS_WORDS;   // uint4 per warp and stage (4 KB)
constexpr int FS_QC = 4;                       // prologue words a thread keeps in registers

// Dynamic shared memory: M * K bytes of codes, then blockDim / 32 * stages * FS_STAGE * 16 bytes.
// Grid: (<= number of SMs)  Block: (32 * warps, <= 512)
template <typename T, int M, int PRO>
__global__ void __launch_bounds__(512, 1) fp8_stream_gemv_kernel(
    T* __restrict__ y,                     // [M, N]
    T* __restrict__ res_out,               // [M, K] (PRO 2) or null
    const T* __restrict__ x,               // [M, K] ([M, 2K] for PRO 1; unused for PRO 3)
    const T* __restrict__ residual,        // [M, K] or null (PRO 2)
    const T* __restrict__ norm_w,          // [K] (PRO 2) or null
    const unsigned char* __restrict__ qx,  // [M, K] (PRO 3) or null
    const float* __restrict__ sx,          // [M] (PRO 3) or null
    const unsigned char* __restrict__ qw,  // [N, K]
    const float* __restrict__ sw,          // [N]
    int N, int K, float eps, int stages) {
  extern __shared__ uint4 smem[];
  __shared__ float red[32], row_scales[M];
  unsigned char* codes = reinterpret_cast<unsigned char*>(smem);  // [M, K]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, words = K / 16;
  // warp w of block b is the grid's warp w * gridDim + b: the warps with one pair more than the
  // others spread over all SMs instead of filling the first blocks
  const int gw = warp * gridDim.x + blockIdx.x, num_warps = gridDim.x * (blockDim.x >> 5);
  const int chunks = (words + FS_WORDS - 1) / FS_WORDS, pairs = (N + FS_ROWS - 1) / FS_ROWS;
  const int items = gw < pairs ? (pairs - gw + num_warps - 1) / num_warps * chunks : 0;
  uint4* stage0 = smem + M * words + warp * stages * FS_STAGE;  // [stages, FS_ROWS, FS_WORDS]

  // Item i: chunk i % chunks of pair gw + i / chunks * num_warps, into stage i % stages. Every
  // call commits a group (an empty one past the end) so that the waits below count evenly.
  auto issue = [&](int i) {
    if (i < items) {
      const int pair = gw + i / chunks * num_warps, c = i % chunks;
      uint4* st = stage0 + i % stages * FS_STAGE;
#pragma unroll
      for (int r = 0; r < FS_ROWS; r++) {
        const int row = pair * FS_ROWS + r;
        const unsigned char* src = qw + (long)min(row, N - 1) * K;
#pragma unroll
        for (int s = 0; s < FS_SLOTS; s++) {
          const int j = lane + 32 * s, v = c * FS_WORDS + j;
          if (v < words) f8_cp_async16(st + r * FS_WORDS + j, src + 16 * v, row < N);
        }
      }
    }
    f8_cp_async_commit();
  };
  for (int i = 0; i < stages; i++) issue(i);  // weights only: before the wait
  pdl_start();  // PDL: everything below may read or write what earlier kernels touch

  // ---- prologue: the M quantized rows into `codes`, their scales into row_scales
  for (int m = 0; m < M; m++) {
    unsigned char* qrow = codes + m * K;
    float s;
    if constexpr (PRO == 3) {
      for (int v = tid; v < words; v += blockDim.x)
        reinterpret_cast<uint4*>(qrow)[v] = __ldg(reinterpret_cast<const uint4*>(qx + m * K) + v);
      s = sx[m];
    } else {
      const long in = (long)m * (PRO == 1 ? 2 : 1) * K;
      s = fp8_stage_row<T, PRO, FS_QC>(
          qrow, red, x + in, residual == nullptr ? nullptr : residual + (long)m * K, norm_w,
          PRO == 2 && blockIdx.x == 0 ? res_out + (long)m * K : nullptr, eps, K);
    }
    if (tid == 0) row_scales[m] = s;
  }
  __syncthreads();  // every warp reads all the codes

  // ---- the product, one chunk of a row pair per step
  const uint4* xw = reinterpret_cast<const uint4*>(codes);
  float acc[M][FS_ROWS][2];
#pragma unroll
  for (int m = 0; m < M; m++)
#pragma unroll
    for (int r = 0; r < FS_ROWS; r++) acc[m][r][0] = acc[m][r][1] = 0.f;
  for (int i = 0; i < items; i++) {
    f8_cp_async_wait(stages - 1);  // item i's group has landed
    const int c = i % chunks;
    const uint4* st = stage0 + i % stages * FS_STAGE;
#pragma unroll
    for (int s = 0; s < FS_SLOTS; s++) {
      const int j = lane + 32 * s, v = c * FS_WORDS + j;
      if (v >= words) continue;
      uint4 wv[FS_ROWS];
#pragma unroll
      for (int r = 0; r < FS_ROWS; r++) wv[r] = st[r * FS_WORDS + j];
#pragma unroll
      for (int m = 0; m < M; m++) {
        const uint4 xv = xw[m * words + v];
#pragma unroll
        for (int h = 0; h < 2; h++) {
          float xf[8];
          fp8x8_to_float(xv, h, xf);
#pragma unroll
          for (int r = 0; r < FS_ROWS; r++) {
            float wf[8];
            fp8x8_to_float(wv[r], h, wf);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[m][r][e & 1] += xf[e] * wf[e];
          }
        }
      }
    }
    issue(i + stages);  // into the stage just read: this lane's words only, already consumed
    if (c == chunks - 1) {
      const int pair = gw + i / chunks * num_warps;
#pragma unroll
      for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < FS_ROWS; r++) {
          const float sum = warp_sum(acc[m][r][0] + acc[m][r][1]);
          acc[m][r][0] = acc[m][r][1] = 0.f;
          const int row = pair * FS_ROWS + r;
          if (lane == 0 && row < N)
            y[(long)m * N + row] = from_float<T>(sum * row_scales[m] * sw[row]);
        }
    }
  }
  f8_cp_async_wait(0);  // only empty groups remain; leave none behind
}

#ifdef PAGEDSERVE_NVCC_CHECK
#define INSTANTIATE(T, M, PRO)                                                                  \
  template __global__ void fp8_stream_gemv_kernel<T, M, PRO>(                                    \
      T*, T*, const T*, const T*, const T*, const unsigned char*, const float*,                 \
      const unsigned char*, const float*, int, int, float, int);
INSTANTIATE(__nv_bfloat16, 1, 0)
INSTANTIATE(__nv_bfloat16, 1, 1)
INSTANTIATE(__nv_bfloat16, 1, 2)
INSTANTIATE(__half, 4, 2)
INSTANTIATE(__half, 2, 3)
INSTANTIATE(__nv_bfloat16, 1, 3)
#endif
