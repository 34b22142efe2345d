// racecheck: two threads touching the same byte without a synchronisation between them, at least
// one of them with a plain (non-atomic) write, is a data race, whatever order the emulator happened
// to run them in. Fibers switch only at barriers and collectives, so a read-modify-write is
// accidentally atomic in the emulator; this check finds the lost update anyway.
//
// Happens-before, per block:
//  * a completed __syncthreads orders everything before it against everything after it (every
//    barrier starts a new epoch; epochs are unique across blocks and launches);
//  * inside a warp, a completed __syncwarp orders the accesses of the lanes in its mask before it
//    against theirs after it (a 32-entry vector clock per thread, reset at every barrier). Shuffles,
//    votes and reductions exchange values but do not order memory (PTX: bar.warp.sync has memory
//    ordering semantics, shfl.sync does not), unless SIMT_RACE_ANY_COLLECTIVE=1 /
//    set_checks(any_collective_orders=True) makes every collective count;
//  * between two blocks of a launch only release/acquire through a global atomic orders memory (the
//    "last block finishes" pattern): block X releases when one of its threads executes
//    __threadfence() and then an atomic write to address A; block Y acquires when one of its threads
//    executes an atomic on A (after X's release: blocks run one after another) and then
//    __threadfence(). X's accesses before its release (every epoch before the fence's, and the
//    releasing thread's own in that epoch) then happen before the acquiring thread's accesses after
//    its fence, and before every thread's of Y after the next __syncthreads. Anything else between
//    blocks is a race: a global byte written by one block and read or written by another.
// Atomic accesses are exempt from the hazard check (they only release and acquire here).
//
// Shadow: one Cell per byte of every region touched, allocated on first use. A cell remembers the
// last plain write and a summary of the reads since then in the current epoch (which warps read,
// which lanes, the latest reader clock), enough to decide whether a later write is ordered after
// every one of them.
#include "simt_internal.h"

#include <stdlib.h>

#include <string>
#include <unordered_map>
#include <vector>

