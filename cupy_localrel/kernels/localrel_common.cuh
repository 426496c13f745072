// localrel_common.cuh - device helpers shared by every cupy-localrel kernel.
//
// What lives here: the storage/accumulation types (half, bfloat16, float, double stored;
// float or double accumulated), the view of the int32 window-geometry buffer that
// cupy_localrel/_backends/_kernel_ops.py uploads (_window_table), and the mapping of a block to a tile of
// one (batch, head) plane.
//
// What does NOT live here, nor in any kernel: border logic. Which input a window slot looks
// at, whether it is valid and which bias/rel entry it uses all come from the tables of
// cupy_localrel/_geometry.py; kernels only apply them.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// Every launch uses at most kMaxThreads threads per block. The second bound (blocks per SM)
// gives ptxas a register budget of 65536 / (128 * 4) = 128: without it, ptxas squeezed some
// kernels into 56-64 registers and spilled; with it none spills (see the NVRTC report).
#define LOCALREL_THREADS 128
#define LOCALREL_BOUNDS __launch_bounds__(LOCALREL_THREADS, LOCALREL_MIN_BLOCKS)
#ifndef LOCALREL_MIN_BLOCKS
#define LOCALREL_MIN_BLOCKS 4
#endif

namespace localrel {

// ---------------------------------------------------------------------------------------
// Types: values are stored as T and accumulated as acc_t<T> (float, or double for double).
// ---------------------------------------------------------------------------------------
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <class T> using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even stores, the rounding NumPy/ml_dtypes use for the reference.
__device__ __forceinline__ void store(float* p, float x) { *p = x; }
__device__ __forceinline__ void store(double* p, double x) { *p = x; }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }

template <class T>
__device__ __forceinline__ acc_t<T> load(const T* __restrict__ p, size_t i) { return to_acc(p[i]); }

// Accurate exp/log (not __expf): the fp32 tolerance (2e-5 relative) leaves no room for
// the fast intrinsics on logits of magnitude ~10.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
__device__ __forceinline__ float acc_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double acc_max(double a, double b) { return fmax(a, b); }

template <class A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000u); }
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(0xfff0000000000000ull);
}
template <class A> __device__ __forceinline__ A quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000ull);
}

// ---------------------------------------------------------------------------------------
// The geometry buffer (int32), written by _kernel_ops._window_table in this order.
// ---------------------------------------------------------------------------------------
enum WindowField {
  kH, kW, kHo, kWo, kKh, kKw,
  kSh, kSw,            // stride: output i is centred on input i*stride (docs/contract.md "Geometry")
  kMr, kMc,            // users per input row / column (width of the users tables)
  kTh, kTw,            // bias/rel table extent per axis (k, or 2k-1 for shift)
  kZeros,              // 1: invalid slots take part in the softmax with key 0, value 0
  kRowsPos, kRowsTab, kColsPos, kColsTab,   // offsets of the (Ho,kh)/(Wo,kw) tables
  kRowsUserOut, kRowsUserSlot, kColsUserOut, kColsUserSlot,  // offsets of (H,mr)/(W,mc)
  kHeaderInts = 32
};

struct Window {
  int H, W, Ho, Wo, kh, kw, sh, sw, mr, mc, th, tw;
  bool zeros;
  const int* rows_pos;   // (Ho, kh): input row of slot row ty, -1 invalid
  const int* rows_tab;   // (Ho, kh): bias/rel table row
  const int* cols_pos;   // (Wo, kw)
  const int* cols_tab;   // (Wo, kw)
  const int* ru_out;     // (H, mr): output rows whose window holds input row y, -1 padded
  const int* ru_slot;    // (H, mr): the slot row ty they see it in
  const int* cu_out;     // (W, mc)
  const int* cu_slot;    // (W, mc)

  __device__ explicit Window(const int* __restrict__ g)
      : H(g[kH]), W(g[kW]), Ho(g[kHo]), Wo(g[kWo]), kh(g[kKh]), kw(g[kKw]), sh(g[kSh]),
        sw(g[kSw]), mr(g[kMr]), mc(g[kMc]), th(g[kTh]), tw(g[kTw]), zeros(g[kZeros] != 0),
        rows_pos(g + g[kRowsPos]), rows_tab(g + g[kRowsTab]), cols_pos(g + g[kColsPos]),
        cols_tab(g + g[kColsTab]), ru_out(g + g[kRowsUserOut]), ru_slot(g + g[kRowsUserSlot]),
        cu_out(g + g[kColsUserOut]), cu_slot(g + g[kColsUserSlot]) {}

  __device__ int slots() const { return kh * kw; }
  __device__ size_t in_plane() const { return (size_t)H * W; }
  __device__ size_t out_plane() const { return (size_t)Ho * Wo; }
  // Flat input offset of the centre of output (i, j), where its query lives.
  __device__ size_t centre(int i, int j) const { return (size_t)i * sh * W + (size_t)j * sw; }
};

// One window slot of one output, resolved through the tables. Kept as separate 32-bit
// row/column (not a flat offset) so that nothing needs a 64-bit division to recover them.
struct Slot {
  int ny, nx;     // input row/column the slot looks at; -1 when outside the image
  int ay, ax;     // bias/rel table row and column (SASA's split rel reads them apart)
  int tab;        // flat bias/rel table index ay*tw + ax
  __device__ bool valid() const { return (ny | nx) >= 0; }
  // Flat input offset ny*W + nx (valid slots only), 64-bit: planes may pass 2^31 elements.
  __device__ size_t in(int W) const { return (size_t)ny * W + nx; }
};

__device__ __forceinline__ Slot slot_of(const Window& w, int i, int j, int ty, int tx) {
  Slot s;
  s.ny = w.rows_pos[i * w.kh + ty];
  s.nx = w.cols_pos[j * w.kw + tx];
  s.ay = w.rows_tab[i * w.kh + ty];
  s.ax = w.cols_tab[j * w.kw + tx];
  s.tab = s.ay * w.tw + s.ax;
  return s;
}

// Does a slot take part in the softmax? Invalid slots do only with border="zeros".
__device__ __forceinline__ bool takes_part(const Window& w, const Slot& s) { return s.valid() || w.zeros; }

// ---------------------------------------------------------------------------------------
// Blocks: blockIdx.x = plane * tiles + tile; a tile is blockDim.y x blockDim.x positions of
// a rows x cols plane, threadIdx.x along columns (contiguous in memory: coalesced).
// Everything is flattened into grid x (2^31-1 blocks) because grid y/z stop at 65535.
// ---------------------------------------------------------------------------------------
struct TilePos {
  int block;         // block index in the whole grid (blockIdx.x + the launch's first block)
  int plane;         // which (batch, head[, chunk]) plane
  int row0, col0;    // first row/column of the tile
  int r, c;          // this thread's row/column
  bool inside;       // (r, c) lies in the plane
  int tid;           // linear thread index in the block
};

// 32-bit index math is enough here: the grid has < 2^31 blocks (the host checks its size).
// `first_block` > 0 when the host splits one grid into several launches (global scratch).
__device__ __forceinline__ TilePos tile_pos(int rows, int cols, int first_block = 0) {
  const unsigned tiles_x = (cols + blockDim.x - 1) / blockDim.x;
  const unsigned tiles_y = (rows + blockDim.y - 1) / blockDim.y;
  const unsigned block = blockIdx.x + (unsigned)first_block;
  const unsigned tiles = tiles_x * tiles_y, tile = block % tiles;
  TilePos p;
  p.block = (int)block;
  p.plane = (int)(block / tiles);
  p.row0 = (int)((tile / tiles_x) * blockDim.y);
  p.col0 = (int)((tile % tiles_x) * blockDim.x);
  p.r = p.row0 + (int)threadIdx.y;
  p.c = p.col0 + (int)threadIdx.x;
  p.inside = p.r < rows && p.c < cols;
  p.tid = (int)(threadIdx.y * blockDim.x + threadIdx.x);
  return p;
}

