// The sharding engine behind disttrain.FullyShardedDataParallel: ZeRO stages
// 1-3 over the flat shards of the wrapped units (see sharded_unit.h).
//
// The Python layer calls pre_forward / post_forward from module hooks and
// pre_backward from hooks on a unit's forward outputs; the engine registers a
// hook on each parameter's gradient accumulator itself, moves each gradient
// into its unit's flat gradient as it arrives, and starts the unit's
// reduction as soon as all of them have, overlapping the rest of backward, and a callback queued on the autograd engine finishes all
// reductions (and, at stage 3, frees the root's parameters) at its end.
//
// Stage 3: a unit's parameters are gathered before its forward and before its
// backward and freed after each (the root's, holding the parameters no unit
// took, stay from its forward to the end of backward; a unit whose backward
// does not read its parameters is not gathered for backward). With prefetch,
// the next unit's gather (forward order of the first iteration; reverse order
// in backward) is launched before the current unit runs forward, and in
// backward once the current unit's gradients are complete (kPost) or when its
// backward starts (kPre).
// Stages 1 and 2: parameters stay gathered; a unit whose shard changed (an
// optimizer step) is gathered again by gather_stale().
#pragma once
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <mutex>
#include <vector>

#include "shard/sharded_unit.h"

namespace disttrain::shard {

class ShardEngine {
 public:
  ShardEngine(c10::intrusive_ptr<c10d::ProcessGroup> group, ShardOptions options);
  ~ShardEngine();
  ShardEngine(const ShardEngine&) = delete;
  ShardEngine& operator=(const ShardEngine&) = delete;

  // Adds a unit (identical on every rank, in the same order); returns its index.
  // The root unit is the one whose forward encloses all others.
  // gather_for_backward false: the unit's backward never reads its parameters
  // (an embedding's), so stage 3 does not gather them for backward.
  int64_t add_unit(const std::vector<at::Tensor>& params, std::vector<std::string> names, bool is_root,
                   bool gather_for_backward = true);
  ShardedUnit& unit(int64_t index);
  int64_t num_units() const { return static_cast<int64_t>(units_.size()); }
  const ShardOptions& options() const { return options_; }

  // Brackets the wrapped module's forward.
  void begin_forward();
  // Stage 3: frees every unit (the root included) when no backward follows.
  void end_forward(bool backward_follows);
  // Before unit `index` runs forward: its parameters are gathered on return.
  void pre_forward(int64_t index);
  // After unit `index`'s forward (stage 3: frees a non-root unit).
  void post_forward(int64_t index);
  // Stage 3: frees every unit's gathered parameters.
  void free_all();
  // Before unit `index`'s backward (the first call per backward counts).
  void pre_backward(int64_t index);
  // lean_backward: reduces the deferred unit, if any.
  void reduce_deferred(bool in_backward);
  // Stages 1 and 2: gathers every unit whose shard changed since its last gather.
  void gather_stale();

  // Scales the shards' gradients so that their global norm (over all ranks'
  // shards) is at most max_norm; returns the norm before clipping. norm_type
  // is 2 or infinity.
  double clip_grad_norm(double max_norm, double norm_type);

 private:
  void on_param_gradient(int64_t index, size_t param);  // autograd hook on a parameter's accumulator
  void reduce_unit(int64_t index, bool in_backward);  // launches a unit's reduction (lock held)
  void finalize_backward();              // autograd final callback
  void prefetch(int64_t index);
  void free_all_locked();
  void discard_unfinished_backward_locked();
  int64_t neighbour_in_order(int64_t index, int step) const;
  int64_t backward_prefetch_target(int64_t index) const;

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  ShardOptions options_;
  std::vector<std::unique_ptr<ShardedUnit>> units_;
  int64_t root_ = -1;

  using GradAccumulator = decltype(torch::autograd::impl::grad_accumulator(std::declval<at::Tensor>()));
  std::vector<GradAccumulator> accumulators_;
  std::vector<uintptr_t> hook_keys_;

  std::mutex mu_;
  std::vector<int64_t> forward_order_;  // units' pre_forward order, recorded in the first forward
  bool order_final_ = false;
  std::vector<int64_t> this_forward_;
  std::vector<char> ran_forward_;       // per unit, since the last backward
  std::vector<char> gather_for_backward_;  // per unit
  std::vector<char> backward_seen_;     // per unit, pre_backward done this backward
  std::vector<char> reduced_;           // per unit, reduction launched this backward
  bool callback_queued_ = false;
  int64_t last_reduced_ = -1;           // reduction still in flight (bounds gradient memory)
  // lean_backward: a unit whose gradients are complete, reduced at the next
  // pre_backward or gradient of another unit (autograd still holds the last
  // gradient while the accumulator's post hook runs).
  int64_t deferred_ = -1;
};

}  // namespace disttrain::shard