namespace simt {
namespace rt {
namespace {

constexpr uint16_t kNone = 0xffff;
constexpr const char* kNoBarrier = "two warps with no __syncthreads between them";
constexpr const char* kNoSyncwarp = "two lanes of one warp with no __syncthreads or __syncwarp of both between them";

struct Cell {
  uint32_t gen;      // launch number (global memory) or block generation (shared memory)
  uint32_t w_epoch;  // last plain write
  uint32_t w_block;
  uint32_t w_pc;
  uint16_t w_tid;
  uint16_t w_clk;
  uint32_t r_epoch;  // reads since the last write, all in r_epoch of block r_block
  uint32_t r_block;
  uint32_t r_warps;  // bit w: warp w read
  uint32_t r_lanes;  // bit l: lane l (of some reading warp) read
  uint32_t r_pc;     // first reader's instruction
  uint16_t r_tid;    // first reader, kNone: no read
  uint16_t r_clk;    // the latest reader clock
};

// A release by block `block`: its accesses in epochs before `epoch`, and thread `tid`'s in it.
struct Release {
  uint32_t block;
  uint32_t epoch;
  uint16_t tid;
};

// What the running block acquired from another block's release, from when.
struct Acquired {
  Release from;
  uint32_t epoch;  // the acquiring fence's epoch: the whole block is ordered after it from the next one
  uint16_t tid;    // the acquiring thread (ordered at once)
};

struct RaceState {
  uint32_t epoch = 0;      // current epoch of the running block (unique, increasing)
  uint32_t block_gen = 0;  // generation of the running block (for shared-memory cells)
  std::vector<uint32_t> vc_epoch;  // epoch each thread's clock row belongs to
  std::vector<uint16_t> vc;        // [thread][32] warp-local vector clocks
  // release / acquire between blocks (per launch)
  std::unordered_map<uintptr_t, std::vector<Release>> releases;  // by atomic address
  std::vector<uint32_t> fence_epoch;                   // per thread: epoch + 1 of its last fence (0: none)
  std::vector<std::vector<Release>> pending;           // per thread: releases its last atomic saw
  std::unordered_map<uint32_t, Acquired> acquired;     // running block: by releasing block
};

RaceState& RS() {
  static RaceState* s = new RaceState();
  return *s;
}

// This thread's clock row, zeroed first when it belongs to an older epoch.
uint16_t* clock_row(unsigned tid) {
  RaceState& s = RS();
  uint16_t* row = &s.vc[static_cast<size_t>(tid) * 32];
  if (s.vc_epoch[tid] != s.epoch) {
    s.vc_epoch[tid] = s.epoch;
    for (int l = 0; l < 32; ++l) row[l] = 0;
  }
  return row;
}

Cell* shadow(Region& r) {
  const size_t n = r.hi - r.lo;
  if (r.race_cap < n) {
    free(r.race_shadow);
    r.race_shadow = calloc(n, sizeof(Cell));  // gen 0: never touched
    if (!r.race_shadow) {
      fprintf(stderr, "simt: racecheck cannot allocate a shadow of %zu bytes\n", n * sizeof(Cell));
      abort();
    }
    r.race_cap = n;
  }
  return static_cast<Cell*>(r.race_shadow);
}

// The access of block `block`'s thread `tid` at `epoch` happens before the running thread's access
// now through a release/acquire pair.
bool acquired_before(uint32_t block, uint32_t epoch, uint16_t tid) {
  RaceState& s = RS();
  const auto it = s.acquired.find(block);
  if (it == s.acquired.end()) return false;
  const Acquired& a = it->second;
  const bool released = epoch < a.from.epoch || (epoch == a.from.epoch && tid == a.from.tid);
  const bool visible = s.epoch > a.epoch || g_exec.tid == a.tid;
  return released && visible;
}

std::string who(unsigned tid, uint32_t block, bool same_block) {
  if (same_block) return describe_thread_id(tid);
  const unsigned gx = gridDim.x, gy = gridDim.y;
  return fmt("block (%u,%u,%u) ", block % gx, (block / gx) % gy, block / (gx * gy)) + describe_thread_id(tid);
}

[[noreturn]] void report(const Region& r, uintptr_t p, unsigned size, bool write, const void* pc,
                         const std::string& other, const char* other_kind, uint32_t other_pc, const char* why) {
  const char* space = r.space == kGlobal ? "global" : "shared";
  fail_kernel(cudaErrorLaunchFailure,
              fmt("SIMT racecheck: %s-%s hazard on %s memory in kernel '%s': ", other_kind, write ? "write" : "read",
                  space, g_exec.desc ? g_exec.desc->name : "?") +
                  fmt("%s of %u bytes by ", write ? "write" : "read", size) + describe_thread() + " (" +
                  describe_pc(pc) + ") races with a " + other_kind + " by " + other + " (" +
                  describe_pc(pc_from_offset(pc, other_pc)) + "): " + why + "; " + describe_address(p, size) +
                  "\n  in " + where_now());
}

}  // namespace

void race_launch_begin() {
  RaceState& s = RS();
  const unsigned n = g_exec.nthreads;
  if (s.vc_epoch.size() < n) {
    s.vc_epoch.assign(n, 0);
    s.vc.assign(static_cast<size_t>(n) * 32, 0);
  }
  s.releases.clear();
}

void race_block_begin() {
  RaceState& s = RS();
  s.epoch++;
  s.block_gen++;
  s.acquired.clear();
  s.fence_epoch.assign(g_exec.nthreads, 0);
  s.pending.assign(g_exec.nthreads, {});
}

void race_fence() {
  RaceState& s = RS();
  const unsigned tid = g_exec.tid;
  if (tid >= s.fence_epoch.size()) return;
  s.fence_epoch[tid] = s.epoch + 1;
  for (const Release& r : s.pending[tid]) {
    Acquired& a = s.acquired[r.block];
    a.from = r;
    a.epoch = s.epoch;
    a.tid = static_cast<uint16_t>(tid);
  }
  s.pending[tid].clear();
}

void race_atomic(uintptr_t p, bool write) {
  RaceState& s = RS();
  const unsigned tid = g_exec.tid;
  if (tid >= s.fence_epoch.size()) return;
  const uint32_t block = static_cast<uint32_t>(g_exec.block);
  std::vector<Release>& rel = s.releases[p];
  for (const Release& r : rel) {
    if (r.block != block) s.pending[tid].push_back(r);
  }
  if (write && s.fence_epoch[tid] != 0) rel.push_back(Release{block, s.fence_epoch[tid] - 1, static_cast<uint16_t>(tid)});
}

void race_barrier() { RS().epoch++; }

void race_warp_sync(unsigned warp_base, unsigned mask) {
  uint16_t join[32] = {};
  uint16_t* rows[32];
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    uint16_t* row = clock_row(warp_base + l);
    row[l]++;
    rows[l] = row;
    for (int k = 0; k < 32; ++k) join[k] = row[k] > join[k] ? row[k] : join[k];
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    for (int k = 0; k < 32; ++k) rows[l][k] = join[k];
  }
}

void race_region_freed(Region& r) {
  free(r.race_shadow);
  r.race_shadow = nullptr;
  r.race_cap = 0;
}

void race_access(Region& r, uintptr_t p, unsigned size, unsigned flags, const void* pc) {
  RaceState& s = RS();
  const bool write = flags & kWrite;
  const bool global = r.space == kGlobal;
  const uint32_t gen = global ? static_cast<uint32_t>(g_exec.launch) : s.block_gen;
  const uint32_t block = static_cast<uint32_t>(g_exec.block);
  const unsigned tid = g_exec.tid, lane = tid & 31u, warp = tid >> 5;
  const uint16_t* row = clock_row(tid);
  const uint16_t clk = row[lane];
  const uint32_t epoch = s.epoch;
  const uint32_t pc32 = static_cast<uint32_t>(module_offset(pc));
  // ordered(t, e, c): the access of thread t (this block) at epoch e and clock c happens before now
  auto ordered = [&](unsigned t, uint32_t e, uint16_t c) {
    if (e != epoch) return true;
    if ((t >> 5) != warp) return false;
    return row[t & 31u] > c;
  };
  Cell* cells = shadow(r) + (p - r.lo);
  const unsigned n = p + size <= r.hi ? size : static_cast<unsigned>(r.hi - p);
  for (unsigned i = 0; i < n; ++i) {
    Cell& c = cells[i];
    if (c.gen != gen) {
      c.gen = gen;
      c.w_tid = kNone;
      c.r_tid = kNone;
    }
    if (c.w_tid != kNone && !(c.w_block == block && c.w_tid == tid)) {
      if (c.w_block != block && !acquired_before(c.w_block, c.w_epoch, c.w_tid))
        report(r, p + i, size, write, pc, who(c.w_tid, c.w_block, false), "write", c.w_pc,
               "two blocks of one launch are never ordered");
      if (c.w_block == block && !ordered(c.w_tid, c.w_epoch, c.w_clk))
        report(r, p + i, size, write, pc, who(c.w_tid, block, true), "write", c.w_pc,
               (c.w_tid >> 5) == warp ? kNoSyncwarp : kNoBarrier);
    }
    if (write) {
      if (c.r_tid != kNone) {
        if (c.r_block != block) {
          if (!acquired_before(c.r_block, c.r_epoch, c.r_tid))
            report(r, p + i, size, write, pc, who(c.r_tid, c.r_block, false), "read", c.r_pc,
                 "two blocks of one launch are never ordered");
        } else if (c.r_epoch == epoch) {
          const uint32_t other_warps = c.r_warps & ~(1u << warp);
          if (other_warps)
            report(r, p + i, size, write, pc,
                   fmt("a thread of warp(s) mask 0x%08x (first reader: ", other_warps) +
                       describe_thread_id(c.r_tid) + ")",
                   "read", c.r_pc, kNoBarrier);
          const uint32_t other_lanes = c.r_lanes & ~(1u << lane);
          for (unsigned l = 0; l < 32; ++l) {
            if ((other_lanes >> l & 1u) && !(row[l] > c.r_clk))
              report(r, p + i, size, write, pc, describe_thread_id(warp * 32 + l), "read", c.r_pc, kNoSyncwarp);
          }
        }
      }
      c.w_tid = static_cast<uint16_t>(tid);
      c.w_block = block;
      c.w_epoch = epoch;
      c.w_clk = clk;
      c.w_pc = pc32;
      c.r_tid = kNone;
    } else {
      if (c.r_tid == kNone || c.r_block != block || c.r_epoch != epoch) {
        c.r_tid = static_cast<uint16_t>(tid);
        c.r_block = block;
        c.r_epoch = epoch;
        c.r_warps = 1u << warp;
        c.r_lanes = 1u << lane;
        c.r_clk = clk;
        c.r_pc = pc32;
      } else {
        c.r_warps |= 1u << warp;
        c.r_lanes |= 1u << lane;
        if (clk > c.r_clk) c.r_clk = clk;
      }
    }
  }
}

}  // namespace rt
}  // namespace simt
