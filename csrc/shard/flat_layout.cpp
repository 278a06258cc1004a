#include "shard/flat_layout.h"

#include <c10/util/irange.h>

#include <algorithm>
#include <limits>

namespace disttrain::shard {

FlatLayout FlatLayout::make(const std::vector<std::vector<int64_t>>& shapes, int world_size) {
  TORCH_CHECK(world_size >= 1, "FlatLayout: world size must be positive, got ", world_size);
  FlatLayout layout;
  layout.shapes = shapes;
  layout.world_size = world_size;
  for (const auto& shape : shapes) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    layout.offsets.push_back(layout.total);
    layout.numels.push_back(n);
    layout.total += n;
  }
  layout.shard_numel = (layout.total + world_size - 1) / world_size;
  layout.padded = layout.shard_numel * world_size;
  return layout;
}

std::vector<int64_t> FlatLayout::split_sizes() const {
  std::vector<int64_t> sizes = numels;
  sizes.push_back(padded - total);
  return sizes;
}

std::vector<ReshardPiece> reshard_plan(int64_t total, int old_world, int new_rank, int new_world) {
  TORCH_CHECK(old_world >= 1 && new_world >= 1, "reshard: world sizes must be positive, got ", old_world, " and ",
              new_world);
  TORCH_CHECK(new_rank >= 0 && new_rank < new_world, "reshard: rank ", new_rank, " outside world size ", new_world);
  TORCH_CHECK(total >= 0 && total <= std::numeric_limits<int64_t>::max() - new_world - old_world,
              "reshard: total size ", total, " out of range");
  const int64_t old_shard = (total + old_world - 1) / old_world;
  const int64_t new_shard = (total + new_world - 1) / new_world;
  const int64_t begin = std::min(total, new_rank * new_shard);
  const int64_t end = std::min(total, begin + new_shard);
  std::vector<ReshardPiece> pieces;
  for (int64_t pos = begin; pos < end;) {
    const int old_rank = static_cast<int>(pos / old_shard);
    const int64_t old_end = std::min(end, (old_rank + 1) * old_shard);
    pieces.push_back({old_rank, pos - old_rank * old_shard, pos - begin, old_end - pos});
    pos = old_end;
  }
  return pieces;
}

at::Tensor reshard(const std::vector<at::Tensor>& old_shards, int64_t total, int new_rank, int new_world) {
  const int old_world = static_cast<int>(old_shards.size());
  const auto pieces = reshard_plan(total, old_world, new_rank, new_world);
  at::TensorOptions options = at::kFloat;
  for (const auto& t : old_shards) {
    if (t.defined()) {
      options = t.options();
      break;
    }
  }
  // Every piece is checked before the output is allocated: a total that the shards do not
  // hold (a hostile or corrupt manifest) is refused without a buffer of that size.
  for (const auto& p : pieces) {
    const at::Tensor& src = old_shards[p.old_rank];
    TORCH_CHECK(src.defined(), "reshard: the shard of old rank ", p.old_rank, " is needed but missing");
    TORCH_CHECK(src.dim() == 1 && src.numel() >= p.old_offset + p.numel, "reshard: old rank ", p.old_rank,
                "'s shard has ", src.numel(), " elements, expected at least ", p.old_offset + p.numel);
  }
  at::Tensor out = at::zeros({(total + new_world - 1) / new_world}, options);
  for (const auto& p : pieces) {
    out.narrow(0, p.new_offset, p.numel).copy_(old_shards[p.old_rank].narrow(0, p.old_offset, p.numel));
  }
  return out;
}

}  // namespace disttrain::shard
