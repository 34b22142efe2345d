// The memory a launch may touch: buffers registered by the test (harness.call registers every
// simt.ptr argument), cudaMalloc allocations, static __shared__ variables (registered by the code
// rewrite.py inserts), and per launch the dynamic shared memory and the kernel's argument block.
// Registrations whose content starts undefined own initcheck's shadow (simt_init.cpp).
// Also the words used in checker messages: nearest buffer, thread, instruction.
// (system headers first: simt.h defines CUDA's __noinline__, which glibc headers also use)
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "simt_internal.h"

namespace simt {
namespace rt {
namespace {

struct Registration {
  uintptr_t lo, hi;
  Space space;
  std::string name;
  unsigned long long id;
  int refs;
  bool racecheck;
  std::unique_ptr<InitShadow> init;  // uninitialized registrations only
};

struct Registry {
  std::vector<Registration> regs;         // host-side registrations (buffers, cudaMalloc)
  std::map<uintptr_t, std::unique_ptr<Region>> regions;  // merged, non-overlapping, by lo
  bool dirty = false;
  unsigned long long next_id = 1;
  Region* cache = nullptr;
  // per launch
  Region dyn, param;
  bool have_dyn = false, have_param = false;
};

Registry& R() {
  static Registry* r = new Registry();  // never destroyed: fibers may outlive static destruction
  return *r;
}

void free_region_data(Region& r) {
  race_region_freed(r);
  counters_region_freed(r);
}

// Rebuilds the merged regions from the registrations: overlapping registrations (a view and its
// base tensor, say) become one region named after all of them.
void rebuild() {
  Registry& g = R();
  g.cache = nullptr;
  std::vector<std::unique_ptr<Region>> keep;  // static shared regions survive rebuilds
  for (auto& [lo, r] : g.regions) {
    if (r->space == kSharedStatic) keep.push_back(std::move(r));
    else free_region_data(*r);
  }
  g.regions.clear();
  for (auto& r : keep) g.regions.emplace(r->lo, std::move(r));
  std::vector<const Registration*> sorted;
  for (const auto& reg : g.regs) sorted.push_back(&reg);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->lo < b->lo; });
  std::unique_ptr<Region> cur;
  auto flush = [&]() {
    if (cur) g.regions[cur->lo] = std::move(cur);
  };
  for (const Registration* reg : sorted) {
    if (cur && reg->lo < cur->hi) {
      cur->hi = std::max(cur->hi, reg->hi);
      if (cur->name.find(reg->name) == std::string::npos) cur->name += " | " + reg->name;
      cur->racecheck = cur->racecheck && reg->racecheck;
      if (reg->init) cur->init.push_back(reg->init.get());
      continue;
    }
    flush();
    cur = std::make_unique<Region>();
    cur->lo = reg->lo;
    cur->hi = reg->hi;
    cur->space = reg->space;
    cur->name = reg->name;
    cur->id = reg->id;
    cur->racecheck = reg->racecheck;
    if (reg->init) cur->init.push_back(reg->init.get());
  }
  flush();
  g.dirty = false;
}

// This library's loaded segments (its static data, string literals, ...): not a buffer of the
// launch, but not an error either (e.g. the emulator's own tables read from inlined code).
struct Module {
  uintptr_t lo = 0, hi = 0;
};

Module& module() {
  static Module m = [] {
    Module out;
    Dl_info info;
    if (!dladdr(reinterpret_cast<const void*>(&R), &info)) return out;
    struct Ctx {
      const void* base;
      Module* m;
    } ctx{info.dli_fbase, &out};
    dl_iterate_phdr(
        [](dl_phdr_info* pi, size_t, void* data) -> int {
          Ctx* c = static_cast<Ctx*>(data);
          bool mine = false;
          uintptr_t lo = UINTPTR_MAX, hi = 0;
          for (int i = 0; i < pi->dlpi_phnum; ++i) {
            const ElfW(Phdr)& ph = pi->dlpi_phdr[i];
            if (ph.p_type != PT_LOAD) continue;
            uintptr_t a = pi->dlpi_addr + ph.p_vaddr;
            lo = std::min(lo, a);
            hi = std::max(hi, a + ph.p_memsz);
          }
          if (lo <= reinterpret_cast<uintptr_t>(c->base) && reinterpret_cast<uintptr_t>(c->base) < hi) mine = true;
          if (mine) {
            c->m->lo = lo;
            c->m->hi = hi;
            return 1;
          }
          return 0;
        },
        &ctx);
    return out;
  }();
  return m;
}

}  // namespace

