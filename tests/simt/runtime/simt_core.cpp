// SIMT CPU emulation core: fiber scheduler, barriers, warp collectives,
// launch, runtime-API state.  Linked into every library built by
// tests/simt/harness.py.  Must be compiled with -U_FORTIFY_SOURCE (longjmp
// between fiber stacks) and -fno-threadsafe-statics is recommended for kernels.
#include "simt/simt.h"
#include "simt_internal.h"

#include <assert.h>
#include <setjmp.h>
#include <stdarg.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

// The built-in variables live in their own section so that the memory checker can tell their
// reads (registers on a GPU) from memory accesses with one range compare (simt_tsan.cpp).
#define SIMT_SPECIAL __attribute__((section("simt_special"), used))
SIMT_SPECIAL uint3 threadIdx = {0, 0, 0};
SIMT_SPECIAL uint3 blockIdx = {0, 0, 0};
SIMT_SPECIAL dim3 blockDim = dim3(1, 1, 1);
SIMT_SPECIAL dim3 gridDim = dim3(1, 1, 1);

namespace simt {
namespace {

enum FState : int { F_RUN = 0, F_BAR = 1, F_WARP = 2, F_DONE = 3 };

struct Fiber {
  jmp_buf ctx;
  ucontext_t uc;
  char* mem = nullptr;  // mapping incl. guard page
  size_t mem_size = 0;
  bool fresh = true;     // must (re)start from fiber_main via setcontext
  int state = F_RUN;
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  // where it waits
  const char* file = "";
  unsigned line = 0;
  int kind = 0;          // warp kind, or -1 for barrier
  unsigned mask = 0;
  unsigned long long val = 0;
  int param = 0;
  int width = 32;
  int bytes = 4;  // value bytes of a shuffle / match (8: two instructions on a GPU)
  unsigned long long res = 0;
  int pred = 0;
  int bmode = 0;
};

struct Rng {
  uint64_t s = 0x9e3779b97f4a7c15ull;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return (uint64_t)(((unsigned __int128)next() * n) >> 64); }
};

struct State {
  std::recursive_mutex mu;
  std::vector<Fiber*> pool;
  std::vector<Fiber*> runnable;
  size_t run_head = 0;  // FIFO mode cursor
  jmp_buf sched;
  Fiber* cur = nullptr;
  unsigned nthreads = 0;
  bool in_launch = false;
  bool abort = false;
  std::string abort_msg;
  cudaError_t abort_code = cudaErrorLaunchFailure;
  // errors
  cudaError_t sticky_code = cudaSuccess;
  std::string sticky_msg;
  cudaError_t last_code = cudaSuccess;
  std::string last_msg;
  // config
  bool cfg_loaded = false;
  uint64_t seed = 0;
  uint64_t launch_counter = 0;
  int order = 0;          // 0 random, 1 fifo (thread order), 2 lifo
  bool strict = true;     // masks naming non-existent lanes are errors
  bool poison = true;     // shuffles reading non-participating lanes return 0xff.. ; dyn smem poisoned
  bool allow_divergent_barrier = false;
  bool abort_on_error = false;
  bool verbose = false;
  size_t stack_size = 256 * 1024;
  Rng rng;
  const LaunchDesc* launch = nullptr;
  // dynamic shared memory region (guard page after its end)
  char* dyn_map = nullptr;
  size_t dyn_cap = 0;
  unsigned char* dyn_ptr = nullptr;
  std::map<const void*, int> max_dyn;
  // every kernel launched since the library was loaded (coverage of instantiations)
  struct Launched {
    std::string name;
    unsigned long long count = 0;
  };
  std::map<const void*, Launched> launched;
  std::string launched_text;
  // stats
  unsigned long long n_launch = 0, n_blocks = 0, n_barriers = 0, n_warpops = 0, n_switches = 0;
  long long ticks = 0;
  unsigned long long block_gen = 1;  // bumped per block; see shared_poison
};

State& S() {
  static State* s = new State();  // never destroyed (fiber stacks outlive static destruction)
  return *s;
}

const size_t kDynMax = 232448;  // 227 KiB, the sm_90 opt-in maximum

void load_config() {
  State& st = S();
  if (st.cfg_loaded) return;
  st.cfg_loaded = true;
  if (const char* e = getenv("SIMT_SEED")) st.seed = strtoull(e, nullptr, 0);
  if (const char* e = getenv("SIMT_ORDER")) {
    std::string v(e);
    st.order = (v == "fifo" || v == "forward" || v == "1") ? 1 : (v == "lifo" || v == "reverse" || v == "2") ? 2 : 0;
  }
  if (const char* e = getenv("SIMT_STRICT")) st.strict = atoi(e) != 0;
  if (const char* e = getenv("SIMT_POISON")) st.poison = atoi(e) != 0;
  if (const char* e = getenv("SIMT_ALLOW_DIVERGENT_BARRIER")) st.allow_divergent_barrier = atoi(e) != 0;
  if (const char* e = getenv("SIMT_ABORT_ON_ERROR")) st.abort_on_error = atoi(e) != 0;
  if (const char* e = getenv("SIMT_VERBOSE")) st.verbose = atoi(e) != 0;
  if (const char* e = getenv("SIMT_STACK_KB")) {
    long kb = atol(e);
    if (kb >= 16) st.stack_size = (size_t)kb * 1024;
  }
}

const char* kind_name(int k) {
  switch (k) {
    case -1: return "__syncthreads";
    case kSync: return "__syncwarp";
    case kShflIdx: return "__shfl_sync";
    case kShflUp: return "__shfl_up_sync";
    case kShflDown: return "__shfl_down_sync";
    case kShflXor: return "__shfl_xor_sync";
    case kBallot: return "__ballot_sync";
    case kAny: return "__any_sync";
    case kAll: return "__all_sync";
    case kMatchAny: return "__match_any_sync";
    case kRedAddU: return "__reduce_add_sync";
    case kRedMinU: case kRedMinI: return "__reduce_min_sync";
    case kRedMaxU: case kRedMaxI: return "__reduce_max_sync";
    case kRedAnd: return "__reduce_and_sync";
    case kRedOr: return "__reduce_or_sync";
    case kRedXor: return "__reduce_xor_sync";
    case kActive: return "__activemask";
    case kMma: return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
  }
  return "?";
}

using rt::fmt;

std::string ranges(const std::vector<unsigned>& ids) {
  std::string out;
  size_t i = 0;
  while (i < ids.size()) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += j == i ? fmt("%u", ids[i]) : fmt("%u-%u", ids[i], ids[j]);
    i = j + 1;
  }
  return out;
}

