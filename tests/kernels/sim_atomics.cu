// Test kernels for the CPU engine: atomics under contention (many blocks, many workers).
extern "C" __global__ void atomics_contention(int* i_sum, float* f_sum, double* d_sum,
                                              unsigned long long* u_sum, int* i_max, int* i_min,
                                              unsigned* u_sub, const int* vals) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int v = vals[t];
  atomicAdd(i_sum, v);
  atomicAdd(f_sum, 1.0f);
  atomicAdd(d_sum, 0.5 * v);
  atomicAdd(u_sum, (unsigned long long)(v + 1000));
  atomicMax(i_max, v);
  atomicMin(i_min, v);
  atomicSub(u_sub, 1u);
}

// A counter incremented with a compare-and-swap loop; each thread records the old value it
// swapped, so the outputs must be a permutation of 0..n-1.
extern "C" __global__ void cas_counter(int* counter, int* ticket) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  int old = atomicOr(counter, 0);   // an atomic read: a plain one would race with the CAS
  for (;;) {
    const int seen = atomicCAS(counter, old, old + 1);
    if (seen == old) break;
    old = seen;
  }
  ticket[t] = old;
}

// Each thread exchanges its id into one slot: the returned olds plus the final value are
// the initial value and all ids, each once.
extern "C" __global__ void exch_chain(int* slot, int* olds, float* fslot, float* folds) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  olds[t] = atomicExch(slot, t);
  folds[t] = atomicExch(fslot, (float)t);
}

// Shared-memory histogram: atomics within a block, then merged with global atomics.
extern "C" __global__ void histogram(const int* x, int n, unsigned* hist) {
  __shared__ unsigned h[16];
  if (threadIdx.x < 16) h[threadIdx.x] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    atomicAdd(&h[x[i] & 15], 1u);
  __syncthreads();
  if (threadIdx.x < 16) atomicAdd(&hist[threadIdx.x], h[threadIdx.x]);
}
