// local_forward.cu - forward kernels of local_qk2d, local_av2d and the fused local_attention2d.
//
// Layout (docs/contract.md): q/k (B, heads*Dqk, H, W), v (B, heads*Dv, H, W), logits/attn
// (B, heads, K, Ho, Wo), out (B, heads*Dv, Ho, Wo), lse (B, heads, Ho, Wo). Channels are
// planes, so threads of a warp on neighbouring output columns read neighbouring addresses
// of every channel plane: the generic kernels are coalesced without any staging.
//
// Kernels (T = __half, __nv_bfloat16, float, double; A = float, or double for double;
// SIM = the similarity function, localrel::Similarity, default kDot):
//   qk_forward<T, SIM>          one thread per output pixel, writes its K logits.
//   av_forward<T, VPT>          one thread per output pixel and chunk of VPT value channels.
//   attention_forward<T, VPT, SIM>
//                               the general fused path: online softmax, one thread per
//                               output pixel and value chunk; writes out (and lse) only.
//   attention_forward_tiled<T, CK, CV>
//                               the fast path: a block owns a tile of queries of one
//                               (batch, head); the keys/values its windows touch (the halo)
//                               are staged in shared memory in chunks of CK (CV) channels,
//                               so each key/value element is read from global memory once
//                               per tile instead of once per window that holds it.
//                               Dot product and no key_bias only (the host's choice).
// key_bias (B, heads, H, W), read only when flags has kHasKeyBias, adds to the logit of
// every valid slot that looks at its pixel; -inf removes the pixel's key (key_removed).
// rel: the full table (heads, Dqk, th, tw) with kHasRel, or with kHasRelSplit SASA's two
// factors as they are, `rel` = rel_h (heads, Dqk/2, th) and `rel_w` (heads, Dqk/2, tw)
// (localrel::RelOfHead); every kernel that reads rel takes both pointers.
#include "localrel_common.cuh"

using namespace localrel;

// ---------------------------------------------------------------------------------------
// local_qk2d forward
// ---------------------------------------------------------------------------------------
template <class T, int SIM = kDot>
__global__ void LOCALREL_BOUNDS
qk_forward(const int* __restrict__ geo, const T* __restrict__ q, const T* __restrict__ k,
           const T* __restrict__ bias, const T* __restrict__ rel, const T* __restrict__ rel_w,
           const T* __restrict__ key_bias, T* __restrict__ logits, int heads, int dqk, int flags, acc_t<T> scale) {
  using A = acc_t<T>;
  const Window w(geo);
  const TilePos p = tile_pos(w.Ho, w.Wo);
  if (!p.inside) return;   // no barriers in this kernel
  const int h = p.plane % heads;
  const size_t qk_off = (size_t)p.plane * dqk * w.in_plane();
  const T* qc = q + qk_off + w.centre(p.r, p.c);
  const T* kb = k + qk_off;
  const T* bias_h = bias + (size_t)h * w.th * w.tw;
  const RelOfHead<T> rel_h(rel, rel_w, h, dqk, w, flags);
  const T* kbias = key_bias + (size_t)p.plane * w.in_plane();
  T* dst = logits + (size_t)p.plane * w.slots() * w.out_plane() + (size_t)p.r * w.Wo + p.c;
  for (int ty = 0; ty < w.kh; ++ty)
    for (int tx = 0; tx < w.kw; ++tx) {
      const Slot s = slot_of(w, p.r, p.c, ty, tx);
      // border="mask": an invalid slot has no logit (-inf gives it weight 0 in any softmax);
      // nor has a slot whose key is removed (key_bias -inf), whatever its k holds.
      const A logit = takes_part(w, s, flags, kbias)
                          ? slot_logit<SIM>(w, s, qc, kb, rel_h, bias_h, dqk, flags, scale, kbias)
                          : neg_inf<A>();
      store(dst + (size_t)(ty * w.kw + tx) * w.out_plane(), logit);
    }
}