std::string where() {
  State& st = S();
  return fmt("kernel '%s' block (%u,%u,%u) [grid (%u,%u,%u) block (%u,%u,%u)]", st.launch ? st.launch->name : "?",
             blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z, blockDim.x, blockDim.y,
             blockDim.z);
}

// ------------------------------------------------------------------ fibers
void fiber_main();

__attribute__((noinline)) void yield_fiber(Fiber* f) {
  if (_setjmp(f->ctx) == 0) _longjmp(S().sched, 1);
}

__attribute__((noinline)) void switch_to(Fiber* f) {
  State& st = S();
  if (_setjmp(st.sched) == 0) {
    if (f->fresh) {
      f->fresh = false;
      getcontext(&f->uc);
      f->uc.uc_stack.ss_sp = f->mem + getpagesize();
      f->uc.uc_stack.ss_size = f->mem_size - getpagesize();
      f->uc.uc_link = nullptr;
      makecontext(&f->uc, fiber_main, 0);
      setcontext(&f->uc);
      abort();  // not reached
    }
    _longjmp(f->ctx, 1);
  }
}

[[noreturn]] void fail_in_fiber(const std::string& msg) {
  State& st = S();
  st.abort = true;
  st.abort_msg = msg;
  yield_fiber(st.cur);
  fprintf(stderr, "simt: internal error: aborted fiber resumed\n");
  abort();
}

void fiber_main() {
  for (;;) {
    Fiber* f = S().cur;
    std::string err;
    try {
      S().launch->invoke(S().launch->data);
    } catch (const std::exception& e) {
      err = std::string("C++ exception escaped the kernel: ") + e.what();
    } catch (...) {
      err = "unknown C++ exception escaped the kernel";
    }
    if (!err.empty()) fail_in_fiber(err + " in " + where());
    f->state = F_DONE;
    yield_fiber(f);
  }
}

Fiber* make_fiber(size_t stack) {
  Fiber* f = new Fiber();
  size_t pg = getpagesize();
  size_t sz = ((stack + pg - 1) / pg) * pg + pg;
  void* m = mmap(nullptr, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    fprintf(stderr, "simt: cannot allocate fiber stack\n");
    abort();
  }
  mprotect(m, pg, PROT_NONE);  // guard page below the stack
  f->mem = (char*)m;
  f->mem_size = sz;
  return f;
}

// ------------------------------------------------------------------ scheduling
void push_runnable(Fiber* f) {
  f->state = F_RUN;
  S().runnable.push_back(f);
}

Fiber* pick_runnable() {
  State& st = S();
  auto& R = st.runnable;
  if (st.order == 1) {
    Fiber* f = R[st.run_head++];
    if (st.run_head == R.size()) { R.clear(); st.run_head = 0; }
    return f;
  }
  size_t i = st.order == 2 ? R.size() - 1 : (size_t)st.rng.below(R.size());
  Fiber* f = R[i];
  R[i] = R.back();
  R.pop_back();
  return f;
}

bool runnable_empty() {
  State& st = S();
  return st.runnable.size() == st.run_head;
}

