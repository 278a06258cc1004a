// The index engine behind disttrain.DistributedSampler.
//
// An epoch has one global order of positions 0, 1, 2, ...; position p holds
// sample perm_epoch(p mod N), so positions past N are the padding (the start of
// the order, repeated). Rank r of R takes positions start + r, start + r + R,
// ... where `start` counts the positions the whole job consumed before this
// pass (0 for a fresh epoch, more after a mid-epoch resume). With start = 0
// this is exactly torch.utils.data.distributed.DistributedSampler's split.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>

#include "data/feistel_permutation.h"

namespace disttrain::data {

enum class SamplerMode {
  kTorch,   // at::randperm seeded with seed + epoch: PyTorch's order, 8 bytes per sample
  kStream,  // keyed Feistel permutation: a different order, O(1) memory
};

SamplerMode parse_sampler_mode(const std::string& name);

struct SamplerOptions {
  int64_t dataset_size = 0;
  int64_t num_replicas = 1;
  int64_t rank = 0;
  bool shuffle = true;
  uint64_t seed = 0;
  bool drop_last = false;
  SamplerMode mode = SamplerMode::kTorch;
};

// Raises a clean error (c10::Error) for options a user can get wrong.
void check_sampler_options(const SamplerOptions& options);

// Indices each rank yields when `start` positions of the epoch's global order
// are already consumed: ceil(remaining / R), or floor with drop_last, where
// remaining = max(N - start, 0). With start = 0 this is PyTorch's num_samples.
int64_t samples_per_rank(int64_t dataset_size, int64_t num_replicas, bool drop_last, int64_t start);

// One rank's pass over one epoch, produced in chunks so the caller never pays
// per-index call overhead.
class IndexStream {
 public:
  // Requires check_sampler_options(options) to pass and 0 <= start.
  IndexStream(const SamplerOptions& options, int64_t epoch, int64_t start);

  int64_t size() const { return size_; }
  int64_t produced() const { return produced_; }
  int64_t remaining() const { return size_ - produced_; }

  // Writes the next min(capacity, remaining()) indices to out; returns how many.
  int64_t fill(int64_t* out, int64_t capacity);

  // Fills the front of a caller-owned buffer (a contiguous CPU int64 tensor,
  // reused across calls so no chunk costs an allocation); returns how many.
  int64_t fill_tensor(const at::Tensor& out);

 private:
  template <typename IndexOf>
  int64_t fill_with(int64_t* out, int64_t count, IndexOf index_of);

  SamplerOptions options_;
  int64_t size_ = 0;
  int64_t produced_ = 0;
  uint64_t position_ = 0;  // the next global position, reduced mod N
  uint64_t step_ = 0;      // num_replicas mod N
  at::Tensor permutation_;                  // torch mode with shuffle
  std::optional<FeistelPermutation> feistel_;  // stream mode with shuffle
};

}  // namespace disttrain::data
