// Calibration kernels for the CPU engine's profile mode (tests/test_profile.py): access
// patterns whose warp-level counts are known exactly. One warp (32 threads) per block unless
// said otherwise; `in`/`out` are 256-byte aligned buffers, as cudaMalloc gives.

// Coalesced float copy: each request covers 128 contiguous bytes = 4 sectors (ideal 4).
extern "C" __global__ void copy_coalesced(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i];
}

// Stride 2 floats: 32 lanes span 256 bytes = 8 sectors, of which 128 bytes are used (ideal 4).
extern "C" __global__ void load_stride2(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[2 * i];
}

// Stride 32 floats (128 bytes): every lane in its own sector, 32 sectors (ideal 4).
extern "C" __global__ void load_stride32(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[32 * i];
}

// Broadcast: every lane reads the same float: 1 sector (ideal 1).
extern "C" __global__ void load_broadcast(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[blockIdx.x];
}

// Misaligned by one float: 128 contiguous bytes starting 4 bytes into a sector: 5 sectors
// (ideal 4, since ceil(128 / 32) = 4).
extern "C" __global__ void load_offset1(const float* in, float* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = in[i + 1];
}

// Shared memory with a word stride of `stride` (1: no conflict, 2: 2-way, 32: 32-way,
// 33: none); stride 0 is a broadcast (one wavefront). One store and one load per lane.
extern "C" __global__ void shared_stride(float* out, int stride) {
  extern __shared__ float buf[];
  const int t = threadIdx.x;
  buf[t * stride] = (float)t;
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[t * stride];
}

// `rounds` barriers per block, plus one atomicAdd per lane into out[0].
extern "C" __global__ void barriers_and_atomics(float* out, int rounds) {
  for (int r = 0; r < rounds; ++r) __syncthreads();
  atomicAdd(out, 1.0f);
}

// 16-byte shared accesses (LDS.128/STS.128) with a float4 stride of `stride`: the hardware
// serves 8 lanes (128 bytes) per wavefront, so 32 contiguous lanes cost 4 wavefronts (the
// ideal, ceil(512 / 128)); stride 2 spreads them over half the banks (8), stride 8 puts
// every lane on banks 0-3 (32); stride 0 is a broadcast (1, ideal 1). Through the kernels'
// own wide-access helpers (localrel::load_wide/store_wide): a plain struct copy is split by
// g++ into 4-byte accesses (four requests).
#include "../../cupy_localrel/kernels/localrel_common.cuh"

extern "C" __global__ void shared_float4_stride(float* out, int stride) {
  extern __shared__ float sbuf[];
  float4* buf4 = reinterpret_cast<float4*>(sbuf);
  const int t = threadIdx.x;
  localrel::store_wide(buf4 + t * stride, make_float4(t, t + 1, t + 2, t + 3));
  __syncthreads();
  const float4 v = localrel::load_wide(buf4 + t * stride);
  out[blockIdx.x * blockDim.x + t] = v.x + v.y + v.z + v.w;
}
