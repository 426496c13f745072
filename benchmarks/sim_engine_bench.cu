// Benchmark kernel for the CPU engine: shared-memory tree steps with barriers, then warp
// shuffles, then a cross-warp combine: the synchronisation pattern of the attention kernels.
extern "C" __global__ void __launch_bounds__(128)
bench_reduce(const float* __restrict__ x, float* __restrict__ out, const int n) {
  __shared__ float s[128];
  __shared__ float warp_part[4];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  s[threadIdx.x] = i < n ? __expf(x[i]) : 0.0f;
  __syncthreads();
  for (int h = 64; h >= 32; h >>= 1) {
    if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];
    __syncthreads();
  }
  float v = threadIdx.x < 32 ? s[threadIdx.x] : s[threadIdx.x & 31] * 0.5f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  for (int o = 1; o < 32; o <<= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, o));
  if ((threadIdx.x & 31) == 0) warp_part[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = warp_part[0] + warp_part[1] + warp_part[2] + warp_part[3];
}
