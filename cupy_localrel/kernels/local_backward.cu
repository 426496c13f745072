// local_backward.cu - backward kernels of local_qk2d, local_av2d and the fused local_attention2d.
//
// Deterministic by construction: no floating-point atomics anywhere.
//   * Query side (dq, d attn): one thread per output pixel owns its query's gradient.
//   * Key side (dk, dv): one thread per input pixel GATHERS from the outputs whose window
//     holds it, listed by the `users` tables of _geometry (rows x columns), in a fixed
//     order, instead of every output scattering into shared keys with atomics.
//   * dbias/drel (tables of at most heads*Dqk*(2k-1)^2 entries): stage 1 (query_grad) sums
//     each block's contributions per table entry in a fixed order into a per-block partials
//     buffer; stage 2 (table_reduce) sums the partials of each entry in block order.
// The fused backward never stores anything attention-sized: query_grad recomputes the
// weights from lse and keeps their gradients (K per query) in shared memory (in a bounded
// global scratch for windows too large for it, see block_scratch); key_grad
// recomputes the weight and its gradient of each (query, slot) that uses its key, helped by
// delta = sum_t p_t dp_t per query (the softmax-backward term, lse-sized, written by
// query_grad). delta is computed from the recomputed weights, not as grad_out . out: the
// same value in exact arithmetic, but `out` arrives rounded to the input dtype (and the
// reference ignores it), so the kernels do not read `out` at all.
//
// Kernels (T = __half, __nv_bfloat16, float, double; A = float, or double for double;
// SIM = the similarity function, localrel::Similarity, default kDot):
//   query_grad<T, MODE, SIM>
//                          MODE kAttention: delta, dq, table partials of the fused op.
//                          MODE kQK: dq and table partials of local_qk2d.
//   query_grad_tiled<T, CK, CV>
//                          the fast path of query_grad<T, kAttention> (stride 1): the keys
//                          and values of the tile's halo staged in shared memory.
//   key_grad<T, MODE, SIM> MODE kAttention: dk and dv; kQK: dk; kAV: dv (local_av2d);
//                          and d key_bias (kAttention, kQK) with kHasKeyBias: each key
//                          gathers the logit gradients of its users, like dk.
//   key_grad_tiled<T, CK, CV>
//                          the fast path of key_grad<T, kAttention> (stride 1): queries and
//                          output gradients of the tile's users staged in shared memory.
//   av_dattn<T>            d attn of local_av2d (per output pixel and slot).
// The tiled kernels serve the dot product without key_bias only (the host's choice).
//   table_reduce<T>        stage 2 of the dbias/drel reduction.
#include "localrel_common.cuh"

using namespace localrel;

enum Mode { kAttention = 0, kQK = 1, kAV = 2 };

// The per-block work arrays of query_grad and key_grad: dynamic shared memory, or, when a
// large window leaves room in shared memory for less than a warp (per_block > 0), this
// block's slice of a global scratch buffer of per_block elements per block; the host then
// splits the grid into launches (first_block) that bound the buffer.
template <class A>
__device__ __forceinline__ unsigned char* block_scratch(unsigned char* smem, A* scratch,
                                                        long long per_block) {
  if (per_block == 0) return smem;
  return reinterpret_cast<unsigned char*>(scratch + (size_t)blockIdx.x * (size_t)per_block);
}

