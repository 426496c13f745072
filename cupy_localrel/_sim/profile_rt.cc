// profile_rt.cc - the counting runtime of the CPU engine's profile mode.
//
// engine.py compiles a kernel file with `-fsanitize=thread -DCUDASIM_PROFILE` (compile only)
// and links this file in place of libtsan: every load and store of kernel code then calls
// __tsan_readN / __tsan_writeN (addr) below. The call's return address is the access *site*;
// Python maps it to the .cu file and line with addr2line (the engine's #line markers).
//
// Which lanes make one warp-level request: blocks run one at a time (profile mode uses one
// worker) and each CUDA thread is a fiber, so the runtime groups accesses by
// (site, load/store/atomic, warp, n) where n counts how often this lane has executed this
// site in this block. That is exact for convergent code. In divergent code (a lane that skips
// an iteration with `continue`) the n-th executions of different lanes may belong to
// different loop iterations; they are still grouped together, so counts remain a faithful
// total of lanes and bytes but the per-request figures of such sites are approximate.
//
// Which memory: an address inside a buffer registered by Python (the kernel's pointer
// arguments) is global memory; inside the block's dynamic shared memory or a static
// __shared__ variable (hooks from cudasim.h) it is shared memory; anything else (fiber
// stacks = registers/local memory, the engine's own state) is not counted.
//
// This file is compiled WITHOUT the sanitizer and does not include cudasim.h (its inline
// functions differ between the instrumented and the plain build).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <map>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

struct TFiber { int depth = 0; };
TFiber g_main_fiber;
TFiber* g_cur = nullptr;
inline TFiber* current() { return g_cur ? g_cur : &g_main_fiber; }

enum Rw : uint8_t { LOAD = 0, STORE = 1, ATOMIC = 2 };

struct Buffer {
  uint64_t lo = 0, hi = 0, base = 0;   // base: lo rounded down to a 32-byte sector
  std::vector<uint64_t> bits;          // one bit per byte from base: the launch's distinct bytes
};
std::vector<Buffer> g_buffers;         // sorted by lo, disjoint

struct Ev { uint64_t addr; uint32_t size; };
struct Key {
  uint64_t site; uint32_t warp, n; uint8_t rw, space;
  bool operator==(const Key& o) const {
    return site == o.site && warp == o.warp && n == o.n && rw == o.rw && space == o.space;
  }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = k.site * 0x9e3779b97f4a7c15ull ^ ((uint64_t)k.warp << 32 | k.n) * 0xbf58476d1ce4e5b9ull;
    return (size_t)(h ^ (h >> 29) ^ ((uint64_t)k.rw << 7) ^ k.space);
  }
};
struct Agg { uint64_t requests = 0, lanes = 0, bytes = 0, sectors = 0, ideal = 0, wavefronts = 0; };

// per block
bool g_in_block = false;
unsigned g_lane = 0;
uint64_t g_dyn_lo = 0, g_dyn_hi = 0;
std::vector<std::pair<uint64_t, uint64_t>> g_static_shared;   // [lo, hi) of __shared__ variables
std::unordered_map<uint64_t, uint32_t> g_nth;                  // (site, rw, lane) -> executions so far
std::unordered_map<Key, uint32_t, KeyHash> g_inst;             // request -> index into g_events
std::vector<std::vector<Ev>> g_events;
std::vector<Key> g_keys;
size_t g_used = 0;

// per launch (until reset)
std::map<std::tuple<uint64_t, int, char>, Agg> g_agg;          // (site offset, rw, space)
std::map<std::pair<std::string, int>, uint64_t> g_barriers;    // (file, line) -> block-wide barriers
uint64_t g_blocks = 0;
uintptr_t g_so_base = 0;

inline int find_buffer(uint64_t a) {
  auto it = std::upper_bound(g_buffers.begin(), g_buffers.end(), a,
                             [](uint64_t x, const Buffer& b) { return x < b.lo; });
  if (it == g_buffers.begin()) return -1;
  --it;
  return a < it->hi ? (int)(it - g_buffers.begin()) : -1;
}

