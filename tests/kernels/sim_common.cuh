// Shared helper for the engine's test kernels: exercised through a quoted include.
#pragma once
#include <math_constants.h>

// Sums n (a power of two) values of `buf` in place; all threads of the block must call it.
template <class T>
__device__ __forceinline__ T tree_sum(T* buf, unsigned n) {
  for (unsigned h = n / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) buf[threadIdx.x] += buf[threadIdx.x + h];
    __syncthreads();
  }
  const T r = buf[0];
  __syncthreads();
  return r;
}

// A device function with its own static shared memory: one copy per block.
__device__ float block_max(float v) {
  __shared__ float part[32];
  const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) part[warp] = v;
  __syncthreads();
  float m = -CUDART_INF_F;
  for (unsigned w = 0; w < (blockDim.x + 31) / 32; w++) m = fmaxf(m, part[w]);
  __syncthreads();
  return m;
}
