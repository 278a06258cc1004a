// Host memory for the async writer's staging buffer: one anonymous mapping,
// its pages populated by the kernel in one call (MAP_POPULATE), a fraction of
// the cost of a page fault per 4 KiB on the training thread's first copy.
// Transparent huge pages are not requested: with the common "madvise" defrag
// setting they make the fault path compact memory synchronously, which
// measured slower and erratic (0.15 s to 2.9 s for 1 GB).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>

namespace disttrain::snapshot {

class HostMapping {
 public:
  // Maps `bytes` of zero-filled memory; throws if the system has none to give.
  explicit HostMapping(uint64_t bytes);
  ~HostMapping();
  HostMapping(const HostMapping&) = delete;
  HostMapping& operator=(const HostMapping&) = delete;

  char* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  char* data_ = nullptr;
  uint64_t size_ = 0;
};

// A tensor viewing `mapping` at `offset`; each tensor has its own storage (so
// saving one tensor saves only its bytes), and the mapping lives as long as
// any of them.
at::Tensor tensor_in(const std::shared_ptr<HostMapping>& mapping, uint64_t offset, at::IntArrayRef shape,
                     at::ScalarType dtype);

}  // namespace disttrain::snapshot
