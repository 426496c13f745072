// Test kernels for the CPU engine: warp shuffles, votes, __syncwarp.
#include "sim_common.cuh"

// KIND: 0 __shfl_sync(src = arg[t]), 1 __shfl_xor_sync(arg[0]), 2 __shfl_down_sync(arg[0]),
// 3 __shfl_up_sync(arg[0]); W is the width.
template <int KIND, int W>
__global__ void shuffle(const int* x, const int* arg, int* out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = x[t];
  int r;
  if (KIND == 0) r = __shfl_sync(0xffffffffu, v, arg[t], W);
  else if (KIND == 1) r = __shfl_xor_sync(0xffffffffu, v, arg[0], W);
  else if (KIND == 2) r = __shfl_down_sync(0xffffffffu, v, (unsigned)arg[0], W);
  else r = __shfl_up_sync(0xffffffffu, v, (unsigned)arg[0], W);
  out[t] = r;
}

// Shuffles move 8-byte values whole.
extern "C" __global__ void shuffle_double(const double* x, double* out) {
  const int t = threadIdx.x;
  out[t] = __shfl_xor_sync(0xffffffffu, x[t], 1) + __shfl_down_sync(0xffffffffu, x[t], 2);
}

extern "C" __global__ void votes(const int* pred, unsigned* ballot, int* any, int* all) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int p = pred[t];
  const unsigned b = __ballot_sync(0xffffffffu, p);
  const int a = __any_sync(0xffffffffu, p);
  const int l = __all_sync(0xffffffffu, p);
  if ((threadIdx.x & 31) == 0) { ballot[t / 32] = b; any[t / 32] = a; all[t / 32] = l; }
}

// The two half-warps run independent collectives with their own masks.
extern "C" __global__ void half_warps(const int* x, int* out) {
  const unsigned lane = threadIdx.x & 31;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  int v = x[threadIdx.x];
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
  out[threadIdx.x] = v + (int)__ballot_sync(mask, lane & 1);
}

// Warp-private exchange through shared memory ordered by __syncwarp.
extern "C" __global__ void syncwarp_rotate(const int* x, int* out) {
  __shared__ int s[128];
  const int t = threadIdx.x, lane = t & 31, base = t - lane;
  s[t] = x[blockIdx.x * blockDim.x + t];
  __syncwarp();
  out[blockIdx.x * blockDim.x + t] = s[base + ((lane + 1) & 31)];
}

// Block max via a header device function with its own __shared__.
extern "C" __global__ void block_max_kernel(const float* x, float* out) {
  const float m = block_max(x[blockIdx.x * blockDim.x + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = m;
}

// BUG on purpose: lane 5 calls a collective whose mask leaves it out.
extern "C" __global__ void bad_mask(int* out) {
  out[threadIdx.x] = __shfl_sync(0xffffffdfu & (threadIdx.x == 5 ? 0x0000ffffu : 0xffffffffu), 1, 0);
}
