// Per-launch memory counters, the input of the GPU cost model (benchmarks/gpu_model.py).
//
// A warp-level request is the n-th execution of one instruction (one access site of the
// instrumented code) by the lanes of one warp: each access carries (warp, instruction, n) with n
// counted per thread, and at the end of every block the accesses are grouped by that key.
// Per request:
//  * global memory: the distinct 32-byte sectors it touches (coalescing), and the sectors its
//    unique bytes would need if packed (the ideal);
//  * shared memory: the wavefronts it needs (32 banks of 4 bytes; a phase of 32 lanes for accesses
//    up to 4 bytes, 16 for 8-byte and 8 for 16-byte accesses; per phase, the most distinct words
//    any one bank must serve), and the ideal (one per phase that has accesses).
// Per launch also the warp collectives that issue through the shared-memory (MIO) pipe (shuffles,
// redux; an 8-byte shuffle counts twice), the warps' mma.sync instructions (tensor cores), and every cudaMemset(Async) from host code as a launch of
// its own (the bytes it writes are DRAM writes).
// Per launch: unique DRAM bytes by first touch of each 32-byte sector (a read of a sector not yet
// touched in this launch is a DRAM read; the first write of a sector is a DRAM write), the busiest
// warp's global load requests split into L1 misses (a sector its block had not touched before, in
// execution order) and L1 hits (the latency-bound path), and per instruction the request, sector
// and wavefront totals (to name bank conflicts and uncoalesced accesses by source line).
#include "simt_internal.h"

#include <stdlib.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

namespace simt {
namespace rt {
namespace {

enum EvKind : uint8_t { kGLoad = 0, kGStore = 1, kGAtomic = 2, kSLoad = 3, kSStore = 4, kSAtomic = 5 };

struct Ev {
  uintptr_t pc;
  uintptr_t addr;
  uint32_t n;      // this thread's execution count of pc before this access
  uint16_t warp;
  uint8_t lane;
  uint8_t kind;
  uint32_t size;
  bool l1_miss;    // touched a sector its block had not touched before
};

struct PcStats {
  uint64_t requests = 0, sectors = 0, ideal_sectors = 0, wavefronts = 0, ideal_wavefronts = 0, bytes = 0;
  uint8_t kind = 0;
  uint32_t size = 0;
};

struct Launch {
  std::string name;
  uintptr_t fn_offset = 0;
  dim3 grid, block;
  size_t dyn_smem = 0, static_smem = 0;
  uint64_t blocks = 0, warps = 0;
  uint64_t req[6] = {}, sectors[6] = {}, ideal_sectors[6] = {}, wavefronts[6] = {}, ideal_wavefronts[6] = {},
           bytes[6] = {};
  uint64_t dram_read = 0, dram_write = 0;
  uint64_t max_warp_global_loads = 0, max_warp_global = 0, max_warp_shared = 0;
  uint64_t max_warp_load_misses = 0, max_warp_load_hits = 0;  // the warp with the longest load chain
  uint64_t max_block_global_loads = 0;  // busiest block: sum of its warps' global load requests
  uint64_t collectives = 0;  // MIO instructions of warp collectives
  uint64_t mma = 0;          // warp-level mma.sync instructions (tensor cores)
  bool memset = false;       // a cudaMemset(Async), not a kernel
  std::map<uintptr_t, PcStats> pcs;
  bool ok = true;
};

// One thread's execution counts per instruction (open addressing; reset per block by stamp).
struct PcCounter {
  struct Slot {
    uintptr_t pc;
    uint32_t n;
    uint32_t gen;
  };
  std::vector<Slot> slots;
  size_t used = 0;
  uint32_t gen = 0;

