#include "ddp/reducer.h"

#include <c10/util/irange.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>

#include <algorithm>
#include <chrono>
#include <sstream>
#include <unordered_set>

#include "comm/backend.h"
#include "ddp/bucket_plan.h"
#include "optim/sgd_kernel.h"
#include "trace/timeline.h"

namespace disttrain::ddp {
namespace {

comm::DisttrainBackend* disttrain_backend(const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  try {
    return dynamic_cast<comm::DisttrainBackend*>(group->getBackend(c10::DeviceType::CPU).get());
  } catch (const std::exception&) {
    return nullptr;  // no CPU backend in this group
  }
}

// The update of `bytes` bytes of one parameter from `grad`, `at` bytes into it.
struct SgdTarget {
  size_t offset, bytes;  // in the bucket's reduced buffer
  uint8_t* param;
  uint8_t* buf;  // null without momentum
  SgdSettings settings;
  bool fresh;
};

SgdTarget target_of(const at::Tensor& param, const at::Tensor& buf, const SgdSettings& settings, bool fresh,
                    size_t offset) {
  return {offset, param.nbytes(), static_cast<uint8_t*>(param.data_ptr()),
          buf.defined() ? static_cast<uint8_t*>(buf.data_ptr()) : nullptr, settings, fresh};
}

void sgd_bytes(const SgdTarget& t, c10::ScalarType dtype, size_t at, const uint8_t* grad, size_t bytes) {
  if (dtype == at::kFloat) {
    const size_t i = at / sizeof(float);
    optim::sgd_step(reinterpret_cast<float*>(t.param) + i, t.buf ? reinterpret_cast<float*>(t.buf) + i : nullptr,
                    reinterpret_cast<const float*>(grad), bytes / sizeof(float), t.settings, t.fresh);
  } else {
    TORCH_INTERNAL_ASSERT(dtype == at::kDouble, "fused SGD on ", dtype);
    const size_t i = at / sizeof(double);
    optim::sgd_step(reinterpret_cast<double*>(t.param) + i, t.buf ? reinterpret_cast<double*>(t.buf) + i : nullptr,
                    reinterpret_cast<const double*>(grad), bytes / sizeof(double), t.settings, t.fresh);
  }
}

// 1 / world as a wrapped number (it takes the gradient's dtype). Multiplying
// by the reciprocal (rather than dividing) matches torch DDP bit for bit.
at::Tensor reciprocal(int world) {
  auto scale = at::scalar_tensor(1.0 / world, at::kDouble);
  scale.unsafeGetTensorImpl()->set_wrapped_number(true);
  return scale;
}

using trace::now_ns;

// Notes when backward reaches the module's output (its first node to run).
struct BackwardStartHook : torch::autograd::FunctionPreHook {
  explicit BackwardStartHook(std::shared_ptr<std::atomic<int64_t>> at) : at_(std::move(at)) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    int64_t none = 0;
    at_->compare_exchange_strong(none, now_ns());
    return grads;
  }
  std::shared_ptr<std::atomic<int64_t>> at_;
};

}  // namespace