inline bool in_shared(uint64_t a) {
  if (a >= g_dyn_lo && a < g_dyn_hi) return true;
  for (auto& r : g_static_shared)
    if (a >= r.first && a < r.second) return true;
  return false;
}

inline void mark_bytes(Buffer& b, uint64_t a, uint32_t n) {
  for (uint64_t x = a; x < a + n && x < b.hi; ++x) {
    const uint64_t i = x - b.base;
    b.bits[i >> 6] |= 1ull << (i & 63);
  }
}

inline void record(const volatile void* p, uint32_t size, Rw rw, void* ret) {
  if (!g_in_block || current()->depth > 0) return;
  const uint64_t a = (uint64_t)(uintptr_t)p;
  char space;
  if (in_shared(a)) {
    space = 'S';
  } else {
    const int b = find_buffer(a);
    if (b < 0) return;
    space = 'G';
    mark_bytes(g_buffers[b], a, size);
  }
  const uint64_t site = (uint64_t)(uintptr_t)ret;
  const uint64_t nk = site * 0x100000001b3ull ^ ((uint64_t)g_lane << 2 | rw);
  const uint32_t n = g_nth[nk]++;
  const Key key{site, g_lane >> 5, n, (uint8_t)rw, (uint8_t)space};
  auto [it, fresh] = g_inst.try_emplace(key, (uint32_t)g_used);
  if (fresh) {
    if (g_used == g_events.size()) g_events.emplace_back();
    if (g_used == g_keys.size()) g_keys.push_back(key); else g_keys[g_used] = key;
    g_events[g_used].clear();
    ++g_used;
  }
  g_events[it->second].push_back(Ev{a, size});
}

// Distinct bytes covered by the events (intervals merged).
uint64_t distinct_bytes(std::vector<Ev>& evs) {
  std::sort(evs.begin(), evs.end(), [](const Ev& x, const Ev& y) { return x.addr < y.addr; });
  uint64_t total = 0, lo = 0, hi = 0;
  bool open = false;
  for (auto& e : evs) {
    if (open && e.addr <= hi) { hi = std::max(hi, e.addr + e.size); continue; }
    if (open) total += hi - lo;
    lo = e.addr; hi = e.addr + e.size; open = true;
  }
  return open ? total + hi - lo : 0;
}