// ---------------------------------------------------------------------------------------
// Query side. Block: a tile of output pixels of one (batch, head). Dynamic shared memory:
//   dlogit[K][TILE] (A)     gradient of each slot's logit, each thread on its own column
//   weight[K][TILE] (A)     kAttention only: each slot's weight, until dlogit is known
//   qs[TILE] (A)            one query channel of the tile, for drel
//   row_slot[blockDim.y][th], col_slot[blockDim.x][tw] (int)
//                           which slot row (column) of output row r (column c) uses table
//                           row ay (column ax), -1 if none: inverts the table per tile
// Table partials: part_bias[block][th*tw], part_rel[block][Dqk][th*tw] (A).
// ---------------------------------------------------------------------------------------
namespace {

// The tile's sums of dlogit (times each of the NQ channel rows qs[n][o] when qs is given)
// over every (output, slot) whose table index is (ay, ax), in a fixed order: rows, then
// columns of the tile. Slot t of output o is dlogit[t * stride + o]: lanes (one table entry
// each) read different slots of one output, so a stride of tile + 1 words (not a multiple
// of the 32 banks) spreads them over the banks. Each dlogit load feeds NQ channels.
template <int NQ, class A>
__device__ void tile_table_sum(A (&sum)[NQ], const A* __restrict__ dlogit, const A* __restrict__ qs,
                               const int* __restrict__ row_slot, const int* __restrict__ col_slot,
                               int ay, int ax, int kw, int th, int tw, int tile, int stride) {
#pragma unroll
  for (int n = 0; n < NQ; ++n) sum[n] = 0;
  for (int r = 0; r < (int)blockDim.y; ++r) {
    const int ty = row_slot[r * th + ay];
    if (ty < 0) continue;
    for (int c = 0; c < (int)blockDim.x; ++c) {
      const int tx = col_slot[c * tw + ax];
      if (tx < 0) continue;
      const int o = r * blockDim.x + c;
      const A g = dlogit[(size_t)(ty * kw + tx) * stride + o];
#pragma unroll
      for (int n = 0; n < NQ; ++n) sum[n] += qs ? g * qs[n * tile + o] : g;
    }
  }
}

// Invert one axis's table over the tile: slot_of_entry[r][a] = t with tab[first + r][t] == a.
// A table row is strictly increasing in t (docs/contract.md "Geometry"), so t is unique.
__device__ void invert_table(int* __restrict__ slot_of_entry, const int* __restrict__ tab, int first,
                             int count, int total, int k, int entries, int tid, int nthreads) {
  for (int idx = tid; idx < count * entries; idx += nthreads) slot_of_entry[idx] = -1;
  __syncthreads();
  for (int idx = tid; idx < count * k; idx += nthreads) {
    const int r = idx / k, t = idx % k;
    if (first + r < total) slot_of_entry[r * entries + tab[(first + r) * k + t]] = t;
  }
}


// Stage 1 of dbias/drel for one block of outputs: part_bias[block][entry] and
// part_rel[block][d][entry], summed over the tile's (output, slot) pairs in a fixed order.
// `dlogit` [K][stride] holds every thread's logit gradients (zeros for threads outside the
// plane; stride 0 means tile); qs has room for NQ channel rows of the tile's queries.
// Every thread of the block must call this (it has barriers).
template <int NQ = 1, class A, class T>
__device__ void table_partials(const Window& w, const TilePos& p, const A* __restrict__ dlogit,
                               A* __restrict__ qs, int* __restrict__ row_slot, int* __restrict__ col_slot,
                               const T* __restrict__ qc, int dqk, int flags, A scale,
                               A* __restrict__ part_bias, A* __restrict__ part_rel, int tile, int stride = 0) {
  if (!(flags & (kHasBias | kHasAnyRel))) return;   // uniform over the block
  if (stride == 0) stride = tile;
  __syncthreads();   // every thread has written its dlogit column before others read it
  invert_table(row_slot, w.rows_tab, p.row0, blockDim.y, w.Ho, w.kh, w.th, p.tid, tile);
  invert_table(col_slot, w.cols_tab, p.col0, blockDim.x, w.Wo, w.kw, w.tw, p.tid, tile);
  __syncthreads();
  const int entries = w.th * w.tw;
  if (flags & kHasBias)
    for (int e = p.tid; e < entries; e += tile) {
      A sum[1];
      tile_table_sum<1, A>(sum, dlogit, nullptr, row_slot, col_slot, e / w.tw, e % w.tw, w.kw, w.th, w.tw, tile,
                           stride);
      part_bias[(size_t)p.block * entries + e] = sum[0];
    }
  if (flags & kHasAnyRel)   // split rel too: the full table's partials, summed per axis on the host
    for (int d0 = 0; d0 < dqk; d0 += NQ) {
      const int nq = min(NQ, dqk - d0);
      __syncthreads();   // everybody is done reading the previous channels
      for (int n = 0; n < NQ; ++n)
        qs[n * tile + p.tid] = (p.inside && n < nq) ? scale * load(qc, (d0 + n) * w.in_plane()) : A(0);
      __syncthreads();
      for (int e = p.tid; e < entries; e += tile) {
        A sum[NQ];
        tile_table_sum<NQ, A>(sum, dlogit, qs, row_slot, col_slot, e / w.tw, e % w.tw, w.kw, w.th, w.tw, tile,
                              stride);
#pragma unroll
        for (int n = 0; n < NQ; ++n)
          if (n < nq) part_rel[((size_t)p.block * dqk + d0 + n) * entries + e] = sum[n];
      }
    }
}

// Stage 1 of SASA's split drel (kHasRelSplit) in query_grad_tiled, for one block of outputs:
//   part_rows[block][c][ay] = sum over the tile's outputs o of scale q_o[c] R_o[ty(ay)],
//   part_cols[block][c][ax] = sum over o of scale q_o[Dqk/2 + c] C_o[tx(ax)],
// each block's rows then columns (part_rel[block][Dqk/2 * (th + tw)], for table_reduce's split),
// where R_o[ty] and C_o[tx] are output o's dlogit summed over slot row ty and slot column
// tx (in `terms` [kh + kw][terms_stride], zeros outside the plane) and ty(ay) is the slot
// row that reads table row ay (none: no term). rel_h[c][ay] is in every full-table entry of
// row ay, so its gradient is those entries' summed over the columns: kh + kw sums per
// output instead of the full table's Dqk x th x tw partials (and no full table to reduce).
// Fixed order: outputs by rows, then columns. Lanes take entries table row (column) fastest:
// a warp's lanes read the sums of different slot rows of one output (rows terms_stride
// apart: an odd stride keeps them in different banks), a few channels of its query (qt:
// rows of 2 kSplitDrelChannels + 1 words), and store neighbouring partials. Each thread
// sums kSplitDrelSums channels of its table row (column), so one read of a dlogit sum feeds
// them all. Every thread of the block must call this (barriers).
constexpr int kSplitDrelChannels = 8;   // channels of each half per pass
constexpr int kSplitDrelSums = 4;       // channels per thread (divides kSplitDrelChannels)

template <class A, class T>
__device__ void split_rel_partials(const Window& w, const TilePos& p, const A* __restrict__ terms, int terms_stride,
                                   A* __restrict__ qt, int* __restrict__ row_slot, int* __restrict__ col_slot,
                                   const T* __restrict__ qc, int dqk, A scale, A* __restrict__ part_rel, int tile) {
  constexpr int P = kSplitDrelChannels, S = kSplitDrelSums, G = P / S, pitch = 2 * P + 1;
  static_assert(P % S == 0, "a thread's channels lie in one pass");
  const int half = dqk / 2, th = w.th, tw = w.tw, bx = blockDim.x;
  A* part_rows = part_rel + (size_t)p.block * half * (th + tw);   // this block's rows, then columns
  A* part_cols = part_rows + (size_t)half * th;
  __syncthreads();   // every thread has written its terms, and nobody reads row_slot any more
  invert_table(row_slot, w.rows_tab, p.row0, blockDim.y, w.Ho, w.kh, th, p.tid, tile);
  invert_table(col_slot, w.cols_tab, p.col0, blockDim.x, w.Wo, w.kw, tw, p.tid, tile);
  for (int d0 = 0; d0 < half; d0 += P) {
    const int nq = min(P, half - d0);
    __syncthreads();   // the inverted tables are complete; the previous pass's readers are done
    for (int n = 0; n < 2 * P; ++n) {   // this thread's query: channels d0.. of each half
      const int c = (n < P ? 0 : half) + d0 + n % P;
      qt[p.tid * pitch + n] = (p.inside && n % P < nq) ? scale * load(qc, (size_t)c * w.in_plane()) : A(0);
    }
    __syncthreads();
    for (int e = p.tid; e < G * (th + tw); e += tile) {
      // Entry: channels d0 + j, d0 + j + G, .. (S of them) of table row a (the rows' G x th
      // entries), else of table column a; a fastest. The G threads of a row (column) take
      // neighbouring channels, so that a warp's lanes store neighbouring partials.
      const bool row = e < G * th;
      const int len = row ? th : tw, er = row ? e : e - G * th, j = er / len, a = er - j * len;
      if (j >= nq) continue;
      A sum[S];
#pragma unroll
      for (int s = 0; s < S; ++s) sum[s] = 0;
      for (int r = 0; r < (int)blockDim.y; ++r) {
        const int ty = row ? row_slot[r * th + a] : 0;
        if (ty < 0) continue;   // no slot row of tile row r reads table row a
        for (int c = 0; c < bx; ++c) {
          const int tx = row ? 0 : col_slot[c * tw + a];
          if (tx < 0) continue;
          const int o = r * bx + c, i = row ? ty : w.kh + tx;   // i: the sum's row in terms
          const A t = terms[(size_t)i * terms_stride + o];
          const A* q_o = qt + o * pitch + (row ? 0 : P) + j;
#pragma unroll
          for (int s = 0; s < S; ++s) sum[s] += q_o[s * G] * t;
        }
      }
      A* part = row ? part_rows + (size_t)(d0 + j) * th + a : part_cols + (size_t)(d0 + j) * tw + a;
#pragma unroll
      for (int s = 0; s < S; ++s)
        if (j + s * G < nq) part[(size_t)s * G * len] = sum[s];
    }
  }
}

}  // namespace

