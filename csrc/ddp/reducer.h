// The gradient reducer behind disttrain.DistributedDataParallel.
//
// Parameters' gradients are packed into flat buckets (reverse registration
// order, a small first bucket). An autograd hook on each parameter's gradient
// accumulator counts a bucket down; when a bucket (and every bucket before it)
// is complete, its all-reduce is launched asynchronously on the process group,
// so communication overlaps the rest of backward. A callback queued on the
// autograd engine waits for all buckets once, at the end of backward, and
// writes the averaged gradients back. After the first synchronised backward
// the buckets are rebuilt in the order gradients actually arrived (rank 0's
// order, so every rank launches the same buckets).
#pragma once
#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "optim/sgd_kernel.h"

namespace disttrain::comm {
class DisttrainBackend;
}

namespace disttrain::ddp {

struct ReducerOptions {
  int64_t bucket_cap_bytes = 25 * 1024 * 1024;
  // Small, so the first all-reduce starts as soon as the last layers are done.
  int64_t first_bucket_cap_bytes = 1024 * 1024;
  bool find_unused_parameters = false;
  // param.grad becomes a view into its bucket: no copy in or out.
  bool gradient_as_bucket_view = false;
  // Reduced precision on the wire (kBFloat16 or kHalf); accumulation of the
  // local gradient and the result stay in the parameter's dtype.
  std::optional<c10::ScalarType> wire_dtype;
  // Which buckets the thread whose gradient completes them reduces itself,
  // there and then (a synchronous all-reduce, run on the caller's thread by a
  // backend that can, when nothing else is in flight), instead of handing them
  // to the backend's progress thread. kAll: no hand-off, but backward waits for
  // every other rank at every bucket (measured slower on 2 saturated cores
  // shared with other work: docs/ddp.md). kLast: only the last bucket, which
  // completes as backward ends, with nothing left to overlap it with.
  enum class OnCaller { kNone, kLast, kAll };
  OnCaller reduce_on_caller = OnCaller::kLast;
};

// torch.optim.SGD's settings for one parameter (its param group's).
using SgdSettings = optim::SgdSettings;

// Timestamps (steady clock, ns) of the last synchronised backward.
struct BackwardTrace {
  std::vector<int64_t> ready_ns;   // per bucket, when its last gradient arrived
  std::vector<int64_t> launch_ns;  // per bucket, when its all-reduce was issued
  std::vector<int64_t> done_ns;    // per bucket, when it completed (0 if unknown)
  // When backward reached the module's outputs; 0 unless the timeline
  // (trace/timeline.h) was on at the forward.
  int64_t backward_start_ns = 0;
  int64_t backward_end_ns = 0;     // autograd finished: the final callback started
  int64_t finalize_end_ns = 0;     // gradients written back
};

class Reducer {
 public:
  // `params`: the parameters that require grad, in registration order;
  // `names` label them in errors. Registers the autograd hooks.
  Reducer(std::vector<at::Tensor> params, std::vector<std::string> names,
          c10::intrusive_ptr<c10d::ProcessGroup> group, ReducerOptions options);
  ~Reducer();
  Reducer(const Reducer&) = delete;
  Reducer& operator=(const Reducer&) = delete;

  // Arms the hooks for the next backward (called after a forward whose
  // gradients must be synchronised). With find_unused_parameters, `outputs`
  // are the forward's output tensors: parameters not reachable from them are
  // marked ready (with zero contribution) when backward starts.
  void prepare_for_backward(const std::vector<at::Tensor>& outputs);

  // Called by a forward whose gradients are not to be synchronised (no_sync):
  // forgets a backward that started reducing but never finished (it raised
  // midway), so that the next backward accumulates locally instead of
  // counting its gradients as that one's second.
  void discard_unfinished_backward();

  // Fuses torch.optim.SGD's step into the synchronised backwards from now on:
  // each parameter is updated as its averaged gradient comes back (over
  // shared memory, block by block as it is reduced, while it is in cache),
  // and its .grad is then reset (undefined): the gradient is consumed, never
  // written back. Per parameter, in the reducer's order: its settings, its
  // momentum buffer (undefined without momentum; contiguous, like the
  // parameter) and whether that buffer is fresh (the first step copies the
  // gradient into it, as torch's does). Empty `settings`: no fusion.
  // Not with find_unused_parameters, gradient_as_bucket_view or compression.
  void set_fused_sgd(std::vector<SgdSettings> settings, std::vector<at::Tensor> buffers, std::vector<bool> fresh);
  // Synchronised backwards that applied the fused step.
  int64_t fused_steps() const;

