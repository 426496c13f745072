// File-scope shared memory declarations (allowed in CUDA), used from a kernel.
extern __shared__ float fs_dyn[];
__shared__ int fs_static_counter;

extern "C" __global__ void file_scope_shared(const float* x, float* y) {
  const int t = threadIdx.x;
  fs_dyn[t] = x[blockIdx.x * blockDim.x + t];
  if (t == 0) fs_static_counter = 0;
  __syncthreads();
  atomicAdd(&fs_static_counter, 1);
  __syncthreads();
  y[blockIdx.x * blockDim.x + t] = fs_dyn[blockDim.x - 1 - t] + (float)fs_static_counter;
}