// Flags of the optional inputs (kernel argument `flags`), uniform over a launch. rel comes
// in one of two forms: kHasRel, the full table (heads, Dqk, th*tw) in `rel`; or
// kHasRelSplit, SASA's factored form, never expanded: `rel` holds rel_h (heads, Dqk/2, th)
// for channels d < Dqk/2, `rel_w` holds rel_w (heads, Dqk/2, tw) for the others
// (RelOfHead). kHasAnyRel: either form.
enum Flags { kHasBias = 1, kHasRel = 2, kHasKeyBias = 4, kHasRelSplit = 8, kHasAnyRel = kHasRel | kHasRelSplit };

// The flags a tiled kernel of key chunk CK serves. The host sends SASA's split rel to the
// CK > 1 configuration only (_kernel_ops._tiled_plan), so the CK = 1 kernels (LR-Net's) drop
// the bit at compile time: their split-rel code is dead and costs them no registers.
template <int CK> __device__ __forceinline__ int tiled_flags(int flags) {
  return CK > 1 ? flags : (flags & ~kHasRelSplit);
}

// One head's rel in either form (Flags), for the kernels that read it per (slot, channel).
template <class T>
struct RelOfHead {
  const T* __restrict__ a;   // kHasRel: rel[h] (Dqk, th*tw); kHasRelSplit: rel_h[h] (Dqk/2, th)
  const T* __restrict__ b;   // kHasRelSplit: rel_w[h] (Dqk/2, tw)
  int half, th, tw;
  __device__ RelOfHead(const T* __restrict__ rel, const T* __restrict__ rel_w, int h, int dqk, const Window& w,
                       int flags)
      : half(dqk / 2), th(w.th), tw(w.tw) {
    const bool split = (flags & kHasRelSplit) != 0;
    a = rel + (size_t)h * (split ? (size_t)half * th : (size_t)dqk * th * tw);
    b = rel_w + (split ? (size_t)h * half * tw : 0);
  }
  // A split rel at a and b as they are (stage_split_rel_head's copy in shared memory).
  __device__ RelOfHead(const T* __restrict__ a_, const T* __restrict__ b_, int half_, int th_, int tw_)
      : a(a_), b(b_), half(half_), th(th_), tw(tw_) {}
  // Channel d's rel at table row ay, column ax (with kHasAnyRel only).
  __device__ acc_t<T> at(int d, int ay, int ax, int flags) const {
    if (flags & kHasRelSplit) return d < half ? load(a, (size_t)d * th + ay) : load(b, (size_t)(d - half) * tw + ax);
    return load(a, ((size_t)d * th + ay) * tw + ax);
  }
  // The channels of one slot as two runs, so that a channel loop needs no branch per
  // channel: run 0 is channels [0, end(0)), run 1 [end(0), Dqk); channel d of run r reads
  // entry[(d - first) * step(r)] of entry = start(r, ...). The full table is one run.
  __device__ int end0(int dqk, int flags) const { return (flags & kHasRelSplit) ? half : dqk; }
  __device__ const T* start(int r, int ay, int ax, int flags) const {
    if (flags & kHasRelSplit) return r == 0 ? a + ay : b + ax;
    return a + (size_t)ay * tw + ax;
  }
  __device__ int step(int r, int flags) const { return (flags & kHasRelSplit) ? (r == 0 ? th : tw) : th * tw; }
};

// A key whose key_bias is -inf is removed (docs/contract.md "Per-key logit"): every slot
// that looks at it is handled like an invalid slot under border="mask": no logit, weight 0,
// and nothing it reads (k, v, even NaN or inf) reaches out, lse or any gradient. Only with
// kHasKeyBias (uniform over the launch): without key_bias nothing is loaded here.
template <class T>
__device__ __forceinline__ bool key_removed(const Window& w, const Slot& s, int flags,
                                            const T* __restrict__ kbias) {
  return (flags & kHasKeyBias) && s.valid() && load(kbias, s.in(w.W)) == neg_inf<acc_t<T>>();
}

// takes_part, and the slot's key is not removed: the slots of the general kernels' softmax.
template <class T>
__device__ __forceinline__ bool takes_part(const Window& w, const Slot& s, int flags,
                                           const T* __restrict__ kbias) {
  return takes_part(w, s) && !key_removed(w, s, flags, kbias);
}

// ---------------------------------------------------------------------------------------
// Similarity functions (docs/contract.md "Similarity functions"): the logit sums phi(q_c, k_c) over a
// head's channels. A template parameter of the general kernels (default kDot), so that the
// kDot instantiations compile to exactly the dot-product code they had before similarities
// existed: Sim<kDot>::phi(q, k) is the expression `q * k`. Order: _geometry.SIMILARITIES.
// dq/dk are the partial derivatives; |x| has the subgradient sign(0) = 0 at 0.
// ---------------------------------------------------------------------------------------
enum Similarity {
  kDot = 0, kKey = 1, kNegAbs = 2, kNegAbsNormalized = 3, kNegSquareNormalized = 4, kNegSquare = 5
};

template <class A> __device__ __forceinline__ A sign_of(A x) { return A((x > A(0)) - (x < A(0))); }
template <class A> __device__ __forceinline__ A abs_of(A x) { return x < A(0) ? -x : x; }

template <int SIM> struct Sim;
template <> struct Sim<kDot> {
  template <class A> static __device__ __forceinline__ A phi(A q, A k) { return q * k; }
  template <class A> static __device__ __forceinline__ A dq(A q, A k) { return k; }
  template <class A> static __device__ __forceinline__ A dk(A q, A k) { return q; }
};
template <> struct Sim<kKey> {
  template <class A> static __device__ __forceinline__ A phi(A q, A k) { return k; }
  template <class A> static __device__ __forceinline__ A dq(A q, A k) { return A(0); }
  template <class A> static __device__ __forceinline__ A dk(A q, A k) { return A(1); }
};
template <> struct Sim<kNegAbs> {
  template <class A> static __device__ __forceinline__ A phi(A q, A k) { return -abs_of(q - k); }
  template <class A> static __device__ __forceinline__ A dq(A q, A k) { return -sign_of(q - k); }
  template <class A> static __device__ __forceinline__ A dk(A q, A k) { return sign_of(q - k); }
};
template <> struct Sim<kNegAbsNormalized> {   // -|q-k| / (|q|+|k|+1)
  template <class A> static __device__ __forceinline__ A phi(A q, A k) {
    return -abs_of(q - k) / (abs_of(q) + abs_of(k) + A(1));
  }
  template <class A> static __device__ __forceinline__ A dq(A q, A k) {
    const A den = abs_of(q) + abs_of(k) + A(1);
    return -sign_of(q - k) / den + abs_of(q - k) / (den * den) * sign_of(q);
  }
  template <class A> static __device__ __forceinline__ A dk(A q, A k) {
    const A den = abs_of(q) + abs_of(k) + A(1);
    return sign_of(q - k) / den + abs_of(q - k) / (den * den) * sign_of(k);
  }
};
template <> struct Sim<kNegSquareNormalized> {   // -(q-k)^2 / (|q k|+1)
  template <class A> static __device__ __forceinline__ A phi(A q, A k) {
    return -(q - k) * (q - k) / (abs_of(q * k) + A(1));
  }
  template <class A> static __device__ __forceinline__ A dq(A q, A k) {
    const A d = q - k, den = abs_of(q * k) + A(1);
    return A(-2) * d / den + d * d / (den * den) * sign_of(q * k) * k;
  }
  template <class A> static __device__ __forceinline__ A dk(A q, A k) {
    const A d = q - k, den = abs_of(q * k) + A(1);
    return A(2) * d / den + d * d / (den * den) * sign_of(q * k) * q;
  }
};
template <> struct Sim<kNegSquare> {
  template <class A> static __device__ __forceinline__ A phi(A q, A k) { return -(q - k) * (q - k); }
  template <class A> static __device__ __forceinline__ A dq(A q, A k) { return A(-2) * (q - k); }
  template <class A> static __device__ __forceinline__ A dk(A q, A k) { return A(2) * (q - k); }
};

// The weight exp(logit - lse) of a slot, exactly 0 for a -inf logit: also in a window where
// no slot takes part (every logit -inf, lse -inf: docs/contract.md "Empty windows"), where the plain
// formula would give exp(-inf - -inf) = NaN. NaN logits or lse still give NaN.
template <class A>
__device__ __forceinline__ A weight_from_lse(A logit, A lse) {
  return logit == neg_inf<A>() ? A(0) : acc_exp(logit - lse);
}

