// cudasim.h - run CUDA C kernels (the sources given to cupy.RawModule) on the CPU with g++.
//
// Execution model
//   * A launch spreads its blocks over `workers` OS threads; each worker runs one block at a
//     time to completion.
//   * Every CUDA thread of the running block is a fiber on that worker. Fibers switch only
//     where CUDA threads must wait for each other: __syncthreads*, warp collectives
//     (__shfl*_sync, __ballot_sync, __syncwarp, ...). Between two such points a CUDA thread
//     runs alone, so results are deterministic for a given thread order.
//   * A "sweep" resumes every live fiber once, in forward, reversed or seeded-shuffled
//     order. A kernel that reads shared memory written by another thread without a barrier
//     in between gets a different (usually poisoned) value under another order.
//   * Shared memory (static `__shared__` and dynamic `extern __shared__`) is per worker,
//     heap-allocated (so AddressSanitizer sees overruns) and filled with 0xff bytes (NaN for
//     floats, -1 for ints) at the start of every block, so stale values cannot hide bugs.
//     The Python side rewrites the declarations (see engine.py); file-scope `__shared__`
//     variables stay plain thread_local storage and are not re-poisoned.
//   * Errors stop the launch and come back to Python as a message, raised there as
//     RuntimeError: __syncthreads reached by only part of the block or at different call
//     sites, deadlocks, warp collectives with a bad mask or an exited lane, __trap().
//   * Sanitizer builds: AddressSanitizer (out-of-bounds global/shared/local accesses, with
//     the CUDA thread named) and ThreadSanitizer, where each CUDA thread is a TSan fiber and
//     barriers/collectives/block order are release-acquire pairs, so TSan reports accesses
//     of two CUDA threads that nothing orders (a "racecheck").
//   * Profile builds (CUDASIM_PROFILE): TSan's instrumentation linked with the counting
//     runtime profile_rt.cc instead of libtsan (memory traffic per warp request and source
//     line; see profile.py). LaunchConfig.blocks runs only chosen blocks (sampling).
//
// Known limits: no inline PTX, mma/wmma/ldmatrix/cp.async, cooperative groups, textures,
// __constant__ upload (get_global); fast-math intrinsics are the accurate libm functions;
// a thread spinning on a flag that another thread of its block sets never yields (hangs);
// x86-64 (fast path) or other glibc Linux (ucontext path).
#pragma once
#include <ucontext.h>
#include <setjmp.h>
#include <sys/mman.h>
#include <unistd.h>
#include <cxxabi.h>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <math.h>  // the C++ wrapper: float overloads of exp/log/... in the global namespace, like CUDA
#include <cstdio>
#include <cstdlib>
#include <climits>
#include <cfloat>
#include <atomic>
#include <thread>
#include <mutex>
#include <vector>
#include <string>
#include <algorithm>
#include <utility>
#include <typeinfo>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __constant__
#define __managed__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__
// The Python side rewrites every `__shared__` declaration inside functions; this fallback
// serves file-scope declarations (one copy per worker thread, never re-poisoned).
#define __shared__ thread_local
#define CUDASIM 1
#define CUPY_LOCALREL_SIM 1

// ThreadSanitizer mode ("racecheck"): every CUDA thread is a TSan fiber, and the points
// where CUDA orders threads (barriers, warp collectives, block boundaries) are told to TSan
// as release/acquire pairs, so TSan reports accesses from two CUDA threads that nothing
// orders: shared-memory races within a block and global-memory races between blocks.
#if defined(__SANITIZE_THREAD__)
#define CUDASIM_TSAN 1
extern "C" void* __tsan_get_current_fiber(void);
extern "C" void* __tsan_create_fiber(unsigned flags);
extern "C" void __tsan_destroy_fiber(void* fiber);
extern "C" void __tsan_switch_to_fiber(void* fiber, unsigned flags);
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
extern "C" void __tsan_ignore_thread_begin(void);
extern "C" void __tsan_ignore_thread_end(void);
extern "C" void __tsan_set_fiber_name(void* fiber, const char* name);
#define CUDASIM_TSAN_RELEASE(p) __tsan_release((void*)(p))
#define CUDASIM_TSAN_ACQUIRE(p) __tsan_acquire((void*)(p))
// The engine's own bookkeeping (barrier counters, exchange buffers, scheduler state) is
// sequential by construction; only the kernel's accesses are checked.
#define CUDASIM_ENGINE_BEGIN() __tsan_ignore_thread_begin()
#define CUDASIM_ENGINE_END() __tsan_ignore_thread_end()
#else
#define CUDASIM_TSAN_RELEASE(p) ((void)0)
#define CUDASIM_TSAN_ACQUIRE(p) ((void)0)
#define CUDASIM_ENGINE_BEGIN() ((void)0)
#define CUDASIM_ENGINE_END() ((void)0)
#endif

// Profile mode (engine.py, CUPY_LOCALREL_SIM_PROFILE=1): the kernel file is compiled with
// -fsanitize=thread but linked against the engine's own counting runtime (profile_rt.cc)
// instead of libtsan: every load/store of kernel code reports its address and call site.
// The runtime needs the block, the lane and the shared-memory ranges, told by these hooks.
#if defined(CUDASIM_PROFILE)
#if !defined(__SANITIZE_THREAD__)
#error "CUDASIM_PROFILE needs -fsanitize=thread (the engine adds it)"
#endif
extern "C" void cudasim_prof_block_begin(unsigned linear_block, const void* dyn, size_t dyn_bytes);
extern "C" void cudasim_prof_block_end(void);
extern "C" void cudasim_prof_lane(unsigned lin);
extern "C" void cudasim_prof_shared_range(const void* p, size_t bytes);
extern "C" void cudasim_prof_barrier(const char* file, int line);
#define CUDASIM_PROF(call) call
#else
#define CUDASIM_PROF(call) ((void)0)
#endif

