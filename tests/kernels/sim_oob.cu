// Test kernel for the engine's ASan mode.
extern "C" __global__ void oob_write(float* y, const int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = 1.0f;  // BUG on purpose: off-by-one, writes y[n]
}