// The logit of one slot: scale * sum_c phi(q_c, k_c + rel_c) + bias + key_bias (docs/contract.md
// "Logits"); an invalid slot has key 0 and key_bias 0; rel exists for kDot only. `qc`, `kb`:
// channel 0 of this head's q at the centre / k plane, channel stride HW; `kbias`: this
// plane's key_bias (read only with kHasKeyBias).
template <int SIM = kDot, class T>
__device__ __forceinline__ acc_t<T> slot_logit(const Window& w, const Slot& s, const T* __restrict__ qc,
                                               const T* __restrict__ kb, const RelOfHead<T>& rel_h,
                                               const T* __restrict__ bias_h, int dqk, int flags,
                                               acc_t<T> scale, const T* __restrict__ kbias = nullptr) {
  using A = acc_t<T>;
  const size_t hw = w.in_plane();
  A dot = 0;
  for (int r = 0, d = 0; r < 2; ++r) {   // the two runs of RelOfHead (one without split rel)
    const int first = d, end = r == 0 ? rel_h.end0(dqk, flags) : dqk, step = rel_h.step(r, flags);
    const T* rel_at = rel_h.start(r, s.ay, s.ax, flags);
    for (; d < end; ++d) {
      A key = s.valid() ? load(kb, d * hw + s.in(w.W)) : A(0);
      if (SIM == kDot && (flags & kHasAnyRel)) key += load(rel_at, (size_t)(d - first) * step);
      dot += Sim<SIM>::phi(load(qc, d * hw), key);
    }
  }
  A logit = scale * dot;
  if (flags & kHasBias) logit += load(bias_h, (size_t)s.tab);
  if ((flags & kHasKeyBias) && s.valid()) logit += load(kbias, s.in(w.W));
  return logit;
}

// ---------------------------------------------------------------------------------------
// Halo staging of the fast (tiled) paths: the input region the windows of one tile of
// outputs touch, one chunk of channels at a time, in shared memory as A.
// ---------------------------------------------------------------------------------------
// The top-left input position of the halo of this tile: the smallest valid position any
// slot of any output in the tile looks at, per axis (tables are per axis, so this is cheap).
// Each warp computes it on its own: its lanes split the count x k entries and reduce with
// __reduce_min_sync (every lane of the warp must call this; the tiled blocks are whole warps).
__device__ __forceinline__ int halo_origin(const int* __restrict__ pos, int first, int count, int total,
                                           int k) {
  const int n = (min(first + count, total) - first) * k;   // the entries pos[first * k ..]
  const int lane = (int)((threadIdx.y * blockDim.x + threadIdx.x) & 31);
  int lo = 0x7fffffff;
  for (int idx = lane; idx < n; idx += 32) {
    const int at = pos[first * k + idx];
    if (at >= 0) lo = min(lo, at);
  }
  return __reduce_min_sync(0xffffffffu, lo);
}

// The staged chunk's layout. A chunk of C channels is stored in channel groups of G: the G
// channels of one halo position are contiguous, halo[g][pos][G] (group g at g * G * area),
// so an inner loop reads all G channels of a slot with one 8- or 16-byte shared load
// (LDS.64/128) instead of G 4-byte loads. A warp's 16-byte request over contiguous positions
// costs 4 wavefronts (8 lanes each), the minimum for 512 bytes, whatever the tile's width
// and the halo's pitch: the 16-lane rows of a 16 x 8 tile (halo_w apart) no longer meet in
// a bank. G is the largest of 4, 2, 1 that divides C and fits 16 bytes of A. Channels past
// the chunk's end (a tail chunk, nch < C) are staged as 0, so the inner loops need no
// per-channel predicate: they add 0 * 0 there and store only channels < nch.
template <class A, int G> struct VecOf;
template <> struct VecOf<float, 1> { using type = float; };
template <> struct VecOf<float, 2> { using type = float2; };
template <> struct VecOf<float, 4> { using type = float4; };
template <> struct VecOf<double, 1> { using type = double; };
template <> struct VecOf<double, 2> { using type = double2; };

template <class A, int C> struct ChunkLayout {
  static constexpr int G = (C % 4 == 0 && 4 * sizeof(A) <= 16) ? 4 : (C % 2 == 0 && 2 * sizeof(A) <= 16) ? 2 : 1;
  static constexpr int groups = C / G;
  using V = typename VecOf<A, G>::type;
};

// One vector access (see cudasim_load_wide: on the CPU engine a plain struct copy would be
// split, and profiled as several requests). Lines marked "profile: caller's line" are
// attributed to the line that calls the helper (cupy_localrel/_sim/profile.py).
template <class V> __device__ __forceinline__ V load_wide(const V* p) {
#ifdef CUDASIM
  return cudasim_load_wide(p);   // profile: caller's line
#else
  return *p;   // profile: caller's line
#endif
}
template <class V> __device__ __forceinline__ void store_wide(V* p, const V& v) {
#ifdef CUDASIM
  cudasim_store_wide(p, v);   // profile: caller's line
#else
  *p = v;   // profile: caller's line
#endif
}
__device__ __forceinline__ float load_wide(const float* p) { return *p; }   // profile: caller's line
__device__ __forceinline__ double load_wide(const double* p) { return *p; }   // profile: caller's line
__device__ __forceinline__ void store_wide(float* p, float v) { *p = v; }   // profile: caller's line
__device__ __forceinline__ void store_wide(double* p, double v) { *p = v; }   // profile: caller's line

// Vector <-> G consecutive accumulators.
__device__ __forceinline__ void unpack(float v, float* d) { d[0] = v; }
__device__ __forceinline__ void unpack(float2 v, float* d) { d[0] = v.x; d[1] = v.y; }
__device__ __forceinline__ void unpack(float4 v, float* d) { d[0] = v.x; d[1] = v.y; d[2] = v.z; d[3] = v.w; }
__device__ __forceinline__ void unpack(double v, double* d) { d[0] = v; }
__device__ __forceinline__ void unpack(double2 v, double* d) { d[0] = v.x; d[1] = v.y; }
template <class V> struct Packer;
template <> struct Packer<float> { static __device__ __forceinline__ float of(const float* s) { return s[0]; } };
template <> struct Packer<float2> {
  static __device__ __forceinline__ float2 of(const float* s) { return make_float2(s[0], s[1]); }
};
template <> struct Packer<float4> {
  static __device__ __forceinline__ float4 of(const float* s) { return make_float4(s[0], s[1], s[2], s[3]); }
};
template <> struct Packer<double> { static __device__ __forceinline__ double of(const double* s) { return s[0]; } };
template <> struct Packer<double2> {
  static __device__ __forceinline__ double2 of(const double* s) { return make_double2(s[0], s[1]); }
};

// dst[c] = channel c of the staged chunk at halo position hs (>= 0), c < C: C / G wide loads.
template <int C, class A>
__device__ __forceinline__ void halo_channels(const A* __restrict__ halo, int halo_area, int hs, A (&dst)[C]) {
  using L = ChunkLayout<A, C>;
  const typename L::V* at = reinterpret_cast<const typename L::V*>(halo) + hs;
#pragma unroll
  for (int g = 0; g < L::groups; ++g)
    unpack(load_wide(at + (size_t)g * halo_area), dst + g * L::G);   // profile: caller's line
}

// As halo_channels, or all 0 where the slot lies outside (hs < 0).
template <int C, class A>
__device__ __forceinline__ void halo_channels_or_zero(const A* __restrict__ halo, int halo_area, int hs,
                                                      A (&dst)[C]) {
  if (hs >= 0) {
    halo_channels<C>(halo, halo_area, hs, dst);   // profile: caller's line
  } else {
#pragma unroll
    for (int c = 0; c < C; ++c) dst[c] = A(0);
  }
}

// Elements of T a lane stages per halo row step: 2 for half/bfloat16 (one __half2 /
// __nv_bfloat162 global load per channel where the pair is aligned), else 1 (4-byte loads of
// neighbouring lanes already fill whole sectors).
template <class T> struct StagePair { static constexpr int n = 1; };
template <> struct StagePair<__half> { static constexpr int n = 2; };
template <> struct StagePair<__nv_bfloat16> { static constexpr int n = 2; };