#if defined(__SANITIZE_ADDRESS__)
#define CUDASIM_ASAN 1
extern "C" void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile* addr, size_t size);
extern "C" void __sanitizer_set_death_callback(void (*callback)(void));
#endif

// ---------------------------------------------------------------------------------------
// Vector types (CUDA's alignment) and dim3
// ---------------------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};
#define CUDASIM_VEC2(T, N, A) struct alignas(A) N##2 { T x, y; }; \
  inline N##2 make_##N##2(T x, T y) { return {x, y}; }
#define CUDASIM_VEC3(T, N) struct N##3 { T x, y, z; }; \
  inline N##3 make_##N##3(T x, T y, T z) { return {x, y, z}; }
#define CUDASIM_VEC4(T, N, A) struct alignas(A) N##4 { T x, y, z, w; }; \
  inline N##4 make_##N##4(T x, T y, T z, T w) { return {x, y, z, w}; }
CUDASIM_VEC2(float, float, 8) CUDASIM_VEC3(float, float) CUDASIM_VEC4(float, float, 16)
CUDASIM_VEC2(double, double, 16) CUDASIM_VEC3(double, double) CUDASIM_VEC4(double, double, 32)
CUDASIM_VEC2(int, int, 8) CUDASIM_VEC3(int, int) CUDASIM_VEC4(int, int, 16)
CUDASIM_VEC2(unsigned, uint, 8) CUDASIM_VEC4(unsigned, uint, 16)
CUDASIM_VEC2(long long, longlong, 16) CUDASIM_VEC2(unsigned long long, ulonglong, 16)
CUDASIM_VEC2(short, short, 4) CUDASIM_VEC2(unsigned short, ushort, 4)
CUDASIM_VEC4(signed char, char, 4) CUDASIM_VEC4(unsigned char, uchar, 4)
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

// One 4-, 8- or 16-byte access of a vector type, as the GPU's LDS.64/128 (STS, LDG; a
// __half2 load) is one instruction. A plain struct copy is not: g++ splits `float4 v = *p` into four 4-byte loads
// once it keeps the fields in registers, and the profile runtime would count four requests
// (four times the wavefronts of a 16-byte request). Kernels reach these through
// localrel::load_wide/store_wide; through a GCC vector type, TSan's instrumentation sees one
// __tsan_read16/__tsan_write16 (read8, read4) per access.
template <class V>
inline V cudasim_load_wide(const V* p) {
  static_assert(sizeof(V) == 4 || sizeof(V) == 8 || sizeof(V) == 16, "4-, 8- or 16-byte vector types only");
  typedef char bytes __attribute__((vector_size(sizeof(V)), aligned(alignof(V))));
  const bytes b = *reinterpret_cast<const bytes*>(p);
  V v;
  std::memcpy(&v, &b, sizeof(V));
  return v;
}
template <class V>
inline void cudasim_store_wide(V* p, const V& v) {
  static_assert(sizeof(V) == 4 || sizeof(V) == 8 || sizeof(V) == 16, "4-, 8- or 16-byte vector types only");
  typedef char bytes __attribute__((vector_size(sizeof(V)), aligned(alignof(V))));
  bytes b;
  std::memcpy(&b, &v, sizeof(V));
  *reinterpret_cast<bytes*>(p) = b;
}
#undef CUDASIM_VEC2
#undef CUDASIM_VEC3
#undef CUDASIM_VEC4
constexpr int warpSize = 32;

namespace cudasim {

// ---------------------------------------------------------------------------------------
// Fibers and per-worker block state
// ---------------------------------------------------------------------------------------
enum Wait : unsigned char { RUNNING, AT_BARRIER, IN_WARP_OP, FINISHED };

// Context switch. On x86-64 a few instructions save the callee-saved registers on the old
// stack and switch stack pointers: no signal-mask syscall (swapcontext) and no cleanup-handler
// walk (_longjmp). The floating-point control state (MXCSR, x87) is shared by all fibers of a
// worker: kernels do not change rounding modes. Elsewhere: ucontext to start a fiber, _setjmp/_longjmp to switch.
#if defined(__x86_64__) && !defined(CUDASIM_PORTABLE_SWITCH)
#define CUDASIM_ASM_SWITCH 1
extern "C" void cudasim_switch_x86_64(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl cudasim_switch_x86_64
  .hidden cudasim_switch_x86_64
  .type cudasim_switch_x86_64, @function
cudasim_switch_x86_64:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudasim_switch_x86_64, .-cudasim_switch_x86_64
)");
#endif

struct Fiber {
#ifdef CUDASIM_ASM_SWITCH
  void* sp = nullptr;    // saved stack pointer while switched out
#else
  jmp_buf jb;            // where the fiber continues (valid once started)
  ucontext_t* ctx = nullptr;  // only used to start the fiber on its own stack
#endif
  char* stack = nullptr;
  size_t stack_size = 0;
  void* asan_fake = nullptr;
  void* tsan_fiber = nullptr;
  char tsan_name[64];
  uint3 tid{};
  unsigned lin = 0;      // linear thread index in the block
  Wait wait = RUNNING;
  bool started = false;
};

// One warp's collective exchange. A collective collects one 64-bit value per lane in
// `mask`, then "drains": each waiting lane reads what it needs; a new collective waits until
// the previous one is drained, so one buffer suffices and groups with different masks
// (e.g. two half-warps) take turns instead of mixing values.
struct Warp {
  enum State : unsigned char { IDLE, COLLECTING, DRAINING };
  State state = IDLE;
  unsigned mask = 0, count = 0, need = 0, pending = 0, gen = 0;
  unsigned exited = 0;   // lanes whose thread has returned from the kernel
  uint64_t slot[32];
  char tsan_sync[2];     // release/acquire addresses of even and odd collectives (TSan mode)
};

struct Block {
  std::vector<Fiber> f;
  std::vector<Warp> w;
#ifdef CUDASIM_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  jmp_buf sched;
  std::vector<ucontext_t> start_ctx;
#endif
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  Fiber* cur = nullptr;
  uint3 idx{};
  unsigned nthreads = 0, nfinished = 0;
  unsigned bar_count = 0, bar_gen = 0;
  int bar_acc = 0, bar_result[2] = {0, 0};
  const char* bar_file = nullptr;  // call site of the first thread waiting at the barrier
  int bar_line = 0;
  char tsan_bar[2];      // release/acquire addresses of even and odd barriers (TSan mode)
  char tsan_block[2];    // orders one block's threads before the next block's on this worker
  char tsan_parked;      // every switch-out releases here: the launch's end comes after all
  unsigned blocks_run = 0;  // blocks this worker has started; its parity picks tsan_block
  void* tsan_sched = nullptr;
  uint64_t progress = 0;   // bumped whenever some fiber gets past a wait
  uint64_t epoch = 0;      // distinct per block run by this worker: shared memory re-poisoning
  std::string error;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  char* dyn = nullptr;
};

inline thread_local Block* tb = nullptr;
inline thread_local uint3 t_threadIdx, t_blockIdx;
inline thread_local dim3 t_blockDim, t_gridDim;
constexpr unsigned char kPoison = 0xff;  // NaN for float/double/half, -1 for signed ints
inline std::atomic<uint64_t> g_epoch{0};

inline std::string where() {
  char buf[96];
  const Fiber* f = tb->cur;
  snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", tb->idx.x, tb->idx.y, tb->idx.z,
           f->tid.x, f->tid.y, f->tid.z);
  return buf;
}