  uint32_t next(uintptr_t pc, uint32_t block_gen) {
    if (gen != block_gen) {
      gen = block_gen;
      used = 0;
      if (slots.empty()) slots.assign(256, Slot{0, 0, 0});
    }
    if ((used + 1) * 2 > slots.size()) grow(block_gen);
    const size_t mask = slots.size() - 1;
    size_t i = (pc * 0x9e3779b97f4a7c15ull) >> 20 & mask;
    for (;; i = (i + 1) & mask) {
      Slot& s = slots[i];
      if (s.gen != block_gen) {
        s = Slot{pc, 1, block_gen};
        used++;
        return 0;
      }
      if (s.pc == pc) return s.n++;
    }
  }
  void grow(uint32_t block_gen) {
    std::vector<Slot> old;
    old.swap(slots);
    slots.assign(old.size() * 2, Slot{0, 0, 0});
    const size_t mask = slots.size() - 1;
    for (const Slot& s : old) {
      if (s.gen != block_gen) continue;
      size_t i = (s.pc * 0x9e3779b97f4a7c15ull) >> 20 & mask;
      while (slots[i].gen == block_gen) i = (i + 1) & mask;
      slots[i] = s;
    }
  }
};

struct Counters {
  bool active = false;
  Launch cur;
  std::vector<Launch> done;
  std::vector<Ev> events;
  std::vector<PcCounter> threads;
  std::set<uintptr_t> static_vars;  // static __shared__ variables seen in this launch
  std::unordered_set<uintptr_t> block_sectors;  // global sectors the running block touched
  uint32_t block_gen = 0;
  std::string json;
};

Counters& C() {
  static Counters* c = new Counters();
  return *c;
}

bool is_shared(uint8_t k) { return k >= kSLoad; }
bool is_load(uint8_t k) { return k == kGLoad || k == kSLoad; }

// First-touch DRAM accounting of a global access.
void touch_sectors(Region& r, uintptr_t p, unsigned size, bool write, Launch& L) {
  const uintptr_t base = r.lo >> 5;
  const size_t nsec = ((r.hi - 1) >> 5) - base + 1;
  if (r.sector_gen != g_exec.launch || !r.sector_touched) {
    if (!r.sector_touched) {
      r.sector_touched = static_cast<uint64_t*>(calloc((nsec + 63) / 64, 8));
      r.sector_written = static_cast<uint64_t*>(calloc((nsec + 63) / 64, 8));
    } else {
      memset(r.sector_touched, 0, (nsec + 63) / 64 * 8);
      memset(r.sector_written, 0, (nsec + 63) / 64 * 8);
    }
    r.sector_gen = g_exec.launch;
  }
  const uintptr_t last = std::min<uintptr_t>(p + size, r.hi) - 1;
  for (uintptr_t s = (p >> 5) - base; s <= (last >> 5) - base; ++s) {
    const uint64_t bit = 1ull << (s & 63);
    uint64_t& t = r.sector_touched[s >> 6];
    if (write) {
      uint64_t& w = r.sector_written[s >> 6];
      if (!(w & bit)) {
        w |= bit;
        L.dram_write += 32;
      }
      t |= bit;
    } else if (!(t & bit)) {
      t |= bit;
      L.dram_read += 32;
    }
  }
}

// Wavefronts of one shared-memory request (events of one warp, one instruction, one execution).
void shared_wavefronts(const Ev* e, size_t n, uint64_t* wf, uint64_t* ideal) {
  uint32_t size = 0;
  for (size_t i = 0; i < n; ++i) size = std::max(size, e[i].size);
  const unsigned phase_lanes = size <= 4 ? 32 : (size <= 8 ? 16 : 8);
  *wf = 0;
  *ideal = 0;
  for (unsigned ph = 0; ph < 32 / phase_lanes; ++ph) {
    uintptr_t words[32][8];  // distinct words per bank, capped (a bank with more is serialised anyway)
    unsigned count[32] = {};
    bool any = false;
    for (size_t i = 0; i < n; ++i) {
      if (e[i].lane / phase_lanes != ph) continue;
      any = true;
      for (uintptr_t w = e[i].addr >> 2; w <= (e[i].addr + e[i].size - 1) >> 2; ++w) {
        const unsigned b = static_cast<unsigned>(w & 31u);
        bool seen = false;
        for (unsigned k = 0; k < std::min(count[b], 8u); ++k) seen |= words[b][k] == w;
        if (seen) continue;
        if (count[b] < 8) words[b][count[b]] = w;
        count[b]++;
      }
    }
    if (!any) continue;
    unsigned worst = 1;
    for (unsigned b = 0; b < 32; ++b) worst = std::max(worst, count[b]);
    *wf += worst;
    *ideal += 1;
  }
}

// Sectors of one global request and the sectors its unique bytes would fill.
void global_sectors(Ev* e, size_t n, uint64_t* sectors, uint64_t* ideal, uint64_t* bytes) {
  std::sort(e, e + n, [](const Ev& a, const Ev& b) { return a.addr < b.addr; });
  uint64_t sec = 0, uniq = 0;
  uintptr_t next_sector = 0, covered = 0;  // sectors below next_sector are counted
  for (size_t i = 0; i < n; ++i) {
    const uintptr_t lo = e[i].addr, hi = e[i].addr + e[i].size;
    for (uintptr_t s = std::max(lo >> 5, next_sector); s <= (hi - 1) >> 5; ++s) sec++;
    next_sector = std::max(next_sector, ((hi - 1) >> 5) + 1);
    if (hi > covered) {
      uniq += hi - std::max(lo, covered);
      covered = hi;
    }
  }
  *sectors = sec;
  *ideal = (uniq + 31) / 32;
  *bytes = uniq;
}

}  // namespace

void counters_launch_begin(const LaunchDesc& d, unsigned nthreads, size_t dyn_bytes) {
  Counters& c = C();
  c.active = true;
  c.cur = Launch();
  c.cur.name = d.name;
  c.cur.fn_offset = module_offset(d.fn);
  c.cur.grid = d.grid;
  c.cur.block = d.block;
  c.cur.dyn_smem = dyn_bytes;
  if (c.threads.size() < nthreads) c.threads.resize(nthreads);
  c.events.clear();
  c.static_vars.clear();
  c.block_sectors.clear();
  c.block_gen++;  // (a block aborted by an error never reached counters_block_end)
}

void counters_collective(unsigned mio) {
  Counters& c = C();
  if (c.active) c.cur.collectives += mio;
}

void counters_mma() {
  Counters& c = C();
  if (c.active) c.cur.mma++;
}

void counters_memset(size_t bytes) {
  Counters& c = C();
  if (c.active) return;  // (a memset inside a launch cannot happen: host code only)
  Launch L;
  L.name = "cudaMemsetAsync";
  L.memset = true;
  L.grid = dim3(1, 1, 1);
  L.block = dim3(1, 1, 1);
  L.dram_write = (bytes + 31) / 32 * 32;
  c.done.push_back(std::move(L));
}

void counters_static_shared(uintptr_t p, size_t bytes) {
  Counters& c = C();
  if (c.active && c.static_vars.insert(p).second) c.cur.static_smem += bytes;
}

void count_access(Region& r, uintptr_t p, unsigned size, unsigned flags, const void* pc) {
  Counters& c = C();
  if (!c.active) return;
  const bool write = flags & kWrite, atomic = flags & kAtomic;
  const bool shared = r.space == kSharedDynamic || r.space == kSharedStatic;
  uint8_t kind = atomic ? kGAtomic : (write ? kGStore : kGLoad);
  if (shared) kind += 3;
  const unsigned tid = g_exec.tid;
  const uintptr_t ipc = reinterpret_cast<uintptr_t>(pc);
  Ev e;
  e.pc = ipc;
  e.addr = p;
  e.n = c.threads[tid].next(ipc, c.block_gen + 1);
  e.warp = static_cast<uint16_t>(tid >> 5);
  e.lane = static_cast<uint8_t>(tid & 31u);
  e.kind = kind;
  e.size = size;
  e.l1_miss = false;
  if (!shared) {
    for (uintptr_t s = p >> 5; s <= (p + size - 1) >> 5; ++s) e.l1_miss |= c.block_sectors.insert(s).second;
  }
  c.events.push_back(e);
  if (!shared) {
    if (atomic) {
      touch_sectors(r, p, size, false, c.cur);
      touch_sectors(r, p, size, true, c.cur);
    } else {
      touch_sectors(r, p, size, write, c.cur);
    }
  }
}

void counters_block_end() {
  Counters& c = C();
  if (!c.active) return;
  Launch& L = c.cur;
  L.blocks++;
  L.warps += (g_exec.nthreads + 31) / 32;
  c.block_gen++;  // the next block counts executions from zero
  auto& ev = c.events;
  std::sort(ev.begin(), ev.end(), [](const Ev& a, const Ev& b) {
    if (a.warp != b.warp) return a.warp < b.warp;
    if (a.pc != b.pc) return a.pc < b.pc;
    return a.n < b.n;
  });
  uint64_t warp_gl = 0, warp_g = 0, warp_s = 0, block_gl = 0, warp_miss = 0;
  int cur_warp = -1;
  auto close_warp = [&]() {
    L.max_warp_global_loads = std::max(L.max_warp_global_loads, warp_gl);
    L.max_warp_global = std::max(L.max_warp_global, warp_g);
    L.max_warp_shared = std::max(L.max_warp_shared, warp_s);
    // the longest chain: misses cost far more than hits, so rank warps by misses, then hits
    const uint64_t hits = warp_gl - warp_miss;
    if (warp_miss > L.max_warp_load_misses ||
        (warp_miss == L.max_warp_load_misses && hits > L.max_warp_load_hits)) {
      L.max_warp_load_misses = warp_miss;
      L.max_warp_load_hits = hits;
    }
    block_gl += warp_gl;
    warp_gl = warp_g = warp_s = warp_miss = 0;
  };
  for (size_t i = 0; i < ev.size();) {
    size_t j = i + 1;
    while (j < ev.size() && ev[j].warp == ev[i].warp && ev[j].pc == ev[i].pc && ev[j].n == ev[i].n) ++j;
    if (ev[i].warp != cur_warp) {
      if (cur_warp >= 0) close_warp();
      cur_warp = ev[i].warp;
    }
    const uint8_t k = ev[i].kind;
    PcStats& ps = L.pcs[module_offset(reinterpret_cast<const void*>(ev[i].pc))];
    ps.kind = k;
    ps.requests++;
    L.req[k]++;
    if (is_shared(k)) {
      uint64_t wf, ideal;
      shared_wavefronts(&ev[i], j - i, &wf, &ideal);
      uint64_t bytes = 0;
      for (size_t m = i; m < j; ++m) bytes += ev[m].size;
      L.wavefronts[k] += wf;
      L.ideal_wavefronts[k] += ideal;
      L.bytes[k] += bytes;
      ps.wavefronts += wf;
      ps.ideal_wavefronts += ideal;
      ps.bytes += bytes;
      warp_s++;
    } else {
      uint64_t sec, ideal, bytes;
      global_sectors(&ev[i], j - i, &sec, &ideal, &bytes);
      L.sectors[k] += sec;
      L.ideal_sectors[k] += ideal;
      L.bytes[k] += bytes;
      ps.sectors += sec;
      ps.ideal_sectors += ideal;
      ps.bytes += bytes;
      warp_g++;
      if (is_load(k)) {
        warp_gl++;
        bool miss = false;
        for (size_t m = i; m < j; ++m) miss |= ev[m].l1_miss;
        warp_miss += miss;
      }
    }
    ps.size = std::max(ps.size, ev[i].size);
    i = j;
  }
  if (cur_warp >= 0) close_warp();
  L.max_block_global_loads = std::max(L.max_block_global_loads, block_gl);
  ev.clear();
  c.block_sectors.clear();
}

void counters_launch_end(bool ok) {
  Counters& c = C();
  if (!c.active) return;
  c.cur.ok = ok;
  c.done.push_back(std::move(c.cur));
  c.cur = Launch();
  c.active = false;
  c.events.clear();
}

void counters_region_freed(Region& r) {
  free(r.sector_touched);
  free(r.sector_written);
  r.sector_touched = r.sector_written = nullptr;
  r.sector_gen = 0;
}

std::string counters_json() {
  static const char* kinds[6] = {"global_load", "global_store", "global_atomic",
                                 "shared_load", "shared_store", "shared_atomic"};
  std::string out = "[";
  bool first = true;
  for (const Launch& L : C().done) {
    if (!first) out += ",";
    first = false;
    std::string name;
    for (char ch : L.name) {
      if (ch == '"' || ch == '\\') name += '\\';
      name += ch;
    }
    out += fmt("\n{\"name\": \"%s\", \"fn_offset\": %llu, \"ok\": %s, \"grid\": [%u, %u, %u], \"block\": [%u, %u, %u], "
               "\"dyn_smem\": %zu, \"static_smem\": %zu, \"blocks\": %llu, \"warps\": %llu, \"dram_read\": %llu, "
               "\"dram_write\": %llu, \"max_warp_global_loads\": %llu, \"max_warp_global\": %llu, "
               "\"max_warp_shared\": %llu, \"max_block_global_loads\": %llu, \"max_warp_load_misses\": %llu, "
               "\"max_warp_load_hits\": %llu, \"collectives\": %llu, \"mma\": %llu, \"memset\": %s",
               name.c_str(), static_cast<unsigned long long>(L.fn_offset), L.ok ? "true" : "false", L.grid.x,
               L.grid.y, L.grid.z, L.block.x, L.block.y, L.block.z, L.dyn_smem, L.static_smem,
               static_cast<unsigned long long>(L.blocks), static_cast<unsigned long long>(L.warps),
               static_cast<unsigned long long>(L.dram_read), static_cast<unsigned long long>(L.dram_write),
               static_cast<unsigned long long>(L.max_warp_global_loads),
               static_cast<unsigned long long>(L.max_warp_global),
               static_cast<unsigned long long>(L.max_warp_shared),
               static_cast<unsigned long long>(L.max_block_global_loads),
               static_cast<unsigned long long>(L.max_warp_load_misses),
               static_cast<unsigned long long>(L.max_warp_load_hits),
               static_cast<unsigned long long>(L.collectives), static_cast<unsigned long long>(L.mma),
               L.memset ? "true" : "false");
    for (int k = 0; k < 6; ++k) {
      out += fmt(", \"%s\": {\"requests\": %llu, \"bytes\": %llu, \"sectors\": %llu, \"ideal_sectors\": %llu, "
                 "\"wavefronts\": %llu, \"ideal_wavefronts\": %llu}",
                 kinds[k], static_cast<unsigned long long>(L.req[k]), static_cast<unsigned long long>(L.bytes[k]),
                 static_cast<unsigned long long>(L.sectors[k]), static_cast<unsigned long long>(L.ideal_sectors[k]),
                 static_cast<unsigned long long>(L.wavefronts[k]),
                 static_cast<unsigned long long>(L.ideal_wavefronts[k]));
    }
    out += ", \"pcs\": [";
    bool fp = true;
    for (const auto& [pc, ps] : L.pcs) {
      if (!fp) out += ",";
      fp = false;
      out += fmt("[%llu, \"%s\", %u, %llu, %llu, %llu, %llu, %llu, %llu]", static_cast<unsigned long long>(pc),
                 kinds[ps.kind], ps.size, static_cast<unsigned long long>(ps.requests),
                 static_cast<unsigned long long>(ps.bytes), static_cast<unsigned long long>(ps.sectors),
                 static_cast<unsigned long long>(ps.ideal_sectors), static_cast<unsigned long long>(ps.wavefronts),
                 static_cast<unsigned long long>(ps.ideal_wavefronts));
    }
    out += "]}";
  }
  out += "\n]";
  return out;
}

}  // namespace rt
}  // namespace simt

// ------------------------------------------------------------------ C API for Python (ctypes)
extern "C" {
// JSON list of the launches counted since the last reset (see benchmarks/gpu_model.py). The
// pointer stays valid until the next call.
const char* simt_counters_json() {
  auto& c = simt::rt::C();
  c.json = simt::rt::counters_json();
  return c.json.c_str();
}
void simt_counters_reset() { simt::rt::C().done.clear(); }
}