// One 4-byte load of an aligned pair (through load_wide: the CPU engine would split the
// struct into two 2-byte loads).
__device__ __forceinline__ float2 load_pair(const __half* p) {
  return __half22float2(load_wide(reinterpret_cast<const __half2*>(p)));   // profile: caller's line
}
__device__ __forceinline__ float2 load_pair(const __nv_bfloat16* p) {
  return __bfloat1622float2(load_wide(reinterpret_cast<const __nv_bfloat162*>(p)));   // profile: caller's line
}

// Copy channels [0, nch) of `src` (channel c at src + c * src_stride, row pitch W) over the
// halo (top-left input (y0, x0)) into shared memory in ChunkLayout<A, C>; positions past the
// image edge and channels nch..C-1 become 0. Row by row: each warp takes whole halo rows of
// one channel group (one division per row, none per element), its lanes walk the row's
// columns, so every global request is one contiguous run of a row; each lane loads its
// position's G channels and stores them with one wide shared store. Half/bfloat16 lanes load
// column pairs, aligned to an even element address (a lone column at an odd start or at the
// row's end loads alone), so nothing past the row (or the image) is read.
template <int C, class T>
__device__ __forceinline__ void stage_halo(acc_t<T>* __restrict__ halo, const T* __restrict__ src, size_t src_stride,
                                           const Window& w, int y0, int x0, int halo_h, int halo_w, int nch,
                                           int tid, int nthreads) {
  using A = acc_t<T>;
  using L = ChunkLayout<A, C>;
  using V = typename L::V;
  constexpr int P = StagePair<T>::n;
  const int lane = tid & 31, warp = tid >> 5, warps = (nthreads + 31) >> 5;
  const int area = halo_h * halo_w;
  const int x_end = min(x0 + halo_w, w.W);   // columns [x0, x_end) lie in the image
  V* out = reinterpret_cast<V*>(halo);
  for (int row = warp; row < L::groups * halo_h; row += warps) {
    const int g = row / halo_h, hy = row - g * halo_h, y = y0 + hy;
    const bool in_rows = y < w.H;
    V* dst = out + (size_t)g * area + (size_t)hy * halo_w;   // position (hy, 0) of group g
    const T* row_src = src + (size_t)(in_rows ? y : 0) * w.W;
    // Pairs start at an even element address (P = 2): column xa, x0 or x0 - 1 (the group's
    // first channel decides; a channel of the other parity, odd H*W, loads singly).
    const int xa = x0 - (P == 2 ? (int)((reinterpret_cast<unsigned long long>(row_src + x0) / sizeof(T)) & 1) : 0);
    for (int x = xa + lane * P; x < x0 + halo_w; x += 32 * P) {
      A v[P][L::G];
#pragma unroll
      for (int e = 0; e < L::G; ++e) {
        const int c = g * L::G + e;
        const bool live = in_rows && c < nch;
        const T* at = row_src + (size_t)c * src_stride + x;
        bool paired = false;
        if constexpr (P == 2) {   // an aligned pair inside the row: one 4-byte load
          paired = live && x >= x0 && x + 1 < x_end &&
                   (reinterpret_cast<unsigned long long>(at) & (2 * sizeof(T) - 1)) == 0;
          if (paired) {
            const float2 f = load_pair(at);
            v[0][e] = f.x;
            v[1][e] = f.y;
          }
        }
        if (!paired) {
#pragma unroll
          for (int i = 0; i < P; ++i)
            v[i][e] = live && x + i >= x0 && x + i < x_end ? load(at, (size_t)i) : A(0);
        }
      }
#pragma unroll
      for (int i = 0; i < P; ++i)
        if (x + i >= x0 && x + i < x0 + halo_w) store_wide(dst + (x + i - x0), Packer<V>::of(v[i]));
    }
  }
}

// `base + n` rounded up to the next 16-byte boundary, for `base` itself 16-byte aligned (the
// dynamic shared memory): where a tiled kernel's halo starts, for its wide loads. Pointer
// arithmetic only (a round trip through an integer would hide from the compiler that the
// pointer is shared, and turn every halo access into a generic one). The host's plan
// (_kernel_ops._tiled_plan) rounds the bytes before the halo up the same way.
template <class A> __device__ __forceinline__ A* align16(A* base, size_t n) {
  constexpr size_t per = 16 / sizeof(A);
  return base + (n + per - 1) / per * per;
}

// The staging buffer of a tiled kernel (floats): one chunk of max(CK, CV) channels over the
// halo, and, with rel, CK channels of the head's rel table right after the first CK halo
// channels (inside the room a value chunk leaves during key phases where that is enough).
// The host's plan (_kernel_ops._tiled_plan) sizes shared memory the same way.
template <int CK, int CV>
__device__ __forceinline__ int staging_floats(int halo_area, int tt, int flags) {
  const int chunk = (CK > CV ? CK : CV) * halo_area, with_rel = CK * (halo_area + tt);
  return (flags & kHasRel) && with_rel > chunk ? with_rel : chunk;
}

// Copy channels [c0, c0 + nch) of one head's rel table (channel stride tt: contiguous) into
// shared memory: every (slot, channel) of a chunk then reads rel there, not from global
// memory (one broadcast wavefront where the lanes share a table index, as inside the image).
template <class T>
__device__ __forceinline__ void stage_rel(acc_t<T>* __restrict__ rels, const T* __restrict__ rel_h, int tt,
                                          int c0, int nch, int tid, int nthreads) {
  const T* src = rel_h + (size_t)c0 * tt;
  for (int i = tid; i < nch * tt; i += nthreads) rels[i] = load(src, (size_t)i);
}

// ---------------------------------------------------------------------------------------
// The window (or users) tables of one tile, re-expressed in shared memory as offsets into
// the tile's halo, filled once per block. Along each axis, entry [s][l] belongs to slot
// (or user) s of the tile's l-th row/column: its halo offset (row part: times halo_w), or
// kOutside when it looks outside the image, and its bias/rel table index. A slot then costs
// two shared loads and an add, instead of four table loads and their index arithmetic in
// every phase: the tiled kernels are bound by such integer work more than by their data.
// ---------------------------------------------------------------------------------------
constexpr int kOutside = -(1 << 29);   // any sum with a valid offset (< 2^28) stays negative

struct TileAxis {
  int* off;   // [slots][n]
  int* tab;   // [slots][n]
};

// Carve a TileAxis of `slots` x `n` entries from `*cursor` (shared ints), advancing it.
__device__ __forceinline__ TileAxis carve_axis(int*& cursor, int slots, int n) {
  TileAxis a;
  a.off = cursor;
  a.tab = cursor + slots * n;
  cursor += 2 * slots * n;
  return a;
}

// From a window table pair (pos, tab) of shape (total, k): outputs first .. first+n-1.
__device__ __forceinline__ void fill_window_axis(TileAxis a, const int* __restrict__ pos,
                                                 const int* __restrict__ tab, int k, int first, int n,
                                                 int total, int origin, int step, int tid, int nthreads) {
  // Lanes walk the tables' rows (contiguous in global memory: coalesced), and store
  // transposed into [slot][n] (a once-per-block fill; the slot loops read it broadcast).
  for (int idx = tid; idx < k * n; idx += nthreads) {
    const int r = idx / k, s = idx - r * k, i = first + r;
    const int at = i < total ? pos[(size_t)first * k + idx] : -1;
    a.off[s * n + r] = at >= 0 ? (at - origin) * step : kOutside;
    a.tab[s * n + r] = i < total ? tab[(size_t)first * k + idx] : 0;
  }
}

// From a users table pair (out, slot) of shape (total, m): inputs first .. first+n-1; the
// offset is that of the user's output, the table index that of its slot (window tab, k).
__device__ __forceinline__ void fill_users_axis(TileAxis a, const int* __restrict__ users_out,
                                                const int* __restrict__ users_slot,
                                                const int* __restrict__ window_tab, int k, int m, int first,
                                                int n, int total, int origin, int step, int tid,
                                                int nthreads) {
  for (int idx = tid; idx < m * n; idx += nthreads) {   // coalesced rows, as fill_window_axis
    const int r = idx / m, s = idx - r * m, y = first + r;
    const int o = y < total ? users_out[(size_t)first * m + idx] : -1;
    a.off[s * n + r] = o >= 0 ? (o - origin) * step : kOutside;
    a.tab[s * n + r] = o >= 0 ? window_tab[o * k + users_slot[(size_t)first * m + idx]] : 0;
  }
}