// Fiber -> scheduler. Returns when the scheduler resumes this fiber.
inline void yield_() {
  Fiber* f = tb->cur;
#ifdef CUDASIM_ASAN
  __sanitizer_start_switch_fiber(&f->asan_fake, tb->sched_bottom, tb->sched_size);
#endif
#ifdef CUDASIM_ASM_SWITCH
  void* const sched_sp = tb->sched_sp;
#endif
#ifdef CUDASIM_TSAN
  // Everything this fiber did so far happens before the end of the launch (the scheduler
  // acquires tsan_parked then); so no memory is read between this release and the switch.
  void* const sched = tb->tsan_sched;
  __tsan_release(&tb->tsan_parked);
  __tsan_switch_to_fiber(sched, 1 /* no synchronisation: only ours counts */);
#endif
#ifdef CUDASIM_ASM_SWITCH
  cudasim_switch_x86_64(&f->sp, sched_sp);
#else
  if (_setjmp(f->jb) == 0) _longjmp(tb->sched, 1);
#endif
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake, &tb->sched_bottom, &tb->sched_size);
#endif
}

// Record the first error of the block and park this fiber for good.
[[noreturn]] inline void fail(const std::string& msg) {
  if (tb->error.empty()) tb->error = msg;
  for (;;) yield_();
}

// ---------------------------------------------------------------------------------------
// Shared memory
// ---------------------------------------------------------------------------------------
// Storage of one static `__shared__` variable (one per declaration site and template
// instantiation, per worker thread), poisoned at the first use in each block.
struct SharedSlot {
  void* p = nullptr;
  uint64_t epoch = ~uint64_t(0);
  ~SharedSlot() { free(p); }
};
template <class T, int Site>
inline SharedSlot& shared_slot() {
  static thread_local SharedSlot slot;
  return slot;
}
template <class T, int Site>
inline T& shared_var() {
  CUDASIM_ENGINE_BEGIN();
  SharedSlot& slot = shared_slot<T, Site>();
  if (slot.epoch != tb->epoch) {
    if (!slot.p && posix_memalign(&slot.p, 128, sizeof(T))) fail("out of memory for __shared__");
    memset(slot.p, kPoison, sizeof(T));
    slot.epoch = tb->epoch;
  }
  T* p = static_cast<T*>(slot.p);
  CUDASIM_PROF(cudasim_prof_shared_range(p, sizeof(T)));
  CUDASIM_ENGINE_END();
  return *p;
}
inline void* dyn_smem() { return tb->dyn; }

// ---------------------------------------------------------------------------------------
// __syncthreads and warp collectives
// ---------------------------------------------------------------------------------------
// Returns the number of threads that passed a non-zero predicate. All threads of the block
// must reach the same __syncthreads call (CUDA: the barrier may sit in conditional code only
// if the condition is uniform over the block), so the call site is checked too.
inline int barrier(int pred, const char* file, int line) {
  CUDASIM_ENGINE_BEGIN();
  Block& b = *tb;
  if (b.nfinished)
    fail("divergent __syncthreads: " + where() + " reached a barrier at " + file + ":" + std::to_string(line) +
         " after " + std::to_string(b.nfinished) + " thread(s) of the block had exited");
  if (b.bar_count == 0) {
    b.bar_file = file; b.bar_line = line;
  } else if (line != b.bar_line || strcmp(file, b.bar_file) != 0) {
    fail("divergent __syncthreads: " + where() + " reached the barrier at " + file + ":" + std::to_string(line) +
         " while " + std::to_string(b.bar_count) + " thread(s) wait at " + b.bar_file + ":" +
         std::to_string(b.bar_line));
  }
  const unsigned g = b.bar_gen;
  b.bar_acc += pred != 0;
  CUDASIM_TSAN_RELEASE(&b.tsan_bar[g & 1]);
  if (++b.bar_count == b.nthreads) {
    CUDASIM_PROF(cudasim_prof_barrier(file, line));   // once per block-wide barrier
    b.bar_result[g & 1] = b.bar_acc;
    b.bar_acc = 0; b.bar_count = 0; b.bar_gen++; b.progress++;
  } else {
    b.cur->wait = AT_BARRIER;
    while (b.bar_gen == g) yield_();
    b.cur->wait = RUNNING;
  }
  CUDASIM_TSAN_ACQUIRE(&b.tsan_bar[g & 1]);
  const int r = b.bar_result[g & 1];
  CUDASIM_ENGINE_END();
  return r;
}

