// One wrapped unit of a sharded module: its parameters flattened into one
// padded buffer, the slice this rank owns (the fp32 master shard the optimizer
// steps on), and the collectives that move between the two.
//
//   full    the unit's parameters, all ranks' slices (padded). An autograd leaf:
//           the module's parameters are views into it, so backward accumulates
//           one flat gradient per unit. At stage 3 its storage is freed between
//           uses and re-allocated (same StorageImpl, so tensors autograd saved
//           in forward see the re-gathered values in backward).
//   shard   this rank's slice, the parameter the optimizer updates.
//
// Gradients: stage 1 all-reduces the full gradient (the shard's .grad is a
// view of this rank's slice of it); stages 2 and 3 reduce-scatter it straight
// into the shard and drop the full gradient. Both are launched asynchronously
// when the unit's gradient is complete and waited for at the end of backward.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <optional>
#include <string>
#include <vector>

#include "train/shard/flat_layout.h"

namespace disttrain::train {

struct ShardOptions {
  int stage = 3;
  bool prefetch = true;
  // Parameters and gradients travel in this dtype (kBFloat16 or kHalf); the
  // master shard, the gathered parameters and the reduced gradient stay fp32.
  std::optional<c10::ScalarType> wire_dtype;
};

class ShardedUnit {
 public:
  // `params`: the unit's parameters (identical on every rank: the caller
  // broadcast them), copied into the flat buffer. `names` label errors.
  ShardedUnit(const std::vector<at::Tensor>& params, std::vector<std::string> names,
              c10::intrusive_ptr<c10d::ProcessGroup> group, const ShardOptions& options);
  ShardedUnit(const ShardedUnit&) = delete;
  ShardedUnit& operator=(const ShardedUnit&) = delete;

  const FlatLayout& layout() const { return layout_; }
  const std::vector<std::string>& names() const { return names_; }
  at::Tensor& full() { return full_; }
  const at::Tensor& shard() const { return shard_; }
  // Replaces the shard by `param` (the nn.Parameter Python built on it), so
  // gradients written here are the ones Python's optimizer sees.
  void set_shard(const at::Tensor& param);

  // Views of `full` shaped like the original parameters; with grad mode on
  // they record autograd (one split, so backward builds one flat gradient).
  std::vector<at::Tensor> param_views() const;

  // All-gathers the shards into `full` (re-allocating it if freed); async.
  void launch_gather();
  // Waits for a launched gather (launching one if none is in flight).
  void wait_gather();
  bool gathered() const { return gathered_ && !gather_work_; }
  bool gather_in_flight() const { return static_cast<bool>(gather_work_); }
  // True when the shard changed (an optimizer step) since the last gather.
  bool stale() const { return shard_._version() != gathered_version_; }
  // Releases the memory of `full` (stage 3).
  void free_full();

  // The flat gradient of `full` is complete: launch its reduction (async).
  void launch_reduction();
  // Nothing arrived for this unit in a backward that reached others: reduce zeros.
  void launch_zero_reduction();
  bool reduction_in_flight() const { return static_cast<bool>(reduce_work_); }
  // Waits and writes (accumulates) the result into the shard's .grad.
  void finish_reduction();

  // A fresh, synchronously gathered copy of the full flat parameters (unpadded
  // views are cut by the caller); leaves `full` alone.
  at::Tensor gather_copy() const;
  // Copies `flat` (the full unpadded parameters) into the shard and `full`.
  void load_full(const at::Tensor& flat);
  // Copies `shard` (a saved shard, this layout) into the shard.
  void load_shard(const at::Tensor& shard);

 private:
  void allocate_full_storage();

  FlatLayout layout_;
  std::vector<std::string> names_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  ShardOptions options_;
  int rank_;

  at::Tensor full_;       // autograd leaf (requires grad)
  at::Tensor full_data_;  // same storage, own version counter: collectives write here
  at::Tensor shard_;
  bool gathered_ = false;
  int64_t gathered_version_ = 0;

  c10::intrusive_ptr<c10d::Work> gather_work_;
  at::Tensor gather_input_, gather_wire_;  // kept alive while the gather is in flight

  c10::intrusive_ptr<c10d::Work> reduce_work_;
  at::Tensor reduce_input_;   // full gradient (or its wire copy) in flight
  at::Tensor reduce_output_;  // stage 2/3: the reduce-scattered slice
  at::Tensor full_grad_;      // stage 1: the full gradient, kept as the shard grad's base
};

}  // namespace disttrain::train