Reducer::Reducer(std::vector<at::Tensor> params, std::vector<std::string> names,
                 c10::intrusive_ptr<c10d::ProcessGroup> group, ReducerOptions options)
    : params_(std::move(params)),
      names_(std::move(names)),
      group_(std::move(group)),
      options_(options),
      world_size_(group_->getSize()) {
  TORCH_CHECK(params_.size() == names_.size(), "Reducer: ", params_.size(), " parameters but ", names_.size(),
              " names");
  TORCH_CHECK(!params_.empty(), "DistributedDataParallel: the module has no parameter that requires grad");
  if (options_.wire_dtype) {
    TORCH_CHECK(*options_.wire_dtype == at::kBFloat16 || *options_.wire_dtype == at::kHalf,
                "Reducer: wire dtype must be bfloat16 or float16, got ", c10::toString(*options_.wire_dtype));
  }
  for (const auto i : c10::irange(params_.size())) {
    const auto& p = params_[i];
    TORCH_CHECK(p.requires_grad(), "Reducer: parameter '", names_[i], "' does not require grad");
    TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(), "DistributedDataParallel: parameter '",
                names_[i], "' must be a dense tensor without overlapping or gapped strides");
    TORCH_CHECK(p.device() == params_[0].device(), "DistributedDataParallel: parameter '", names_[i], "' is on ",
                p.device(), " but '", names_[0], "' is on ", params_[0].device(), "; keep the module on one device");
  }

  disttrain_ = params_[0].device().is_cpu() ? disttrain_backend(group_) : nullptr;
  reduce_in_place_ = !options_.wire_dtype && !options_.gradient_as_bucket_view && disttrain_;
  std::vector<TensorSlot> slots;
  for (const auto& p : params_) slots.push_back({p.numel() * static_cast<int64_t>(p.element_size()), p.scalar_type()});
  // Forward runs layers in registration order, so backward tends to produce
  // gradients in the reverse one; the first iteration's real order replaces it.
  std::vector<int64_t> order;
  for (int64_t i = static_cast<int64_t>(params_.size()) - 1; i >= 0; --i) order.push_back(i);
  build_buckets(plan_buckets(slots, order, options_.first_bucket_cap_bytes, options_.bucket_cap_bytes));

  ready_.assign(params_.size(), 0);
  used_.assign(params_.size(), 0);
  for (const auto i : c10::irange(params_.size())) {
    auto accumulator = torch::autograd::impl::grad_accumulator(params_[i]);
    TORCH_CHECK(accumulator, "Reducer: parameter '", names_[i], "' has no gradient accumulator");
    const int64_t index = static_cast<int64_t>(i);
    hook_keys_.push_back(accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, index](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          on_gradient_ready(index);
          return outputs;
        })));
    // Keeps the same accumulator (and so our hook) alive across iterations.
    accumulators_.push_back(std::move(accumulator));
  }
}

Reducer::~Reducer() {
  for (const auto i : c10::irange(accumulators_.size())) accumulators_[i]->del_post_hook(hook_keys_[i]);
}

void Reducer::build_buckets(const std::vector<std::vector<int64_t>>& plan) {
  std::vector<Bucket> buckets;
  where_.assign(params_.size(), Location{0, 0});
  for (const auto& members : plan) {
    Bucket bucket;
    bucket.params = members;
    int64_t total = 0;
    for (int64_t i : members) total += params_[i].numel();
    const auto& first = params_[members.front()];
    auto options = first.options().requires_grad(false);
    const bool compress = options_.wire_dtype && at::isFloatingType(first.scalar_type()) &&
                          first.scalar_type() != *options_.wire_dtype;
    if (compress && !options_.gradient_as_bucket_view) {
      // Gradients are scaled straight into the compressed buffer and widened
      // on the way back: no full-precision staging copy.
      bucket.flat = at::zeros({total}, options.dtype(*options_.wire_dtype));
    } else {
      bucket.flat = at::zeros({total}, options);
      if (compress) bucket.wire = at::empty({total}, options.dtype(*options_.wire_dtype));
    }
    int64_t offset = 0;
    for (const auto slot : c10::irange(members.size())) {
      const auto& p = params_[members[slot]];
      // Same strides as the parameter, so a view can stand in for its .grad.
      bucket.views.push_back(bucket.flat.as_strided(p.sizes(), p.strides(), offset));
      where_[members[slot]] = Location{buckets.size(), slot};
      offset += p.numel();
    }
    bucket.direct = members.size() == 1 && !compress && !options_.gradient_as_bucket_view;
    bucket.in_place.resize(members.size());
    bucket.pending = members.size();
    buckets.push_back(std::move(bucket));
  }
  buckets_ = std::move(buckets);
}

void Reducer::prepare_for_backward(const std::vector<at::Tensor>& outputs) {
  std::lock_guard<std::mutex> lock(mu_);
  consumed_grads_.clear();
  // A forward whose backward never ran (evaluation with grad enabled) left
  // the hooks armed with nothing counted: start over.
  if (callback_queued_) wait_launched();  // a backward that raised with buckets in flight
  reset_iteration();
  armed_ = true;
  if (options_.find_unused_parameters) unused_ = locally_unused(outputs);
  backward_start_ns_->store(0);
  if (trace::enabled()) {
    // Backward's span starts when backward reaches the outputs (Python passes
    // them while tracing); the hook lives and dies with this iteration's graph.
    for (const auto& t : outputs) {
      if (!t.defined() || !t.requires_grad()) continue;
      if (auto fn = torch::autograd::impl::gradient_edge(t).function)
        fn->add_pre_hook(std::make_unique<BackwardStartHook>(backward_start_ns_));
    }
  }
}