inline unsigned lane_id() { return tb->cur->lin & 31; }

// Lanes that exist in the current fiber's warp (the last warp of a block may be partial).
inline unsigned warp_exists_mask() {
  unsigned base = tb->cur->lin & ~31u, n = std::min(32u, tb->nthreads - base);
  return n == 32 ? 0xffffffffu : ((1u << n) - 1);
}

// Every lane in `mask` deposits `mine`, waits for the others, then `read(slots)` runs
// before the exchange buffer is released.
template <class F>
inline auto warp_collective(unsigned mask, uint64_t mine, F read) {
  CUDASIM_ENGINE_BEGIN();
  Block& b = *tb;
  const unsigned lin = b.cur->lin, lane = lin & 31;
  Warp& w = b.w[lin >> 5];
  const unsigned exist = warp_exists_mask();
  char msg[160];
  if (!(mask >> lane & 1)) {
    snprintf(msg, sizeof msg, "warp collective: calling lane %u is not in mask 0x%08x (", lane, mask);
    fail(msg + where() + ")");
  }
  if (mask & ~exist) {
    snprintf(msg, sizeof msg, "warp collective: mask 0x%08x names lanes beyond the block's last thread (", mask);
    fail(msg + where() + ")");
  }
  if (mask & w.exited) {
    snprintf(msg, sizeof msg, "warp collective: mask 0x%08x includes lane %d, which has exited (", mask,
             __builtin_ctz(mask & w.exited));
    fail(msg + where() + ")");
  }
  b.cur->wait = IN_WARP_OP;
  while (w.state == Warp::DRAINING || (w.state == Warp::COLLECTING && w.mask != mask)) yield_();
  if (w.state == Warp::IDLE) {
    w.state = Warp::COLLECTING; w.mask = mask; w.count = 0; w.need = __builtin_popcount(mask);
  }
  const unsigned g = w.gen;
  w.slot[lane] = mine;
  CUDASIM_TSAN_RELEASE(&w.tsan_sync[g & 1]);
  if (++w.count == w.need) {
    w.gen++; b.progress++;
    w.pending = w.need - 1;
    w.state = w.pending ? Warp::DRAINING : Warp::IDLE;
    b.cur->wait = RUNNING;
    CUDASIM_TSAN_ACQUIRE(&w.tsan_sync[g & 1]);
    auto r = read(w.slot);
    CUDASIM_ENGINE_END();
    return r;
  }
  while (w.gen == g) yield_();
  b.cur->wait = RUNNING;
  CUDASIM_TSAN_ACQUIRE(&w.tsan_sync[g & 1]);
  auto r = read(w.slot);
  if (--w.pending == 0) w.state = Warp::IDLE;
  b.progress++;
  CUDASIM_ENGINE_END();
  return r;
}

template <class T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp shuffles move at most 8 bytes");
  uint64_t r = 0; memcpy(&r, &v, sizeof(T)); return r;
}
template <class T> inline T from_bits(uint64_t r) { T v; memcpy(&v, &r, sizeof(T)); return v; }

// src < 0: keep own value (CUDA's out-of-segment rule).
template <class T> inline T shfl(unsigned mask, T v, int src) {
  return warp_collective(mask, to_bits(v), [&](const uint64_t* s) {
    return src < 0 ? v : from_bits<T>(s[src & 31]);
  });
}

// ---------------------------------------------------------------------------------------
// The launch
// ---------------------------------------------------------------------------------------
// Fiber stacks come from a pool so that repeated launches do not mmap/munmap every time.
// Each stack has a PROT_NONE guard page below it: an overflow faults instead of silently
// corrupting the neighbouring fiber.
struct StackArena {
  char* base = nullptr; size_t stack_size = 0, count = 0, bytes = 0;
};
inline std::mutex g_pool_mu;
inline std::vector<StackArena> g_pool;

inline bool acquire_stacks(StackArena& out, size_t stack_size, size_t count) {
  {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    for (size_t i = 0; i < g_pool.size(); i++)
      if (g_pool[i].stack_size == stack_size && g_pool[i].count >= count) {
        out = g_pool[i]; g_pool.erase(g_pool.begin() + i);
#ifdef CUDASIM_ASAN
        // A launch that failed left fibers parked mid-kernel: their frames' redzones are
        // still poisoned and would give false reports to the next frames at those addresses.
        __asan_unpoison_memory_region(out.base, out.bytes);
#endif
        return true;
      }
  }
  const size_t page = (size_t)sysconf(_SC_PAGESIZE), per = stack_size + page;
  void* p = mmap(nullptr, per * count, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  out.base = static_cast<char*>(p); out.stack_size = stack_size; out.count = count; out.bytes = per * count;
  for (size_t i = 0; i < count; i++) mprotect(out.base + i * per, page, PROT_NONE);
  return true;
}
inline void release_stacks(const StackArena& a) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  g_pool.push_back(a);
  if (g_pool.size() > 16) { munmap(g_pool.front().base, g_pool.front().bytes); g_pool.erase(g_pool.begin()); }
}

