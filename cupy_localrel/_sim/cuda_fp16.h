// CPU stand-in for <cuda_fp16.h> (cudasim): IEEE binary16 with round-to-nearest-even
// conversions (GCC's _Float16 on x86-64/aarch64). Like CUDA's header, __half converts
// implicitly to and from float, and its operators take two __half operands, so mixed
// expressions such as `h + 1.0f` are ambiguous here exactly as they are under NVRTC.
#pragma once
#include "cudasim.h"

struct __half_raw { unsigned short x; };

struct __half {
  unsigned short __x;
  __half() = default;
  __half(__half_raw r) : __x(r.x) {}
  __half(float f) { _Float16 h = (_Float16)f; memcpy(&__x, &h, 2); }
  __half(double d) { _Float16 h = (_Float16)d; memcpy(&__x, &h, 2); }
  template <class I, class = std::enable_if_t<std::is_integral_v<I>>>
  __half(I i) : __half((float)i) {}
  operator float() const { _Float16 h; memcpy(&h, &__x, 2); return (float)h; }
  operator __half_raw() const { return {__x}; }
  __half& operator+=(__half o) { return *this = __half(float(*this) + float(o)); }
  __half& operator-=(__half o) { return *this = __half(float(*this) - float(o)); }
  __half& operator*=(__half o) { return *this = __half(float(*this) * float(o)); }
  __half& operator/=(__half o) { return *this = __half(float(*this) / float(o)); }
};
struct alignas(4) __half2 { __half x, y; };

inline __half operator+(__half a, __half b) { return __half(float(a) + float(b)); }
inline __half operator-(__half a, __half b) { return __half(float(a) - float(b)); }
inline __half operator*(__half a, __half b) { return __half(float(a) * float(b)); }
inline __half operator/(__half a, __half b) { return __half(float(a) / float(b)); }
inline __half operator-(__half a) { __half r = a; r.__x ^= 0x8000; return r; }
inline __half operator+(__half a) { return a; }
inline bool operator==(__half a, __half b) { return float(a) == float(b); }
inline bool operator!=(__half a, __half b) { return float(a) != float(b); }
inline bool operator<(__half a, __half b) { return float(a) < float(b); }
inline bool operator<=(__half a, __half b) { return float(a) <= float(b); }
inline bool operator>(__half a, __half b) { return float(a) > float(b); }
inline bool operator>=(__half a, __half b) { return float(a) >= float(b); }

inline float __half2float(__half h) { return float(h); }
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline __half __double2half(double d) { return __half(d); }
inline __half __int2half_rn(int i) { return __half((float)i); }
inline int __half2int_rn(__half h) { return (int)nearbyintf(float(h)); }
inline int __half2int_rz(__half h) { return (int)float(h); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half __short_as_half(short s) { return __half(__half_raw{(unsigned short)s}); }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hneg(__half a) { return -a; }
inline __half __habs(__half a) { __half r = a; r.__x &= 0x7fff; return r; }
inline __half __hfma(__half a, __half b, __half c) { return __half(fmaf(float(a), float(b), float(c))); }
inline __half __hmax(__half a, __half b) { return __half(fmaxf(float(a), float(b))); }
inline __half __hmin(__half a, __half b) { return __half(fminf(float(a), float(b))); }
inline bool __heq(__half a, __half b) { return a == b; }
inline bool __hne(__half a, __half b) { return a != b; }
inline bool __hlt(__half a, __half b) { return a < b; }
inline bool __hle(__half a, __half b) { return a <= b; }
inline bool __hgt(__half a, __half b) { return a > b; }
inline bool __hge(__half a, __half b) { return a >= b; }
inline bool __hisnan(__half a) { return std::isnan(float(a)); }
inline int __hisinf(__half a) { float f = float(a); return std::isinf(f) ? (f < 0 ? -1 : 1) : 0; }
inline __half hexp(__half a) { return __half(expf(float(a))); }
inline __half hlog(__half a) { return __half(logf(float(a))); }
inline __half hsqrt(__half a) { return __half(sqrtf(float(a))); }
inline __half hrsqrt(__half a) { return __half(1.0f / sqrtf(float(a))); }
inline __half2 __floats2half2_rn(float a, float b) { return {__half(a), __half(b)}; }
inline __half2 __float2half2_rn(float a) { return {__half(a), __half(a)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float2 __half22float2(__half2 h) { return {float(h.x), float(h.y)}; }
inline float __low2float(__half2 h) { return float(h.x); }
inline float __high2float(__half2 h) { return float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {a.x + b.x, a.y + b.y}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {a.x * b.x, a.y * b.y}; }

inline __half __shfl_sync(unsigned m, __half v, int s, int w = 32) { return __ushort_as_half(__shfl_sync(m, v.__x, s, w)); }
inline __half __shfl_xor_sync(unsigned m, __half v, int s, int w = 32) { return __ushort_as_half(__shfl_xor_sync(m, v.__x, s, w)); }
inline __half __shfl_down_sync(unsigned m, __half v, unsigned s, int w = 32) { return __ushort_as_half(__shfl_down_sync(m, v.__x, s, w)); }
inline __half __shfl_up_sync(unsigned m, __half v, unsigned s, int w = 32) { return __ushort_as_half(__shfl_up_sync(m, v.__x, s, w)); }
inline __half __ldg(const __half* p) { return *p; }

// atomicAdd on __half: compare-and-swap on the 16-bit storage.
inline __half atomicAdd(__half* p, __half v) {
  std::atomic_ref<unsigned short> a(p->__x);
  unsigned short old = a.load();
  while (!a.compare_exchange_weak(old, __half(float(__ushort_as_half(old)) + float(v)).__x)) {}
  return __ushort_as_half(old);
}

namespace cudasim { template <> struct is_float_like<__half> : std::true_type {}; }
