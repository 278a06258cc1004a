// One wrapped unit of a sharded module: its parameters flattened into one
// padded buffer, the slice this rank owns (the fp32 master shard the optimizer
// steps on), and the collectives that move between the two.
//
//   full    the unit's parameters, all ranks' slices (padded). At stage 3 its
//           storage is freed between uses and re-allocated (same StorageImpl,
//           so tensors autograd saved in forward see the re-gathered values in
//           backward).
//   params  one autograd leaf per original parameter, shaped like it, sharing
//           full's storage (each with its own version counter: gathers write
//           through full, which autograd's saved-tensor checks must not see).
//           The module's parameter attributes point at these.
//   grad    the unit's flat gradient, allocated when the first parameter's
//           gradient arrives; each parameter's gradient is copied into its
//           slot as it arrives and then dropped, so a unit never holds its
//           parameters' gradients twice (no per-parameter pieces next to a
//           concatenated copy).
//   shard   this rank's slice, the parameter the optimizer updates.
//
// Gradients: stage 1 all-reduces the flat gradient (the shard's .grad is a
// view of this rank's slice of it); stages 2 and 3 reduce-scatter it straight
// into the shard and drop the flat gradient. Both are launched asynchronously
// when the unit's gradient is complete.
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <optional>
#include <string>
#include <vector>

#include "shard/flat_layout.h"

namespace disttrain::shard {

struct ShardOptions {
  int stage = 3;
  // Stage 3: gather the next unit while the current one computes.
  bool prefetch = true;
  // When backward's prefetch is issued: kPost (default) once the current
  // unit's gradients are complete and its parameters freed, so that at most
  // one unit's full parameters and one unit's flat gradient (plus the
  // reduction in flight) are alive; kPre when the current unit's backward
  // starts, overlapping the gather with it, at one more unit's parameters.
  enum class BackwardPrefetch { kPre, kPost };
  BackwardPrefetch backward_prefetch = BackwardPrefetch::kPost;
  // Parameters and gradients travel in this dtype (kBFloat16 or kHalf); the
  // master shard, the gathered parameters and the reduced gradient stay fp32.
  std::optional<c10::ScalarType> wire_dtype;
  // Stage 3, trading overlap for memory in backward (default false):
  //  - a unit's gradients stay as autograd made them until the last one
  //    arrives; the unit is reduced at the next unit's pre_backward (autograd
  //    still holds the last gradient while the accumulator's hook runs);
  //  - there the gathered parameters are freed before the gradients are
  //    flattened (parameters, flat gradient and a gradient piece are never
  //    alive together) and before the next unit's gather;
  //  - the reduction is finished before the next unit computes a gradient.
  bool lean_backward = false;
};

// "pre" or "post" (FullyShardedDataParallel's backward_prefetch); anything else
// is a ValueError naming the value.
ShardOptions::BackwardPrefetch parse_backward_prefetch(const std::string& name);

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
  const at::Tensor& full() const { return full_; }
  const at::Tensor& shard() const { return shard_; }
  // Replaces the shard by `param` (the nn.Parameter Python built on it), so
  // gradients written here are the ones Python's optimizer sees.
  void set_shard(const at::Tensor& param);

  // The autograd leaves standing for the original parameters (views of `full`'s storage).
  const std::vector<at::Tensor>& params() const { return params_; }

  // Parameter `i`'s gradient is complete (its accumulator ran): moves it into
  // the flat gradient and drops it. Returns true when every parameter's has arrived.
  bool accept_gradient(size_t i);
  // Parameters whose gradients arrived this backward (0: none yet).
  size_t gradients_arrived() const { return arrived_count_; }

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

  // lean_backward: flattens the gradients kept since they arrived (call after
  // free_full, before the next gather); launch_reduction does it otherwise.
  void flatten_pending();
  // Launches the reduction of the flat gradient (async); parameters whose
  // gradients did not arrive (or all, if none did) contribute zeros.
  void launch_reduction();
  bool reduction_in_flight() const { return static_cast<bool>(reduce_work_); }
  // Waits and writes (accumulates) the result into the shard's .grad.
  void finish_reduction();
  // Forgets a backward that never finished: waits for a reduction in flight
  // (every rank launched it) and drops its result, the flat gradient and the
  // count of arrived gradients; the shard's .grad is left as it was.
  void discard_backward();

  // A fresh, synchronously gathered copy of the full flat parameters (unpadded
  // views are cut by the caller); leaves `full` alone.
  at::Tensor gather_copy() const;
  // Copies `flat` (the full unpadded parameters) into the shard and `full`.
  void load_full(const at::Tensor& flat);
  // Copies `shard` (a saved shard, this layout) into the shard.
  void load_shard(const at::Tensor& shard);

 private:
  void allocate_full_storage();
  // Moves gradient `g` of parameter `i` into the flat gradient (allocating it).
  void flatten_into_grad(size_t i, at::Tensor g);

  FlatLayout layout_;
  std::vector<std::string> names_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  ShardOptions options_;
  int rank_;

  at::Tensor full_;                 // collectives write here
  std::vector<at::Tensor> params_;  // autograd leaves sharing full_'s storage
  at::Tensor grad_;                 // flat gradient being assembled (padded)
  std::vector<at::Tensor> pending_; // lean_backward: gradients as autograd made them, until flattened
  std::vector<char> arrived_;       // per parameter, this backward
  size_t arrived_count_ = 0;
  at::Tensor shard_;
  bool gathered_ = false;
  int64_t gathered_version_ = 0;

  c10::intrusive_ptr<c10d::Work> gather_work_;
  at::Tensor gather_input_, gather_wire_;  // kept alive while the gather is in flight

  c10::intrusive_ptr<c10d::Work> reduce_work_;
  at::Tensor reduce_input_;   // flat gradient (or its wire copy) in flight
  at::Tensor reduce_output_;  // stage 2/3: the reduce-scattered slice
  at::Tensor full_grad_;      // stage 1: the full gradient, kept as the shard grad's base
};

}  // namespace disttrain::shard