// Fibers persist across the blocks a worker runs: body() once per block, then park.
inline void fiber_entry() {
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &tb->sched_bottom, &tb->sched_size);
#endif
  for (;;) {
    // TSan: this block's threads come after the previous block's on this worker (they reuse
    // its shared memory), but not after each other: two alternating sync addresses.
    CUDASIM_ENGINE_BEGIN();
    CUDASIM_TSAN_ACQUIRE(&tb->tsan_block[(tb->blocks_run + 1) & 1]);
#ifdef CUDASIM_TSAN
    snprintf(tb->cur->tsan_name, sizeof tb->cur->tsan_name, "CUDA %s", where().c_str());
    __tsan_set_fiber_name(tb->cur->tsan_fiber, tb->cur->tsan_name);
#endif
    CUDASIM_ENGINE_END();
    tb->body(tb->ctx);
    CUDASIM_ENGINE_BEGIN();
    CUDASIM_TSAN_RELEASE(&tb->tsan_block[tb->blocks_run & 1]);
    tb->cur->wait = FINISHED;
    CUDASIM_ENGINE_END();
    yield_();
  }
}

// Make `f` start in fiber_entry on its own stack at its first resume.
inline void prepare_fiber(Block& b, Fiber& f) {
#ifdef CUDASIM_ASM_SWITCH
  // The frame cudasim_switch_x86_64 pops: r15..r12, rbx, rbp, then the return address
  // (fiber_entry) and a dummy caller return address, leaving the stack pointer 8 mod 16 at
  // fiber_entry's first instruction, as after a call.
  (void)b;
  uintptr_t top = ((uintptr_t)f.stack + f.stack_size) & ~(uintptr_t)15;
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
  memset(sp, 0, 8 * sizeof(uint64_t));
  sp[6] = reinterpret_cast<uint64_t>(&fiber_entry);
  f.sp = sp;
#else
  if (b.start_ctx.size() < b.f.size()) b.start_ctx.resize(b.f.size());
  f.ctx = &b.start_ctx[f.lin];
  getcontext(f.ctx);
  f.ctx->uc_stack.ss_sp = f.stack; f.ctx->uc_stack.ss_size = f.stack_size; f.ctx->uc_link = nullptr;
  makecontext(f.ctx, fiber_entry, 0);
#endif
}

// splitmix64: a tiny, portable generator, so a seed gives the same order everywhere.
inline uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

struct LaunchConfig {            // must match engine.py's _LaunchConfig
  unsigned grid[3], block[3];
  uint64_t dyn_smem;
  uint64_t stack_size;
  int64_t seed;                  // 0 forward, 1 reversed, any other value: shuffled by it
  unsigned workers;
  unsigned nblocks;              // with `blocks`: run only these linear block indices
  const unsigned* blocks;        // null: every block of the grid (profiling samples blocks)
};

// Resume fiber `f` until it waits or finishes.
inline void resume(Block& b, Fiber& f) {
  b.cur = &f; t_threadIdx = f.tid;
  CUDASIM_PROF(cudasim_prof_lane(f.lin));
#ifdef CUDASIM_ASAN
  __sanitizer_start_switch_fiber(&b.sched_fake, f.stack, f.stack_size);
#endif
#ifdef CUDASIM_TSAN
  __tsan_switch_to_fiber(f.tsan_fiber, 1);
#endif
#ifdef CUDASIM_ASM_SWITCH
  f.started = true;
  cudasim_switch_x86_64(&b.sched_sp, f.sp);
#else
  if (_setjmp(b.sched) == 0) {
    if (!f.started) { f.started = true; setcontext(f.ctx); }
    _longjmp(f.jb, 1);
  }
#endif
#ifdef CUDASIM_ASAN
  __sanitizer_finish_switch_fiber(b.sched_fake, nullptr, nullptr);
#endif
}

inline std::string deadlock_report(const Block& b) {
  unsigned at_bar = 0, in_warp = 0;
  for (const Fiber& f : b.f) { at_bar += f.wait == AT_BARRIER; in_warp += f.wait == IN_WARP_OP; }
  char buf[256];
  snprintf(buf, sizeof buf, "deadlock in block (%u,%u,%u): %u thread(s) wait in __syncthreads, "
           "%u in warp collectives, %u exited; the barrier/collective can never complete",
           b.idx.x, b.idx.y, b.idx.z, at_bar, in_warp, b.nfinished);
  return buf;
}

// Run one block on the current worker; leaves b.error set on failure.
inline void run_block(Block& b, const LaunchConfig& c, unsigned linear_block, std::vector<unsigned>& order) {
  const unsigned nt = b.nthreads;
  memset(b.dyn, kPoison, c.dyn_smem);
  b.blocks_run++;
  b.epoch = g_epoch.fetch_add(1) + 1;  // unique across launches: SharedSlots outlive a Block
  b.nfinished = 0; b.bar_count = 0; b.bar_acc = 0;
  for (Warp& w : b.w) w = Warp{};
  for (unsigned t = 0; t < nt; t++) { b.f[t].wait = RUNNING; order[t] = t; }
  if (c.seed == 1) std::reverse(order.begin(), order.end());
  uint64_t rng = (uint64_t)c.seed * 0x100000001b3ull ^ linear_block;
  CUDASIM_PROF(cudasim_prof_block_begin(linear_block, b.dyn, c.dyn_smem));
  while (b.nfinished < nt && b.error.empty()) {
    const uint64_t before = b.progress;
    if (c.seed != 0 && c.seed != 1)
      for (unsigned i = nt - 1; i > 0; i--) std::swap(order[i], order[splitmix(rng) % (i + 1)]);
    for (unsigned t : order) {
      Fiber& f = b.f[t];
      if (f.wait == FINISHED) continue;
      resume(b, f);
      if (!b.error.empty()) break;
      if (f.wait == FINISHED) {
        b.nfinished++; b.progress++;
        if (b.bar_count) {
          b.error = "divergent __syncthreads: block (" + std::to_string(b.idx.x) + "," + std::to_string(b.idx.y) +
                    "," + std::to_string(b.idx.z) + ") thread (" + std::to_string(f.tid.x) + "," +
                    std::to_string(f.tid.y) + "," + std::to_string(f.tid.z) + ") exited while " +
                    std::to_string(b.bar_count) + " thread(s) wait at a barrier";
          break;
        }
        Warp& w = b.w[f.lin >> 5];
        w.exited |= 1u << (f.lin & 31);
        if (w.state == Warp::COLLECTING && (w.mask >> (f.lin & 31) & 1)) {
          b.error = "warp collective: lane " + std::to_string(f.lin & 31) + " of warp " + std::to_string(f.lin >> 5) +
                    " exited while other lanes of its mask wait for it";
          break;
        }
      }
    }
    if (b.error.empty() && b.nfinished < nt && b.progress == before) b.error = deadlock_report(b);
  }
  CUDASIM_PROF(cudasim_prof_block_end());
}

