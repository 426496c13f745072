// Test kernels for the CPU engine: half/bfloat16, math, vector types, scalar arguments.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>

extern "C" __global__ void half_convert(const float* x, __half* h, float* back, const int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half v = __float2half_rn(x[i]);
  h[i] = v;
  back[i] = __half2float(h[i]);
}

extern "C" __global__ void bf16_convert(const float* x, __nv_bfloat16* b, float* back, const int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  b[i] = __float2bfloat16(x[i]);
  back[i] = __bfloat162float(b[i]);
}

// Reads half/bf16 inputs, does arithmetic in the 16-bit types and in float.
extern "C" __global__ void half_math(const __half* a, const __nv_bfloat16* b, __half* hsum, __nv_bfloat16* bsum,
                                     float* fsum, const int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  hsum[i] = a[i] + a[i];
  bsum[i] = b[i] * b[i];
  fsum[i] = __half2float(a[i]) + __bfloat162float(b[i]) + __half2float(__float2half(0.5f));
}

// Templates over the element type: load as T, accumulate in float, store as T.
template <class T>
__global__ void scale_t(const T* x, T* y, const float a, const int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = T(a * (float)x[i]);
}

extern "C" __global__ void math_funcs(const float* x, const double* xd, float* out, double* outd, const int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = x[i];
  float* o = out + 16 * i;
  o[0] = expf(v); o[1] = __expf(v); o[2] = logf(fabsf(v) + 1.0f); o[3] = __logf(fabsf(v) + 1.0f);
  o[4] = fmaxf(v, 0.25f); o[5] = fminf(v, 0.25f); o[6] = sqrtf(fabsf(v)); o[7] = rsqrtf(fabsf(v) + 1.0f);
  o[8] = __fdividef(v, 3.0f); o[9] = __fmaf_rn(v, 2.0f, 1.0f); o[10] = fmaf(v, v, -1.0f);
  o[11] = max(v, 0.0f) + (float)min(i, 3) + (float)max(7ll, (long long)i);
  o[12] = isinf(v / 0.0f) ? 1.0f : 0.0f; o[13] = isnan(v - v) ? 1.0f : 0.0f;
  o[14] = -CUDART_INF_F < v ? __ldg(x + i) : 0.0f;
  o[15] = exp(v) + log(fabsf(v) + 2.0f);
  const double d = xd[i];
  outd[3 * i] = exp(d); outd[3 * i + 1] = log(fabs(d) + 1.0); outd[3 * i + 2] = fmax(d, 0.0) + fmin(d, 0.0);
}

extern "C" __global__ void vec_types(const float4* a, const float2* b, int4* c, int2* d, float* out) {
  const int i = threadIdx.x;
  const float4 v = a[i];
  const float2 w = b[i];
  const int4 ci = c[i];
  const int2 di = make_int2(d[i].y, d[i].x);
  const float4 s = make_float4(v.x + w.x, v.y + w.y, v.z, v.w);
  c[i] = make_int4(ci.w, ci.z, ci.y, ci.x);
  d[i] = di;
  out[i] = s.x + s.y + s.z + s.w + (float)sizeof(float4) + (float)sizeof(size_t);
}

// Scalar parameters of several sizes; out receives them back.
extern "C" __global__ void scalars(const int a, const long long b, const float c, const double d,
                                   const unsigned u, const size_t z, double* out) {
  out[0] = a; out[1] = (double)b; out[2] = c; out[3] = d; out[4] = u; out[5] = (double)z;
}

// double -> 16-bit floats in one rounding step.
extern "C" __global__ void from_double(const double* x, __half* h, __nv_bfloat16* b, const int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  h[i] = __double2half(x[i]);
  b[i] = __double2bfloat16(x[i]);
}