std::string describe_block(const char* headline) {
  State& st = S();
  // group threads by (state, kind, file, line, mask)
  struct Key {
    int state, kind;
    const char* file;
    unsigned line, mask;
    bool operator<(const Key& o) const {
      return std::tie(state, kind, file, line, mask) < std::tie(o.state, o.kind, o.file, o.line, o.mask);
    }
  };
  std::map<Key, std::vector<unsigned>> groups;
  for (unsigned t = 0; t < st.nthreads; ++t) {
    Fiber* f = st.pool[t];
    Key k{f->state, f->state == F_BAR ? -1 : (f->state == F_WARP ? f->kind : 0), f->state == F_DONE ? "" : f->file,
          f->state == F_DONE ? 0u : f->line, f->state == F_WARP ? f->mask : 0u};
    groups[k].push_back(t);
  }
  std::string msg = fmt("%s in %s\n", headline, where().c_str());
  for (auto& [k, ids] : groups) {
    if (k.state == F_DONE) {
      msg += fmt("  threads %s: exited\n", ranges(ids).c_str());
    } else if (k.state == F_BAR) {
      msg += fmt("  threads %s: waiting at __syncthreads() at %s:%u\n", ranges(ids).c_str(), k.file, k.line);
    } else if (k.state == F_WARP) {
      msg += fmt("  threads %s: waiting at %s(mask=0x%08x) at %s:%u\n", ranges(ids).c_str(), kind_name(k.kind), k.mask,
                 k.file, k.line);
    } else {
      msg += fmt("  threads %s: runnable\n", ranges(ids).c_str());
    }
  }
  msg += "  (thread ids are linear: x + y*blockDim.x + z*blockDim.x*blockDim.y; warp = id/32)";
  return msg;
}

// Run one block to completion. Returns false (with st.abort_msg) on error.
bool run_block() {
  State& st = S();
  for (;;) {
    while (!runnable_empty()) {
      Fiber* f = pick_runnable();
      st.cur = f;
      threadIdx = f->tid;
      rt::g_exec.tid = f->linear;
      rt::g_exec.stack_lo = reinterpret_cast<uintptr_t>(f->mem);
      rt::g_exec.stack_size = f->mem_size;
      switch_to(f);
      st.n_switches++;
      st.cur = nullptr;
      if (st.abort) return false;
    }
    // nothing runnable: either done, a barrier completes, or deadlock
    unsigned live = 0, atbar = 0;
    for (unsigned t = 0; t < st.nthreads; ++t) {
      int s = st.pool[t]->state;
      if (s != F_DONE) live++;
      if (s == F_BAR) atbar++;
    }
    if (live == 0) return true;
    // __activemask(): lanes of a warp waiting at the same call site form the mask
    bool released = false;
    for (unsigned t = 0; t < st.nthreads; ++t) {
      Fiber* f = st.pool[t];
      if (f->state != F_WARP || f->kind != kActive) continue;
      unsigned wbase = t & ~31u, m = 0;
      std::vector<Fiber*> grp;
      for (unsigned l = 0; l < 32 && wbase + l < st.nthreads; ++l) {
        Fiber* g = st.pool[wbase + l];
        if (g->state == F_WARP && g->kind == kActive && g->line == f->line && strcmp(g->file, f->file) == 0) {
          m |= 1u << l;
          grp.push_back(g);
        }
      }
      for (Fiber* g : grp) { g->res = m; push_runnable(g); }
      released = true;
    }
    if (released) continue;
    if (atbar != live) {
      st.abort_msg = describe_block("SIMT deadlock: no thread can make progress (a __syncthreads/warp collective can "
                                    "never be reached by all the threads it waits for)");
      return false;
    }
    // barrier: all live threads wait at __syncthreads
    const char* file = nullptr;
    unsigned line = 0;
    bool divergent = false;
    int count = 0;
    for (unsigned t = 0; t < st.nthreads; ++t) {
      Fiber* f = st.pool[t];
      if (f->state != F_BAR) continue;
      if (!file) { file = f->file; line = f->line; }
      else if (f->line != line || strcmp(f->file, file) != 0) divergent = true;
      count += f->pred;
    }
    if (divergent && !st.allow_divergent_barrier) {
      st.abort_msg = describe_block("SIMT deadlock: divergent __syncthreads (threads wait at different barriers; "
                                    "set SIMT_ALLOW_DIVERGENT_BARRIER=1 to treat them as one)");
      return false;
    }
    st.n_barriers++;
    rt::on_barrier();
    for (unsigned t = 0; t < st.nthreads; ++t) {
      Fiber* f = st.pool[t];
      if (f->state != F_BAR) continue;
      switch (f->bmode) {
        case 1: f->res = (unsigned long long)count; break;
        case 2: f->res = count == (int)live; break;
        case 3: f->res = count > 0; break;
        default: f->res = 0;
      }
      push_runnable(f);
    }
  }
}