// This thread's view: slot (sr, sc) -> halo offset (negative: outside) and table index.
struct TileSlots {
  const int *row_off, *row_tab, *col_off, *col_tab;
  int by, bx;
  __device__ TileSlots(TileAxis rows, TileAxis cols)
      : row_off(rows.off + threadIdx.y), row_tab(rows.tab + threadIdx.y), col_off(cols.off + threadIdx.x),
        col_tab(cols.tab + threadIdx.x), by(blockDim.y), bx(blockDim.x) {}
  __device__ int off(int sr, int sc) const { return row_off[sr * by] + col_off[sc * bx]; }
  // The row part of off(sr, .); off(sr, sc) = row(sr) + col(sc). The backward's loops over
  // slots read it (and tab_row) once per slot row: the compiler cannot hoist these shared
  // loads past the loops' own shared stores, which might alias them.
  __device__ int row(int sr) const { return row_off[sr * by]; }
  __device__ int col(int sc) const { return col_off[sc * bx]; }
  __device__ int tab(int sr, int sc, int tw) const { return row_tab[sr * by] * tw + col_tab[sc * bx]; }
  // The table row of slot row sr and the table column of slot column sc, kept apart (split rel).
  __device__ int tab_row(int sr) const { return row_tab[sr * by]; }
  __device__ int tab_col(int sc) const { return col_tab[sc * bx]; }
  // The view of the thread at tile position (ty, tx) instead of this one's.
  __device__ TileSlots at(int ty, int tx) const {
    TileSlots o = *this;
    o.row_off += ty - (int)threadIdx.y;
    o.row_tab += ty - (int)threadIdx.y;
    o.col_off += tx - (int)threadIdx.x;
    o.col_tab += tx - (int)threadIdx.x;
    return o;
  }
};

// The tile's window tables (fill_window_axis, rows then columns) carved from `cursor`
// (shared ints), and this thread's view of them, for a halo whose top-left input is (y0, x0).
// Every thread of the block must call this: it ends in a barrier.
__device__ __forceinline__ TileSlots window_tile_slots(int* cursor, const Window& w, const TilePos& p, int y0,
                                                       int x0, int halo_w, int tile) {
  const TileAxis rows = carve_axis(cursor, w.kh, blockDim.y), cols = carve_axis(cursor, w.kw, blockDim.x);
  fill_window_axis(rows, w.rows_pos, w.rows_tab, w.kh, p.row0, blockDim.y, w.Ho, y0, halo_w, p.tid, tile);
  fill_window_axis(cols, w.cols_pos, w.cols_tab, w.kw, p.col0, blockDim.x, w.Wo, x0, 1, p.tid, tile);
  __syncthreads();
  return TileSlots(rows, cols);
}

// SASA's split rel at one query (kHasRelSplit), rel being rank 2: q . rel at slot (ty, tx)
// = q_rows . rel_h[:, ay(ty)] + q_cols . rel_w[:, ax(tx)], with q_rows/q_cols the query's
// first/second Dqk/2 channels. So the query-side tiled kernels accumulate q . k alone in
// their hot loop, and this thread's kh + kw short dot products go to its column of
// `terms` ([kh + kw][stride], shared: split_rel_floats): row ty's at terms[ty * stride],
// column tx's at terms[(kh + tx) * stride]. `qc`: the query's channel 0, channel stride
// q_stride. Fixed summation order (chunk after chunk of kSplitRelChunk channels).
constexpr int kSplitRelChunk = 8;   // query channels held in registers at a time

// Floats of one head's split rel staged in shared memory (stage_split_rel_head: rel_h's
// Dqk/2 x th entries, then rel_w's Dqk/2 x tw), 0 without split rel.
__device__ __forceinline__ int split_rel_head_floats(const Window& w, int dqk, int flags) {
  return (flags & kHasRelSplit) ? dqk / 2 * (w.th + w.tw) : 0;
}

// Floats of a query-side tiled kernel's split rel buffers (0 without split rel): `terms`
// [kh + kw][stride] (stride: the tile, or tile + 1 in query_grad_tiled), then the head's
// rel_h and rel_w (stage_split_rel_head). The host plans the same (_kernel_ops._split_rel_floats).
__device__ __forceinline__ int split_rel_floats(const Window& w, int dqk, int stride, int flags) {
  return (flags & kHasRelSplit) ? (w.kh + w.kw) * stride + split_rel_head_floats(w, dqk, flags) : 0;
}

// One head's split rel copied into shared memory (`dst`: rel_h's Dqk/2 x th entries, then
// rel_w's Dqk/2 x tw), once per block: the tiled kernels read every entry once per query
// (key side: per user row or column), and from global memory that was one (uniform)
// request per entry and warp.
// Returns the copy's view; every thread of the block must call this, and a barrier must
// come before the view is read.
template <class T>
__device__ __forceinline__ RelOfHead<acc_t<T>> stage_split_rel_head(acc_t<T>* __restrict__ dst,
                                                                   const RelOfHead<T>& rel, int tid, int nthreads) {
  const int na = rel.half * rel.th, n = na + rel.half * rel.tw;
  for (int i = tid; i < n; i += nthreads) dst[i] = i < na ? load(rel.a, i) : load(rel.b, i - na);
  return RelOfHead<acc_t<T>>(dst, dst + na, rel.half, rel.th, rel.tw);
}

template <class T, class R>
__device__ __forceinline__ void split_rel_terms(acc_t<T>* __restrict__ terms, int stride, const T* __restrict__ qc,
                                                size_t q_stride, const RelOfHead<R>& rel, const TileSlots& ts,
                                                int kh, int kw) {
  using A = acc_t<T>;
  for (int i = 0; i < kh + kw; ++i) terms[(size_t)i * stride] = 0;
  for (int d0 = 0; d0 < rel.half; d0 += kSplitRelChunk) {
    const int n = min(kSplitRelChunk, rel.half - d0);
    for (int axis = 0; axis < 2; ++axis) {   // rows (rel_h, first half), then columns
      const R* table = axis == 0 ? rel.a : rel.b;
      const int entries = axis == 0 ? rel.th : rel.tw, count = axis == 0 ? kh : kw;
      A qr[kSplitRelChunk];
#pragma unroll
      for (int d = 0; d < kSplitRelChunk; ++d)
        qr[d] = d < n ? load(qc, (size_t)(axis * rel.half + d0 + d) * q_stride) : A(0);
      for (int i = 0; i < count; ++i) {
        const int at = axis == 0 ? ts.tab_row(i) : ts.tab_col(i);
        A dot = 0;
#pragma unroll
        for (int d = 0; d < kSplitRelChunk; ++d)
          if (d < n) dot += qr[d] * load(table, (size_t)(d0 + d) * entries + at);
        terms[(size_t)(axis * kh + i) * stride] += dot;
      }
    }
  }
}

// mine[slot (ty, tx)] += terms[ty] + terms[kh + tx]: split_rel_terms' products added to
// this thread's per-slot logits (mine: stride `stride`, terms: stride `terms_stride`).
template <class A>
__device__ __forceinline__ void add_split_rel_terms(A* __restrict__ mine, int stride, const A* __restrict__ terms,
                                                    int terms_stride, int kh, int kw) {
  for (int ty = 0; ty < kh; ++ty) {
    const A row = terms[(size_t)ty * terms_stride];
    for (int tx = 0; tx < kw; ++tx) mine[(size_t)(ty * kw + tx) * stride] += row + terms[(size_t)(kh + tx) * terms_stride];
  }
}

