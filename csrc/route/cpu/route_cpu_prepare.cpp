// Prepared router parameters of the CPU kernels and their cache (route_cpu_prepare.h).
#include "route_cpu_prepare.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <mutex>
#include <unordered_map>

namespace l2r {
namespace route {
namespace cpu {
namespace {

// Rows of W padded to a multiple of 16 floats and away from multiples of 4 KiB (r rows read side
// by side would otherwise share L1 sets).
int64_t padded_stride(int64_t d) {
  const int64_t s = round_up(d, 16);
  return s % 1024 == 0 ? s + 16 : s;
}

template <typename A>
void prepare(const at::Tensor& proj_in, const at::Tensor& anchors_in, const at::Tensor& scale,
             const c10::optional<at::Tensor>& norm_weight_in, const PrepareOptions& o, PreparedStorage<A>& P) {
  const auto acc = c10::CppTypeToScalarType<A>::value;
  const at::Tensor proj = proj_in.to(acc).contiguous();
  const at::Tensor anchors = anchors_in.to(acc).contiguous();
  const int64_t R = proj.size(0), d = proj.size(1), E = anchors.size(0), H = anchors.size(1);
  const int64_t stride = padded_stride(d);
  const int64_t E8 = round_up(E, o.width);
  const A beta = static_cast<A>(o.beta), eps = static_cast<A>(o.eps);
  const A* w = proj.data_ptr<A>();
  P.proj.assign(R * stride, A(0));
  P.proj_w.assign(R * stride, A(0));
  const bool weighted = o.use_norm && norm_weight_in.has_value();
  if (weighted) {
    const at::Tensor g = norm_weight_in->to(acc).contiguous();
    P.norm_weight.assign(g.data_ptr<A>(), g.data_ptr<A>() + d);
  } else {
    P.norm_weight.clear();
  }
  for (int64_t k = 0; k < R; ++k) {
    for (int64_t i = 0; i < d; ++i) {
      P.proj[k * stride + i] = w[k * d + i];
      P.proj_w[k * stride + i] = weighted ? w[k * d + i] * P.norm_weight[i] : w[k * d + i];
    }
  }
  P.anchors.assign(anchors.data_ptr<A>(), anchors.data_ptr<A>() + E * H * R);
  P.anchor_coef.resize(E * H);
  P.anchors_t.assign(R * H * E8, A(0));
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t h = 0; h < H; ++h) {
      const A* a = P.anchors.data() + (e * H + h) * R;
      const math::NormCoef<A> c = math::sips_norm_coef(lanes::vsqrt(math::dot_r(a, a, int(R))), beta, eps);
      P.anchor_coef[e * H + h] = c;
      for (int64_t i = 0; i < R; ++i) P.anchors_t[(i * H + h) * E8 + e] = c.coef * a[i];
    }
  }
  Prepared<A>& v = P.view;
  v.d = d;
  v.proj_stride = stride;
  v.rank = static_cast<int>(R);
  v.experts = static_cast<int>(E);
  v.anchors = static_cast<int>(H);
  v.experts_padded = static_cast<int>(E8);
  v.proj_w = P.proj_w.data();
  v.proj = P.proj.data();
  v.norm_weight = weighted ? P.norm_weight.data() : nullptr;
  v.anchors_t = P.anchors_t.data();
  v.scale = scale.to(acc).template item<A>();
}

// The tensors a preparation reads, in a fixed order.
constexpr int kTensors = 4;  // proj, anchors, scale, norm_weight (when used)

struct CacheKey {
  std::array<const c10::StorageImpl*, kTensors> storages;
  std::array<const void*, kTensors> data;
  bool use_norm;
  int width;
  uint64_t beta_bits, eps_bits;
  bool operator==(const CacheKey& o) const {
    return storages == o.storages && data == o.data && use_norm == o.use_norm && width == o.width &&
           beta_bits == o.beta_bits && eps_bits == o.eps_bits;
  }
};

struct CacheKeyHash {
  size_t operator()(const CacheKey& k) const {
    size_t h = std::hash<int>()(k.width) ^ (size_t(k.use_norm) << 1);
    const auto mix = [&h](size_t v) { h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    for (int i = 0; i < kTensors; ++i) {
      mix(std::hash<const void*>()(k.storages[i]));
      mix(std::hash<const void*>()(k.data[i]));
    }
    mix(std::hash<uint64_t>()(k.beta_bits));
    mix(std::hash<uint64_t>()(k.eps_bits));
    return h;
  }
};

uint64_t bits_of(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

// One cache per math type. Entries whose tensors died are dropped when the cache is full; beyond
// kMaxEntries (far more routers than a model has) the least recently used goes.
template <typename A>
struct Cache {
  static constexpr size_t kMaxEntries = 512;
  struct Entry {
    std::array<TensorVersion, kTensors> versions;
    std::shared_ptr<const PreparedStorage<A>> value;
    uint64_t last_use = 0;
  };
  std::mutex mutex;
  std::unordered_map<CacheKey, Entry, CacheKeyHash> entries;
  uint64_t clock = 0;
  std::atomic<int64_t> hits{0}, misses{0};

  void clear() {
    std::lock_guard<std::mutex> lock(mutex);
    entries.clear();
  }

  size_t size() {
    std::lock_guard<std::mutex> lock(mutex);
    return entries.size();
  }

  static Cache& get() {
    static Cache* cache = new Cache();  // never destroyed: calls may come during interpreter exit
    return *cache;
  }

  void make_room() {
    for (auto it = entries.begin(); it != entries.end();) {
      bool alive = true;
      for (const TensorVersion& v : it->second.versions) alive = alive && v.alive();
      it = alive ? std::next(it) : entries.erase(it);
    }
    while (entries.size() >= kMaxEntries) {
      auto oldest = entries.begin();
      for (auto it = entries.begin(); it != entries.end(); ++it) {
        if (it->second.last_use < oldest->second.last_use) oldest = it;
      }
      entries.erase(oldest);
    }
  }
};

// L2R_PREPARED_CACHE=0 turns the cache off (for code that writes parameters behind the version
// counter's back and cannot call clear_prepared_cache).
bool cache_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("L2R_PREPARED_CACHE");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

}  // namespace

template <typename A>
std::shared_ptr<const PreparedStorage<A>> prepared_params(const at::Tensor& proj, const at::Tensor& anchors,
                                                          const at::Tensor& scale,
                                                          const c10::optional<at::Tensor>& norm_weight,
                                                          const PrepareOptions& options) {
  const at::Tensor used_weight = options.use_norm && norm_weight.has_value() ? *norm_weight : at::Tensor();
  const std::array<const at::Tensor*, kTensors> tensors{&proj, &anchors, &scale, &used_weight};
  std::array<TensorVersion, kTensors> now;
  bool trackable = true;
  for (int i = 0; i < kTensors; ++i) {
    std::optional<TensorVersion> v = TensorVersion::of(*tensors[i], /*hold=*/false);
    if (!v) {
      trackable = false;
      break;
    }
    now[i] = std::move(*v);
  }
  // float64 is the gradcheck path: gradcheck perturbs its inputs through `.data`, which the version
  // counter does not see, so float64 parameters are prepared on every call.
  trackable = trackable && std::is_same_v<A, float> && cache_enabled();
  Cache<A>& cache = Cache<A>::get();
  CacheKey key{};
  if (trackable) {
    for (int i = 0; i < kTensors; ++i) {
      key.storages[i] = now[i].identity;
      key.data[i] = now[i].data;
    }
    key.use_norm = options.use_norm;
    key.width = options.width;
    key.beta_bits = bits_of(options.beta);
    key.eps_bits = bits_of(options.eps);
    std::lock_guard<std::mutex> lock(cache.mutex);
    auto it = cache.entries.find(key);
    if (it != cache.entries.end()) {
      bool current = true;
      for (int i = 0; i < kTensors; ++i) current = current && it->second.versions[i].matches(now[i]);
      if (current) {
        it->second.last_use = ++cache.clock;
        cache.hits.fetch_add(1, std::memory_order_relaxed);
        return it->second.value;
      }
    }
  }
  cache.misses.fetch_add(1, std::memory_order_relaxed);
  auto fresh = std::make_shared<PreparedStorage<A>>();
  prepare<A>(proj, anchors, scale, norm_weight, options, *fresh);
  if (!trackable) return fresh;
  typename Cache<A>::Entry entry;
  for (int i = 0; i < kTensors; ++i) entry.versions[i] = *TensorVersion::of(*tensors[i], /*hold=*/true);
  entry.value = fresh;
  std::lock_guard<std::mutex> lock(cache.mutex);
  auto it = cache.entries.find(key);
  if (it == cache.entries.end()) {
    cache.make_room();
    it = cache.entries.emplace(key, std::move(entry)).first;
  } else {
    it->second = std::move(entry);
  }
  it->second.last_use = ++cache.clock;
  return fresh;
}

template std::shared_ptr<const PreparedStorage<float>> prepared_params<float>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const PrepareOptions&);
template std::shared_ptr<const PreparedStorage<double>> prepared_params<double>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, const PrepareOptions&);

void clear_prepared_cache() {
  Cache<float>::get().clear();
  Cache<double>::get().clear();
}

PreparedCacheStats prepared_cache_stats() {
  Cache<float>& f = Cache<float>::get();
  Cache<double>& g = Cache<double>::get();
  PreparedCacheStats s;
  s.entries = static_cast<int64_t>(f.size() + g.size());
  s.hits = f.hits.load() + g.hits.load();
  s.misses = f.misses.load() + g.misses.load();
  return s;
}

}  // namespace cpu
}  // namespace route
}  // namespace l2r
