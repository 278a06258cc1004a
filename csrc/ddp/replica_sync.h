// Keeping model replicas identical across ranks: a shape check and a
// coalesced broadcast, both over any c10d::ProcessGroup.
#pragma once
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <string>
#include <vector>

namespace disttrain::ddp {

// Collective: every rank must call it with its own parameters. Throws the same
// error on every rank, naming the first parameter whose position, shape or
// dtype differs from rank 0's (or the count, when one rank has extra ones).
void verify_replicas(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::vector<at::Tensor>& params,
                     const std::vector<std::string>& names);

// Broadcasts `tensors` in place from `root`, flattened per dtype into chunks of
// at most `chunk_bytes` so a model's many small tensors cost few collectives.
void broadcast_coalesced(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::vector<at::Tensor>& tensors,
                         int64_t chunk_bytes, int root = 0);

}  // namespace disttrain::ddp
