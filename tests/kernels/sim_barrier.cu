// Test kernels for the CPU engine: barriers, shared memory, scheduling bugs.
#include "sim_common.cuh"

// Tree reduction in static shared memory; BLOCK threads per block.
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) block_sum(const float* __restrict__ x, float* __restrict__ out, const int n) {
  __shared__ float s[BLOCK];
  const int i = blockIdx.x * BLOCK + threadIdx.x;
  s[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int h = BLOCK / 2; h > 0; h >>= 1) {
    if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// Same with dynamic shared memory (blockDim.x floats) and a header helper.
extern "C" __global__ void block_sum_dyn(const double* x, double* out, const long long n) {
  extern __shared__ double buf[];
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? x[i] : 0.0;
  __syncthreads();
  const double total = tree_sum(buf, blockDim.x);
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

// __syncthreads_count / _and / _or on the predicate pred[global thread].
extern "C" __global__ void sync_votes(const int* pred, int* out) {
  const int p = pred[blockIdx.x * blockDim.x + threadIdx.x];
  const int c = __syncthreads_count(p);
  const int a = __syncthreads_and(p);
  const int o = __syncthreads_or(p);
  if (threadIdx.x == 0) { out[3 * blockIdx.x] = c; out[3 * blockIdx.x + 1] = a; out[3 * blockIdx.x + 2] = o; }
}

// BUG on purpose: reads a neighbour's shared value without a barrier. In forward order the
// neighbour (threadIdx.x - 1) has already written it; in any other order it may not have.
extern "C" __global__ void shift_no_barrier(const float* x, float* y) {
  __shared__ float s[256];
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  s[t] = x[base + t];
  y[base + t] = t > 0 ? s[t - 1] : 0.0f;
}

// The fixed version.
extern "C" __global__ void shift_barrier(const float* x, float* y) {
  __shared__ float s[256];
  const int t = threadIdx.x, base = blockIdx.x * blockDim.x;
  s[t] = x[base + t];
  __syncthreads();
  y[base + t] = t > 0 ? s[t - 1] : 0.0f;
}

// Reads shared memory before writing it: every block must see poison (NaN), never the
// previous block's values.
extern "C" __global__ void read_stale(float* static_seen, float* dyn_seen) {
  __shared__ float s[64];
  extern __shared__ float d[];
  const int t = threadIdx.x, b = blockIdx.x;
  static_seen[b * 64 + t] = s[t];
  dyn_seen[b * 64 + t] = d[t];
  __syncthreads();
  s[t] = (float)b;
  d[t] = (float)b;
}

// BUG on purpose: threads >= 64 skip the barrier.
extern "C" __global__ void divergent_barrier(float* y) {
  if (threadIdx.x >= 64) return;
  __syncthreads();
  y[threadIdx.x] = 1.0f;
}

// BUG on purpose: lane 0 waits for lane 1 in a shuffle while lane 1 waits in __syncthreads.
extern "C" __global__ void deadlock(int* y) {
  int v = threadIdx.x;
  if (threadIdx.x == 0) v = __shfl_sync(0x3u, v, 1);
  else __syncthreads();
  y[threadIdx.x] = v;
}

// 3-D indices: each thread writes its global linear id at its position.
extern "C" __global__ void index3d(int* out) {
  const dim3 g = gridDim, b = blockDim;
  const uint3 t = threadIdx, k = blockIdx;
  const int block_lin = (k.z * g.y + k.y) * g.x + k.x;
  const int thread_lin = (t.z * b.y + t.y) * b.x + t.x;
  const int nthreads = b.x * b.y * b.z;
  out[block_lin * nthreads + thread_lin] = block_lin * 1000 + thread_lin;
}

// Big per-thread arrays (registers on the GPU) live on the fiber stack.
extern "C" __global__ void big_locals(const float* x, float* y) {
  float a[64], b[64];
  for (int i = 0; i < 64; i++) { a[i] = x[i] * (threadIdx.x + 1); b[i] = a[i] * 2.0f; }
  __syncthreads();
  float acc = 0.0f;
  for (int i = 0; i < 64; i++) acc += a[i] + b[i];
  y[blockIdx.x * blockDim.x + threadIdx.x] = acc;
}

// BUG on purpose: the two halves of the block wait at different __syncthreads calls.
extern "C" __global__ void split_barrier(float* y) {
  if (threadIdx.x < 32) {
    y[threadIdx.x] = 1.0f;
    __syncthreads();
  } else {
    __syncthreads();
    y[threadIdx.x] = 2.0f;
  }
}

// Launch bounds behind a macro, as the package's kernels write them.
#define SIM_TEST_BOUNDS __launch_bounds__(64, 2)
extern "C" __global__ void SIM_TEST_BOUNDS bounded(float* y) { y[threadIdx.x] = 1.0f; }
