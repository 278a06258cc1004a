#include "ddp/bucket_plan.h"

#include <c10/util/Exception.h>

#include <map>

namespace disttrain::ddp {

std::vector<std::vector<int64_t>> plan_buckets(const std::vector<TensorSlot>& slots,
                                               const std::vector<int64_t>& order, int64_t first_cap_bytes,
                                               int64_t cap_bytes) {
  TORCH_CHECK(cap_bytes > 0 && first_cap_bytes > 0, "bucket caps must be positive, got ", first_cap_bytes,
              " and ", cap_bytes);
  struct Open {
    int64_t bucket = -1;  // index into `buckets`
    int64_t bytes = 0;
  };
  std::vector<std::vector<int64_t>> buckets;
  // One open bucket per dtype: mixed-precision models keep their buckets dense.
  std::map<c10::ScalarType, Open> open;
  for (int64_t index : order) {
    TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(slots.size()), "bucket plan: index ", index,
                " out of range [0, ", slots.size(), ")");
    const TensorSlot& slot = slots[index];
    Open& current = open[slot.dtype];
    // Close before overflowing rather than after: a large tensor then gets a
    // bucket of its own instead of holding back the small ones before it
    // (which matters most for the first bucket).
    if (current.bucket >= 0) {
      const int64_t cap = current.bucket == 0 ? first_cap_bytes : cap_bytes;
      if (current.bytes + slot.bytes > cap) current.bucket = -1;
    }
    if (current.bucket < 0) {
      current.bucket = static_cast<int64_t>(buckets.size());
      current.bytes = 0;
      buckets.emplace_back();
    }
    buckets[current.bucket].push_back(index);
    current.bytes += slot.bytes;
  }
  return buckets;
}

}  // namespace disttrain::ddp