unsigned long long register_region(const void* p, size_t n, Space space, const char* name, bool racecheck,
                                   bool uninitialized) {
  Registry& g = R();
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  // A buffer with content makes the bytes it shares with uninitialized ones defined (the test says
  // they hold something); a second registration of the same range only adds a reference.
  if (!uninitialized) mark_written(p, n);
  for (auto& reg : g.regs) {
    if (reg.lo == lo && reg.hi == lo + n) {
      reg.refs++;
      return reg.id;
    }
  }
  Registration reg{lo, lo + n, space, name ? name : "buffer", g.next_id++, 1, racecheck, nullptr};
  if (uninitialized && space == kGlobal) {
    reg.init = std::make_unique<InitShadow>(lo, lo + n);
    for (const auto& other : g.regs) {
      if (!other.init && other.lo < reg.hi && reg.lo < other.hi) init_mark(*reg.init, other.lo, other.hi);
    }
  }
  g.regs.push_back(std::move(reg));
  g.dirty = true;
  g.cache = nullptr;
  return g.regs.back().id;
}

void mark_written(const void* p, size_t n) {
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + n;
  for (auto& reg : R().regs) {
    if (reg.init && reg.lo < hi && lo < reg.hi) init_mark(*reg.init, lo, hi);
  }
}

void unregister_region(const void* p) {
  Registry& g = R();
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  for (size_t i = 0; i < g.regs.size(); ++i) {
    if (g.regs[i].lo != lo) continue;
    if (--g.regs[i].refs == 0) {
      g.regs.erase(g.regs.begin() + static_cast<long>(i));
      g.dirty = true;
      g.cache = nullptr;
    }
    return;
  }
}

void register_static_shared(const void* p, size_t n, const char* name) {
  Registry& g = R();
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p);
  counters_static_shared(lo, n);
  auto it = g.regions.find(lo);
  if (it != g.regions.end()) return;
  auto r = std::make_unique<Region>();
  r->lo = lo;
  r->hi = lo + n;
  r->space = kSharedStatic;
  r->name = std::string("__shared__ ") + (name ? name : "?");
  r->id = g.next_id++;
  g.regions.emplace(lo, std::move(r));
  g.cache = nullptr;
}

void set_launch_regions(void* dyn, size_t dyn_bytes, const void* param, size_t param_bytes) {
  Registry& g = R();
  if (g.dirty) rebuild();
  g.cache = nullptr;
  // (the dynamic shared memory region keeps its racecheck shadow across launches: cells carry
  // the generation of the block that wrote them, so stale ones read as empty)
  g.dyn.lo = reinterpret_cast<uintptr_t>(dyn);
  g.dyn.hi = g.dyn.lo + dyn_bytes;
  g.dyn.space = kSharedDynamic;
  g.dyn.name = fmt("dynamic shared memory (%zu bytes)", dyn_bytes);
  g.have_dyn = dyn_bytes > 0;
  g.param.lo = reinterpret_cast<uintptr_t>(param);
  g.param.hi = g.param.lo + param_bytes;
  g.param.space = kParam;
  g.param.name = "kernel parameters";
  g.have_param = param_bytes > 0;
}

void clear_launch_regions() {
  Registry& g = R();
  g.have_dyn = g.have_param = false;
  g.cache = nullptr;
}

Region* find_region(uintptr_t p) {
  Registry& g = R();
  Region* c = g.cache;
  if (c && p - c->lo < c->hi - c->lo) return c;
  if (g.have_dyn && p - g.dyn.lo < g.dyn.hi - g.dyn.lo) return g.cache = &g.dyn;
  if (g.have_param && p - g.param.lo < g.param.hi - g.param.lo) return g.cache = &g.param;
  if (g.dirty && !g_exec.in_kernel) rebuild();
  auto it = g.regions.upper_bound(p);
  if (it == g.regions.begin()) return nullptr;
  --it;
  Region* r = it->second.get();
  if (p - r->lo < r->hi - r->lo) return g.cache = r;
  return nullptr;
}

bool in_module(uintptr_t p) {
  const Module& m = module();
  return p - m.lo < m.hi - m.lo;
}

