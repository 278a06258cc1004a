#include "shard/shard_engine.h"

#include <c10/util/irange.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>

#include <cmath>
#include <limits>

namespace disttrain::shard {

ShardEngine::ShardEngine(c10::intrusive_ptr<c10d::ProcessGroup> group, ShardOptions options)
    : group_(std::move(group)), options_(options) {
  TORCH_CHECK(options_.stage >= 1 && options_.stage <= 3, "FullyShardedDataParallel: stage must be 1, 2 or 3, got ",
              options_.stage);
  if (options_.wire_dtype) {
    TORCH_CHECK(*options_.wire_dtype == at::kBFloat16 || *options_.wire_dtype == at::kHalf,
                "FullyShardedDataParallel: the wire dtype must be bfloat16 or float16, got ",
                c10::toString(*options_.wire_dtype));
  }
}

ShardEngine::~ShardEngine() {
  for (const auto i : c10::irange(accumulators_.size())) accumulators_[i]->del_post_hook(hook_keys_[i]);
}

int64_t ShardEngine::add_unit(const std::vector<at::Tensor>& params, std::vector<std::string> names, bool is_root,
                              bool gather_for_backward) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(!(is_root && root_ >= 0), "ShardEngine: only one root unit");
  const int64_t index = static_cast<int64_t>(units_.size());
  units_.push_back(std::make_unique<ShardedUnit>(params, std::move(names), group_, options_));
  if (is_root) root_ = index;
  const auto& leaves = units_.back()->params();
  for (const auto i : c10::irange(leaves.size())) {
    auto accumulator = torch::autograd::impl::grad_accumulator(leaves[i]);
    TORCH_INTERNAL_ASSERT(accumulator, "a unit's parameter has no gradient accumulator");
    hook_keys_.push_back(accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, index, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          on_param_gradient(index, i);
          return outputs;
        })));
    accumulators_.push_back(std::move(accumulator));
  }
  ran_forward_.push_back(0);
  gather_for_backward_.push_back(gather_for_backward || is_root);
  backward_seen_.push_back(0);
  reduced_.push_back(0);
  return index;
}

ShardedUnit& ShardEngine::unit(int64_t index) {
  TORCH_CHECK(index >= 0 && index < num_units(), "ShardEngine: no unit ", index);
  return *units_[index];
}

int64_t ShardEngine::neighbour_in_order(int64_t index, int step) const {
  if (!order_final_) return -1;
  for (const auto pos : c10::irange(forward_order_.size())) {
    if (forward_order_[pos] != index) continue;
    const int64_t next = static_cast<int64_t>(pos) + step;
    if (next < 0 || next >= static_cast<int64_t>(forward_order_.size())) return -1;
    const int64_t unit = forward_order_[next];
    return unit == root_ ? -1 : unit;
  }
  return -1;
}

int64_t ShardEngine::backward_prefetch_target(int64_t index) const {
  // Strictly earlier in the forward order each step, so this ends.
  for (int64_t u = neighbour_in_order(index, -1); u >= 0; u = neighbour_in_order(u, -1)) {
    if (gather_for_backward_[u]) return u;
  }
  return -1;
}

void ShardEngine::prefetch(int64_t index) {
  if (index < 0 || !options_.prefetch || options_.stage != 3) return;
  ShardedUnit& u = *units_[index];
  if (!u.gathered() && !u.gather_in_flight()) u.launch_gather();
}

void ShardEngine::begin_forward() {
  std::lock_guard<std::mutex> lock(mu_);
  // Outside any backward (a forward recomputed inside one must not touch its state).
  if (torch::autograd::get_current_graph_task_id() == -1) discard_unfinished_backward_locked();
  this_forward_.clear();
  std::fill(ran_forward_.begin(), ran_forward_.end(), 0);
}

void ShardEngine::end_forward(bool backward_follows) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!order_final_) {
    forward_order_ = this_forward_;
    order_final_ = true;
  }
  if (!backward_follows) free_all_locked();
}