inline void worker_main(const LaunchConfig& c, void (*body)(void*), void* ctx, std::atomic<unsigned>& next,
                        std::atomic<bool>& stop, std::string& err, std::mutex& err_mu) {
  const unsigned nt = c.block[0] * c.block[1] * c.block[2];
  const unsigned nb = c.blocks ? c.nblocks : c.grid[0] * c.grid[1] * c.grid[2];
  CUDASIM_ENGINE_BEGIN();
  Block b; tb = &b;
#ifdef CUDASIM_TSAN
  b.tsan_sched = __tsan_get_current_fiber();
#endif
  b.body = body; b.ctx = ctx; b.nthreads = nt;
  b.f.resize(nt); b.w.resize((nt + 31) / 32);
  t_blockDim = dim3(c.block[0], c.block[1], c.block[2]);
  t_gridDim = dim3(c.grid[0], c.grid[1], c.grid[2]);
  StackArena stacks;
  void* dyn = nullptr;
  auto report = [&](const std::string& m) {
    std::lock_guard<std::mutex> lk(err_mu);
    if (err.empty()) err = m;
    stop = true;
  };
  if (!acquire_stacks(stacks, c.stack_size, nt)) {
    report("cannot allocate fiber stacks"); tb = nullptr; CUDASIM_ENGINE_END(); return;
  }
  if (posix_memalign(&dyn, 128, c.dyn_smem ? c.dyn_smem : 1)) { report("cannot allocate dynamic shared memory"); }
  b.dyn = static_cast<char*>(dyn);
  const size_t page = (size_t)sysconf(_SC_PAGESIZE);
  for (unsigned t = 0; t < nt && !stop; t++) {
    Fiber& f = b.f[t];
    f.lin = t;
    f.tid = {t % c.block[0], t / c.block[0] % c.block[1], t / (c.block[0] * c.block[1])};
    f.stack = stacks.base + t * (c.stack_size + page) + page;
    f.stack_size = c.stack_size;
#ifdef CUDASIM_TSAN
    f.tsan_fiber = __tsan_create_fiber(0);   // inherits this thread's clock: the launch's setup
#endif
    prepare_fiber(b, f);
  }
  std::vector<unsigned> order(nt);
  for (unsigned j; !stop && (j = next++) < nb;) {
    const unsigned i = c.blocks ? c.blocks[j] : j;
    b.idx = {i % c.grid[0], i / c.grid[0] % c.grid[1], i / (c.grid[0] * c.grid[1])};
    t_blockIdx = b.idx;
    run_block(b, c, i, order);
    if (!b.error.empty()) report(b.error);
  }
  // Fibers that failed are parked mid-kernel; their stacks are simply reused later.
  // the fibers' work happens before the launch returns (and their stacks are reused)
  CUDASIM_TSAN_ACQUIRE(&b.tsan_parked);
#ifdef CUDASIM_TSAN
  // A fiber parked mid-kernel by an error may sit inside an engine (ignored) region, and
  // TSan dies when such a fiber is destroyed: those few are leaked instead.
  for (Fiber& f : b.f)
    if (f.tsan_fiber && (f.wait == FINISHED || !f.started)) __tsan_destroy_fiber(f.tsan_fiber);
#endif
  free(dyn);
  release_stacks(stacks);
  tb = nullptr;
  CUDASIM_ENGINE_END();
}

#ifdef CUDASIM_ASAN
// ASan aborts the process on a finding; say which CUDA thread was running first.
inline void asan_death_note() {
  if (tb && tb->cur) fprintf(stderr, "cudasim: the error above happened in CUDA %s\n", where().c_str());
}
#endif

// Returns 0 on success, else writes a message into err_out.
inline int run(const LaunchConfig& c, void (*body)(void*), void* ctx, char* err_out, size_t err_len) {
  const unsigned nb = c.blocks ? c.nblocks : c.grid[0] * c.grid[1] * c.grid[2];
  std::atomic<unsigned> next{0};
  std::atomic<bool> stop{false};
  std::string err;
  std::mutex err_mu;
  const unsigned nw = std::max(1u, std::min(c.workers, nb));
#ifdef CUDASIM_ASAN
  __sanitizer_set_death_callback(asan_death_note);
#endif
  if (nw == 1) {
    worker_main(c, body, ctx, next, stop, err, err_mu);  // no thread start for tiny launches
  } else {
    std::vector<std::thread> th;
    for (unsigned k = 0; k < nw; k++)
      th.emplace_back([&] { worker_main(c, body, ctx, next, stop, err, err_mu); });
    for (auto& t : th) t.join();
  }
  if (err.empty()) return 0;
  snprintf(err_out, err_len, "%s", err.c_str());
  return 1;
}