// ---------------------------------------------------------------------------------------
// Chunked phases of the tiled kernels. Each thread owns one column of a per-slot array in
// shared memory (`mine`: entry s at mine[s * stride], stride >= tile; chunked_slot_logits
// and chunked_slot_dots overwrite it: the first chunk stores, later chunks add) over an nr x nc grid of slots (window
// slots, or users) listed by `ts`. Every channel chunk is staged over the tile's halo (from
// `src`, channel stride `src_stride`) between two barriers, so every thread of the block
// must call these (threads outside the plane only help staging). Sums run over the slots
// in (row, column) order, then over the channels of a chunk in order, chunk after chunk.
// ---------------------------------------------------------------------------------------
// Full-chunk specialisation: body(FullChunk<true>{}) when the chunk holds all C channels
// (the common case), body(FullChunk<false>{}) for a tail, so that a loop's channel guards
// (`FULL || d < nch`) vanish from the full chunk's code.
template <bool B> struct FullChunk { static constexpr bool value = B; };
template <class Body> __device__ __forceinline__ void by_chunk_fill(bool full, Body&& body) {
  if (full) body(FullChunk<true>{});
  else body(FullChunk<false>{});
}

// mine[s] += sum_d x[d] * (halo_d[s] + rel_d[s]) over nch channels, where x (this thread's
// own vector, channel stride x_stride) multiplies each slot's halo entry, or 0 where the
// slot lies outside (ts.off < 0), plus its rel entry (flags & kHasRel). The logits of the
// query-side tiled kernels: x = the query, halo = the keys. With rel, each chunk of rel_h
// (global) is staged into `rels` (shared, C x th*tw) next to the halo.
// FULL (nch == C, the common case): no channel predicate at all; a tail chunk only guards
// its rel reads (the staged halo is 0 past nch, the rel chunk is not).
template <bool FULL, int C, class A>
__device__ __forceinline__ void slot_logits_chunk(A* __restrict__ mine, const A* __restrict__ halo,
                                                  const A* __restrict__ rels, const A (&xreg)[C], int flags,
                                                  int nch, bool first, const Window& w, const TileSlots& ts,
                                                  int nr, int nc, int halo_area, int stride) {
  const size_t tt = (size_t)w.th * w.tw;
  for (int sr = 0; sr < nr; ++sr) {
    const int row = ts.row(sr);
    for (int sc = 0; sc < nc; ++sc) {
      const int hs = row + ts.col(sc);
      const int tab = (flags & kHasRel) ? ts.tab(sr, sc, w.tw) : 0;   // once per slot, not per channel
      A key[C];
      halo_channels_or_zero<C>(halo, halo_area, hs, key);
      A dot = 0;
#pragma unroll
      for (int d = 0; d < C; ++d) {   // fully unrolled: xreg and key stay in registers
        if ((flags & kHasRel) && (FULL || d < nch)) key[d] += rels[d * tt + tab];
        dot += xreg[d] * key[d];
      }
      A& m = mine[(size_t)(sr * nc + sc) * stride];
      m = first ? dot : m + dot;
    }
  }
}

// ---------------------------------------------------------------------------------------
// Register blocking of the tiled kernels' hot loops (two outputs per thread). In a blocked
// phase the threads are remapped (RowPair): each takes two outputs of one tile column, tile
// rows 2i and 2i+1, and a half g of the work (the weighted sums: half the chunk's channels;
// the per-slot dots: every other slot column). The two halves of one row pair are
// neighbours (g is the bit above tx): in a 16-wide tile one warp is one row pair. (With g
// above the pair index, a warp held two row pairs, whose per-slot entries lie 2 * 16 words
// apart: one bank, 2-way conflicts on the weighted sums' weight loads.) Only for even tile
// heights (blockDim.y, uniform over the block); otherwise one output per thread.
// ---------------------------------------------------------------------------------------
struct RowPair {
  int g;          // this thread's half of the work (0 unpaired)
  int tx, ty_a;   // output a at tile position (ty_a, tx); paired, output b at (ty_a + 1, tx)
  int r_a, c;     // output a's row and column in the plane
  bool in_a, in_b;   // the outputs lie in the rows x cols plane (b: paired only)
  __device__ RowPair(bool pairs, const TilePos& p, int rows, int cols) {
    const int bx = (int)blockDim.x;
    g = pairs ? (p.tid / bx) % 2 : 0;
    tx = pairs ? p.tid % bx : (int)threadIdx.x;
    ty_a = pairs ? 2 * (p.tid / (2 * bx)) : (int)threadIdx.y;
    r_a = p.row0 + ty_a;
    c = p.col0 + tx;
    in_a = r_a < rows && c < cols;
    in_b = pairs && r_a + 1 < rows && c < cols;
  }
};

// Visit the halo rows of two outputs of one tile column (TileSlots views ta, tb; b only if
// with_b) in a merge of their slot rows' halo offsets (two cursors): visit(row, sa, sb,
// use_a, use_b) once per step, for a row both look at (use_a and use_b: slot rows sa of a,
// sb of b) or a row only one looks at. Each output still meets its own slot rows in order.
// A slot row outside the image (offset < 0) is visited alone where visit_outside, else
// skipped.
template <class Visit>
__device__ __forceinline__ void merge_slot_rows(const TileSlots& ta, const TileSlots& tb, int nr, bool with_b,
                                                bool visit_outside, Visit&& visit) {
  constexpr int kDone = 0x7fffffff;   // past a cursor's end, or no second output
  int sa = 0, sb = 0;
  while (true) {
    const int ra = sa < nr ? ta.row(sa) : kDone, rb = with_b && sb < nr ? tb.row(sb) : kDone;
    if (ra == kDone && rb == kDone) break;
    const bool use_a = ra < 0 || (rb >= 0 && ra <= rb), use_b = !use_a || ra == rb;
    if (visit_outside || (use_a ? ra : rb) >= 0) visit(use_a ? ra : rb, sa, sb, use_a, use_b);
    sa += use_a;
    sb += use_b;
  }
}

// One halo row of the blocked logits for up to two outputs of one tile column (use_a,
// use_b: which ones look at halo row `row`, as their slot rows sa and sb): for the slot
// columns sc = sc0, sc0 + 2, ... < nc, mine_a[(sa * nc + sc) * stride] = (first ? 0 :
// itself) + sum_d xa[d] * key_d, d in order, key = the halo at row + col(sc) or 0 outside
// (b alike with xb): each key vector is loaded once for both.
template <int C, class A>
__device__ __forceinline__ void slot_logits_row(A* __restrict__ mine_a, A* __restrict__ mine_b,
                                                const A* __restrict__ halo, int halo_area, const TileSlots& ts,
                                                int row, int sa, int sb, bool use_a, bool use_b, const A (&xa)[C],
                                                const A (&xb)[C], bool first, int sc0, int nc, int stride) {
  A* ma = mine_a + (size_t)sa * nc * stride;
  A* mb = mine_b + (size_t)sb * nc * stride;
#pragma unroll 1
  for (int sc = sc0; sc < nc; sc += 2) {
    const int hs = row + ts.col(sc);
    A& a = ma[(size_t)sc * stride];
    A& b = mb[(size_t)sc * stride];
    A key[C];
    halo_channels_or_zero<C>(halo, halo_area, hs, key);
    A dot_a = 0, dot_b = 0;
#pragma unroll
    for (int d = 0; d < C; ++d) {
      dot_a += xa[d] * key[d];
      dot_b += xb[d] * key[d];
    }
    if (use_a) a = first ? dot_a : a + dot_a;
    if (use_b) b = first ? dot_b : b + dot_b;
  }
}

// One staged key chunk of the blocked logits (RowPair rp): this thread's two outputs, every
// other slot column (sc = g, g + 2, ...), over the merge of their halo rows; xa/xb are the
// outputs' queries (xb 0 without b). mine: the per-slot arrays' base (output (ty, tx) owns
// column ty * blockDim.x + tx).
template <int C, class A>
__device__ __forceinline__ void slot_logits_pairs(A* __restrict__ mine, const A* __restrict__ halo, int halo_area,
                                                  const TileSlots& ts, const RowPair& rp, const A (&xa)[C],
                                                  const A (&xb)[C], bool first, int nr, int nc, int stride) {
  const int bx = (int)blockDim.x;
  const TileSlots ta = ts.at(rp.ty_a, rp.tx);
  A* mine_a = mine + rp.ty_a * bx + rp.tx;
  merge_slot_rows(ta, ts.at(rp.ty_a + 1, rp.tx), nr, rp.in_b, true,
                  [&](int row, int sa, int sb, bool use_a, bool use_b) {
                    slot_logits_row<C>(mine_a, mine_a + bx, halo, halo_area, ta, row, sa, sb, use_a, use_b, xa, xb,
                                       first, rp.g, nc, stride);
                  });
}

