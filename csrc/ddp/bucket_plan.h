// Bucket assignment for the gradient reducer: which parameters share a flat
// all-reduce buffer, in the order the buckets are launched.
#pragma once
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace disttrain::ddp {

struct TensorSlot {
  int64_t bytes;
  c10::ScalarType dtype;
};

// Groups `order` (indices into `slots`, the order gradients are expected to
// become ready) into buckets, one dtype per bucket. The first bucket holds at
// most `first_cap_bytes` so communication starts early in backward; later
// ones `cap_bytes`. A tensor larger than its cap gets a bucket of its own.
// Buckets come back in launch order: a bucket's position is that of the
// earliest-ready tensor in it.
std::vector<std::vector<int64_t>> plan_buckets(const std::vector<TensorSlot>& slots,
                                               const std::vector<int64_t>& order, int64_t first_cap_bytes,
                                               int64_t cap_bytes);

}  // namespace disttrain::ddp