// ---------------------------------------------------------------------------------------
// local_av2d forward: out = sum over valid slots of attn * v. VPT value channels per thread
// keep the accumulators in registers; the grid covers ceil(Dv / VPT) chunks per head.
// ---------------------------------------------------------------------------------------
template <class T, int VPT>
__global__ void LOCALREL_BOUNDS
av_forward(const int* __restrict__ geo, const T* __restrict__ attn, const T* __restrict__ v,
           T* __restrict__ out, int dv, int chunks) {
  using A = acc_t<T>;
  const Window w(geo);
  const TilePos p = tile_pos(w.Ho, w.Wo);
  if (!p.inside) return;
  const int bh = p.plane / chunks;
  const int e0 = (p.plane % chunks) * VPT, ne = min(VPT, dv - e0);
  const size_t o = (size_t)p.r * w.Wo + p.c;
  const T* a = attn + (size_t)bh * w.slots() * w.out_plane() + o;
  const T* vb = v + ((size_t)bh * dv + e0) * w.in_plane();
  A acc[VPT];
#pragma unroll
  for (int e = 0; e < VPT; ++e) acc[e] = 0;
  for (int ty = 0; ty < w.kh; ++ty)
    for (int tx = 0; tx < w.kw; ++tx) {
      const Slot s = slot_of(w, p.r, p.c, ty, tx);
      if (!s.valid()) continue;   // invalid slots add nothing, whatever their weight
      const A wt = load(a, (size_t)(ty * w.kw + tx) * w.out_plane());
#pragma unroll
      for (int e = 0; e < VPT; ++e)
        if (e < ne) acc[e] += wt * load(vb, e * w.in_plane() + s.in(w.W));
    }
  T* dst = out + ((size_t)bh * dv + e0) * w.out_plane() + o;
#pragma unroll
  for (int e = 0; e < VPT; ++e)
    if (e < ne) store(dst + e * w.out_plane(), acc[e]);
}

// ---------------------------------------------------------------------------------------
// Fused attention, general path: one pass over the window with an online softmax (running
// max m and sum l rescale the accumulators), so the weights never leave registers.
// The chunk that holds value channel 0 also writes lse (with Dv == 0 one empty chunk runs).
// ---------------------------------------------------------------------------------------
template <class T, int VPT, int SIM = kDot>
__global__ void LOCALREL_BOUNDS
attention_forward(const int* __restrict__ geo, const T* __restrict__ q, const T* __restrict__ k,
                  const T* __restrict__ v, const T* __restrict__ bias, const T* __restrict__ rel,
                  const T* __restrict__ rel_w, const T* __restrict__ key_bias, T* __restrict__ out,
                  acc_t<T>* __restrict__ lse,
                  int heads, int dqk, int dv, int chunks, int flags, acc_t<T> scale) {
  using A = acc_t<T>;
  const Window w(geo);
  const TilePos p = tile_pos(w.Ho, w.Wo);
  if (!p.inside) return;
  const int bh = p.plane / chunks;
  const int h = bh % heads, e0 = (p.plane % chunks) * VPT, ne = min(VPT, dv - e0);
  const size_t o = (size_t)p.r * w.Wo + p.c;
  const size_t qk_off = (size_t)bh * dqk * w.in_plane();
  const T* qc = q + qk_off + w.centre(p.r, p.c);
  const T* kb = k + qk_off;
  const T* vb = v + ((size_t)bh * dv + e0) * w.in_plane();
  const T* bias_h = bias + (size_t)h * w.th * w.tw;
  const RelOfHead<T> rel_h(rel, rel_w, h, dqk, w, flags);
  const T* kbias = key_bias + (size_t)bh * w.in_plane();
  A m = neg_inf<A>(), l = 0, acc[VPT];
#pragma unroll
  for (int e = 0; e < VPT; ++e) acc[e] = 0;
  for (int ty = 0; ty < w.kh; ++ty)
    for (int tx = 0; tx < w.kw; ++tx) {
      const Slot s = slot_of(w, p.r, p.c, ty, tx);
      if (!takes_part(w, s, flags, kbias)) continue;   // neither its k nor its v is read
      const A x = slot_logit<SIM>(w, s, qc, kb, rel_h, bias_h, dqk, flags, scale, kbias);
      // A -inf logit (a -inf bias) weighs exactly 0. Skipping it also keeps
      // exp(-inf - -inf) = NaN out of the sums while every logit so far is -inf.
      if (x == neg_inf<A>()) continue;
      const A m_new = acc_max(m, x);
      // m = -inf before the first slot: exp(-inf) = 0 drops the empty history.
      const A rescale = acc_exp(m - m_new), pt = acc_exp(x - m_new);
      l = l * rescale + pt;
#pragma unroll
      for (int e = 0; e < VPT; ++e) {
        const A val = (e < ne && s.valid()) ? load(vb, e * w.in_plane() + s.in(w.W)) : A(0);
        acc[e] = acc[e] * rescale + pt * val;
      }
      m = m_new;
    }
  // Every logit -inf (no slot takes part, docs/contract.md "Empty windows"): l = 0 and m = -inf give
  // out = 0 (not 0/0) and lse = m + log(0) = -inf. A NaN logit leaves l NaN: both NaN.
  const A inv_l = l == A(0) ? A(0) : A(1) / l;
  T* dst = out + ((size_t)bh * dv + e0) * w.out_plane() + o;
#pragma unroll
  for (int e = 0; e < VPT; ++e)
    if (e < ne) store(dst + e * w.out_plane(), acc[e] * inv_l);
  if (e0 == 0) lse[(size_t)bh * w.out_plane() + o] = m + acc_log(l);
}