// Instructions of a warp collective that issue through the SM's shared-memory / MIO pipe (the cost
// model adds them to the shared-memory term): a shuffle or match per 32-bit half of its value, one
// redux; votes and __syncwarp do not go through it.
unsigned mio_instructions(int kind, Fiber* const* lanes) {
  int bytes = 4;
  for (unsigned l = 0; l < 32; ++l) {
    if (lanes[l]) {
      bytes = lanes[l]->bytes;
      break;
    }
  }
  const unsigned halves = bytes > 4 ? 2u : 1u;
  switch (kind) {
    case kShflIdx: case kShflUp: case kShflDown: case kShflXor: case kMatchAny: return halves;
    case kRedAddU: case kRedMinU: case kRedMaxU: case kRedMinI: case kRedMaxI: case kRedAnd: case kRedOr:
    case kRedXor: return 1;
    default: return 0;
  }
}

// Compute results of a complete warp collective and make its lanes runnable.
void resolve_warp(unsigned wbase, unsigned mask) {
  State& st = S();
  Fiber* lanes[32];
  int kind = -2;
  for (unsigned l = 0; l < 32; ++l) {
    lanes[l] = nullptr;
    if (!(mask >> l & 1u)) continue;
    Fiber* g = st.pool[wbase + l];
    lanes[l] = g;
    if (kind == -2) kind = g->kind;
    else if (g->kind != kind) {
      fail_in_fiber(describe_block("SIMT error: lanes named in one warp mask reached different warp collectives"));
    }
  }
  st.n_warpops++;
  rt::on_warp_sync(wbase, mask, kind == kSync);
  rt::on_warp_collective(mio_instructions(kind, lanes));
  if (kind == kMma) rt::on_mma();
  const unsigned long long poison = ~0ull;
  switch (kind) {
    case kSync: for (auto* g : lanes) if (g) g->res = 0; break;
    case kShflIdx: case kShflUp: case kShflDown: case kShflXor:
      for (unsigned l = 0; l < 32; ++l) {
        Fiber* g = lanes[l];
        if (!g) continue;
        int w = g->width;
        int base = (int)l & ~(w - 1);
        int src;
        if (kind == kShflIdx) src = base + (g->param & (w - 1));
        else if (kind == kShflUp) src = ((int)l - base) >= g->param ? (int)l - g->param : (int)l;
        else if (kind == kShflDown) src = ((int)l - base) + g->param < w ? (int)l + g->param : (int)l;
        else { src = (int)l ^ g->param; if (src < base || src >= base + w) src = (int)l; }
        if (src < 0 || src >= 32) src = (int)l;
        if (lanes[src]) g->res = lanes[src]->val;
        else g->res = st.poison ? poison : g->val;  // source lane did not take part: undefined on the GPU
      }
      break;
    case kBallot: case kAny: case kAll: {
      unsigned b = 0;
      for (unsigned l = 0; l < 32; ++l) if (lanes[l] && lanes[l]->val) b |= 1u << l;
      unsigned long long r = kind == kBallot ? b : kind == kAny ? (b != 0) : (b == mask);
      for (auto* g : lanes) if (g) g->res = r;
      break;
    }
    case kMma: {
      // The 16 x 16 A and 16 x 8 B of the warp from the lanes' fragments (MmaBf16Operands in simt.h).
      auto ops = [&](unsigned l) { return reinterpret_cast<MmaBf16Operands*>(lanes[l]->val); };
      auto bf = [](unsigned bits16) {
        const unsigned u = bits16 << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
      };
      float A[16][16], B[16][8];
      for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l / 4, c = l % 4;
        const MmaBf16Operands* o = ops(l);
        for (unsigned r = 0; r < 4; ++r) {
          const unsigned row = g + 8 * (r % 2), col = 2 * c + 8 * (r / 2);
          A[row][col] = bf(o->a[r] & 0xffffu);
          A[row][col + 1] = bf(o->a[r] >> 16);
        }
        for (unsigned r = 0; r < 2; ++r) {
          B[2 * c + 8 * r][g] = bf(o->b[r] & 0xffffu);
          B[2 * c + 8 * r + 1][g] = bf(o->b[r] >> 16);
        }
      }
      for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l / 4, c = l % 4;
        MmaBf16Operands* o = ops(l);
        for (unsigned r = 0; r < 4; ++r) {
          const unsigned row = g + 8 * (r / 2), col = 2 * c + r % 2;
          double acc = o->c[r];
          for (unsigned k = 0; k < 16; ++k) acc += (double)A[row][k] * (double)B[k][col];
          o->d[r] = (float)acc;
        }
        lanes[l]->res = 0;
      }
      break;
    }
    case kMatchAny:
      for (unsigned l = 0; l < 32; ++l) {
        if (!lanes[l]) continue;
        unsigned m = 0;
        for (unsigned k = 0; k < 32; ++k) if (lanes[k] && lanes[k]->val == lanes[l]->val) m |= 1u << k;
        lanes[l]->res = m;
      }
      break;
    default: {
      unsigned acc = 0;
      bool first = true;
      for (auto* g : lanes) {
        if (!g) continue;
        unsigned v = (unsigned)g->val;
        if (first) { acc = v; first = false; continue; }
        switch (kind) {
          case kRedAddU: acc += v; break;
          case kRedMinU: acc = std::min(acc, v); break;
          case kRedMaxU: acc = std::max(acc, v); break;
          case kRedMinI: acc = (unsigned)std::min((int)acc, (int)v); break;
          case kRedMaxI: acc = (unsigned)std::max((int)acc, (int)v); break;
          case kRedAnd: acc &= v; break;
          case kRedOr: acc |= v; break;
          case kRedXor: acc ^= v; break;
        }
      }
      for (auto* g : lanes) if (g) g->res = acc;
    }
  }
  for (auto* g : lanes) if (g) push_runnable(g);
}