// C channels c0 .. c0 + nch of the vector of the output at plane position (r, c): x_at(r, c)
// is its channel 0, channel stride x_stride; 0 past nch.
template <int C, class A, class XAt>
__device__ __forceinline__ void load_vector(A (&x)[C], const XAt& x_at, int r, int c, size_t x_stride, int c0,
                                            int nch) {
  const auto* at = x_at(r, c);
#pragma unroll
  for (int d = 0; d < C; ++d) x[d] = d < nch ? load(at, (size_t)(c0 + d) * x_stride) : A(0);
}

// A row pair's vectors xa, xb (outputs a, b of RowPair rp; xb 0 without b), channels c0 ..
// c0 + nch, for pairs_in_warps(): each lane loads its own output's vector (p.r, p.c: one
// global request per channel and warp, as unpaired) and the pair takes them by warp
// shuffles. (Loading both in every thread doubled the global requests, and the model's
// latency term with them.) Every thread of the block must call this (the shuffles).
template <int C, class A, class XAt>
__device__ __forceinline__ void pair_vectors(A (&xa)[C], A (&xb)[C], const XAt& x_at, const TilePos& p,
                                             const RowPair& rp, size_t x_stride, int c0, int nch) {
  const int bx = (int)blockDim.x;
  const auto* at = x_at(p.r, p.c);
  const int n = p.inside ? nch : 0, lane = p.tid % 32, first = lane - lane % (2 * bx);   // the pair's first lane
#pragma unroll
  for (int d = 0; d < C; ++d) {
    const A own = d < n ? load(at, (size_t)(c0 + d) * x_stride) : A(0);
    xa[d] = __shfl_sync(0xffffffffu, own, first + rp.tx);
    xb[d] = __shfl_sync(0xffffffffu, own, first + bx + rp.tx);
  }
}

// Can the per-slot dots be register-blocked? Even tile heights (RowPair), and a row pair in
// one warp (2 * blockDim.x divides 32, whole warps: pair_vectors' shuffles). Uniform.
__device__ __forceinline__ bool pairs_in_warps() {
  return blockDim.y % 2 == 0 && 32 % (2 * blockDim.x) == 0 && (blockDim.x * blockDim.y) % 32 == 0;
}

// The per-slot logits q . (k + rel) of the query-side tiled kernels, over key chunks
// (mine: the per-slot array's base, stride `stride`; x_at(r, c): the query of the output at
// plane position (r, c), channel stride x_stride; rows x cols: the output plane). Without
// a full rel table (kHasRel), for C > 1 and pairs_in_warps(), register-blocked (RowPair,
// slot_logits_pairs: one key vector loaded per halo row and slot column for two queries); the
// sums are bitwise those of one output per thread. (LR-Net's one key channel is not: the
// model showed no gain, and its registers cost the forward a block per SM.) Blocked, a
// thread writes other threads' columns of mine: a closing barrier orders them before the
// caller's reads.
template <int C, class T, class XAt>
__device__ __forceinline__ void chunked_slot_logits(
    acc_t<T>* __restrict__ mine, acc_t<T>* __restrict__ halo, const T* __restrict__ src, size_t src_stride,
    const XAt& x_at, size_t x_stride, const T* __restrict__ rel_h, acc_t<T>* __restrict__ rels,
    int flags, int nch_total,
    const Window& w, const TilePos& p, const TileSlots& ts, int nr, int nc, int y0, int x0, int halo_h,
    int halo_w, int tile, int stride, int rows, int cols) {
  using A = acc_t<T>;
  const int halo_area = halo_h * halo_w;
  const size_t tt = (size_t)w.th * w.tw;
  const bool pairs = C > 1 && !(flags & kHasRel) && pairs_in_warps();   // (one channel: no gain, see below)
  const RowPair rp(pairs, p, rows, cols);
  if (nch_total <= 0 && p.inside)   // no channel: every logit is 0 (before rel, bias)
    for (int sr = 0; sr < nr * nc; ++sr) mine[(size_t)sr * stride + p.tid] = 0;
  for (int c0 = 0; c0 < nch_total; c0 += C) {
    const int nch = min(C, nch_total - c0);
    __syncthreads();   // the previous chunk's readers are done with the halo
    stage_halo<C>(halo, src + (size_t)c0 * src_stride, src_stride, w, y0, x0, halo_h, halo_w, nch, p.tid, tile);
    if (flags & kHasRel) stage_rel(rels, rel_h, (int)tt, c0, nch, p.tid, tile);
    __syncthreads();
    A xa[C], xb[C];
    if (pairs) {
      pair_vectors<C, A>(xa, xb, x_at, p, rp, x_stride, c0, nch);
      if (rp.in_a) slot_logits_pairs<C>(mine, halo, halo_area, ts, rp, xa, xb, c0 == 0, nr, nc, stride);
      continue;
    }
    if (!p.inside) continue;
    load_vector<C, A>(xa, x_at, p.r, p.c, x_stride, c0, nch);
    by_chunk_fill(nch == C, [&](auto full) {
      slot_logits_chunk<decltype(full)::value>(mine + p.tid, halo, rels, xa, flags, nch, c0 == 0, w, ts, nr, nc,
                                               halo_area, stride);
    });
  }
  if (pairs) __syncthreads();
}

// One slot's (or user's) entry of a chunked dot: m = (first ? 0 : m) + sum_c x[c] * the C
// channels of halo position `at`, c in order; outside (at < 0, a slot outside the image or
// a padding user) nothing is added (the first chunk stores 0).
template <int C, class A>
__device__ __forceinline__ void chunk_dot_entry(A& m, const A* __restrict__ halo, int halo_area, int at,
                                                const A (&x)[C], bool first) {
  if (at < 0) {
    if (first) m = 0;
    return;
  }
  A val[C];
  halo_channels<C>(halo, halo_area, at, val);
  A dot = 0;
#pragma unroll
  for (int c = 0; c < C; ++c) dot += x[c] * val[c];
  m = first ? dot : m + dot;
}

// mine[s] = sum_e x[e] * halo_e[s] over the chunks, for the slots inside (ts.off >= 0), 0
// for the others: grad_out . v of each slot (query side; x_at(r, c): grad_out of output
// (r, c)) or each user (key side; v of key (r, c)); mine as in chunked_slot_logits. One
// output per thread: blocked like the logits (pair_vectors' shuffles), the model had
// LR-Net's key_grad_tiled 1373 -> 1439 us and SASA's 1828 -> 1872 (fewer shared loads, more
// instructions), and query_grad_tiled spilled. No channel predicate: the staged halo is 0
// past nch, and so is x.
template <int C, class T, class XAt>
__device__ __forceinline__ void chunked_slot_dots(acc_t<T>* __restrict__ mine, acc_t<T>* __restrict__ halo,
                                                  const T* __restrict__ src, size_t src_stride, const XAt& x_at,
                                                  size_t x_stride, int nch_total, const Window& w, const TilePos& p,
                                                  const TileSlots& ts, int nr, int nc, int y0, int x0, int halo_h,
                                                  int halo_w, int tile, int stride) {
  using A = acc_t<T>;
  const int halo_area = halo_h * halo_w;
  mine += p.tid;   // this thread's column
  if (nch_total <= 0 && p.inside)
    for (int sr = 0; sr < nr * nc; ++sr) mine[(size_t)sr * stride] = 0;
  for (int c0 = 0; c0 < nch_total; c0 += C) {
    const int nch = min(C, nch_total - c0);
    __syncthreads();
    stage_halo<C>(halo, src + (size_t)c0 * src_stride, src_stride, w, y0, x0, halo_h, halo_w, nch, p.tid, tile);
    __syncthreads();
    if (!p.inside) continue;
    A xreg[C];
    load_vector<C, A>(xreg, x_at, p.r, p.c, x_stride, c0, nch);
    for (int sr = 0; sr < nr; ++sr) {
      const int row = ts.row(sr);
      for (int sc = 0; sc < nc; ++sc)
        chunk_dot_entry<C>(mine[(size_t)(sr * nc + sc) * stride], halo, halo_area, row + ts.col(sc), xreg, c0 == 0);
    }
  }
}