template <class T, int MODE, int SIM = kDot>
__global__ void LOCALREL_BOUNDS
query_grad(const int* __restrict__ geo, const T* __restrict__ grad, const T* __restrict__ q,
           const T* __restrict__ k, const T* __restrict__ v, const acc_t<T>* __restrict__ lse, const T* __restrict__ bias, const T* __restrict__ rel,
           const T* __restrict__ rel_w, const T* __restrict__ key_bias, T* __restrict__ dq, acc_t<T>* __restrict__ delta, acc_t<T>* __restrict__ part_bias,
           acc_t<T>* __restrict__ part_rel, int heads, int dqk, int dv, int flags, acc_t<T> scale,
           acc_t<T>* __restrict__ scratch, long long scratch_per_block, int first_block) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Window w(geo);
  const TilePos p = tile_pos(w.Ho, w.Wo, first_block);
  const int K = w.slots(), tile = blockDim.x * blockDim.y, h = p.plane % heads;
  const size_t tt = (size_t)w.th * w.tw, hw = w.in_plane(), ohw = w.out_plane();
  A* dlogit = reinterpret_cast<A*>(block_scratch(smem_raw, scratch, scratch_per_block));
  A* weight = dlogit + (size_t)K * tile;                          // kAttention only
  A* qs = weight + (MODE == kAttention ? (size_t)K * tile : 0);
  int* row_slot = reinterpret_cast<int*>(qs + tile);
  int* col_slot = row_slot + blockDim.y * w.th;

  const size_t o = p.inside ? (size_t)p.r * w.Wo + p.c : 0;
  const size_t qk_off = (size_t)p.plane * dqk * hw;
  const T* qc = q + qk_off + (p.inside ? w.centre(p.r, p.c) : 0);
  const T* kb = k + qk_off;
  const RelOfHead<T> rel_h(rel, rel_w, h, dqk, w, flags);
  const T* bias_h = bias + (size_t)h * tt;
  const T* kbias = key_bias + (size_t)p.plane * hw;

  // (1) dlogit of every slot. Threads past the plane edge hold zeros for the table sums.
  A* my = dlogit + p.tid;
  if (!p.inside) {
    for (int t = 0; t < K; ++t) my[(size_t)t * tile] = 0;
  } else if (MODE == kQK) {
    // grad_logits (B, heads, K, Ho, Wo); with border="mask" gradients at masked slots are
    // ignored, and so are those at slots whose key is removed (key_bias -inf).
    const T* g = grad + (size_t)p.plane * K * ohw + o;
    for (int ty = 0; ty < w.kh; ++ty)
      for (int tx = 0; tx < w.kw; ++tx) {
        const Slot s = slot_of(w, p.r, p.c, ty, tx);
        const int t = ty * w.kw + tx;
        my[(size_t)t * tile] = takes_part(w, s, flags, kbias) ? load(g, t * ohw) : A(0);
      }
  } else {
    // Softmax backward: dlogit_t = p_t (dp_t - delta), dp_t = grad_out . v_t (0 for an
    // invalid slot), delta = sum_t p_t dp_t; p_t recomputed from lse (0 for masked slots
    // and removed keys, whose k and v are not read).
    const T* g = grad + (size_t)p.plane * dv * ohw + o;
    const T* vb = v + (size_t)p.plane * dv * hw;
    A* my_p = weight + p.tid;
    const A lse_o = lse[(size_t)p.plane * ohw + o];
    A dsum = 0;
    for (int ty = 0; ty < w.kh; ++ty)
      for (int tx = 0; tx < w.kw; ++tx) {
        const Slot s = slot_of(w, p.r, p.c, ty, tx);
        const size_t t = (size_t)(ty * w.kw + tx) * tile;
        A pt = 0, dp = 0;
        if (takes_part(w, s, flags, kbias)) {
          pt = weight_from_lse(slot_logit<SIM>(w, s, qc, kb, rel_h, bias_h, dqk, flags, scale, kbias), lse_o);
          if (s.valid())
            for (int e = 0; e < dv; ++e) dp += load(g, e * ohw) * load(vb, e * hw + s.in(w.W));
        }
        my_p[t] = pt;
        my[t] = dp;
        dsum += pt * dp;
      }
    delta[(size_t)p.plane * ohw + o] = dsum;
    for (int t = 0; t < K; ++t) my[(size_t)t * tile] = my_p[(size_t)t * tile] * (my[(size_t)t * tile] - dsum);
  }

  // (2) dq at the centre: scale * sum_t dlogit_t dphi/dq(q, k_t) (k_t + rel_t for the dot
  // product); an invalid slot, and a removed key (dlogit 0 too), has key 0: its k is not read.
  if (p.inside) {
    T* dqc = dq + qk_off + w.centre(p.r, p.c);
    for (int d = 0; d < dqk; ++d) {
      A sum = 0;
      const A qd = SIM == kDot ? A(0) : load(qc, d * hw);   // the dot product needs no q here
      for (int ty = 0; ty < w.kh; ++ty)
        for (int tx = 0; tx < w.kw; ++tx) {
          const Slot s = slot_of(w, p.r, p.c, ty, tx);
          A key = s.valid() && !key_removed(w, s, flags, kbias) ? load(kb, d * hw + s.in(w.W)) : A(0);
          if (SIM == kDot && (flags & kHasAnyRel)) key += rel_h.at(d, s.ay, s.ax, flags);
          sum += my[(size_t)(ty * w.kw + tx) * tile] * Sim<SIM>::dq(qd, key);
        }
      store(dqc + d * hw, scale * sum);
    }
  }

  // (3) stage 1 of dbias/drel: this block's sum per table entry.
  table_partials(w, p, dlogit, qs, row_slot, col_slot, qc, dqk, flags, scale, part_bias, part_rel, tile);
}

// ---------------------------------------------------------------------------------------
// Query side, fast path (stride 1): query_grad<T, kAttention> with the tile's key and value
// halo staged in shared memory, chunk by chunk, as in attention_forward_tiled. Shared:
//   dlogit[K][TILE+1], dp[K][TILE+1] (A)   logits then their gradients; grad_out . v per
//                           slot (the + 1 keeps tile_table_sum's lanes in different banks)
//   halo[max(CK,CV)][halo_h*halo_w] (A) (with rel: staging_floats), qs[kTableChannels][TILE]
//   (A), with split rel terms[kh + kw][TILE] (A: the short dot products, then dlogit's
//   row/column sums) and the head's rel_h, rel_w (stage_split_rel_head), row_slot, col_slot (int),
//   the tile's window tables as halo offsets (int, see TileSlots)
// Phases: (1) logits over key chunks, (2) dp over value chunks, (3) dlogit, (4) dq over key
// chunks again, (5) table partials.
// ---------------------------------------------------------------------------------------
// Query channels per pass of query_grad_tiled's drel partials (qs rows; each dlogit load
// feeds this many sums). The host's shared-memory plan (_kernel_ops) counts the same.
constexpr int kTableChannels = 8;

// Floats of query_grad_tiled's query rows (qs): kTableChannels rows of the tile's queries
// (a full rel's partials), or with split rel split_rel_partials' qt (2 kSplitDrelChannels
// + 1 floats per output). The host plans the same.
__device__ __forceinline__ int query_rows_floats(int tile, int flags) {
  return ((flags & kHasRelSplit) ? 2 * kSplitDrelChannels + 1 : kTableChannels) * tile;
}