void check_in_kernel(const char* what) {
  if (!S().cur) {
    fprintf(stderr, "simt: %s called outside of a kernel\n", what);
    abort();
  }
}

}  // namespace

// ------------------------------------------------------------------ device-side API
int syncthreads(int mode, int pred, const char* file, unsigned line) {
  check_in_kernel("__syncthreads");
  Fiber* f = S().cur;
  f->state = F_BAR;
  f->bmode = mode;
  f->pred = pred != 0;
  f->file = file;
  f->line = line;
  yield_fiber(f);
  return (int)f->res;
}

unsigned long long warp_op(int kind, unsigned mask, unsigned long long val, int param, int width, const char* file,
                           unsigned line, int bytes) {
  check_in_kernel(kind_name(kind));
  State& st = S();
  Fiber* f = st.cur;
  unsigned lane = f->linear & 31u, wbase = f->linear & ~31u;
  f->file = file;
  f->line = line;
  if (!(mask >> lane & 1u))
    fail_in_fiber(fmt("SIMT error: %s(mask=0x%08x) called by thread %u (warp %u lane %u) whose lane is not in the "
                      "mask, at %s:%u in %s",
                      kind_name(kind), mask, f->linear, wbase / 32, lane, file, line, where().c_str()));
  unsigned nl = std::min(32u, st.nthreads - wbase);
  unsigned exist = nl == 32 ? ~0u : ((1u << nl) - 1u);
  if (mask & ~exist) {
    if (st.strict)
      fail_in_fiber(fmt("SIMT deadlock: %s(mask=0x%08x) at %s:%u names lanes that do not exist (warp %u has only %u "
                        "threads, lanes 0x%08x) in %s",
                        kind_name(kind), mask, file, line, wbase / 32, nl, exist, where().c_str()));
    mask &= exist;
  }
  if (kind >= kShflIdx && kind <= kShflXor && (width < 1 || width > 32 || (width & (width - 1))))
    fail_in_fiber(fmt("SIMT error: %s width=%d is not a power of two in [1,32] at %s:%u in %s", kind_name(kind), width,
                      file, line, where().c_str()));
  if (kind == kMma && mask != ~0u)
    fail_in_fiber(fmt("SIMT error: %s at %s:%u by warp %u, which has only %u threads: the instruction needs all 32 "
                      "lanes of a full warp, converged, in %s",
                      kind_name(kind), file, line, wbase / 32, nl, where().c_str()));
  f->state = F_WARP;
  f->kind = kind;
  f->mask = mask;
  f->val = val;
  f->param = param;
  f->width = width;
  f->bytes = bytes;
  bool complete = true;
  for (unsigned l = 0; l < 32 && complete; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber* g = st.pool[wbase + l];
    if (g->state != F_WARP || g->mask != mask) complete = false;
  }
  if (complete) resolve_warp(wbase, mask);
  yield_fiber(f);
  return f->res;
}

unsigned activemask(const char* file, unsigned line) {
  check_in_kernel("__activemask");
  Fiber* f = S().cur;
  f->state = F_WARP;
  f->kind = kActive;
  f->mask = 0;
  f->file = file;
  f->line = line;
  yield_fiber(f);
  return (unsigned)f->res;
}

void threadfence() {
  if (S().cur) rt::on_fence();
}

void host_memset(void* dst, int value, size_t n) {
  if (n) std::memset(dst, value, n);
  rt::on_host_memset(dst, n);
}

void host_copy(void* dst, const void* src, size_t n) {
  if (n) std::memmove(dst, src, n);
  rt::on_host_copy(dst, n);
}