// Unpack CUDA-style kernelParams (array of pointers to argument values) into a call.
template <class... P, size_t... I>
void call(void (*k)(P...), void** a, std::index_sequence<I...>) {
  k(*static_cast<std::remove_cv_t<P>*>(a[I])...);
}
template <class... P>
int launch(void (*k)(P...), const LaunchConfig* c, void** args, char* err, size_t err_len) {
  struct Ctx { void (*k)(P...); void** a; } ctx{k, args};
  auto body = [](void* p) {
    auto* x = static_cast<Ctx*>(p);
    call(x->k, x->a, std::index_sequence_for<P...>{});
  };
  return run(*c, body, &ctx, err, err_len);
}

// Parameter description for the Python-side argument check.
template <class T> struct is_float_like : std::is_floating_point<T> {};
struct ParamInfo {               // must match engine.py's _ParamInfo
  uint64_t size;
  uint64_t pointee_size;         // 0: not a pointer, or a pointer to void / to a struct
  char kind;                     // 'p' pointer, 'f' floating, 'i' integer/bool/enum, 'o' other
  char pointee_kind;             // same letters for the pointee
  char type_name[94];
};
template <class T> constexpr char kind_of() {
  if constexpr (std::is_pointer_v<T>) return 'p';
  else if constexpr (is_float_like<std::remove_cv_t<T>>::value) return 'f';
  else if constexpr (std::is_integral_v<T> || std::is_enum_v<T>) return 'i';
  else return 'o';
}
template <class T> void describe(ParamInfo& p) {
  using U = std::remove_cv_t<T>;
  p.size = sizeof(U);
  p.kind = kind_of<U>();
  p.pointee_size = 0; p.pointee_kind = 0;
  if constexpr (std::is_pointer_v<U>) {
    using E = std::remove_cv_t<std::remove_pointer_t<U>>;
    p.pointee_kind = kind_of<E>();
    if constexpr (kind_of<E>() != 'o') p.pointee_size = sizeof(E);
  }
  int status = 0;
  char* dm = abi::__cxa_demangle(typeid(T).name(), nullptr, nullptr, &status);
  snprintf(p.type_name, sizeof p.type_name, "%s", status == 0 && dm ? dm : typeid(T).name());
  free(dm);
}
template <class... P> int signature(void (*)(P...), ParamInfo* out, int max) {
  int i = 0;
  ((i < max ? describe<P>(out[i]) : void(), i++), ...);
  return (int)sizeof...(P);
}

}  // namespace cudasim

// ---------------------------------------------------------------------------------------
// CUDA built-ins
// ---------------------------------------------------------------------------------------
#define threadIdx (::cudasim::t_threadIdx)
#define blockIdx (::cudasim::t_blockIdx)
#define blockDim (::cudasim::t_blockDim)
#define gridDim (::cudasim::t_gridDim)

// __builtin_FILE/LINE as default arguments give the caller's position (the kernel source).
#define CUDASIM_SITE const char* file_ = __builtin_FILE(), int line_ = __builtin_LINE()
inline void __syncthreads(CUDASIM_SITE) { cudasim::barrier(0, file_, line_); }
inline int __syncthreads_count(int p, CUDASIM_SITE) { return cudasim::barrier(p, file_, line_); }
inline int __syncthreads_and(int p, CUDASIM_SITE) {
  return cudasim::barrier(p, file_, line_) == (int)cudasim::tb->nthreads;
}
inline int __syncthreads_or(int p, CUDASIM_SITE) { return cudasim::barrier(p, file_, line_) != 0; }
#undef CUDASIM_SITE
inline void __syncwarp(unsigned m = 0xffffffffu) { cudasim::warp_collective(m, 0, [](const uint64_t*) { return 0; }); }
// Fibers are not in lock-step; report the lanes that have not exited.
inline unsigned __activemask() {
  return cudasim::warp_exists_mask() & ~cudasim::tb->w[cudasim::tb->cur->lin >> 5].exited;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_signal_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { cudasim::fail("__trap() called (" + cudasim::where() + ")"); }
inline void __nanosleep(unsigned) {}

// Warp shuffles: CUDA semantics for `width` (a power of two <= 32): lanes form segments of
// `width`; a source outside the caller's segment (above it for xor/down, below for up)
// returns the caller's own value.
template <class T> T __shfl_sync(unsigned m, T v, int src, int w = 32) {
  int l = (int)cudasim::lane_id();
  return cudasim::shfl(m, v, (l & ~(w - 1)) + (src & (w - 1)));
}
template <class T> T __shfl_xor_sync(unsigned m, T v, int x, int w = 32) {
  int l = (int)cudasim::lane_id(), src = l ^ x;
  return cudasim::shfl(m, v, src >= (l & ~(w - 1)) + w ? -1 : src);
}
template <class T> T __shfl_down_sync(unsigned m, T v, unsigned d, int w = 32) {
  int l = (int)cudasim::lane_id();
  return cudasim::shfl(m, v, (l & (w - 1)) + (int)d >= w ? -1 : l + (int)d);
}
template <class T> T __shfl_up_sync(unsigned m, T v, unsigned d, int w = 32) {
  int l = (int)cudasim::lane_id();
  return cudasim::shfl(m, v, (l & (w - 1)) < (int)d ? -1 : l - (int)d);
}
inline unsigned __ballot_sync(unsigned m, int p) {
  return cudasim::warp_collective(m, p != 0, [m](const uint64_t* s) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) if ((m >> i & 1) && s[i]) r |= 1u << i;
    return r;
  });
}
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }
inline int __all_sync(unsigned m, int p) { return __ballot_sync(m, p) == m; }
template <class T, class Op> T cudasim_reduce(unsigned m, T v, Op op) {
  return cudasim::warp_collective(m, cudasim::to_bits(v), [&](const uint64_t* s) {
    bool first = true; T r{};
    for (int i = 0; i < 32; i++)
      if (m >> i & 1) { T x = cudasim::from_bits<T>(s[i]); r = first ? x : op(r, x); first = false; }
    return r;
  });
}
inline int __reduce_add_sync(unsigned m, int v) { return cudasim_reduce(m, v, [](int a, int b) { return (int)((unsigned)a + (unsigned)b); }); }
inline unsigned __reduce_add_sync(unsigned m, unsigned v) { return cudasim_reduce(m, v, [](unsigned a, unsigned b) { return a + b; }); }
inline int __reduce_min_sync(unsigned m, int v) { return cudasim_reduce(m, v, [](int a, int b) { return a < b ? a : b; }); }
inline unsigned __reduce_min_sync(unsigned m, unsigned v) { return cudasim_reduce(m, v, [](unsigned a, unsigned b) { return a < b ? a : b; }); }
inline int __reduce_max_sync(unsigned m, int v) { return cudasim_reduce(m, v, [](int a, int b) { return a > b ? a : b; }); }
inline unsigned __reduce_max_sync(unsigned m, unsigned v) { return cudasim_reduce(m, v, [](unsigned a, unsigned b) { return a > b ? a : b; }); }