// dq's part from SASA's split rel (kHasRelSplit) for channels [c0, c0 + nch) of one query:
// acc[d] += sum_ty R[ty] rel_h[c][ay(ty)] for c = c0 + d < Dqk/2, and sum_tx C[tx]
// rel_w[c - Dqk/2][ax(tx)] for the others, where R/C are the row/column sums of the query's
// dlogit, kept in `sums` (R[ty] at sums[ty * stride], C[tx] at sums[(kh + tx) * stride]):
// kh + kw products per channel instead of one rel add per (slot, channel). Fixed order.
template <int C, class A>
__device__ __forceinline__ void split_rel_dq(A (&acc)[C], int c0, int nch, const A* __restrict__ sums,
                                             int stride, const RelOfHead<A>& rel, const TileSlots& ts, int kh,
                                             int kw) {
  for (int i = 0; i < kh + kw; ++i) {   // rows (rel_h: channels < Dqk/2), then columns
    const bool row = i < kh;
    const A sum = sums[(size_t)i * stride];
    const A* table = row ? rel.a + ts.tab_row(i) : rel.b + ts.tab_col(i - kh);
    const int entries = row ? rel.th : rel.tw;
#pragma unroll
    for (int d = 0; d < C; ++d)
      if (d < nch && (c0 + d < rel.half) == row) acc[d] += sum * load(table, (size_t)(c0 + d - (row ? 0 : rel.half)) * entries);
  }
}

template <class T, int CK, int CV>
__global__ void LOCALREL_BOUNDS
query_grad_tiled(const int* __restrict__ geo, const T* __restrict__ grad, const T* __restrict__ q,
                 const T* __restrict__ k, const T* __restrict__ v, const acc_t<T>* __restrict__ lse, const T* __restrict__ bias, const T* __restrict__ rel,
                 const T* __restrict__ rel_w, T* __restrict__ dq, acc_t<T>* __restrict__ delta, acc_t<T>* __restrict__ part_bias,
                 acc_t<T>* __restrict__ part_rel, int heads, int dqk, int dv, int flags, acc_t<T> scale,
                 int halo_h, int halo_w) {
  using A = acc_t<T>;
  flags = tiled_flags<CK>(flags);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Window w(geo);
  const TilePos p = tile_pos(w.Ho, w.Wo);
  const int K = w.slots(), tile = blockDim.x * blockDim.y, h = p.plane % heads;
  const int halo_area = halo_h * halo_w;
  const int ss = tile + 1;   // slot stride of dlogit/dp: see tile_table_sum
  const size_t tt = (size_t)w.th * w.tw, hw = w.in_plane(), ohw = w.out_plane();
  A* dlogit = reinterpret_cast<A*>(smem_raw);
  A* dp = dlogit + (size_t)K * ss;
  A* halo = align16(dlogit, 2 * (size_t)K * ss);   // 16-byte aligned: the halo's wide loads
  A* rels = halo + CK * halo_area;   // [CK][th*tw] with rel (see staging_floats)
  A* qs = halo + staging_floats<CK, CV>(halo_area, (int)tt, flags);   // query_rows_floats
  const int ts_stride = tile + 1;   // terms' row stride: odd, see split_rel_partials
  A* my_terms = qs + query_rows_floats(tile, flags) + p.tid;   // [kh + kw][ts_stride] with split rel
  int* row_slot = reinterpret_cast<int*>(qs + query_rows_floats(tile, flags) + split_rel_floats(w, dqk, ts_stride, flags));
  int* col_slot = row_slot + blockDim.y * w.th;
  const int y0 = halo_origin(w.rows_pos, p.row0, blockDim.y, w.Ho, w.kh);
  const int x0 = halo_origin(w.cols_pos, p.col0, blockDim.x, w.Wo, w.kw);

  const size_t o = p.inside ? (size_t)p.r * w.Wo + p.c : 0;
  const size_t qk_off = (size_t)p.plane * dqk * hw;
  const T* qc = q + qk_off + (p.inside ? w.centre(p.r, p.c) : 0);
  const T* kb = k + qk_off;
  const T* vb = v + (size_t)p.plane * dv * hw;
  const T* rel_h = rel + (size_t)h * dqk * tt;
  A* my_dl = dlogit + p.tid;
  A* my_dp = dp + p.tid;

  // Slot (ty, tx) of this thread's output: halo offset ts.off (negative: outside the image)
  // and table index ts.tab, from the tile's tables in shared memory.
  // Split rel: the head's rel_h and rel_w, after the terms (read after the next barrier).
  const RelOfHead<A> split_rel = (flags & kHasRelSplit)
      ? stage_split_rel_head(my_terms - p.tid + (w.kh + w.kw) * ts_stride, RelOfHead<T>(rel, rel_w, h, dqk, w, flags),
                             p.tid, tile)
      : RelOfHead<A>(nullptr, nullptr, 0, 0, 0);
  const TileSlots ts = window_tile_slots(col_slot + blockDim.x * w.tw, w, p, y0, x0, halo_w, tile);

  // Threads past the plane edge hold zeros for the table sums (the phases below write only
  // the columns of threads inside).
  if (!p.inside)
    for (int t = 0; t < K; ++t) my_dl[(size_t)t * ss] = 0;

  // (1) logits q . (k + rel), over key chunks.
  const T* qb = q + qk_off;
  const auto query_at = [&](int r, int c) { return qb + w.centre(r, c); };
  chunked_slot_logits<CK>(dlogit, halo, kb, hw, query_at, hw, rel_h, rels, flags, dqk, w, p, ts, w.kh, w.kw, y0, x0,
                          halo_h, halo_w, tile, ss, w.Ho, w.Wo);

  // (2) dp_t = grad_out . v_t, over value chunks (invalid slots: value 0).
  const T* gb = grad + (size_t)p.plane * dv * ohw;
  const auto grad_at = [&](int r, int c) { return gb + (size_t)r * w.Wo + c; };
  chunked_slot_dots<CV>(dp, halo, vb, hw, grad_at, ohw, dv, w, p, ts, w.kh, w.kw, y0, x0, halo_h, halo_w, tile, ss);

  // (3) weights p_t from lse (0 for masked slots), delta = sum_t p_t dp_t, then
  // dlogit_t = p_t (dp_t - delta). Split rel adds its kh + kw short dot products to the
  // logits here (phase (1) summed q . k alone), then leaves dlogit's row and column sums
  // in their place for phase (4).
  if (p.inside) {
    if (flags & kHasRelSplit) {
      split_rel_terms(my_terms, ts_stride, qc, hw, split_rel, ts, w.kh, w.kw);
      add_split_rel_terms(my_dl, ss, my_terms, ts_stride, w.kh, w.kw);
    }
    const A lse_o = lse[(size_t)p.plane * ohw + o];
    A dsum = 0;
    for (int ty = 0; ty < w.kh; ++ty) {
      // The slot row's halo offset and table row, once per row (TileSlots::row).
      const int row = ts.row(ty), tab_row = (flags & kHasBias) ? ts.tab_row(ty) * w.tw : 0;
      for (int tx = 0; tx < w.kw; ++tx) {
        const int hs = row + ts.col(tx);
        const size_t t = (size_t)(ty * w.kw + tx) * ss;
        if (hs < 0 && !w.zeros) { my_dl[t] = 0; continue; }   // border="mask": p_t = dp_t = 0
        const A logit = scale * my_dl[t] + ((flags & kHasBias) ? load(bias, (size_t)h * tt + tab_row + ts.tab_col(tx)) : A(0));
        my_dl[t] = weight_from_lse(logit, lse_o);   // 0 in an empty window (lse -inf)
        dsum += my_dl[t] * my_dp[t];
      }
    }
    delta[(size_t)p.plane * ohw + o] = dsum;
    for (int t = 0; t < K; ++t) my_dl[(size_t)t * ss] *= my_dp[(size_t)t * ss] - dsum;
    if (flags & kHasRelSplit) {   // row sums R[ty], then column sums C[tx], of dlogit
      for (int ty = 0; ty < w.kh; ++ty) {
        A sum = 0;
        for (int tx = 0; tx < w.kw; ++tx) sum += my_dl[(size_t)(ty * w.kw + tx) * ss];
        my_terms[(size_t)ty * ts_stride] = sum;
      }
      for (int tx = 0; tx < w.kw; ++tx) {
        A sum = 0;
        for (int ty = 0; ty < w.kh; ++ty) sum += my_dl[(size_t)(ty * w.kw + tx) * ss];
        my_terms[(size_t)(w.kh + tx) * ts_stride] = sum;
      }
    }
  } else if (flags & kHasRelSplit) {   // outside the plane: no sums (split_rel_partials reads them)
    for (int i = 0; i < w.kh + w.kw; ++i) my_terms[(size_t)i * ts_stride] = 0;
  }

  // (4) dq = scale * sum_t dlogit_t (k_t + rel_t), over key chunks again (split rel: its
  // part from the row/column sums of dlogit, split_rel_dq).
  for (int c0 = 0; c0 < dqk; c0 += CK) {
    const int nch = min(CK, dqk - c0);
    __syncthreads();
    stage_halo<CK>(halo, kb + (size_t)c0 * hw, hw, w, y0, x0, halo_h, halo_w, nch, p.tid, tile);
    if (flags & kHasRel) stage_rel(rels, rel_h, (int)tt, c0, nch, p.tid, tile);
    __syncthreads();
    if (!p.inside) continue;
    A acc[CK];
#pragma unroll
    for (int d = 0; d < CK; ++d) acc[d] = 0;
    if (flags & kHasRelSplit)   // split rel's part first, before the slot loop's registers are live
      split_rel_dq<CK>(acc, c0, nch, my_terms, ts_stride, split_rel, ts, w.kh, w.kw);
    // Channels past nch: the staged keys are 0 (their sums are not stored); only a tail's
    // rel chunk, staged for nch channels, needs the guard.
    by_chunk_fill(nch == CK, [&](auto full) {
      for (int ty = 0; ty < w.kh; ++ty) {
        const int row = ts.row(ty), tab_row = (flags & kHasRel) ? ts.tab_row(ty) * w.tw : 0;   // once per row
        for (int tx = 0; tx < w.kw; ++tx) {
          const int hs = row + ts.col(tx);
          const A dl = my_dl[(size_t)(ty * w.kw + tx) * ss];
          const int tab = (flags & kHasRel) ? tab_row + ts.tab_col(tx) : 0;   // once per slot
          A key[CK];
          halo_channels_or_zero<CK>(halo, halo_area, hs, key);
#pragma unroll
          for (int d = 0; d < CK; ++d) {
            if ((flags & kHasRel) && (decltype(full)::value || d < nch)) key[d] += rels[d * tt + tab];
            acc[d] += dl * key[d];
          }
        }
      }
    });
    T* dqc = dq + qk_off + w.centre(p.r, p.c);
#pragma unroll
    for (int d = 0; d < CK; ++d)
      if (d < nch) store(dqc + (size_t)(c0 + d) * hw, scale * acc[d]);
  }

  // (5) stage 1 of dbias/drel (split rel: its own, from dlogit's row and column sums).
  table_partials<kTableChannels>(w, p, dlogit, qs, row_slot, col_slot, qc, dqk, flags & ~kHasRelSplit, scale,
                                 part_bias, part_rel, tile, ss);
  if (flags & kHasRelSplit)
    split_rel_partials(w, p, my_terms - p.tid, ts_stride, qs, row_slot, col_slot, qc, dqk, scale, part_rel, tile);
}