cudaError_t alloc(void** p, size_t n, const char* api, bool uninitialized) {
  if (!p) return cudaErrorInvalidValue;
  if (n == 0) {
    *p = nullptr;
    return cudaSuccess;
  }
  size_t r = (n + 255) & ~(size_t)255;
  *p = aligned_alloc(256, r);
  if (!*p) return cudaErrorMemoryAllocation;
  char name[64];
  snprintf(name, sizeof name, "%s(%zu)", api, n);
  rt::register_region(*p, n, rt::kGlobal, name, /*racecheck=*/true, uninitialized);
  return cudaSuccess;
}

void yield_now() {
  check_in_kernel("__nanosleep");
  Fiber* f = S().cur;
  push_runnable(f);
  yield_fiber(f);
}

void trap(const char* what, const char* file, unsigned line) {
  check_in_kernel(what);
  fail_in_fiber(fmt("SIMT error: %s by thread (%u,%u,%u) at %s:%u in %s", what, threadIdx.x, threadIdx.y, threadIdx.z,
                    file, line, where().c_str()));
}

unsigned char* dyn_smem_base() { return S().dyn_ptr; }

namespace rt {
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

void fail_kernel(cudaError_t code, const std::string& msg) {
  S().abort_code = code;
  fail_in_fiber(msg);
}
std::string where_now() { return where(); }
}  // namespace rt
void shared_poison(void* p, size_t n, unsigned long long* gen, const char* name) {
  State& st = S();
  if (!st.cur || *gen == st.block_gen) return;
  *gen = st.block_gen;
  rt::register_static_shared(p, n, name);
  if (st.poison) memset(p, 0xff, n);
}
long long clock_tick() { return ++S().ticks; }

// ------------------------------------------------------------------ errors
void record_error(cudaError_t e, const char* msg) {
  State& st = S();
  st.last_code = e;
  st.last_msg = msg ? msg : "";
}
cudaError_t sticky_error() { return S().sticky_code; }
cudaError_t get_last_error(bool reset) {
  State& st = S();
  if (st.sticky_code != cudaSuccess) return st.sticky_code;
  cudaError_t e = st.last_code;
  if (reset) { st.last_code = cudaSuccess; }
  return e;
}
void set_max_dyn_smem(const void* fn, int bytes) { S().max_dyn[fn] = bytes; }
int get_max_dyn_smem(const void* fn) {
  auto it = S().max_dyn.find(fn);
  return it == S().max_dyn.end() ? 48 * 1024 : it->second;
}

static cudaError_t config_error(cudaError_t code, const std::string& msg) {
  State& st = S();
  st.last_code = code;
  st.last_msg = msg;
  fprintf(stderr, "%s\n", msg.c_str());
  if (st.abort_on_error) abort();
  return code;
}