std::string describe_address(uintptr_t p, size_t n) {
  Registry& g = R();
  // The region holding p, else the nearest one by distance.
  const Region* best = nullptr;
  uintptr_t best_dist = UINTPTR_MAX;
  auto consider = [&](const Region& r) {
    uintptr_t dist = p < r.lo ? r.lo - p : (p >= r.hi ? p - r.hi + 1 : 0);
    if (dist < best_dist) {
      best_dist = dist;
      best = &r;
    }
  };
  for (const auto& [lo, r] : g.regions) consider(*r);
  if (g.have_dyn) consider(g.dyn);
  std::string out = fmt("address 0x%llx, %zu bytes", static_cast<unsigned long long>(p), n);
  if (!best) return out + " (no buffer is registered)";
  const Region& r = *best;
  const char* space = r.space == kGlobal ? "global" : "shared";
  if (p >= r.lo && p < r.hi) {
    out += fmt(" at offset %llu of %s buffer '%s' [0x%llx, 0x%llx) (%llu bytes)",
               static_cast<unsigned long long>(p - r.lo), space, r.name.c_str(),
               static_cast<unsigned long long>(r.lo), static_cast<unsigned long long>(r.hi),
               static_cast<unsigned long long>(r.hi - r.lo));
    if (p + n > r.hi)
      out += fmt(": the access ends %llu bytes past its end", static_cast<unsigned long long>(p + n - r.hi));
  } else if (p >= r.hi) {
    out += fmt(", %llu bytes after the end of the nearest buffer, %s '%s' [0x%llx, 0x%llx) (%llu bytes)",
               static_cast<unsigned long long>(p - r.hi), space, r.name.c_str(),
               static_cast<unsigned long long>(r.lo), static_cast<unsigned long long>(r.hi),
               static_cast<unsigned long long>(r.hi - r.lo));
  } else {
    out += fmt(", %llu bytes before the start of the nearest buffer, %s '%s' [0x%llx, 0x%llx) (%llu bytes)",
               static_cast<unsigned long long>(r.lo - p), space, r.name.c_str(),
               static_cast<unsigned long long>(r.lo), static_cast<unsigned long long>(r.hi),
               static_cast<unsigned long long>(r.hi - r.lo));
  }
  return out;
}

std::string describe_thread_id(unsigned tid) {
  const unsigned bx = blockDim.x, by = blockDim.y;
  return fmt("thread (%u,%u,%u) [linear %u, warp %u lane %u]", tid % bx, (tid / bx) % by, tid / (bx * by), tid,
             tid / 32, tid % 32);
}

std::string describe_thread() {
  return fmt("block (%u,%u,%u) ", blockIdx.x, blockIdx.y, blockIdx.z) + describe_thread_id(g_exec.tid);
}

std::string describe_pc(const void* pc) {
  Dl_info info;
  if (pc && dladdr(pc, &info) && info.dli_fname) {
    const char* base = strrchr(info.dli_fname, '/');
    return fmt("pc %s+0x%llx", base ? base + 1 : info.dli_fname,
               static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(pc) -
                                               reinterpret_cast<uintptr_t>(info.dli_fbase)));
  }
  return fmt("pc %p", pc);
}

// Kernels and runtime are linked into one library: one load address (looked up once) serves all.
uintptr_t module_offset(const void* pc) {
  static const uintptr_t base = [] {
    Dl_info info;
    return dladdr(reinterpret_cast<const void*>(&R), &info) ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
  }();
  return reinterpret_cast<uintptr_t>(pc) - base;
}

const void* pc_from_offset(const void* like, uintptr_t offset) {
  Dl_info info;
  if (like && dladdr(like, &info)) return reinterpret_cast<const char*>(info.dli_fbase) + offset;
  return reinterpret_cast<const void*>(offset);
}

}  // namespace rt
}  // namespace simt

// ------------------------------------------------------------------ C API for Python (ctypes)
extern "C" {
// Registers [p, p + n) as a global buffer the kernels may touch (refcounted by (p, n)); racecheck 0
// exempts it from racecheck; uninitialized 1: its content is undefined until written (initcheck),
// as an at::empty buffer's on a GPU.
unsigned long long simt_register_buffer(const void* p, unsigned long long n, const char* name, int racecheck,
                                        int uninitialized) {
  return simt::rt::register_region(p, n, simt::rt::kGlobal, name, racecheck != 0, uninitialized != 0);
}
void simt_unregister_buffer(const void* p) { simt::rt::unregister_region(p); }
}