// Atomics: blocks run on several OS threads, so these are real atomics.
template <class T> T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }
template <class T> T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v); }
template <class T> T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v); }
template <class T> T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v); }
template <class T> T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v); }
template <class T> T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v); }
template <class T> T atomicCAS(T* p, T cmp, T v) {
  std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v);
  return cmp;  // the old value, whether or not the swap happened
}
template <class T, class F> T cudasim_atomic_update(T* p, F f) {
  std::atomic_ref<T> a(*p);
  T old = a.load();
  while (!a.compare_exchange_weak(old, f(old))) {}
  return old;
}
template <class T> T atomicMax(T* p, T v) { return cudasim_atomic_update(p, [v](T o) { return o < v ? v : o; }); }
template <class T> T atomicMin(T* p, T v) { return cudasim_atomic_update(p, [v](T o) { return v < o ? v : o; }); }
inline unsigned atomicInc(unsigned* p, unsigned v) { return cudasim_atomic_update(p, [v](unsigned o) { return o >= v ? 0u : o + 1; }); }
inline unsigned atomicDec(unsigned* p, unsigned v) { return cudasim_atomic_update(p, [v](unsigned o) { return (o == 0 || o > v) ? v : o - 1; }); }
#define CUDASIM_SCOPED(op) \
  template <class T, class... A> T op##_block(T* p, A... a) { return op(p, a...); } \
  template <class T, class... A> T op##_system(T* p, A... a) { return op(p, a...); }
CUDASIM_SCOPED(atomicAdd) CUDASIM_SCOPED(atomicSub) CUDASIM_SCOPED(atomicExch) CUDASIM_SCOPED(atomicMax)
CUDASIM_SCOPED(atomicMin) CUDASIM_SCOPED(atomicCAS) CUDASIM_SCOPED(atomicAnd) CUDASIM_SCOPED(atomicOr)
CUDASIM_SCOPED(atomicXor)
#undef CUDASIM_SCOPED

// Loads through the read-only / streaming caches are plain loads here.
template <class T> T __ldg(const T* p) { return *p; }
template <class T> T __ldcg(const T* p) { return *p; }
template <class T> T __ldca(const T* p) { return *p; }
template <class T> T __ldcs(const T* p) { return *p; }
template <class T> T __ldlu(const T* p) { return *p; }
template <class T> T __ldcv(const T* p) { return *p; }
template <class T> void __stcg(T* p, T v) { *p = v; }
template <class T> void __stcs(T* p, T v) { *p = v; }
template <class T> void __stwb(T* p, T v) { *p = v; }
template <class T> void __stwt(T* p, T v) { *p = v; }

// ---------------------------------------------------------------------------------------
// Math. The intrinsics compute the accurate result: compare against the GPU with tolerance.
// ---------------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __int_as_float(int i) { return cudasim::from_bits<float>((uint32_t)i); }
inline int __float_as_int(float f) { return (int)(uint32_t)cudasim::to_bits(f); }
inline float __uint_as_float(unsigned i) { return cudasim::from_bits<float>(i); }
inline unsigned __float_as_uint(float f) { return (uint32_t)cudasim::to_bits(f); }
inline double __longlong_as_double(long long i) { return cudasim::from_bits<double>((uint64_t)i); }
inline long long __double_as_longlong(double d) { return (long long)cudasim::to_bits(d); }
inline int __float2int_rn(float x) { return (int)nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)floorf(x); }
inline int __float2int_ru(float x) { return (int)ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)nearbyintf(x); }
inline long long __float2ll_rn(float x) { return (long long)nearbyintf(x); }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline double __int2double_rn(int x) { return (double)x; }
inline int __double2int_rn(double x) { return (int)nearbyint(x); }
inline float __double2float_rn(double x) { return (float)x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  s &= 31; return s ? (hi << s) | (lo >> (32 - s)) : hi;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  s &= 31; return s ? (lo >> s) | (hi << (32 - s)) : lo;
}

// min/max: CUDA overloads them for every arithmetic pair (mixed types follow the usual
// arithmetic conversions); one constrained template covers them all.
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin((C)a, (C)b);
  else return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
constexpr std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax((C)a, (C)b);
  else return (C)a < (C)b ? (C)b : (C)a;
}
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
using std::isinf;
using std::isnan;
using std::isfinite;
using std::signbit;