// ---------------------------------------------------------------------------------------
// Fused attention, fast path (tiled). Block: a blockDim.y x blockDim.x tile of output pixels
// of one (batch, head); halo_h x halo_w is the largest input region a tile's windows touch
// (computed on the host from the same tables). Dynamic shared memory:
//   logit[K][TILE] (A)        each thread's K logits, then its K weights (own column only)
//   halo[max(CK,CV)][halo_h*halo_w] (A)   one chunk of key or value channels (with rel, CK
//                             channels of rel after the first CK channels: staging_floats)
//   terms[kh + kw][TILE] (A)  split rel only (kHasRelSplit): each query's kh + kw short dot
//                             products q_rows . rel_h[:, a], q_cols . rel_w[:, b]; then
//                             the head's rel_h and rel_w (stage_split_rel_head)
//   the tile's window tables as halo offsets (int, see TileSlots)
// Phases: (1) logits accumulate over key-channel chunks; (2) each thread turns its logits
// into weights and lse; (3) per value-channel chunk, stage values and sum. The weights
// stay in shared memory: nothing attention-sized is written to global memory.
// ---------------------------------------------------------------------------------------
template <class T, int CK, int CV>
__global__ void LOCALREL_BOUNDS
attention_forward_tiled(const int* __restrict__ geo, const T* __restrict__ q, const T* __restrict__ k,
                        const T* __restrict__ v, const T* __restrict__ bias, const T* __restrict__ rel,
                        const T* __restrict__ rel_w, T* __restrict__ out, acc_t<T>* __restrict__ lse,
                        int heads, int dqk, int dv,
                        int flags, acc_t<T> scale, int halo_h, int halo_w) {
  using A = acc_t<T>;
  flags = tiled_flags<CK>(flags);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Window w(geo);
  const TilePos p = tile_pos(w.Ho, w.Wo);
  const int K = w.slots(), tile = blockDim.x * blockDim.y;
  A* logit = reinterpret_cast<A*>(smem_raw);   // [K][tile]
  A* halo = align16(logit, (size_t)K * tile);   // [max(CK, CV)][halo_h * halo_w], ChunkLayout
  const int y0 = halo_origin(w.rows_pos, p.row0, blockDim.y, w.Ho, w.kh);
  const int x0 = halo_origin(w.cols_pos, p.col0, blockDim.x, w.Wo, w.kw);
  const int h = p.plane % heads, halo_area = halo_h * halo_w;
  const size_t tt = (size_t)w.th * w.tw;
  const T* qc = q + (size_t)p.plane * dqk * w.in_plane() + (p.inside ? w.centre(p.r, p.c) : 0);
  const T* kb = k + (size_t)p.plane * dqk * w.in_plane();
  const T* rel_h = rel + (size_t)h * dqk * tt;

  // Slot (ty, tx) of this thread's output: halo offset ts.off (negative: outside the image)
  // and table index ts.tab, from the tile's tables in shared memory.
  A* rels = halo + CK * halo_area;   // [CK][th*tw] with rel (see staging_floats)
  A* terms = halo + staging_floats<CK, CV>(halo_area, (int)tt, flags);   // [kh + kw][tile] with split rel
  int* tables = reinterpret_cast<int*>(terms + split_rel_floats(w, dqk, tile, flags));
  // Split rel: the head's rel_h and rel_w, after the terms (read after the next barrier).
  const RelOfHead<A> split_rel = (flags & kHasRelSplit)
      ? stage_split_rel_head(terms + (w.kh + w.kw) * tile, RelOfHead<T>(rel, rel_w, h, dqk, w, flags), p.tid, tile)
      : RelOfHead<A>(nullptr, nullptr, 0, 0, 0);
  const TileSlots ts = window_tile_slots(tables, w, p, y0, x0, halo_w, tile);

  // (1) logits: q . (k + rel) summed over key-channel chunks (q . k alone with split rel,
  // which has no kHasRel bit).
  const T* qb = q + (size_t)p.plane * dqk * w.in_plane();
  const auto query_at = [&](int r, int c) { return qb + w.centre(r, c); };
  chunked_slot_logits<CK>(logit, halo, kb, w.in_plane(), query_at, w.in_plane(), rel_h, rels, flags, dqk, w, p, ts,
                          w.kh, w.kw, y0, x0, halo_h, halo_w, tile, tile, w.Ho, w.Wo);

  // (2) weights and lse, each thread on its own column; split rel adds its kh + kw short
  // dot products (split_rel_terms) to the logits here.
  if (p.inside) {
    if (flags & kHasRelSplit) {
      split_rel_terms(terms + p.tid, tile, qc, w.in_plane(), split_rel, ts, w.kh, w.kw);
      add_split_rel_terms(logit + p.tid, tile, terms + p.tid, tile, w.kh, w.kw);
    }
    A m = neg_inf<A>();
    for (int ty = 0; ty < w.kh; ++ty)
      for (int tx = 0; tx < w.kw; ++tx) {
        const int hs = ts.off(ty, tx);
        A& x = logit[(size_t)(ty * w.kw + tx) * tile + p.tid];
        if (hs < 0 && !w.zeros) { x = neg_inf<A>(); continue; }   // border="mask"
        x = scale * x + ((flags & kHasBias) ? load(bias, (size_t)h * tt + ts.tab(ty, tx, w.tw)) : A(0));
        m = acc_max(m, x);
      }
    // -inf logits weigh 0 (weight_from_lse): a window where no slot takes part gets
    // l = 0, lse = -inf and weights 0, so out = 0 (docs/contract.md "Empty windows").
    A l = 0;
    for (int t = 0; t < K; ++t) l += weight_from_lse(logit[(size_t)t * tile + p.tid], m);
    const A lse_v = m + acc_log(l);
    for (int t = 0; t < K; ++t) {
      A& x = logit[(size_t)t * tile + p.tid];
      x = weight_from_lse(x, lse_v);
    }
    lse[(size_t)p.plane * w.out_plane() + (size_t)p.r * w.Wo + p.c] = lse_v;
  }

  // (3) out = sum_t weight_t * v_t, one value-channel chunk at a time (invalid slots
  // carry value 0).
  const T* vb = v + (size_t)p.plane * dv * w.in_plane();
  chunked_weighted_sums<CV>(out + (size_t)p.plane * dv * w.out_plane(), w.out_plane(), A(1), logit, halo, vb,
                            w.in_plane(), dv, w, p, ts, w.kh, w.kw, y0, x0, halo_h, halo_w, tile, tile, w.Ho, w.Wo);
}