// ------------------------------------------------------------------ launch
cudaError_t launch(const LaunchDesc& d) {
  State& st = S();
  std::lock_guard<std::recursive_mutex> lock(st.mu);
  load_config();
  if (st.in_launch) {
    // dynamic parallelism: not supported
    fail_in_fiber(fmt("SIMT error: kernel '%s' launched from device code (dynamic parallelism is not supported)",
                      d.name));
  }
  if (st.sticky_code != cudaSuccess) return st.sticky_code;
  const dim3 g = d.grid, b = d.block;
  unsigned long long nthreads = (unsigned long long)b.x * b.y * b.z;
  if (nthreads == 0 || nthreads > 1024 || b.x > 1024 || b.y > 1024 || b.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 ||
      g.x > 2147483647u || g.y > 65535 || g.z > 65535)
    return config_error(cudaErrorInvalidConfiguration,
                        fmt("SIMT launch error: invalid configuration for kernel '%s': grid (%u,%u,%u) block (%u,%u,%u)",
                            d.name, g.x, g.y, g.z, b.x, b.y, b.z));
  int limit = get_max_dyn_smem(d.fn);
  if (d.smem > (size_t)limit || d.smem > kDynMax)
    return config_error(cudaErrorInvalidValue,
                        fmt("SIMT launch error: kernel '%s' requests %zu bytes of dynamic shared memory but its limit is "
                            "%d (raise it with cudaFuncSetAttribute(kernel, "
                            "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes); hardware max %zu)",
                            d.name, d.smem, limit, kDynMax));
  st.launched[d.fn].name = d.name;
  st.launched[d.fn].count++;
  st.rng.s = st.seed * 0x2545f4914f6cdd1dull + 0x632be59bd9b4e019ull * (++st.launch_counter);
  st.rng.next();
  st.n_launch++;
  if (st.verbose)
    fprintf(stderr, "simt: launch #%llu '%s' grid (%u,%u,%u) block (%u,%u,%u) smem %zu seed %llu\n",
            (unsigned long long)st.launch_counter, d.name, g.x, g.y, g.z, b.x, b.y, b.z, d.smem,
            (unsigned long long)st.seed);
  while (st.pool.size() < nthreads) st.pool.push_back(make_fiber(st.stack_size));
  // dynamic shared memory: place the buffer so it ends at a guard page
  if (!st.dyn_map) {
    size_t pg = getpagesize();
    st.dyn_cap = ((kDynMax + pg - 1) / pg) * pg;
    void* m = mmap(nullptr, st.dyn_cap + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) abort();
    st.dyn_map = (char*)m;
    mprotect(st.dyn_map + st.dyn_cap, pg, PROT_NONE);
  }
  size_t rounded = (d.smem + 15) & ~(size_t)15;
  st.dyn_ptr = (unsigned char*)st.dyn_map + st.dyn_cap - rounded;

  st.launch = &d;
  st.nthreads = (unsigned)nthreads;
  st.in_launch = true;
  gridDim = g;
  blockDim = b;
  rt::g_exec.launch = st.launch_counter;
  rt::on_launch_begin(d, st.nthreads, st.dyn_ptr, d.smem);
  unsigned long long nblocks = (unsigned long long)g.x * g.y * g.z;
  // block order: a random affine permutation i -> (a*i + c) mod n
  unsigned long long pa = 1, pc = 0;
  if (st.order == 0 && nblocks > 1) {
    for (;;) {
      pa = 1 + st.rng.below(nblocks - 1);
      unsigned long long x = pa, y = nblocks;
      while (y) { unsigned long long t = x % y; x = y; y = t; }
      if (x == 1) break;
    }
    pc = st.rng.below(nblocks);
  } else if (st.order == 2) {
    pa = nblocks - 1;  // reverse order: (n-1)*i + (n-1) == n-1-i (mod n)
    pc = nblocks - 1;
  }
  cudaError_t result = cudaSuccess;
  for (unsigned long long i = 0; i < nblocks; ++i) {
    unsigned long long bid = (unsigned long long)(((unsigned __int128)pa * i + pc) % nblocks);
    blockIdx.x = (unsigned)(bid % g.x);
    blockIdx.y = (unsigned)((bid / g.x) % g.y);
    blockIdx.z = (unsigned)(bid / ((unsigned long long)g.x * g.y));
    if (st.poison && d.smem) memset(st.dyn_ptr, 0xff, d.smem);
    st.block_gen++;
    rt::g_exec.block = bid;
    rt::on_block_begin();
    st.runnable.clear();
    st.run_head = 0;
    for (unsigned t = 0; t < st.nthreads; ++t) {
      Fiber* f = st.pool[t];
      f->linear = t;
      f->tid = uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
      f->state = F_RUN;
      f->file = "";
      f->line = 0;
      st.runnable.push_back(f);
    }
    st.abort = false;
    st.abort_code = cudaErrorLaunchFailure;
    bool ok = run_block();
    st.n_blocks++;
    if (ok) rt::on_block_end();
    if (!ok) {
      for (unsigned t = 0; t < st.nthreads; ++t)
        if (st.pool[t]->state != F_DONE) st.pool[t]->fresh = true;
      st.runnable.clear();
      st.run_head = 0;
      st.sticky_code = st.abort_code;
      st.sticky_msg = st.abort_msg + fmt("\n  (seed %llu, launch #%llu)", (unsigned long long)st.seed,
                                         (unsigned long long)st.launch_counter);
      fprintf(stderr, "%s\n", st.sticky_msg.c_str());
      if (st.abort_on_error) abort();
      result = st.sticky_code;
      break;
    }
  }
  threadIdx = uint3{0, 0, 0};
  rt::on_launch_end(result == cudaSuccess);
  st.in_launch = false;
  st.launch = nullptr;
  st.cur = nullptr;
  return result;
}
}  // namespace simt