void Reducer::discard_unfinished_backward() {
  // Not from inside a backward (a forward recomputed by checkpointing): that backward is still running.
  if (torch::autograd::get_current_graph_task_id() != -1) return;
  std::lock_guard<std::mutex> lock(mu_);
  consumed_grads_.clear();
  // The final callback was queued but never ran: autograd dropped it with the exception.
  if (callback_queued_) {
    wait_launched();
    reset_iteration();
  }
}

void Reducer::wait_launched() {
  // Buckets the raised backward had launched may still be in flight, writing the gradients they
  // reduce in place, or, with a fused optimizer, updating parameters and momentum buffers. They
  // finish before the next forward reads the parameters (or anything frees those buffers).
  for (auto& bucket : buckets_) {
    if (!bucket.work) continue;
    try {
      bucket.work->wait();
    } catch (const std::exception&) {
      // That backward already raised; its reduction's own error is not this forward's.
    }
  }
}

std::vector<int64_t> Reducer::locally_unused(const std::vector<at::Tensor>& outputs) const {
  std::unordered_set<const torch::autograd::Node*> seen;
  std::vector<const torch::autograd::Node*> stack;
  for (const auto& t : outputs) {
    if (!t.defined() || !t.requires_grad()) continue;
    const auto* fn = torch::autograd::impl::gradient_edge(t).function.get();
    if (fn && seen.insert(fn).second) stack.push_back(fn);
  }
  while (!stack.empty()) {
    const auto* fn = stack.back();
    stack.pop_back();
    for (const auto& edge : fn->next_edges()) {
      const auto* next = edge.function.get();
      if (next && seen.insert(next).second) stack.push_back(next);
    }
  }
  std::vector<int64_t> unused;
  for (const auto i : c10::irange(params_.size())) {
    if (!seen.count(accumulators_[i].get())) unused.push_back(static_cast<int64_t>(i));
  }
  return unused;
}

void Reducer::on_gradient_ready(int64_t index) {
  std::lock_guard<std::mutex> lock(mu_);
  // Usage counts in no_sync() iterations too: a gradient accumulated there is
  // reduced at the next synchronised step.
  if (options_.find_unused_parameters && params_[index].grad().defined()) used_[index] = 1;
  if (!armed_) return;
  if (!callback_queued_) {
    callback_queued_ = true;
    torch::autograd::Engine::get_default_engine().queue_callback([this] { finalize_backward(); });
    for (int64_t i : unused_) mark_ready(i, /*from_hook=*/false);
  }
  TORCH_CHECK(!ready_[index], "DistributedDataParallel: parameter '", names_[index],
              "' received a gradient twice in one backward pass (is it used outside the wrapped module's "
              "outputs, or was backward run twice on one forward?)");
  mark_ready(index, /*from_hook=*/true);
  launch_ready_buckets();
}

void Reducer::mark_ready(int64_t index, bool from_hook) {
  ready_[index] = 1;
  if (!rebuilt_) arrival_.push_back(index);
  copy_into_bucket(index, from_hook);
  Bucket& bucket = buckets_[where_[index].bucket];
  if (--bucket.pending == 0) bucket.ready_ns = now_ns();
}