void flush_block() {
  std::vector<uint64_t> ids;
  for (size_t i = 0; i < g_used; ++i) {
    const Key& k = g_keys[i];
    std::vector<Ev>& evs = g_events[i];
    Agg& g = g_agg[{k.site - g_so_base, k.rw, (char)k.space}];
    g.requests++;
    g.lanes += evs.size();
    ids.clear();
    for (auto& e : evs) {
      g.bytes += e.size;
      if (k.space == 'S')      // 4-byte words; bank = word % 32
        for (uint64_t w = e.addr >> 2; w <= (e.addr + e.size - 1) >> 2; ++w) ids.push_back(w);
      else                     // 32-byte sectors
        for (uint64_t s = e.addr >> 5; s <= (e.addr + e.size - 1) >> 5; ++s) ids.push_back(s);
    }
    std::sort(ids.begin(), ids.end());
    ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
    if (k.space == 'S') {
      // A wavefront serves at most one distinct word per bank; a broadcast (many lanes, one
      // word) costs one.
      unsigned per_bank[32] = {0};
      unsigned worst = 0;
      for (uint64_t w : ids) worst = std::max(worst, ++per_bank[w & 31]);
      g.wavefronts += worst;
      // The fewest wavefronts any layout could serve the request's distinct bytes in: 128
      // bytes (32 banks x 4) per wavefront, at least one. A 4-byte request of 32 lanes needs
      // 1, a 16-byte (LDS.128) one 4: wavefronts / ideal is the conflict factor at any width.
      g.ideal += std::max<uint64_t>(1, (distinct_bytes(evs) + 127) / 128);
    } else {
      g.sectors += ids.size();
      g.ideal += (distinct_bytes(evs) + 31) / 32;
    }
  }
  g_inst.clear();
  g_nth.clear();
  g_used = 0;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Hooks called by cudasim.h (CUDASIM_PROFILE)
// ---------------------------------------------------------------------------------------
extern "C" {
void cudasim_prof_block_begin(unsigned, const void* dyn, size_t dyn_bytes) {
  g_dyn_lo = (uint64_t)(uintptr_t)dyn;
  g_dyn_hi = g_dyn_lo + dyn_bytes;
  g_static_shared.clear();
  g_in_block = true;
  g_blocks++;
}
void cudasim_prof_block_end(void) {
  flush_block();
  g_in_block = false;
}
void cudasim_prof_lane(unsigned lin) { g_lane = lin; }
void cudasim_prof_shared_range(const void* p, size_t bytes) {
  const uint64_t lo = (uint64_t)(uintptr_t)p;
  for (auto& r : g_static_shared)
    if (r.first == lo) return;
  g_static_shared.emplace_back(lo, lo + bytes);
}
void cudasim_prof_barrier(const char* file, int line) { g_barriers[{file ? file : "?", line}]++; }

// ---------------------------------------------------------------------------------------
// Called from Python (ctypes)
// ---------------------------------------------------------------------------------------
// ranges: n pairs [lo, hi) of the launch's global buffers (the kernel's pointer arguments).
int cudasim_prof_begin(const uint64_t* ranges, unsigned n) {
  g_buffers.clear();
  for (unsigned i = 0; i < n; ++i) {
    Buffer b;
    b.lo = ranges[2 * i]; b.hi = ranges[2 * i + 1];
    if (b.hi <= b.lo) continue;
    b.base = b.lo & ~uint64_t(31);
    b.bits.assign((b.hi - b.base + 63) / 64, 0);
    g_buffers.push_back(std::move(b));
  }
  std::sort(g_buffers.begin(), g_buffers.end(), [](const Buffer& x, const Buffer& y) { return x.lo < y.lo; });
  for (size_t i = 1; i < g_buffers.size(); ++i)
    if (g_buffers[i].lo < g_buffers[i - 1].hi) return 1;   // overlapping: Python merges first
  g_agg.clear(); g_barriers.clear(); g_blocks = 0;
  g_inst.clear(); g_nth.clear(); g_used = 0;
  return 0;
}

// Text report (Python parses it):
//   blocks N
//   buffer LO UNIQUE_BYTES UNIQUE_SECTORS
//   site OFFSET RW SPACE REQUESTS LANES BYTES SECTORS IDEAL WAVEFRONTS
// (IDEAL: ideal sectors in global memory, ideal wavefronts in shared memory)
//   barrier COUNT LINE FILE
int cudasim_prof_dump(const char* path) {
  if (g_in_block) flush_block();
  FILE* f = fopen(path, "w");
  if (!f) return 1;
  fprintf(f, "blocks %llu\n", (unsigned long long)g_blocks);
  for (auto& b : g_buffers) {
    uint64_t bytes = 0, sectors = 0;
    for (uint64_t w : b.bits) {
      bytes += __builtin_popcountll(w);
      sectors += (uint32_t)w != 0;
      sectors += (w >> 32) != 0;
    }
    fprintf(f, "buffer %llu %llu %llu\n", (unsigned long long)b.lo, (unsigned long long)bytes,
            (unsigned long long)sectors);
  }
  for (auto& [k, g] : g_agg)
    fprintf(f, "site %llx %d %c %llu %llu %llu %llu %llu %llu\n", (unsigned long long)std::get<0>(k),
            std::get<1>(k), std::get<2>(k), (unsigned long long)g.requests, (unsigned long long)g.lanes,
            (unsigned long long)g.bytes, (unsigned long long)g.sectors, (unsigned long long)g.ideal,
            (unsigned long long)g.wavefronts);
  for (auto& [k, n] : g_barriers)
    fprintf(f, "barrier %llu %d %s\n", (unsigned long long)n, k.second, k.first.c_str());
  fclose(f);
  g_buffers.clear();
  return 0;
}

// ---------------------------------------------------------------------------------------
// ThreadSanitizer's compiler interface, implemented as counters
// ---------------------------------------------------------------------------------------
#define CUDASIM_RW(n)                                                                            \
  void __tsan_read##n(void* p) { record(p, n, LOAD, __builtin_return_address(0)); }              \
  void __tsan_write##n(void* p) { record(p, n, STORE, __builtin_return_address(0)); }            \
  void __tsan_unaligned_read##n(void* p) { record(p, n, LOAD, __builtin_return_address(0)); }    \
  void __tsan_unaligned_write##n(void* p) { record(p, n, STORE, __builtin_return_address(0)); }  \
  void __tsan_volatile_read##n(void* p) { record(p, n, LOAD, __builtin_return_address(0)); }     \
  void __tsan_volatile_write##n(void* p) { record(p, n, STORE, __builtin_return_address(0)); }
CUDASIM_RW(1) CUDASIM_RW(2) CUDASIM_RW(4) CUDASIM_RW(8) CUDASIM_RW(16)
#undef CUDASIM_RW
void __tsan_read_range(void* p, unsigned long n) { record(p, (uint32_t)n, LOAD, __builtin_return_address(0)); }
void __tsan_write_range(void* p, unsigned long n) { record(p, (uint32_t)n, STORE, __builtin_return_address(0)); }
void __tsan_init(void) {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit(void) {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void* __tsan_get_current_fiber(void) { return current(); }
void* __tsan_create_fiber(unsigned) { return new TFiber; }
void __tsan_destroy_fiber(void* f) { delete static_cast<TFiber*>(f); }
void __tsan_switch_to_fiber(void* f, unsigned) { g_cur = static_cast<TFiber*>(f); }
void __tsan_set_fiber_name(void*, const char*) {}
void __tsan_ignore_thread_begin(void) { current()->depth++; }
void __tsan_ignore_thread_end(void) { current()->depth--; }
void __tsan_acquire(void*) {}
void __tsan_release(void*) {}

// Atomics: each read-modify-write counts as one atomic. Plain atomic loads and stores are not
// counted: in kernel code they only come from the engine's emulation of CUDA's atomics (the
// load before a compare-and-swap loop of atomicAdd on a float).
#define CUDASIM_RMW(bits, T, op, builtin)                                                      \
  T __tsan_atomic##bits##_##op(volatile T* a, T v, int) {                                       \
    record(a, sizeof(T), ATOMIC, __builtin_return_address(0));                                  \
    return builtin(a, v, __ATOMIC_SEQ_CST);                                                     \
  }
#define CUDASIM_CAS(bits, T, op)                                                                \
  int __tsan_atomic##bits##_compare_exchange_##op(volatile T* a, T* c, T v, int, int) {         \
    record(a, sizeof(T), ATOMIC, __builtin_return_address(0));                                  \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
  }
#define CUDASIM_ATOMIC(bits, T)                                                                 \
  T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  CUDASIM_RMW(bits, T, exchange, __atomic_exchange_n)                                           \
  CUDASIM_RMW(bits, T, fetch_add, __atomic_fetch_add)                                           \
  CUDASIM_RMW(bits, T, fetch_sub, __atomic_fetch_sub)                                           \
  CUDASIM_RMW(bits, T, fetch_and, __atomic_fetch_and)                                           \
  CUDASIM_RMW(bits, T, fetch_or, __atomic_fetch_or)                                             \
  CUDASIM_RMW(bits, T, fetch_xor, __atomic_fetch_xor)                                           \
  CUDASIM_RMW(bits, T, fetch_nand, __atomic_fetch_nand)                                         \
  CUDASIM_CAS(bits, T, strong)                                                                  \
  CUDASIM_CAS(bits, T, weak)                                                                    \
  T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {             \
    record(a, sizeof(T), ATOMIC, __builtin_return_address(0));                                  \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
    return c;                                                                                   \
  }
CUDASIM_ATOMIC(8, int8_t) CUDASIM_ATOMIC(16, int16_t) CUDASIM_ATOMIC(32, int32_t) CUDASIM_ATOMIC(64, int64_t)
#undef CUDASIM_ATOMIC
#undef CUDASIM_CAS
#undef CUDASIM_RMW
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

__attribute__((constructor)) static void cudasim_prof_init(void) {
  Dl_info info;
  if (dladdr((void*)&cudasim_prof_dump, &info)) g_so_base = (uintptr_t)info.dli_fbase;
}
}  // extern "C"