// One halo row of the weighted sums: acc[c] += mine[(sr * nc + sc) * stride] * halo_c[row + col(sc)]
// over the slot columns sc in order, for the slots inside (offset >= 0). `halo` is the
// first channel group of the C channels summed here.
template <int C, class A>
__device__ __forceinline__ void weighted_row(A (&acc)[C], const A* __restrict__ mine, const A* __restrict__ halo,
                                             int halo_area, const TileSlots& ts, int row, int sr, int nc,
                                             int stride) {
  for (int sc = 0; sc < nc; ++sc) {
    const int hs = row + ts.col(sc);
    if (hs < 0) continue;   // outside the image (value 0) or padding (no user)
    const A wt = mine[(size_t)(sr * nc + sc) * stride];
    A val[C];
    halo_channels<C>(halo, halo_area, hs, val);
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] += wt * val[c];
  }
}

// As weighted_row for two outputs of the same tile column whose slot rows sa (output a)
// and sb (output b) both look at halo row `row`: each halo value is loaded once for both.
template <int C, class A>
__device__ __forceinline__ void weighted_row_pair(A (&acc_a)[C], A (&acc_b)[C], const A* __restrict__ mine_a,
                                                  const A* __restrict__ mine_b, const A* __restrict__ halo,
                                                  int halo_area, const TileSlots& ts, int row, int sa, int sb,
                                                  int nc, int stride) {
  for (int sc = 0; sc < nc; ++sc) {
    const int hs = row + ts.col(sc);
    if (hs < 0) continue;
    const A wa = mine_a[(size_t)(sa * nc + sc) * stride], wb = mine_b[(size_t)(sb * nc + sc) * stride];
    A val[C];
    halo_channels<C>(halo, halo_area, hs, val);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      acc_a[c] += wa * val[c];
      acc_b[c] += wb * val[c];
    }
  }
}

// Can the weighted sums of C channels be register-blocked (two outputs x half the chunk per
// thread)? Each half must be whole channel groups of the same width as the full chunk's.
template <class A, int C> struct PairBlocking {
  static constexpr bool value = C % 2 == 0 && ChunkLayout<A, C>::groups % 2 == 0 &&
                                ChunkLayout<A, C / 2>::G == ChunkLayout<A, C>::G;
};

// dst[c] = out_scale * sum_s mine[s] * halo_c[s] over the slots inside (ts.off >= 0), for
// every channel c of src, at every output of the tile inside the rows x cols plane (dst:
// channel 0 of the plane, channel stride dst_stride, row pitch cols; mine: the per-slot
// array's base, the output at tile position (ty, tx) owns column ty * blockDim.x + tx).
// The weighted sums of the tiled kernels: out = sum_t p_t v_t (forward), dk = scale * sum_u
// dlogit_u q_u and dv = sum_u p_u grad_out_u (key side; out_scale 1 stores the sum as is).
// The inner loop has no channel predicate (channels past nch are staged as 0 and not stored).
//
// Register blocking (PairBlocking, even tile heights): in this phase the threads are
// remapped so that each computes TWO outputs, tile rows 2i and 2i+1 of one column, for one
// half g of the chunk's channels: the same outputs and channels over the same threads, but
// a halo value feeds both outputs wherever their windows share its halo row, and the slot's
// column offset is read once for both. The slot rows of each output come from the tables
// (borders, dilation, users): a merge of the two outputs' sequences of halo rows (two
// cursors) visits a row both look at once, a row only one looks at for that one alone. Each
// output still sums its own slots in (row, column) order, exactly as one output per thread
// would: the result is bitwise the same. Otherwise (odd heights, C that does not split) one
// output per thread, all C channels. A thread reads other threads' columns of `mine`: the
// barriers before each chunk's staging order those reads after the caller's writes.
template <int C, class T>
__device__ __forceinline__ void chunked_weighted_sums(T* __restrict__ dst, size_t dst_stride, acc_t<T> out_scale,
                                                      const acc_t<T>* __restrict__ mine,
                                                      acc_t<T>* __restrict__ halo, const T* __restrict__ src,
                                                      size_t src_stride, int nch_total, const Window& w,
                                                      const TilePos& p, const TileSlots& ts, int nr, int nc,
                                                      int y0, int x0, int halo_h, int halo_w, int tile, int stride,
                                                      int rows, int cols) {
  using A = acc_t<T>;
  const int halo_area = halo_h * halo_w;
  constexpr bool kPairs = PairBlocking<A, C>::value;
  const bool pairs = kPairs && blockDim.y % 2 == 0;   // uniform over the block
  constexpr int CH = kPairs ? C / 2 : C;   // channels per thread when paired
  // This thread's outputs (RowPair): (ty_a, tx) and, paired, (ty_a + 1, tx), channel half
  // g: the two 16-lane halves of a warp read the same weights and column offsets (one
  // broadcast wavefront) and the two channel groups at the same positions.
  const int bx = (int)blockDim.x;
  const RowPair rp(pairs, p, rows, cols);
  const int g = rp.g, tx = rp.tx, ty_a = rp.ty_a, r_a = rp.r_a, c = rp.c;
  const bool in_a = rp.in_a, in_b = rp.in_b;
  const TileSlots ta = ts.at(ty_a, tx), tb = ts.at(ty_a + 1, tx);
  const A* mine_a = mine + ty_a * bx + tx;
  const A* mine_b = mine_a + bx;
  T* dst_a = dst + (in_a ? (size_t)r_a * cols + c : 0);
  T* dst_b = dst + (in_b ? (size_t)(r_a + 1) * cols + c : 0);
  for (int c0 = 0; c0 < nch_total; c0 += C) {
    const int nch = min(C, nch_total - c0);
    __syncthreads();
    stage_halo<C>(halo, src + (size_t)c0 * src_stride, src_stride, w, y0, x0, halo_h, halo_w, nch, p.tid, tile);
    __syncthreads();
    if (!in_a) continue;   // (b lies below a: outside too)
    if (kPairs && pairs) {
      const A* hg = halo + (size_t)g * CH * halo_area;   // channel half g: whole groups
      A acc_a[CH], acc_b[CH];
#pragma unroll
      for (int e = 0; e < CH; ++e) acc_a[e] = acc_b[e] = 0;
      merge_slot_rows(ta, tb, nr, in_b, false, [&](int row, int sa, int sb, bool use_a, bool use_b) {
        if (use_a && use_b) weighted_row_pair<CH>(acc_a, acc_b, mine_a, mine_b, hg, halo_area, ta, row, sa, sb, nc, stride);
        else if (use_a) weighted_row<CH>(acc_a, mine_a, hg, halo_area, ta, row, sa, nc, stride);
        else weighted_row<CH>(acc_b, mine_b, hg, halo_area, tb, row, sb, nc, stride);
      });
#pragma unroll
      for (int e = 0; e < CH; ++e) {
        const int ch = g * CH + e;
        if (nch == C || ch < nch) {
          store(dst_a + (size_t)(c0 + ch) * dst_stride, out_scale * acc_a[e]);
          if (in_b) store(dst_b + (size_t)(c0 + ch) * dst_stride, out_scale * acc_b[e]);
        }
      }
      continue;
    }
    A acc[C];
#pragma unroll
    for (int e = 0; e < C; ++e) acc[e] = 0;
    for (int sr = 0; sr < nr; ++sr) weighted_row<C>(acc, mine_a, halo, halo_area, ta, ta.row(sr), sr, nc, stride);
    if (nch == C) {
#pragma unroll
      for (int e = 0; e < C; ++e) store(dst_a + (size_t)(c0 + e) * dst_stride, out_scale * acc[e]);
    } else {
#pragma unroll
      for (int e = 0; e < C; ++e)
        if (e < nch) store(dst_a + (size_t)(c0 + e) * dst_stride, out_scale * acc[e]);
    }
  }
}

}  // namespace localrel