void Reducer::copy_into_bucket(int64_t index, bool from_hook) {
  const Location loc = where_[index];
  Bucket& bucket = buckets_[loc.bucket];
  at::Tensor& view = bucket.views[loc.slot];
  at::Tensor& grad = params_[index].mutable_grad();
  if (!grad.defined()) {
    if (bucket.direct) {
      bucket.direct_grad = at::zeros(params_[index].sizes(), params_[index].options().requires_grad(false));
    } else {
      view.zero_();
    }
    return;
  }
  TORCH_CHECK(grad.layout() == at::kStrided, "DistributedDataParallel: parameter '", names_[index],
              "' has a sparse gradient, which this reducer does not support");
  if (grad.is_alias_of(view)) {
    // gradient_as_bucket_view: backward accumulated straight into the bucket.
    view.div_(world_size_);
    return;
  }
  // Autograd is done with this gradient for this backward, so it may be
  // all-reduced where it is, saving a copy in and a copy out. Not for a
  // parameter this forward did not use: if no rank used it, its .grad must
  // stay untouched.
  const bool where_it_is = from_hook && grad.is_contiguous() && !grad.requires_grad();
  // Averaged by the backend inside the reduction, at launch: also for a lone
  // parameter, which would otherwise take a scaling pass over its gradient first.
  if (reduce_in_place_ && where_it_is && (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble)) {
    bucket.in_place[loc.slot] = grad;
    return;
  }
  if (bucket.direct && where_it_is) {
    grad.mul_(reciprocal(world_size_));
    bucket.direct_grad = grad;
    return;
  }
  stage(bucket, loc.slot, grad);
}

void Reducer::stage(Bucket& bucket, size_t slot, const at::Tensor& grad) {
  at::Tensor& view = bucket.views[slot];
  const at::Tensor scale = reciprocal(world_size_);
  if (view.scalar_type() != grad.scalar_type()) {
    // Compressing: ATen's mixed-dtype mul_out is a slow scalar loop (12x a
    // copy here), while narrowing copy_ and a bf16/fp16 mul_ are vectorised.
    view.copy_(grad).mul_(scale);
  } else {
    // Scale while copying: one pass over the gradient.
    at::mul_out(view, grad, scale);
  }
  if (options_.gradient_as_bucket_view) params_[bucket.params[slot]].mutable_grad() = view;
}

void Reducer::launch_ready_buckets() {
  // Buckets go out strictly in plan order, so every rank issues the same
  // sequence of collectives whatever order its hooks fire in.
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& bucket = buckets_[next_launch_++];
    bucket.launched_in_place = !bucket.direct_grad.defined() &&
                               std::all_of(bucket.in_place.begin(), bucket.in_place.end(),
                                           [](const at::Tensor& g) { return g.defined(); });
    if (bucket.launched_in_place) {
      c10d::AllreduceCoalescedOptions opts;
      opts.reduceOp = c10d::ReduceOp::AVG;
      opts.asyncOp = !(options_.reduce_on_caller == ReducerOptions::OnCaller::kAll ||
                       (options_.reduce_on_caller == ReducerOptions::OnCaller::kLast && next_launch_ == buckets_.size()));
      bucket.launch_ns = now_ns();
      // The fused step takes the reduced gradients as they come (the same all-reduce on the wire).
      bucket.consumed = !sgd_.empty() && disttrain_;
      bucket.work = bucket.consumed
                        ? disttrain_->allreduce_avg_consumed(bucket.in_place, sgd_consumer(bucket), opts.asyncOp)
                        : group_->allreduce_coalesced(bucket.in_place, opts);
    } else {
      // Some gradient could not be reduced in place: stage them all.
      for (const auto slot : c10::irange(bucket.in_place.size())) {
        if (bucket.in_place[slot].defined()) stage(bucket, slot, bucket.in_place[slot]);
        bucket.in_place[slot].reset();
      }
      std::vector<at::Tensor> tensors{bucket.direct_grad.defined() ? bucket.direct_grad
                                      : bucket.wire.defined()      ? bucket.wire.copy_(bucket.flat)
                                                                   : bucket.flat};
      c10d::AllreduceOptions opts;
      opts.reduceOp = c10d::ReduceOp::SUM;
      bucket.launch_ns = now_ns();
      bucket.work = group_->allreduce(tensors, opts);
    }
    if (trace::enabled()) {
      try {
        bucket.seq = bucket.work->getSequencenumber();
      } catch (const std::exception&) {
        bucket.seq = 0;  // a Work that does not say (a Python process group's)
      }
    }
    bucket.done_ns = std::make_shared<std::atomic<int64_t>>(0);
    try {
      bucket.work->getFuture()->addCallback(
          [done = bucket.done_ns](c10::ivalue::Future&) { done->store(now_ns()); });
    } catch (const std::exception&) {
      // A Work without a future: completion is then timed by the wait.
    }
  }
  if (next_launch_ == buckets_.size() && options_.find_unused_parameters && !used_work_) {
    used_flags_ = at::tensor(used_, at::kInt).to(params_[0].device());
    std::vector<at::Tensor> flags{used_flags_};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::MAX;
    used_work_ = group_->allreduce(flags, opts);
  }
}

