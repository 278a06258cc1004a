#include "snapshot/host_memory.h"

#include <sys/mman.h>

#include <cerrno>
#include <cstring>

namespace disttrain::snapshot {

HostMapping::HostMapping(uint64_t bytes) : size_(bytes) {
  if (size_ == 0) return;
  void* p = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  TORCH_CHECK(p != MAP_FAILED, "snapshot: cannot map ", size_, " bytes of host memory: ", std::strerror(errno));
  data_ = static_cast<char*>(p);
}

HostMapping::~HostMapping() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

at::Tensor tensor_in(const std::shared_ptr<HostMapping>& mapping, uint64_t offset, at::IntArrayRef shape,
                     at::ScalarType dtype) {
  const int64_t numel = c10::multiply_integers(shape);
  if (numel == 0) return at::empty(shape, at::TensorOptions().dtype(dtype));
  TORCH_INTERNAL_ASSERT(offset + numel * c10::elementSize(dtype) <= mapping->size());
  return at::from_blob(mapping->data() + offset, shape, [mapping](void*) {}, at::TensorOptions().dtype(dtype));
}

}  // namespace disttrain::snapshot