// ---------------------------------------------------------------------------------------
// Key side. Block: a tile of INPUT pixels of one (batch, head). Each thread lists the
// (output, slot) pairs whose window holds its pixel: users = row users x column users
// (at most U = mr*mc), read from the users tables. Dynamic shared memory, each thread on
// its own column (no barriers needed):
//   user_p[U][TILE] (A)       weight of the pair      (kAttention, kAV)
//   user_dl[U][TILE] (A)      gradient of its logit   (kAttention, kQK)
// (kQK and kAV keep only their one array.) Then dk = scale * sum_u dl_u q(centre of u),
// dv = sum_u p_u grad_out(u), channel by channel so that each thread writes neighbouring
// addresses to its neighbours. Users' output indices are re-read from the (cached) tables
// rather than kept in shared memory: shared memory per thread bounds the block size.
// ---------------------------------------------------------------------------------------
namespace {

// User (a, b) of input pixel (y, x): output (i, j) seeing it in slot (ty, tx); false for padding.
struct User {
  int i, j, ty, tx;
};
__device__ __forceinline__ bool user_of(const Window& w, int y, int x, int a, int b, User& u) {
  u.i = w.ru_out[y * w.mr + a];
  u.j = w.cu_out[x * w.mc + b];
  u.ty = w.ru_slot[y * w.mr + a];
  u.tx = w.cu_slot[x * w.mc + b];
  return (u.i | u.j) >= 0;
}

}  // namespace