void ShardEngine::discard_unfinished_backward_locked() {
  // A backward that raised midway (autograd drops the final callback with the
  // exception) or one that reached no parameter (torch.autograd.grad of an
  // input: pre_backward ran, no gradient arrived, no callback was queued) left
  // its bookkeeping; the next backward would count its gradients as that one's
  // second, or skip the stage-3 gather of a unit marked as seen. Forget it, as
  // if it had not run: reductions in flight are waited for and dropped.
  bool unfinished = callback_queued_ || last_reduced_ >= 0 || deferred_ >= 0;
  for (const auto i : c10::irange(units_.size())) {
    unfinished = unfinished || backward_seen_[i] || reduced_[i] || units_[i]->gradients_arrived() > 0 ||
                 units_[i]->reduction_in_flight();
  }
  if (!unfinished) return;
  for (auto& u : units_) u->discard_backward();
  callback_queued_ = false;
  last_reduced_ = -1;
  deferred_ = -1;
  std::fill(backward_seen_.begin(), backward_seen_.end(), 0);
  std::fill(reduced_.begin(), reduced_.end(), 0);
  free_all_locked();  // stage 3: units gathered for that backward
}

void ShardEngine::free_all() {
  std::lock_guard<std::mutex> lock(mu_);
  free_all_locked();
}

void ShardEngine::free_all_locked() {
  if (options_.stage != 3) return;
  for (auto& u : units_) {
    if (u->gather_in_flight()) u->wait_gather();
    u->free_full();
  }
}

void ShardEngine::pre_forward(int64_t index) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(index >= 0 && index < num_units(), "ShardEngine: no unit ", index);
  this_forward_.push_back(index);
  ran_forward_[index] = 1;
  units_[index]->wait_gather();  // stages 1 and 2: returns at once unless the shard changed
  prefetch(neighbour_in_order(index, +1));
}

void ShardEngine::post_forward(int64_t index) {
  std::lock_guard<std::mutex> lock(mu_);
  if (options_.stage == 3 && index != root_) units_[index]->free_full();
}

void ShardEngine::pre_backward(int64_t index) {
  std::lock_guard<std::mutex> lock(mu_);
  if (backward_seen_[index]) return;
  backward_seen_[index] = 1;
  if (options_.stage != 3) return;
  // lean_backward: the previous unit's reduction is launched now (its
  // gradients no longer held by autograd) and ends before this unit's
  // gradients are computed (otherwise on_param_gradient ends it, after).
  if (options_.lean_backward) reduce_deferred(/*in_backward=*/true);
  if (gather_for_backward_[index]) units_[index]->wait_gather();
  if (options_.lean_backward && last_reduced_ >= 0 && last_reduced_ != index) {
    units_[last_reduced_]->finish_reduction();
    last_reduced_ = -1;
  }
  if (options_.backward_prefetch == ShardOptions::BackwardPrefetch::kPre) prefetch(backward_prefetch_target(index));
}

void ShardEngine::on_param_gradient(int64_t index, size_t param) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!callback_queued_) {
    callback_queued_ = true;
    torch::autograd::Engine::get_default_engine().queue_callback([this] { finalize_backward(); });
  }
  if (deferred_ != index) reduce_deferred(/*in_backward=*/true);
  ShardedUnit& u = *units_[index];
  TORCH_CHECK(!reduced_[index], "FullyShardedDataParallel: the unit holding '", u.names().front(),
              "' received gradients twice in one backward (was backward run twice on one forward?)");
  // The previous unit's reduction has had the time since its launch; finish
  // it before this gradient is added, so that two units' flat gradients are
  // not alive at once.
  if (last_reduced_ >= 0 && last_reduced_ != index) {
    units_[last_reduced_]->finish_reduction();
    last_reduced_ = -1;
  }
  if (u.accept_gradient(param)) {
    if (options_.lean_backward && options_.stage == 3) {
      deferred_ = index;
    } else {
      reduce_unit(index, /*in_backward=*/true);
    }
  }
}

void ShardEngine::reduce_deferred(bool in_backward) {
  if (deferred_ < 0) return;
  const int64_t index = deferred_;
  deferred_ = -1;
  reduce_unit(index, in_backward);
}

