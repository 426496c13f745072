// CPU stand-in for <cuda_bf16.h> (cudasim): bfloat16 as 16-bit storage with software
// round-to-nearest-even (GCC 12 has no bfloat16 arithmetic type). Same operator shape as
// CUDA's header: implicit conversions to/from float, operators on two bfloat16 operands.
#pragma once
#include "cudasim.h"
#include "cuda_fp16.h"

struct __nv_bfloat16_raw { unsigned short x; };

namespace cudasim {
inline unsigned short float_to_bf16_rne(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040);  // quiet NaN, keep sign
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even (overflow rounds to inf)
  return (unsigned short)(u >> 16);
}
inline float bf16_to_float(unsigned short b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }
// double -> bfloat16 with one rounding: to float with round-to-odd (truncate, then set the
// lowest bit if anything was lost), then to bfloat16 with ties-to-even; float keeps more
// than two extra bits, so the result equals a direct correctly rounded conversion.
inline unsigned short double_to_bf16_rne(double d) {
  float f = (float)d;
  if (!std::isnan(d) && (double)f != d) {
    uint32_t u; memcpy(&u, &f, 4);
    if (std::fabs((double)f) > std::fabs(d)) u -= 1;  // round toward zero instead
    u |= 1;
    memcpy(&f, &u, 4);
  }
  return float_to_bf16_rne(f);
}
}  // namespace cudasim

struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(__nv_bfloat16_raw r) : __x(r.x) {}
  __nv_bfloat16(float f) : __x(cudasim::float_to_bf16_rne(f)) {}
  __nv_bfloat16(double d) : __x(cudasim::double_to_bf16_rne(d)) {}
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  __nv_bfloat16(I i) : __nv_bfloat16((float)i) {}
  operator float() const { return cudasim::bf16_to_float(__x); }
  operator __nv_bfloat16_raw() const { return {__x}; }
  __nv_bfloat16& operator+=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) + float(o)); }
  __nv_bfloat16& operator-=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) - float(o)); }
  __nv_bfloat16& operator*=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) * float(o)); }
  __nv_bfloat16& operator/=(__nv_bfloat16 o) { return *this = __nv_bfloat16(float(*this) / float(o)); }
};
typedef __nv_bfloat16 nv_bfloat16;
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 operator+(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) + float(b)); }
inline __nv_bfloat16 operator-(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) - float(b)); }
inline __nv_bfloat16 operator*(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) * float(b)); }
inline __nv_bfloat16 operator/(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(float(a) / float(b)); }
inline __nv_bfloat16 operator-(__nv_bfloat16 a) { __nv_bfloat16 r = a; r.__x ^= 0x8000; return r; }
inline __nv_bfloat16 operator+(__nv_bfloat16 a) { return a; }
inline bool operator==(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) == float(b); }
inline bool operator!=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) != float(b); }
inline bool operator<(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) < float(b); }
inline bool operator<=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) <= float(b); }
inline bool operator>(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) > float(b); }
inline bool operator>=(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) >= float(b); }

inline float __bfloat162float(__nv_bfloat16 h) { return float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __nv_bfloat16(d); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16(__nv_bfloat16_raw{(unsigned short)s}); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return a / b; }
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return -a; }
inline __nv_bfloat16 __habs(__nv_bfloat16 a) { __nv_bfloat16 r = a; r.__x &= 0x7fff; return r; }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) { return __nv_bfloat16(fmaf(float(a), float(b), float(c))); }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(fmaxf(float(a), float(b))); }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat16(fminf(float(a), float(b))); }
inline bool __hisnan(__nv_bfloat16 a) { return std::isnan(float(a)); }
inline int __hisinf(__nv_bfloat16 a) { float f = float(a); return std::isinf(f) ? (f < 0 ? -1 : 1) : 0; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__nv_bfloat16(a), __nv_bfloat16(a)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return float(h.y); }

inline __nv_bfloat16 __shfl_sync(unsigned m, __nv_bfloat16 v, int s, int w = 32) { return __ushort_as_bfloat16(__shfl_sync(m, v.__x, s, w)); }
inline __nv_bfloat16 __shfl_xor_sync(unsigned m, __nv_bfloat16 v, int s, int w = 32) { return __ushort_as_bfloat16(__shfl_xor_sync(m, v.__x, s, w)); }
inline __nv_bfloat16 __shfl_down_sync(unsigned m, __nv_bfloat16 v, unsigned s, int w = 32) { return __ushort_as_bfloat16(__shfl_down_sync(m, v.__x, s, w)); }
inline __nv_bfloat16 __shfl_up_sync(unsigned m, __nv_bfloat16 v, unsigned s, int w = 32) { return __ushort_as_bfloat16(__shfl_up_sync(m, v.__x, s, w)); }
inline __nv_bfloat16 __ldg(const __nv_bfloat16* p) { return *p; }

inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  std::atomic_ref<unsigned short> a(p->__x);
  unsigned short old = a.load();
  while (!a.compare_exchange_weak(old, __nv_bfloat16(float(__ushort_as_bfloat16(old)) + float(v)).__x)) {}
  return __ushort_as_bfloat16(old);
}

namespace cudasim { template <> struct is_float_like<__nv_bfloat16> : std::true_type {}; }