void Reducer::finalize_backward() {
  std::lock_guard<std::mutex> lock(mu_);
  trace_ = BackwardTrace{};
  trace_.backward_end_ns = now_ns();
  trace_.backward_start_ns = backward_start_ns_->load();
  if (next_launch_ < buckets_.size()) {
    std::ostringstream names;
    int64_t missing = 0;
    for (const auto i : c10::irange(params_.size())) {
      if (ready_[i]) continue;
      names << (missing++ ? ", " : "") << "'" << names_[i] << "'";
    }
    reset_iteration();
    TORCH_CHECK(false, "DistributedDataParallel: ", missing, " parameter(s) received no gradient in this backward "
                "pass: ", names.str(), ". If the forward pass does not use every parameter, pass "
                "find_unused_parameters=True; otherwise make sure the loss depends on all of the module's outputs.");
  }
  try {
    // Each bucket's gradients are written back as soon as it completes, while
    // later buckets are still on the wire. Parameters this rank did not use
    // wait for the used-flags all-reduce, which says whether any rank did.
    std::vector<std::pair<size_t, size_t>> deferred;
    for (const auto b : c10::irange(buckets_.size())) {
      Bucket& bucket = buckets_[b];
      const int64_t wait_from = now_ns();
      bucket.work->wait();
      const int64_t waited = now_ns();
      if (bucket.wire.defined()) bucket.flat.copy_(bucket.wire);
      const int64_t done = bucket.done_ns->load();
      trace_.ready_ns.push_back(bucket.ready_ns);
      trace_.launch_ns.push_back(bucket.launch_ns);
      trace_.done_ns.push_back(done ? std::min(done, waited) : waited);
      // finalize blocked on this bucket (more than the call itself takes)
      if (waited - wait_from > 2000) trace::span("ddp", "wait", wait_from, waited, static_cast<int64_t>(b));
      for (const auto slot : c10::irange(bucket.params.size())) {
        const int64_t index = bucket.params[slot];
        if (options_.find_unused_parameters && !used_[index]) {
          deferred.emplace_back(b, slot);
        } else if (!sgd_.empty()) {
          // The fused step: applied by the all-reduce, or now from the written-back gradient.
          if (!bucket.consumed) {
            write_back(bucket, slot);
            apply_sgd(index, params_[index].grad());
          }
          // Freed at the next forward, where torch's loop frees its gradients (zero_grad): freed
          // here, at the end of backward, with the activations, glibc returned the whole span to
          // the system and the next backward page-faulted it back (2.5x the page faults, ResNet-18).
          consumed_grads_.push_back(std::move(params_[index].mutable_grad()));
          params_[index].mutable_grad().reset();
        } else {
          write_back(bucket, slot);
        }
      }
    }
    if (options_.find_unused_parameters) {
      used_work_->wait();
      auto flags = used_flags_.to(at::kCPU).contiguous();
      const int32_t* used_anywhere = flags.data_ptr<int32_t>();
      for (const auto& [b, slot] : deferred) {
        // A parameter no rank used keeps its .grad untouched, as in torch DDP.
        if (used_anywhere[buckets_[b].params[slot]]) write_back(buckets_[b], slot);
      }
    }
    if (!sgd_.empty()) {
      ++fused_steps_;
      std::fill(sgd_fresh_.begin(), sgd_fresh_.end(), 0);
    }
    if (!rebuilt_) rebuild_from_arrival_order();
  } catch (...) {
    reset_iteration();
    throw;
  }
  trace_.finalize_end_ns = now_ns();
  if (trace::enabled()) record_timeline();
  reset_iteration();
  std::fill(used_.begin(), used_.end(), 0);
}