void ShardEngine::reduce_unit(int64_t index, bool in_backward) {
  ShardedUnit& u = *units_[index];
  reduced_[index] = 1;
  if (last_reduced_ >= 0) units_[last_reduced_]->finish_reduction();
  // Every parameter's accumulator has run: no later backward node reads them.
  // A unit reduced at the end of backward without having had its backward (it
  // ran forward, its output reached no loss) may have been prefetched for it:
  // every rank launched that gather, so it is waited for, then freed.
  if (options_.stage == 3 && index != root_) {
    if (u.gather_in_flight()) u.wait_gather();
    u.free_full();
  }
  // lean_backward: the gradients become the flat gradient with the parameters
  // freed and before the next unit's gather allocates its own.
  u.flatten_pending();
  // The next unit's gather goes first: backward waits for it, not for this reduction.
  if (in_backward && options_.backward_prefetch == ShardOptions::BackwardPrefetch::kPost) {
    prefetch(backward_prefetch_target(index));
  }
  u.launch_reduction();
  last_reduced_ = index;
}

void ShardEngine::finalize_backward() {
  std::lock_guard<std::mutex> lock(mu_);
  try {
    reduce_deferred(/*in_backward=*/false);
    // Units that ran forward but got no or only some gradients (every rank
    // alike) reduce what they have (zeros for the rest), in index order, so
    // every rank issues the same collectives.
    for (const auto i : c10::irange(units_.size())) {
      if (!reduced_[i] && (ran_forward_[i] || units_[i]->gradients_arrived() > 0)) {
        reduce_unit(static_cast<int64_t>(i), /*in_backward=*/false);
      }
    }
    for (auto& u : units_) u->finish_reduction();
    free_all_locked();
  } catch (...) {
    callback_queued_ = false;
    last_reduced_ = -1;
    deferred_ = -1;
    std::fill(backward_seen_.begin(), backward_seen_.end(), 0);
    std::fill(reduced_.begin(), reduced_.end(), 0);
    throw;
  }
  callback_queued_ = false;
  last_reduced_ = -1;
  std::fill(backward_seen_.begin(), backward_seen_.end(), 0);
  std::fill(reduced_.begin(), reduced_.end(), 0);
}

void ShardEngine::gather_stale() {
  std::lock_guard<std::mutex> lock(mu_);
  if (options_.stage == 3) return;
  for (auto& u : units_) {
    if (u->stale()) u->launch_gather();
  }
  for (auto& u : units_) {
    if (u->gather_in_flight()) u->wait_gather();
  }
}

double ShardEngine::clip_grad_norm(double max_norm, double norm_type) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(max_norm >= 0, "clip_grad_norm_: max_norm must be non-negative, got ", max_norm);
  const bool inf = std::isinf(norm_type);
  TORCH_CHECK(inf || norm_type == 2.0, "clip_grad_norm_: norm_type must be 2 or inf, got ", norm_type);
  double local = 0.0;
  // The inf norm's NaN travels as a flag: std::max and a backend's MAX may drop
  // a NaN, and torch's clip_grad_norm_ returns NaN then (a loop that checks the
  // norm for finiteness must see it). The sum of the 2-norm propagates NaN itself.
  double nan_seen = 0.0;
  std::vector<at::Tensor> grads;
  for (auto& u : units_) {
    const at::Tensor& g = u->shard().grad();
    if (!g.defined()) continue;
    grads.push_back(g);
    if (g.numel() == 0) continue;  // an empty shard (a zero-element unit): max() of nothing is an error
    if (inf) {
      const double m = g.abs().max().item<double>();
      if (std::isnan(m)) nan_seen = 1.0;
      else local = std::max(local, m);
    } else {
      const double n = at::linalg_vector_norm(g, 2.0, c10::nullopt, false, at::kDouble).item<double>();
      local += n * n;
    }
  }
  std::vector<at::Tensor> total{inf ? at::tensor({local, nan_seen}, at::kDouble) : at::full({1}, local, at::kDouble)};
  c10d::AllreduceOptions opts;
  opts.reduceOp = inf ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  group_->allreduce(total, opts)->wait();
  double norm = inf ? total[0][0].item<double>() : std::sqrt(total[0][0].item<double>());
  if (inf && total[0][1].item<double>() > 0) norm = std::numeric_limits<double>::quiet_NaN();
  const double coef = max_norm / (norm + 1e-6);
  if (coef < 1.0) {
    at::NoGradGuard no_grad;
    for (auto& g : grads) g.mul_(coef);
  }
  return norm;
}

}  // namespace disttrain::shard