template <class T, int MODE, int SIM = kDot>
__global__ void LOCALREL_BOUNDS
key_grad(const int* __restrict__ geo, const T* __restrict__ grad, const T* __restrict__ q,
         const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ attn,
         const acc_t<T>* __restrict__ lse, const acc_t<T>* __restrict__ delta,
         const T* __restrict__ bias, const T* __restrict__ rel, const T* __restrict__ rel_w,
         const T* __restrict__ key_bias, T* __restrict__ dk, T* __restrict__ dv_out, T* __restrict__ dkey_bias, int heads, int dqk, int dv, int flags, acc_t<T> scale,
         acc_t<T>* __restrict__ scratch, long long scratch_per_block, int first_block) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Window w(geo);
  const TilePos p = tile_pos(w.H, w.W, first_block);
  if (!p.inside) return;   // no barriers in this kernel
  const int tile = blockDim.x * blockDim.y, U = w.mr * w.mc, K = w.slots();
  const int h = p.plane % heads;
  const size_t tt = (size_t)w.th * w.tw, hw = w.in_plane(), ohw = w.out_plane();
  A* user_p = reinterpret_cast<A*>(block_scratch(smem_raw, scratch, scratch_per_block)) + p.tid;
  A* user_dl = MODE == kAttention ? user_p + (size_t)U * tile : user_p;

  const size_t n = (size_t)p.r * w.W + p.c;   // this thread's input pixel
  const size_t qk_off = (size_t)p.plane * dqk * hw;
  const T* qb = q + qk_off;
  const T* kn = k + qk_off + n;
  const T* vn = v + (size_t)p.plane * dv * hw + n;
  const T* gb = grad + (size_t)p.plane * (MODE == kQK ? K : dv) * ohw;
  const RelOfHead<T> rel_h(rel, rel_w, h, dqk, w, flags);
  // This key's own key_bias: in every logit that sees it; -inf removes the key.
  const bool has_kb = MODE != kAV && (flags & kHasKeyBias);
  const A kb_n = has_kb ? load(key_bias, (size_t)p.plane * hw + n) : A(0);
  if (has_kb && kb_n == neg_inf<A>()) {
    // A removed key takes part in no window: dk, dv and d key_bias are exactly 0, whatever
    // its k and v or its users' queries and output gradients hold (NaN and inf included).
    for (int d = 0; d < dqk; ++d) store(dk + qk_off + n + d * hw, A(0));
    if (MODE == kAttention)
      for (int e = 0; e < dv; ++e) store(dv_out + (size_t)p.plane * dv * hw + n + e * hw, A(0));
    store(dkey_bias + (size_t)p.plane * hw + n, A(0));
    return;   // no barriers in this kernel
  }

  // (1) the weight and/or logit gradient of every (output, slot) pair that uses pixel n.
  for (int a = 0; a < w.mr; ++a)
    for (int b = 0; b < w.mc; ++b) {
      const size_t slot = (size_t)(a * w.mc + b) * tile;
      User u;
      if (!user_of(w, p.r, p.c, a, b, u)) continue;   // padding: never read below either
      const int t = u.ty * w.kw + u.tx;
      const size_t o = (size_t)u.i * w.Wo + u.j;
      if (MODE == kAV) {
        user_p[slot] = load(attn, ((size_t)p.plane * K + t) * ohw + o);
      } else if (MODE == kQK) {
        user_dl[slot] = load(gb, t * ohw + o);
      } else {
        // Recompute the weight from lse; the key is this thread's own, always valid here.
        const int ay = w.rows_tab[u.i * w.kh + u.ty], ax = w.cols_tab[u.j * w.kw + u.tx];
        const int tab = ay * w.tw + ax;
        const T* qc = qb + w.centre(u.i, u.j);
        A dot = 0;
        for (int d = 0; d < dqk; ++d) {
          A key = load(kn, d * hw);
          if (SIM == kDot && (flags & kHasAnyRel)) key += rel_h.at(d, ay, ax, flags);
          dot += Sim<SIM>::phi(load(qc, d * hw), key);
        }
        A logit = scale * dot;
        if (flags & kHasBias) logit += load(bias, (size_t)h * tt + tab);
        if (has_kb) logit += kb_n;
        const A pt = weight_from_lse(logit, lse[(size_t)p.plane * ohw + o]);
        A dp = 0;
        for (int e = 0; e < dv; ++e) dp += load(gb, e * ohw + o) * load(vn, e * hw);
        user_p[slot] = pt;
        user_dl[slot] = pt * (dp - delta[(size_t)p.plane * ohw + o]);
      }
    }

  // (2) dk: scale * sum_u dl_u dphi/dk(q(centre of u), k) (q itself for the dot product).
  if (MODE != kAV)
    for (int d = 0; d < dqk; ++d) {
      A sum = 0;
      const A kd = SIM == kDot ? A(0) : load(kn, d * hw);   // the dot product needs no k here
      for (int a = 0; a < w.mr; ++a)
        for (int b = 0; b < w.mc; ++b) {
          User u;
          if (user_of(w, p.r, p.c, a, b, u))
            sum += user_dl[(size_t)(a * w.mc + b) * tile] * Sim<SIM>::dk(load(qb, d * hw + w.centre(u.i, u.j)), kd);
        }
      store(dk + qk_off + n + d * hw, scale * sum);
    }
  // d key_bias: sum_u dl_u, the logit gradients of every pair that sees this key.
  if (has_kb) {
    A sum = 0;
    for (int a = 0; a < w.mr; ++a)
      for (int b = 0; b < w.mc; ++b) {
        User u;
        if (user_of(w, p.r, p.c, a, b, u)) sum += user_dl[(size_t)(a * w.mc + b) * tile];
      }
    store(dkey_bias + (size_t)p.plane * hw + n, sum);
  }
  // (3) dv: sum_u p_u grad_out(u).
  if (MODE != kQK)
    for (int e = 0; e < dv; ++e) {
      A sum = 0;
      for (int a = 0; a < w.mr; ++a)
        for (int b = 0; b < w.mc; ++b) {
          User u;
          if (user_of(w, p.r, p.c, a, b, u))
            sum += user_p[(size_t)(a * w.mc + b) * tile] * load(gb, e * ohw + (size_t)u.i * w.Wo + u.j);
        }
      store(dv_out + (size_t)p.plane * dv * hw + n + e * hw, sum);
    }
}

