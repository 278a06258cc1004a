#include "strategies/step_memory.h"

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <unordered_map>

namespace disttrain::strategies {
namespace {

thread_local int tls_depth = 0;

class StepMemoryAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (tls_depth == 0 || n < min_bytes_ || n == 0) {
      // What the default CPU allocator does (less its profiler report): one
      // deleter for every block, as raw_deleter() promises (oneDNN frees
      // through it).
      void* ptr = c10::alloc_cpu(n);
      return {ptr, ptr, &StepMemoryAllocator::release_block, c10::Device(c10::DeviceType::CPU)};
    }
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.lower_bound(n);
      if (it != free_.end() && it->first - n <= n / 8) {
        ptr = it->second;
        live_[ptr] = it->first;
        live_bytes_ += it->first;
        live_count_.fetch_add(1, std::memory_order_relaxed);
        cached_bytes_ -= it->first;
        free_.erase(it);
        ++reused_;
      }
    }
    if (ptr == nullptr) {
      ptr = c10::alloc_cpu(n);  // throws on failure, like the default allocator
      std::lock_guard<std::mutex> lock(mu_);
      live_[ptr] = n;
      live_bytes_ += n;
      live_count_.fetch_add(1, std::memory_order_relaxed);
      ++fresh_;
    }
    return {ptr, ptr, &StepMemoryAllocator::release_block, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &StepMemoryAllocator::release_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void limits(uint64_t max_cached, uint64_t min_bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    max_cached_bytes_ = std::max(max_cached_bytes_, max_cached);
    min_bytes_ = std::max<uint64_t>(min_bytes, 1);
  }

  void release() {
    std::multimap<size_t, void*> gone;
    {
      std::lock_guard<std::mutex> lock(mu_);
      gone.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& [size, ptr] : gone) c10::free_cpu(ptr);
  }

  StepMemoryStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    StepMemoryStats s;
    s.reused = reused_;
    s.fresh = fresh_;
    s.cached_bytes = cached_bytes_;
    s.live_bytes = live_bytes_;
    s.max_cached_bytes = max_cached_bytes_;
    s.min_bytes = min_bytes_;
    return s;
  }

  static StepMemoryAllocator* instance;

 private:
  static void release_block(void* ptr) { instance->give_back(ptr); }

  void give_back(void* ptr) {
    if (live_count_.load(std::memory_order_relaxed) == 0) {  // no scoped block anywhere: not one of them
      c10::free_cpu(ptr);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(ptr);
      if (it != live_.end()) {
        const size_t size = it->second;
        live_.erase(it);
        live_bytes_ -= size;
        live_count_.fetch_sub(1, std::memory_order_relaxed);
        if (cached_bytes_ + size <= max_cached_bytes_) {
          free_.emplace(size, ptr);
          cached_bytes_ += size;
          return;
        }
      }
    }
    c10::free_cpu(ptr);
  }

  std::mutex mu_;
  std::atomic<int64_t> live_count_{0};
  std::multimap<size_t, void*> free_;          // size -> block
  std::unordered_map<void*, size_t> live_;     // block -> size, blocks in use
  uint64_t cached_bytes_ = 0, live_bytes_ = 0, reused_ = 0, fresh_ = 0;
  uint64_t max_cached_bytes_ = 0;
  uint64_t min_bytes_ = 1 << 20;
};

StepMemoryAllocator* StepMemoryAllocator::instance = nullptr;
std::mutex install_mu;

}  // namespace

bool step_memory_install() {
  std::lock_guard<std::mutex> lock(install_mu);
  if (StepMemoryAllocator::instance == nullptr) {
    // Only in place of torch's own CPU allocator (its blocks and ours are both
    // c10::alloc_cpu's, so either deleter frees either); another allocator
    // installed by someone else is left alone, and scopes then reuse nothing.
    if (c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator()) return false;
    // Never freed: tensors anywhere may hold its blocks until the process ends.
    StepMemoryAllocator::instance = new StepMemoryAllocator();
    // Priority 1: above the default CPU allocator's 0, below anything that asked for more.
    c10::SetCPUAllocator(StepMemoryAllocator::instance, /*priority=*/1);
  }
  return c10::GetCPUAllocator() == StepMemoryAllocator::instance;
}

void step_memory_limits(uint64_t max_cached_bytes, uint64_t min_bytes) {
  step_memory_install();
  StepMemoryAllocator::instance->limits(max_cached_bytes, min_bytes);
}

void step_memory_enter() { ++tls_depth; }

void step_memory_exit() {
  if (tls_depth > 0) --tls_depth;
}

int step_memory_depth() { return tls_depth; }

void step_memory_release() {
  if (StepMemoryAllocator::instance != nullptr) StepMemoryAllocator::instance->release();
}

StepMemoryStats step_memory_stats() {
  StepMemoryStats s;
  if (StepMemoryAllocator::instance != nullptr) {
    s = StepMemoryAllocator::instance->stats();
    s.installed = c10::GetCPUAllocator() == StepMemoryAllocator::instance;
  }
  return s;
}

}  // namespace disttrain::strategies
