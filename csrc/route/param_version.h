// The identity and version of a parameter tensor, for caches of values derived from parameters
// (the route kernels' prepared parameters: folded projection, normalised anchors). A cached value is
// current while every tensor it came from is the same storage, at the same data pointer, view and
// dtype, with the same version counter value: an in-place change (optimizer step, load_state_dict,
// copy_ under no_grad) bumps the version and makes the entry stale.
//
// Not seen (as for autograd's saved-tensor check): writes that bypass the version counter, i.e.
// through `param.data`, another tensor with its own version counter over the same memory, or a
// NumPy/DLPack view. Such code must call l2r_cuda.ops.clear_prepared_cache() after the write (or
// run with L2R_PREPARED_CACHE=0). torch.autograd.gradcheck writes through `.data`: the CPU kernels
// therefore cache float32 preparations only (gradcheck runs in float64).
//
// The storage is held by a weak reference: the cache never keeps a parameter's memory alive, and
// while the weak reference lives the StorageImpl object cannot be freed, so its address is a
// unique identity until the entry goes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>
#include <optional>

namespace l2r {
namespace route {

struct TensorVersion {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage{c10::weak_intrusive_ptr<c10::StorageImpl>(
      c10::intrusive_ptr<c10::StorageImpl>())};
  const c10::StorageImpl* identity = nullptr;  // compared while `storage` is not expired
  const void* data = nullptr;
  uint32_t version = 0;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  int64_t offset = 0;
  c10::SmallVector<int64_t, 4> sizes, strides;

  // nullopt where a tensor cannot be tracked: inference tensors have no version counter. `hold`:
  // take the weak reference (for an entry that is kept; a lookup only compares).
  static std::optional<TensorVersion> of(const at::Tensor& t, bool hold) {
    if (!t.defined()) return TensorVersion{};
    if (t.is_inference() || !t.has_storage()) return std::nullopt;
    TensorVersion v;
    if (hold) v.storage = t.storage().getWeakStorageImpl();
    v.identity = t.storage().unsafeGetStorageImpl();
    v.data = t.data_ptr();
    v.version = static_cast<uint32_t>(t._version());
    v.dtype = t.scalar_type();
    v.device = t.device();
    v.offset = t.storage_offset();
    v.sizes.assign(t.sizes().begin(), t.sizes().end());
    v.strides.assign(t.strides().begin(), t.strides().end());
    return v;
  }

  bool alive() const { return identity == nullptr || !storage.expired(); }

  // This kept version (taken with hold) is the same tensor, unchanged, as `now` (an undefined
  // tensor matches an undefined one).
  bool matches(const TensorVersion& now) const {
    return identity == now.identity && alive() && data == now.data && version == now.version &&
           dtype == now.dtype && device == now.device && offset == now.offset && sizes == now.sizes &&
           strides == now.strides;
  }
};

}  // namespace route
}  // namespace l2r
