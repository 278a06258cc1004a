// Peak bytes of CPU tensor memory, measured at the allocator.
//
// Installs itself as the thread's profiler state, one that profiles nothing
// but memory (the allocator reports to that slot), so every CPU allocation and free made on this thread, or on
// threads that inherit its state (autograd, at::parallel_for), is counted:
// parameters, gradients, optimizer state, gathered buffers and activations,
// whoever allocates them (torch, our engine, torch FSDP). Allocations made
// before start() are not counted, nor their frees.
#pragma once
#include <c10/core/Allocator.h>

#include <atomic>
#include <memory>

namespace disttrain::shard {

class TensorMemoryTracker {
 public:
  TensorMemoryTracker();
  ~TensorMemoryTracker();
  void start();   // on the calling thread; counts from zero
  void stop();
  void reset_peak();  // peak := current
  int64_t current_bytes() const;
  int64_t peak_bytes() const;

 private:
  struct Hook;
  std::shared_ptr<Hook> hook_;
  bool active_ = false;
};

}  // namespace disttrain::shard