// The key side's logits of one chunk of split rel channels that lies within one half
// (kHasRelSplit): their rel depends on the user's table row only (channels < Dqk/2,
// rel_h) or on its table column only (rel_w). So key + rel of each channel is formed once
// per user row (column) in registers, and each user costs its query's halo loads and one
// FMA per channel: no rel load, no add. The users are visited row by row (column by
// column); each user's dot runs over the channels in order, as in key_grad_tiled's loop,
// so the logits are bitwise those of it. mine: this thread's column of the users' logits
// [U][tile] (this chunk stores if first, else adds); rel: the head's staged split rel
// (stage_split_rel_head), c0: the chunk's first channel.
template <int C, class A>
__device__ __forceinline__ void split_rel_chunk_logits(A* __restrict__ mine, const A* __restrict__ halo,
                                                       int halo_area, const RelOfHead<A>& rel, int c0,
                                                       const A (&kreg)[C], int nch, bool first,
                                                       const TileSlots& ts, int mr, int mc, int tile) {
  const bool rows_half = c0 < rel.half;
  const int outer = rows_half ? mr : mc, inner = rows_half ? mc : mr;
  const int entries = rows_half ? rel.th : rel.tw;   // of one channel's rel_h (rel_w)
  const A* table = rows_half ? rel.a + (size_t)c0 * rel.th : rel.b + (size_t)(c0 - rel.half) * rel.tw;
  for (int i = 0; i < outer; ++i) {
    const int at = rows_half ? ts.tab_row(i) : ts.tab_col(i), fixed = rows_half ? ts.row(i) : ts.col(i);
    A krel[C];
#pragma unroll
    for (int d = 0; d < C; ++d) krel[d] = d < nch ? kreg[d] + table[d * entries + at] : kreg[d];   // kreg 0 past nch
    for (int j = 0; j < inner; ++j) {   // user (a, b): its logit, or 0 for padding
      const int a = rows_half ? i : j, b = rows_half ? j : i;
      chunk_dot_entry<C>(mine[(size_t)(a * mc + b) * tile], halo, halo_area,
                         fixed + (rows_half ? ts.col(j) : ts.row(j)), krel, first);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Key side, fast path (stride 1): key_grad<T, kAttention> for a tile of keys with the
// queries and output gradients of its users staged in shared memory (the "halo" of
// outputs whose windows reach the tile; with stride 1 a query sits at its output's
// position, so both are staged over the same output rectangle). Shared:
//   user_p[U][TILE], user_dl[U][TILE] (A)   logits, then weights; grad_out . v, then dlogit
//   halo[max(CK,CV)][halo_h*halo_w] (A)     one chunk of q or grad_out channels (with rel,
//                                           CK channels of rel after CK of q: staging_floats)
//   split rel: the head's rel_h and rel_w (A, stage_split_rel_head)
//   the tile's users tables as halo offsets (int, see TileSlots)
// Phases: (1) logits over q chunks, (2) grad_out . v over grad chunks, (3) weights and
// dlogit, (4) dk over q chunks, (5) dv over grad chunks.
// ---------------------------------------------------------------------------------------
template <class T, int CK, int CV>
__global__ void LOCALREL_BOUNDS
key_grad_tiled(const int* __restrict__ geo, const T* __restrict__ grad, const T* __restrict__ q,
               const T* __restrict__ k, const T* __restrict__ v, const acc_t<T>* __restrict__ lse,
               const acc_t<T>* __restrict__ delta, const T* __restrict__ bias, const T* __restrict__ rel,
               const T* __restrict__ rel_w, T* __restrict__ dk, T* __restrict__ dv_out, int heads, int dqk, int dv, int flags,
               acc_t<T> scale, int halo_h, int halo_w) {
  using A = acc_t<T>;
  flags = tiled_flags<CK>(flags);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Window w(geo);
  const TilePos p = tile_pos(w.H, w.W);
  const int tile = blockDim.x * blockDim.y, U = w.mr * w.mc, h = p.plane % heads;
  const int halo_area = halo_h * halo_w;
  const size_t tt = (size_t)w.th * w.tw, hw = w.in_plane(), ohw = w.out_plane();
  A* user_p = reinterpret_cast<A*>(smem_raw) + p.tid;
  A* user_dl = user_p + (size_t)U * tile;
  A* halo = align16(reinterpret_cast<A*>(smem_raw), 2 * (size_t)U * tile);   // ChunkLayout
  // Top-left output of the users of this tile (users tables: -1 padded, like pos tables).
  const int oy0 = halo_origin(w.ru_out, p.row0, blockDim.y, w.H, w.mr);
  const int ox0 = halo_origin(w.cu_out, p.col0, blockDim.x, w.W, w.mc);

  const size_t n = p.inside ? (size_t)p.r * w.W + p.c : 0;   // this thread's key pixel
  const size_t qk_off = (size_t)p.plane * dqk * hw;
  const T* qb = q + qk_off;
  const T* kn = k + qk_off + n;
  const T* gb = grad + (size_t)p.plane * dv * ohw;
  const T* rel_h = rel + (size_t)h * dqk * tt;

  // User (a, b) of this thread's key: halo offset of its output ts.off (negative: padding)
  // and its bias/rel table index ts.tab, from the tile's users tables in shared memory.
  A* rels = halo + CK * halo_area;   // [CK][th*tw] with rel (staging_floats)
  // Split rel: the head's rel_h and rel_w after the staging buffer (read after the barrier
  // that follows the users tables).
  A* rel_copy = halo + staging_floats<CK, CV>(halo_area, (int)tt, flags);
  const RelOfHead<A> split_rel = (flags & kHasRelSplit)
      ? stage_split_rel_head(rel_copy, RelOfHead<T>(rel, rel_w, h, dqk, w, flags), p.tid, tile)
      : RelOfHead<A>(nullptr, nullptr, 0, 0, 0);
  int* cursor = reinterpret_cast<int*>(rel_copy + split_rel_head_floats(w, dqk, flags));
  const TileAxis rows = carve_axis(cursor, w.mr, blockDim.y), cols = carve_axis(cursor, w.mc, blockDim.x);
  fill_users_axis(rows, w.ru_out, w.ru_slot, w.rows_tab, w.kh, w.mr, p.row0, blockDim.y, w.H, oy0, halo_w,
                  p.tid, tile);
  fill_users_axis(cols, w.cu_out, w.cu_slot, w.cols_tab, w.kw, w.mc, p.col0, blockDim.x, w.W, ox0, 1, p.tid, tile);
  __syncthreads();
  const TileSlots ts(rows, cols);


  // (1) logits q_u . (k + rel_u), over q chunks (the first chunk stores).
  if (dqk <= 0 && p.inside)
    for (int s = 0; s < U; ++s) user_p[(size_t)s * tile] = 0;
  for (int c0 = 0; c0 < dqk; c0 += CK) {
    const int nch = min(CK, dqk - c0);
    __syncthreads();
    stage_halo<CK>(halo, qb + (size_t)c0 * hw, hw, w, oy0, ox0, halo_h, halo_w, nch, p.tid, tile);
    if (flags & kHasRel) stage_rel(rels, rel_h, (int)tt, c0, nch, p.tid, tile);
    __syncthreads();
    if (!p.inside) continue;
    A kreg[CK];
#pragma unroll
    for (int d = 0; d < CK; ++d) kreg[d] = d < nch ? load(kn, (size_t)(c0 + d) * hw) : A(0);
    if ((flags & kHasRelSplit) && (c0 + nch <= split_rel.half || c0 >= split_rel.half)) {
      split_rel_chunk_logits<CK>(user_p, halo, halo_area, split_rel, c0, kreg, nch, c0 == 0, ts, w.mr, w.mc, tile);
      continue;
    }
    // Channels past nch: the staged queries are 0; only a tail's rel chunk needs the guard.
    by_chunk_fill(nch == CK, [&](auto full) {
      for (int a = 0; a < w.mr; ++a) {
        const int row = ts.row(a), ay = ts.tab_row(a);   // once per user row
        for (int b = 0; b < w.mc; ++b) {
          const int uh = row + ts.col(b);
          A& up = user_p[(size_t)(a * w.mc + b) * tile];
          if (uh < 0) {   // padding: no user
            if (c0 == 0) up = 0;
            continue;
          }
          const int ax = ts.tab_col(b), tab = ay * w.tw + ax;
          A qu[CK];
          halo_channels<CK>(halo, halo_area, uh, qu);
          A dot = 0;
#pragma unroll
          for (int d = 0; d < CK; ++d) {
            A key = kreg[d];
            if ((flags & kHasRel) && (decltype(full)::value || d < nch)) key += rels[d * tt + tab];
            if ((flags & kHasRelSplit) && (decltype(full)::value || d < nch))
              key += split_rel.at(c0 + d, ay, ax, flags);
            dot += qu[d] * key;
          }
          up = c0 == 0 ? dot : up + dot;   // the first chunk stores
        }
      }
    });
  }

  // (2) dp_u = grad_out_u . v, over grad chunks.
  const T* vb = v + (size_t)p.plane * dv * hw;
  const auto value_at = [&](int r, int c) { return vb + (size_t)r * w.W + c; };
  chunked_slot_dots<CV>(user_dl - p.tid, halo, gb, ohw, value_at, hw, dv, w, p, ts, w.mr, w.mc, oy0, ox0, halo_h,
                        halo_w, tile, tile);

  // (3) weight p_u = exp(logit - lse) and dlogit_u = p_u (dp_u - delta) of each user. lse and
  // delta of the users' outputs are staged over the output halo first (the halo buffer is
  // free between the chunked phases, and holds >= 2 channels): coalesced reads, instead of
  // a gather and a division per user.
  static_assert((CK > CV ? CK : CV) >= 2, "lse and delta are staged in two halo channels");
  A* lse_h = halo;
  A* delta_h = halo + halo_area;
  __syncthreads();   // phase (2)'s readers are done with the halo
  for (int idx = p.tid; idx < halo_area; idx += tile) {
    const int y = oy0 + idx / halo_w, x = ox0 + idx % halo_w;
    const bool in = y < w.Ho && x < w.Wo;
    const size_t o = (size_t)p.plane * ohw + (size_t)(in ? y : 0) * w.Wo + (in ? x : 0);
    lse_h[idx] = in ? lse[o] : A(0);
    delta_h[idx] = in ? delta[o] : A(0);
  }
  __syncthreads();
  if (p.inside)
    for (int a = 0; a < w.mr; ++a) {
      const int row = ts.row(a), tab_row = (flags & kHasBias) ? ts.tab_row(a) * w.tw : 0;   // once per row
      for (int b = 0; b < w.mc; ++b) {
        const int uh = row + ts.col(b);   // the user's output, as a halo offset (stride 1)
        if (uh < 0) continue;
        const size_t s = (size_t)(a * w.mc + b) * tile;
        const A logit = scale * user_p[s] + ((flags & kHasBias) ? load(bias, (size_t)h * tt + tab_row + ts.tab_col(b)) : A(0));
        // 0 in an empty window (lse -inf), where exp(logit - lse) would be NaN.
        const A pt = weight_from_lse(logit, lse_h[uh]);
        user_p[s] = pt;
        user_dl[s] = pt * (user_dl[s] - delta_h[uh]);
      }
    }

  // (4) dk = scale * sum_u dlogit_u q_u, over q chunks.
  // (user_p and user_dl point at this thread's column: the sums take the arrays' bases.)
  chunked_weighted_sums<CK>(dk + qk_off, hw, scale, user_dl - p.tid, halo, qb, hw, dqk, w, p, ts, w.mr, w.mc, oy0,
                            ox0, halo_h, halo_w, tile, tile, w.H, w.W);
  // (5) dv = sum_u p_u grad_out_u, over grad chunks.
  chunked_weighted_sums<CV>(dv_out + (size_t)p.plane * dv * hw, hw, A(1), user_p - p.tid, halo, gb, ohw, dv, w, p,
                            ts, w.mr, w.mc, oy0, ox0, halo_h, halo_w, tile, tile, w.H, w.W);
}

// ---------------------------------------------------------------------------------------
// local_av2d backward, attention side: d attn_t = grad_out . v_t (0 at invalid slots).
// ---------------------------------------------------------------------------------------
template <class T>
__global__ void LOCALREL_BOUNDS
av_dattn(const int* __restrict__ geo, const T* __restrict__ grad, const T* __restrict__ v,
         T* __restrict__ dattn, int dv) {
  using A = acc_t<T>;
  const Window w(geo);
  const TilePos p = tile_pos(w.Ho, w.Wo);
  if (!p.inside) return;
  const size_t o = (size_t)p.r * w.Wo + p.c, hw = w.in_plane(), ohw = w.out_plane();
  const T* g = grad + (size_t)p.plane * dv * ohw + o;
  const T* vb = v + (size_t)p.plane * dv * hw;
  T* dst = dattn + (size_t)p.plane * w.slots() * ohw + o;
  for (int ty = 0; ty < w.kh; ++ty)
    for (int tx = 0; tx < w.kw; ++tx) {
      const Slot s = slot_of(w, p.r, p.c, ty, tx);
      A dot = 0;
      if (s.valid())
        for (int e = 0; e < dv; ++e) dot += load(g, e * ohw) * load(vb, e * hw + s.in(w.W));
      store(dst + (size_t)(ty * w.kw + tx) * ohw, dot);
    }
}

// ---------------------------------------------------------------------------------------
// Stage 2 of dbias/drel: dst[h][e] = sum over batches b and tiles of part[(b*heads + h)
// * tiles + tile][e]. `entries` per block: th*tw (bias), Dqk*th*tw (rel) or, for split rel,
// Dqk/2 * (th + tw): then each head's first `split` entries (rel_h's) go to dst[h][e] and
// the others (rel_w's) to dst2[h][e - split], two results from one launch (split = entries
// otherwise). Block
// (kReduceRun, kReduceSegments): lane x owns output idx = h * entries + e of a run of
// kReduceRun (a warp reads 4 such runs of 32 bytes), row y sums the y-th
// contiguous segment of the batch*tiles partials in order, and lane x of row 0 adds the
// segments' sums in order: a fixed order. Short runs and many segments give the small
// reductions (a bias table: heads * th * tw outputs) enough blocks and warps in flight to
// hide the loads' latency. Grid: ceil(heads * entries / kReduceRun) blocks.
// ---------------------------------------------------------------------------------------
constexpr int kReduceRun = 8, kReduceSegments = 16;

template <class T>
__global__ void LOCALREL_BOUNDS
table_reduce(const acc_t<T>* __restrict__ part, T* __restrict__ dst, T* __restrict__ dst2, int batch, int heads,
             int tiles, int entries, int split) {
  using A = acc_t<T>;
  __shared__ A seg[kReduceSegments][kReduceRun];
  const long long idx = (long long)blockIdx.x * kReduceRun + threadIdx.x;
  const bool valid = idx < (long long)heads * entries;
  const int h = valid ? (int)(idx / entries) : 0, e = (int)(idx - (long long)h * entries);
  const long long n = (long long)batch * tiles;   // partials per entry, (b, tile) order
  const long long first = n * threadIdx.y / kReduceSegments, last = n * (threadIdx.y + 1) / kReduceSegments;
  A sum = 0;
  if (valid) {
    long long b = first / tiles, t = first - b * tiles;   // one division per thread
    for (long long j = first; j < last; ++j) {
      sum += part[((size_t)(b * heads + h) * tiles + t) * entries + e];
      if (++t == tiles) t = 0, ++b;
    }
  }
  seg[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && valid) {
    A total = seg[0][threadIdx.x];
    for (int y = 1; y < kReduceSegments; ++y) total += seg[y][threadIdx.x];
    store(e < split ? dst + (size_t)h * split + e : dst2 + (size_t)h * (entries - split) + (e - split), total);
  }
}
