// Store each new token's k and v heads into the paged cache at its slot.
#include "common.cuh"

// slot = block * block_size + offset; slot -1 (padding, or a token whose k/v is not kept) is skipped.
// Copies 16-byte words (8 elements): head_dim is a multiple of 8.
// Grid: (num_tokens)  Block: (128)
template <typename T>
__global__ void write_kv_cache_kernel(T* __restrict__ k_cache,  // [num_blocks, nkv, bs, hd]
                                      T* __restrict__ v_cache,  // [num_blocks, nkv, bs, hd]
                                      const T* __restrict__ qkv,  // [num_tokens, (nh+2nkv) * hd]
                                      const int* __restrict__ slot_mapping,  // [num_tokens]
                                      int num_heads, int num_kv_heads, int head_dim,
                                      int block_size) {
  const long t = blockIdx.x;
  const long slot = slot_mapping[t];
  if (slot < 0) return;
  const long block = slot / block_size, offset = slot % block_size;
  const int words_per_head = head_dim / 8, words = num_kv_heads * words_per_head;
  const T* row = qkv + t * (num_heads + 2 * num_kv_heads) * head_dim;
  for (int w = threadIdx.x; w < 2 * words; w += blockDim.x) {
    const int is_v = w >= words, r = w % words;
    const int h = r / words_per_head, d = (r % words_per_head) * 8;
    const uint4 val = *reinterpret_cast<const uint4*>(
        row + (long)(num_heads + is_v * num_kv_heads + h) * head_dim + d);
    T* cache = is_v ? v_cache : k_cache;
    *reinterpret_cast<uint4*>(cache + ((block * num_kv_heads + h) * block_size + offset) * head_dim +
                              d) = val;
  }
}

#ifdef PAGEDSERVE_NVCC_CHECK
template __global__ void write_kv_cache_kernel<__half>(__half*, __half*, const __half*, const int*,
                                                       int, int, int, int);
template __global__ void write_kv_cache_kernel<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*,
                                                              const __nv_bfloat16*, const int*,
                                                              int, int, int, int);
#endif