  // Bucket plan as reducer parameter indices, in launch order.
  std::vector<std::vector<int64_t>> bucket_plan() const;
  BackwardTrace last_trace() const;
  bool rebuilt() const { return rebuilt_; }

 private:
  struct Bucket {
    std::vector<int64_t> params;
    std::vector<at::Tensor> views;  // shaped like each parameter, into `flat`
    at::Tensor flat;                // the scaled gradients (in the wire dtype if compressing without views)
    at::Tensor wire;                // compressed copy of `flat`: compression with bucket views
    // A lone parameter's gradient is all-reduced in place, without staging.
    bool direct = false;
    at::Tensor direct_grad;
    // With a backend that all-reduces a tensor list in place with AVG: the
    // gradients themselves, per slot (undefined until ready, or when staged).
    std::vector<at::Tensor> in_place;
    bool launched_in_place = false;
    bool consumed = false;  // its all-reduce applied the fused step (no write-back)
    size_t pending = 0;
    c10::intrusive_ptr<c10d::Work> work;
    uint64_t seq = 0;  // the collective's sequence number, to match the backend's trace
    int64_t ready_ns = 0;
    int64_t launch_ns = 0;
    std::shared_ptr<std::atomic<int64_t>> done_ns;
  };
  struct Location {
    size_t bucket;
    size_t slot;
  };

  void build_buckets(const std::vector<std::vector<int64_t>>& plan);
  void on_gradient_ready(int64_t index);  // autograd hook (engine thread)
  void mark_ready(int64_t index, bool from_hook);  // holds mu_
  void copy_into_bucket(int64_t index, bool from_hook);
  void stage(Bucket& bucket, size_t slot, const at::Tensor& grad);  // scaled copy into the bucket
  void launch_ready_buckets();            // holds mu_
  void finalize_backward();               // engine final callback
  void record_timeline() const;           // trace_ into the timeline (trace/timeline.h)
  void write_back(Bucket& bucket, size_t slot);  // the reduced gradient into param.grad
  // The fused step's consumer of a bucket's reduced bytes (holds mu_).
  std::function<void(size_t, const uint8_t*, size_t)> sgd_consumer(const Bucket& bucket) const;
  void apply_sgd(int64_t index, const at::Tensor& grad) const;  // the fused step from a written-back gradient
  void rebuild_from_arrival_order();
  void reset_iteration();
  void wait_launched();  // waits for the buckets a raised backward left in flight (holds mu_)
  std::vector<int64_t> locally_unused(const std::vector<at::Tensor>& outputs) const;

  std::vector<at::Tensor> params_;
  std::vector<std::string> names_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  ReducerOptions options_;
  int world_size_;
  // The group's backend all-reduces a list of tensors where they are, with
  // AVG (disttrain's does, over shared memory): gradients then skip the
  // bucket copy in and the copy out.
  bool reduce_in_place_ = false;
  // The group's backend when it is disttrain's (it hands reduced bytes to the fused step).
  comm::DisttrainBackend* disttrain_ = nullptr;
  std::vector<SgdSettings> sgd_;       // empty: no fused step
  std::vector<at::Tensor> sgd_buffers_;
  std::vector<char> sgd_fresh_;
  int64_t fused_steps_ = 0;
  std::vector<at::Tensor> consumed_grads_;  // the fused step's gradients, kept until the next forward

  using GradAccumulator = decltype(torch::autograd::impl::grad_accumulator(std::declval<at::Tensor>()));
  std::vector<GradAccumulator> accumulators_;
  std::vector<uintptr_t> hook_keys_;

  std::vector<Bucket> buckets_;
  std::vector<Location> where_;

  mutable std::mutex mu_;
  bool armed_ = false;            // this backward's gradients are to be reduced
  bool callback_queued_ = false;
  size_t next_launch_ = 0;
  std::vector<char> ready_;       // per parameter, this backward
  std::vector<int64_t> unused_;   // not reachable from the outputs (find_unused)
  std::vector<int32_t> used_;     // per parameter: got a gradient since the last sync (find_unused)
  at::Tensor used_flags_;         // used_, all-reduced (MAX) across ranks
  c10::intrusive_ptr<c10d::Work> used_work_;
  std::vector<int64_t> arrival_;  // order of readiness, for the rebuild
  bool rebuilt_ = false;
  BackwardTrace trace_;
  // Set by a pre-hook on the outputs' autograd nodes while tracing.
  std::shared_ptr<std::atomic<int64_t>> backward_start_ns_ = std::make_shared<std::atomic<int64_t>>(0);
};

}  // namespace disttrain::ddp