// ------------------------------------------------------------------ host API pieces
cudaError_t cudaMalloc(void** p, size_t n) { return simt::alloc(p, n, "cudaMalloc", /*uninitialized=*/true); }
cudaError_t cudaFree(void* p) {
  if (p) simt::rt::unregister_region(p);
  free(p);
  return cudaSuccess;
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
#define C(x) case x: return #x;
    C(cudaSuccess) C(cudaErrorInvalidValue) C(cudaErrorMemoryAllocation) C(cudaErrorInitializationError)
    C(cudaErrorInvalidConfiguration) C(cudaErrorInvalidDevicePointer) C(cudaErrorInvalidMemcpyDirection)
    C(cudaErrorInvalidDeviceFunction) C(cudaErrorNoDevice) C(cudaErrorInvalidDevice) C(cudaErrorNoKernelImageForDevice)
    C(cudaErrorInvalidResourceHandle) C(cudaErrorNotReady) C(cudaErrorIllegalAddress) C(cudaErrorLaunchOutOfResources)
    C(cudaErrorLaunchTimeout) C(cudaErrorMisalignedAddress) C(cudaErrorAssert) C(cudaErrorLaunchFailure) C(cudaErrorNotSupported) C(cudaErrorUnknown)
#undef C
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (SIMT emulator: see simt_last_error())";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    default: return cudaGetErrorName(e);
  }
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxBlockDimX: case cudaDevAttrMaxBlockDimY: *v = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *v = 64; break;
    case cudaDevAttrMaxGridDimX: *v = 2147483647; break;
    case cudaDevAttrMaxGridDimY: case cudaDevAttrMaxGridDimZ: *v = 65535; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = 49152; break;
    case cudaDevAttrTotalConstantMemory: *v = 65536; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxRegistersPerBlock: case cudaDevAttrMaxRegistersPerMultiprocessor: *v = 65536; break;
    case cudaDevAttrClockRate: *v = 1755000; break;
    case cudaDevAttrMultiProcessorCount: *v = 132; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 233472; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = 2048; break;
    case cudaDevAttrL2CacheSize: *v = 50 * 1024 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = 232448; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *v = 32; break;
    default: *v = 0; return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  memset(p, 0, sizeof(*p));
  snprintf(p->name, sizeof p->name, "SIMT CPU emulator (sm_90)");
  p->totalGlobalMem = 80ull << 30;
  p->sharedMemPerBlock = 49152;
  p->regsPerBlock = 65536;
  p->warpSize = 32;
  p->memPitch = 2147483647;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsDim[0] = 1024; p->maxThreadsDim[1] = 1024; p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647; p->maxGridSize[1] = 65535; p->maxGridSize[2] = 65535;
  p->clockRate = 1755000;
  p->totalConstMem = 65536;
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = 132;
  p->l2CacheSize = 50 * 1024 * 1024;
  p->maxThreadsPerMultiProcessor = 2048;
  p->sharedMemPerMultiprocessor = 233472;
  p->sharedMemPerBlockOptin = 232448;
  p->regsPerMultiprocessor = 65536;
  p->maxBlocksPerMultiProcessor = 32;
  return cudaSuccess;
}

// assert() in kernel code: glibc's assert macro calls __assert_fail; the
// library is linked with -Bsymbolic-functions so this definition wins.
extern "C" void __assert_fail(const char* expr, const char* file, unsigned int line, const char* func) noexcept {
  if (simt::S().cur) {
    simt::S().abort_code = cudaErrorAssert;
    simt::fail_in_fiber(simt::fmt("SIMT error: device assert(%s) failed in %s at %s:%u in %s", expr, func, file, line,
                                  simt::where().c_str()));
  }
  fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, func, expr);
  abort();
}

// ------------------------------------------------------------------ C API for Python (ctypes)
extern "C" {
void simt_set_seed(unsigned long long seed) {
  simt::load_config();
  simt::S().seed = seed;
  simt::S().launch_counter = 0;
}
unsigned long long simt_get_seed() { simt::load_config(); return simt::S().seed; }
void simt_set_order(int mode) { simt::load_config(); simt::S().order = mode; }
void simt_set_strict(int on) { simt::load_config(); simt::S().strict = on != 0; }
void simt_set_poison(int on) { simt::load_config(); simt::S().poison = on != 0; }
void simt_set_allow_divergent_barrier(int on) { simt::load_config(); simt::S().allow_divergent_barrier = on != 0; }
// Message of the sticky launch failure ("" if none), else of the last
// configuration error ("" if none).
const char* simt_last_error() {
  auto& st = simt::S();
  if (st.sticky_code != cudaSuccess) return st.sticky_msg.c_str();
  if (st.last_code != cudaSuccess) return st.last_msg.c_str();
  return "";
}
int simt_last_error_code() {
  auto& st = simt::S();
  return st.sticky_code != cudaSuccess ? (int)st.sticky_code : (int)st.last_code;
}
void simt_clear_error() {
  auto& st = simt::S();
  st.sticky_code = cudaSuccess;
  st.sticky_msg.clear();
  st.last_code = cudaSuccess;
  st.last_msg.clear();
}
// Every kernel that started (past the launch-configuration checks) since the library was loaded,
// one line each: "<function offset in the library>\t<launch count>\t<kernel expression as written>". The
// offsets name the template instantiations (harness.launched_kernels maps them with nm).
const char* simt_launched_kernels() {
  auto& st = simt::S();
  st.launched_text.clear();
  for (const auto& [fn, l] : st.launched) {
    st.launched_text += simt::fmt("%llu\t%llu\t", (unsigned long long)simt::rt::module_offset(fn), l.count) +
                        l.name + "\n";
  }
  return st.launched_text.c_str();
}
// 0 launches, 1 blocks, 2 barriers, 3 warp collectives, 4 fiber switches
unsigned long long simt_stat(int which) {
  auto& st = simt::S();
  switch (which) {
    case 0: return st.n_launch;
    case 1: return st.n_blocks;
    case 2: return st.n_barriers;
    case 3: return st.n_warpops;
    case 4: return st.n_switches;
  }
  return 0;
}
}