void Reducer::record_timeline() const {
  // Per bucket: ready (its last gradient arrived) and in flight [launch, done]
  // (the "buckets" track; its id is the collective's sequence number).
  for (const auto b : c10::irange(trace_.launch_ns.size())) {
    const Bucket& bucket = buckets_[b];
    int64_t bytes = 0;
    for (int64_t i : bucket.params) bytes += params_[i].numel() * static_cast<int64_t>(params_[i].element_size());
    const std::string name = "bucket " + std::to_string(b);
    trace::instant("ddp", "ready", trace_.ready_ns[b], static_cast<int64_t>(b), bytes);
    trace::record(trace::Event{name, "ddp.bucket", 'X', trace_.launch_ns[b], trace_.done_ns[b], 0,
                               static_cast<int64_t>(bucket.seq), bytes});
  }
  if (trace_.backward_start_ns) trace::span("ddp", "backward", trace_.backward_start_ns, trace_.backward_end_ns);
  trace::span("ddp", "finalize", trace_.backward_end_ns, trace_.finalize_end_ns);
}

void Reducer::write_back(Bucket& bucket, size_t slot) {
  const int64_t index = bucket.params[slot];
  const at::Tensor& view = bucket.views[slot];
  at::Tensor& grad = params_[index].mutable_grad();
  if (bucket.launched_in_place) {
    if (!grad.is_same(bucket.in_place[slot])) grad = bucket.in_place[slot];
  } else if (bucket.direct_grad.defined()) {
    if (!grad.is_same(bucket.direct_grad)) grad = bucket.direct_grad;  // it had none locally
  } else if (options_.gradient_as_bucket_view) {
    if (!grad.defined() || !grad.is_alias_of(view)) grad = view;
  } else if (!grad.defined()) {
    grad = at::empty_like(params_[index], at::MemoryFormat::Preserve).copy_(view);
  } else {
    grad.copy_(view);
  }
}

void Reducer::rebuild_from_arrival_order() {
  TORCH_INTERNAL_ASSERT(arrival_.size() == params_.size(), "arrival order has ", arrival_.size(), " of ",
                        params_.size(), " parameters");
  // Rank 0's order for everyone: ranks must agree on the buckets.
  std::vector<at::Tensor> order{at::tensor(arrival_, at::kLong)};
  c10d::BroadcastOptions opts;
  opts.rootRank = 0;
  group_->broadcast(order, opts)->wait();
  std::vector<int64_t> agreed(order[0].data_ptr<int64_t>(), order[0].data_ptr<int64_t>() + order[0].numel());

  std::vector<TensorSlot> slots;
  for (const auto& p : params_) slots.push_back({p.numel() * static_cast<int64_t>(p.element_size()), p.scalar_type()});
  auto plan = plan_buckets(slots, agreed, options_.first_bucket_cap_bytes, options_.bucket_cap_bytes);
  build_buckets(plan);
  if (options_.gradient_as_bucket_view) {
    // The reduced gradients live in the old buckets: move them to the new ones.
    for (const auto i : c10::irange(params_.size())) {
      at::Tensor& grad = params_[i].mutable_grad();
      if (!grad.defined()) continue;
      const Location loc = where_[i];
      at::Tensor& view = buckets_[loc.bucket].views[loc.slot];
      view.copy_(grad);
      grad = view;
    }
  }
  rebuilt_ = true;
  arrival_.clear();
}

void Reducer::reset_iteration() {
  armed_ = false;
  callback_queued_ = false;
  next_launch_ = 0;
  std::fill(ready_.begin(), ready_.end(), 0);
  unused_.clear();
  used_work_.reset();
  if (!rebuilt_) arrival_.clear();
  for (auto& bucket : buckets_) {
    bucket.pending = bucket.params.size();
    bucket.work.reset();
    bucket.direct_grad.reset();
    for (auto& g : bucket.in_place) g.reset();
    bucket.launched_in_place = false;
    bucket.consumed = false;
  }
}

