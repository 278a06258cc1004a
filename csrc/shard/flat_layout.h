// Where each parameter of a wrapped unit lives in its flat buffer, and which
// slice of that buffer each rank owns.
//
// Parameters are laid out back to back in registration order; the total is
// padded with zeros to a multiple of the world size, so every rank owns the
// same number of elements: rank r owns [r * shard_numel, (r + 1) * shard_numel).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace disttrain::shard {

struct FlatLayout {
  std::vector<std::vector<int64_t>> shapes;
  std::vector<int64_t> numels;
  std::vector<int64_t> offsets;
  int64_t total = 0;        // elements of all parameters
  int64_t padded = 0;       // total rounded up to a multiple of world_size
  int64_t shard_numel = 0;  // padded / world_size
  int world_size = 1;

  // Layout of `shapes` (in order) split over `world_size` ranks.
  static FlatLayout make(const std::vector<std::vector<int64_t>>& shapes, int world_size);
  int64_t shard_begin(int rank) const { return rank * shard_numel; }
  // split_with_sizes sizes: one per parameter, then the padding (possibly 0).
  std::vector<int64_t> split_sizes() const;
};

// A piece of an old shard that lands in a new one, for resharding a flat
// buffer of `total` elements saved at one world size and loaded at another.
struct ReshardPiece {
  int old_rank;
  int64_t old_offset;  // within the old rank's shard
  int64_t new_offset;  // within the new rank's shard
  int64_t numel;
};

// The pieces of the old shards that make up `new_rank`'s shard (padding left
// out: it stays zero).
std::vector<ReshardPiece> reshard_plan(int64_t total, int old_world, int new_rank, int new_world);

// `new_rank`'s shard assembled from the old shards (`old_shards[r]` may be
// undefined for an old rank the plan does not use), zero padded.
at::Tensor reshard(const std::vector<at::Tensor>& old_shards, int64_t total, int new_rank, int new_world);

}  // namespace disttrain::shard
