#include "shard/tensor_memory_tracker.h"

#include <torch/csrc/profiler/orchestration/observer.h>

#include <mutex>
#include <unordered_map>

namespace disttrain::shard {

// A profiler state that profiles nothing but memory: the slot it takes is
// the profiler's, and code that finds a state there expects a profiler's.
struct TensorMemoryTracker::Hook : public torch::profiler::impl::ProfilerStateBase {
  Hook() : ProfilerStateBase(torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::Disabled)) {}
  torch::profiler::impl::ActiveProfilerType profilerType() override {
    return torch::profiler::impl::ActiveProfilerType::NONE;
  }
  std::mutex mu;
  std::unordered_map<void*, int64_t> live;  // only blocks allocated while tracking
  int64_t current = 0;
  int64_t peak = 0;

  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t, size_t, c10::Device device) override {
    if (device.type() != c10::DeviceType::CPU || ptr == nullptr) return;
    std::lock_guard<std::mutex> lock(mu);
    if (alloc_size > 0) {
      live[ptr] = alloc_size;
      current += alloc_size;
      peak = std::max(peak, current);
    } else {
      auto it = live.find(ptr);
      if (it == live.end()) return;
      current -= it->second;
      live.erase(it);
    }
  }
  bool memoryProfilingEnabled() const override { return true; }
};

TensorMemoryTracker::TensorMemoryTracker() : hook_(std::make_shared<Hook>()) {}

TensorMemoryTracker::~TensorMemoryTracker() {
  if (active_) stop();
}

void TensorMemoryTracker::start() {
  TORCH_CHECK(!active_, "TensorMemoryTracker: already started");
  TORCH_CHECK(!torch::profiler::impl::ProfilerStateBase::get(/*global=*/false),
              "TensorMemoryTracker: the profiler (or another tracker) is already active on this thread");
  torch::profiler::impl::ProfilerStateBase::push(std::shared_ptr<torch::profiler::impl::ProfilerStateBase>(hook_));
  active_ = true;
}

void TensorMemoryTracker::stop() {
  if (!active_) return;
  torch::profiler::impl::ProfilerStateBase::pop(/*global=*/false);
  active_ = false;
}

void TensorMemoryTracker::reset_peak() {
  std::lock_guard<std::mutex> lock(hook_->mu);
  hook_->peak = hook_->current;
}

int64_t TensorMemoryTracker::current_bytes() const {
  std::lock_guard<std::mutex> lock(hook_->mu);
  return hook_->current;
}

int64_t TensorMemoryTracker::peak_bytes() const {
  std::lock_guard<std::mutex> lock(hook_->mu);
  return hook_->peak;
}

}  // namespace disttrain::shard
