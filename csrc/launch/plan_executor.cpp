// The current plan executor (plan_executor.h).
#include "plan_executor.h"

#include <atomic>

namespace l2r {
namespace {
std::atomic<PlanExecutor*> g_override{nullptr};
}  // namespace

PlanExecutor* plan_executor() {
  if (PlanExecutor* e = g_override.load()) return e;
#if defined(L2R_WITH_CUDA)
  return nvcc_plan_executor();
#else
  return nullptr;
#endif
}

void set_plan_executor_override(PlanExecutor* executor) { g_override.store(executor); }

}  // namespace l2r