void Reducer::set_fused_sgd(std::vector<SgdSettings> settings, std::vector<at::Tensor> buffers,
                            std::vector<bool> fresh) {
  // Called by a forward (no bucket of this rank is in flight then: the last backward waited for
  // all of them, or raised before launching the rest, which prepare_for_backward forgets).
  std::lock_guard<std::mutex> lock(mu_);
  if (callback_queued_ && torch::autograd::get_current_graph_task_id() == -1) wait_launched();
  if (settings.empty()) {
    consumed_grads_.clear();
    sgd_.clear();
    sgd_buffers_.clear();
    sgd_fresh_.clear();
    return;
  }
  TORCH_CHECK_VALUE(settings.size() == params_.size() && buffers.size() == params_.size() &&
                        fresh.size() == params_.size(),
                    "Reducer: fused SGD needs settings, buffers and fresh flags for each of the ", params_.size(),
                    " parameters");
  TORCH_CHECK_VALUE(!options_.find_unused_parameters && !options_.gradient_as_bucket_view && !options_.wire_dtype,
                    "DistributedDataParallel: a fused optimizer does not work with find_unused_parameters, "
                    "gradient_as_bucket_view or compression");
  for (const auto i : c10::irange(params_.size())) {
    const auto& p = params_[i];
    TORCH_CHECK_VALUE(p.device().is_cpu() && p.is_contiguous() &&
                          (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble),
                      "DistributedDataParallel: a fused optimizer needs contiguous float32 or float64 CPU "
                      "parameters; '", names_[i], "' is ", p.scalar_type(), " on ", p.device());
    const bool momentum = settings[i].momentum != 0;
    TORCH_CHECK_VALUE(momentum == buffers[i].defined(), "Reducer: parameter '", names_[i],
                      momentum ? "' has momentum but no buffer" : "' has a buffer but no momentum");
    if (momentum) {
      TORCH_CHECK_VALUE(buffers[i].is_contiguous() && buffers[i].sizes() == p.sizes() &&
                            buffers[i].scalar_type() == p.scalar_type() && buffers[i].device() == p.device(),
                        "DistributedDataParallel: the momentum buffer of '", names_[i],
                        "' must be a contiguous tensor shaped like it, of its dtype and device");
    }
  }
  sgd_ = std::move(settings);
  sgd_buffers_ = std::move(buffers);
  sgd_fresh_.assign(fresh.begin(), fresh.end());
}

int64_t Reducer::fused_steps() const {
  std::lock_guard<std::mutex> lock(mu_);
  return fused_steps_;
}

std::function<void(size_t, const uint8_t*, size_t)> Reducer::sgd_consumer(const Bucket& bucket) const {
  auto targets = std::make_shared<std::vector<SgdTarget>>();
  // The momentum buffers stay alive while the all-reduce may still write them (a backward that
  // raised leaves it in flight, and the optimizer's state may drop them meanwhile).
  auto keep = std::make_shared<std::vector<at::Tensor>>();
  size_t offset = 0;
  for (const int64_t i : bucket.params) {
    if (sgd_buffers_[i].defined()) keep->push_back(sgd_buffers_[i]);
    targets->push_back(target_of(params_[i], sgd_buffers_[i], sgd_[i], sgd_fresh_[i] != 0, offset));
    offset += targets->back().bytes;
  }
  const c10::ScalarType dtype = params_[bucket.params.front()].scalar_type();
  return [targets, keep, dtype](size_t at, const uint8_t* reduced, size_t bytes) {
    // The parameters that [at, at + bytes) covers, from the first that ends after `at`.
    auto t = std::upper_bound(targets->begin(), targets->end(), at,
                              [](size_t x, const SgdTarget& e) { return x < e.offset + e.bytes; });
    for (; t != targets->end() && t->offset < at + bytes; ++t) {
      const size_t lo = std::max(at, t->offset), hi = std::min(at + bytes, t->offset + t->bytes);
      sgd_bytes(*t, dtype, lo - t->offset, reduced + (lo - at), hi - lo);
    }
  };
}

void Reducer::apply_sgd(int64_t index, const at::Tensor& grad) const {
  const auto& p = params_[index];
  if (!grad.defined()) return;  // no rank produced one (torch's step skips it too)
  const at::Tensor g = grad.contiguous();
  sgd_bytes(target_of(p, sgd_buffers_[index], sgd_[index], sgd_fresh_[index] != 0, 0), p.scalar_type(), 0,
            static_cast<const uint8_t*>(g.data_ptr()), p.nbytes());
}

std::vector<std::vector<int64_t>> Reducer::bucket_plan() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::vector<int64_t>> plan;
  for (const auto& bucket : buckets_) plan.push_back(bucket.params);
  return plan;
}

BackwardTrace Reducer::last_trace() const {
  std::lock_guard<std::mutex> lock(mu_);
  return trace_;
}

}  // namespace disttrain::ddp
