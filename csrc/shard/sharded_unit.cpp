#include "shard/sharded_unit.h"

#include <c10/util/irange.h>
#include <torch/csrc/autograd/variable.h>

// _allgather_base/_reduce_scatter_base are deprecated aliases in torch 2.13
// and the only names in 2.9; both versions are supported.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace disttrain::shard {
namespace {

// 1/N as a wrapped number: multiplying by it matches DDP's gradient scaling.
at::Tensor reciprocal_scale(int world_size) {
  auto scale = at::scalar_tensor(1.0 / world_size, at::kDouble);
  scale.unsafeGetTensorImpl()->set_wrapped_number(true);
  return scale;
}

void set_storage_bytes(const at::Tensor& t, size_t nbytes) {
  c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  if (storage->nbytes() == nbytes) return;
  storage->set_data_ptr_noswap(storage->allocator()->allocate(nbytes));
  storage->set_nbytes(nbytes);
}

// Frees `t`'s memory now, whoever else still references the tensor: a
// finished collective's buffers are held by the backend until its next op.
void release_storage(const at::Tensor& t) {
  if (t.defined() && t.storage().unsafeGetStorageImpl()->allocator() != nullptr) set_storage_bytes(t, 0);
}

}  // namespace

ShardOptions::BackwardPrefetch parse_backward_prefetch(const std::string& name) {
  if (name == "pre") return ShardOptions::BackwardPrefetch::kPre;
  if (name == "post") return ShardOptions::BackwardPrefetch::kPost;
  TORCH_CHECK_VALUE(false, "FullyShardedDataParallel: backward_prefetch must be 'pre' or 'post', got '", name, "'");
}

ShardedUnit::ShardedUnit(const std::vector<at::Tensor>& params, std::vector<std::string> names,
                         c10::intrusive_ptr<c10d::ProcessGroup> group, const ShardOptions& options)
    : names_(std::move(names)), group_(std::move(group)), options_(options), rank_(group_->getRank()) {
  TORCH_CHECK(!params.empty(), "FullyShardedDataParallel: a wrapped unit has no parameters");
  TORCH_CHECK(params.size() == names_.size(), "ShardedUnit: ", params.size(), " parameters but ", names_.size(),
              " names");
  std::vector<std::vector<int64_t>> shapes;
  for (const auto i : c10::irange(params.size())) {
    const auto& p = params[i];
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "FullyShardedDataParallel: parameter '", names_[i], "' has dtype ",
                p.scalar_type(), "; only floating-point parameters can be sharded");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type() && p.device() == params[0].device(),
                "FullyShardedDataParallel: parameter '", names_[i], "' is ", p.scalar_type(), " on ", p.device(),
                " but '", names_[0], "' is ", params[0].scalar_type(), " on ", params[0].device(),
                "; a wrapped unit needs one dtype and device");
    TORCH_CHECK(p.layout() == at::kStrided, "FullyShardedDataParallel: parameter '", names_[i], "' is not dense");
    shapes.push_back(p.sizes().vec());
  }
  layout_ = FlatLayout::make(shapes, group_->getSize());

  at::Tensor flat = at::zeros({layout_.padded}, params[0].options().requires_grad(false));
  {
    at::NoGradGuard no_grad;
    for (const auto i : c10::irange(params.size())) {
      flat.narrow(0, layout_.offsets[i], layout_.numels[i]).copy_(params[i].detach().reshape(-1));
    }
  }
  shard_ = flat.narrow(0, layout_.shard_begin(rank_), layout_.shard_numel).clone();
  full_ = flat;
  for (const auto i : c10::irange(params.size())) {
    at::Tensor leaf = full_.narrow(0, layout_.offsets[i], layout_.numels[i]).view(layout_.shapes[i]).variable_data();
    leaf.set_requires_grad(true);
    params_.push_back(std::move(leaf));
  }
  arrived_.assign(params_.size(), 0);
  pending_.resize(params_.size());
  gathered_ = true;
  gathered_version_ = shard_._version();
}

void ShardedUnit::set_shard(const at::Tensor& param) {
  TORCH_CHECK(param.numel() == shard_.numel() && param.scalar_type() == shard_.scalar_type(),
              "ShardedUnit::set_shard: expected ", shard_.numel(), " elements of ", shard_.scalar_type());
  TORCH_CHECK(param.data_ptr() == shard_.data_ptr(), "ShardedUnit::set_shard: the parameter must share the shard's memory");
  shard_ = param;
  gathered_version_ = shard_._version();
}

bool ShardedUnit::accept_gradient(size_t i) {
  TORCH_INTERNAL_ASSERT(i < params_.size());
  TORCH_CHECK(!arrived_[i], "FullyShardedDataParallel: parameter '", names_[i],
              "' received gradients twice in one backward (was backward run twice on one forward?)");
  at::Tensor g = std::move(params_[i].mutable_grad());
  params_[i].mutable_grad().reset();
  if (!g.defined()) return false;
  arrived_[i] = 1;
  ++arrived_count_;
  at::NoGradGuard no_grad;
  if (g.is_sparse()) g = g.to_dense();
  if (options_.lean_backward && options_.stage == 3) {
    pending_[i] = std::move(g);  // flattened once the parameters are freed
  } else {
    flatten_into_grad(i, std::move(g));
  }
  return arrived_count_ == params_.size();
}

void ShardedUnit::flatten_pending() {
  at::NoGradGuard no_grad;
  for (const auto i : c10::irange(pending_.size())) {
    if (!pending_[i].defined()) continue;
    at::Tensor g = std::move(pending_[i]);
    pending_[i].reset();
    flatten_into_grad(i, std::move(g));  // each piece dropped once copied
  }
}

void ShardedUnit::flatten_into_grad(size_t i, at::Tensor g) {
  const int64_t bytes = layout_.padded * full_.element_size();
  // The only parameter, no padding, and no other handle on its gradient (the
  // flat gradient's memory is released after the reduction; a gradient a
  // user hook kept before accumulation was cloned by the accumulator, not
  // stolen): it becomes the flat gradient.
  if (!grad_.defined() && params_.size() == 1 && layout_.padded == layout_.total && g.is_contiguous() &&
      g.scalar_type() == full_.scalar_type() && g.storage_offset() == 0 &&
      static_cast<int64_t>(g.storage().nbytes()) == bytes && g.use_count() == 1) {
    grad_ = g.view({-1});
  } else {
    if (!grad_.defined()) grad_ = at::empty({layout_.padded}, full_.options());
    grad_.narrow(0, layout_.offsets[i], layout_.numels[i]).view(layout_.shapes[i]).copy_(g);
  }
}

void ShardedUnit::allocate_full_storage() {
  set_storage_bytes(full_, static_cast<size_t>(layout_.padded) * full_.element_size());
}

void ShardedUnit::free_full() {
  TORCH_INTERNAL_ASSERT(!gather_work_, "freeing a unit whose gather is in flight");
  set_storage_bytes(full_, 0);
  gathered_ = false;
}

void ShardedUnit::launch_gather() {
  if (gather_work_) return;
  allocate_full_storage();
  gathered_version_ = shard_._version();
  if (options_.wire_dtype) {
    gather_input_ = shard_.variable_data().to(*options_.wire_dtype);
    gather_wire_ = at::empty({layout_.padded}, gather_input_.options());
    gather_work_ = group_->_allgather_base(gather_wire_, gather_input_);
  } else {
    gather_input_ = shard_.variable_data();
    gather_work_ = group_->_allgather_base(full_, gather_input_);
  }
}

void ShardedUnit::wait_gather() {
  if (!gather_work_ && gathered_ && !stale()) return;
  launch_gather();
  gather_work_->wait();
  gather_work_.reset();
  if (gather_wire_.defined()) {
    full_.copy_(gather_wire_);
    release_storage(gather_wire_);
    release_storage(gather_input_);  // the shard's wire copy
  }
  gather_wire_.reset();
  gather_input_.reset();
  gathered_ = true;
}

void ShardedUnit::launch_reduction() {
  TORCH_INTERNAL_ASSERT(!reduce_work_, "a unit's gradient reduction launched twice in one backward");
  flatten_pending();
  at::NoGradGuard no_grad;
  at::Tensor grad = std::move(grad_);
  grad_.reset();
  if (!grad.defined()) {
    grad = at::zeros({layout_.padded}, full_.options());
  } else {
    // Parameters that got no gradient this backward, and the padding, are zeros.
    for (const auto i : c10::irange(params_.size())) {
      if (!arrived_[i]) grad.narrow(0, layout_.offsets[i], layout_.numels[i]).zero_();
    }
    grad.narrow(0, layout_.total, layout_.padded - layout_.total).zero_();
  }
  std::fill(arrived_.begin(), arrived_.end(), 0);
  arrived_count_ = 0;
  grad.mul_(reciprocal_scale(layout_.world_size));
  at::Tensor input = options_.wire_dtype ? grad.to(*options_.wire_dtype) : grad;
  if (options_.stage == 1) {
    full_grad_ = grad;
    reduce_input_ = input;
    std::vector<at::Tensor> tensors{input};
    reduce_work_ = group_->allreduce(tensors);
  } else {
    reduce_input_ = input;
    reduce_output_ = at::empty({layout_.shard_numel}, input.options());
    reduce_work_ = group_->_reduce_scatter_base(reduce_output_, reduce_input_);
  }
}

void ShardedUnit::finish_reduction() {
  if (!reduce_work_) return;
  reduce_work_->wait();
  reduce_work_.reset();
  at::Tensor result;
  if (options_.stage == 1) {
    if (options_.wire_dtype) full_grad_.copy_(reduce_input_);
    result = full_grad_.narrow(0, layout_.shard_begin(rank_), layout_.shard_numel);
  } else {
    result = options_.wire_dtype ? reduce_output_.to(shard_.scalar_type()) : reduce_output_;
  }
  at::Tensor& grad = shard_.mutable_grad();
  if (grad.defined()) {
    grad.add_(result);
  } else {
    grad = result;
  }
  // The flat gradient (stages 2, 3) or a wire copy is done with: free it now.
  if (options_.stage != 1 || options_.wire_dtype) release_storage(reduce_input_);
  if (options_.stage != 1 && options_.wire_dtype) release_storage(reduce_output_);
  reduce_input_.reset();
  reduce_output_.reset();
  full_grad_.reset();
}

void ShardedUnit::discard_backward() {
  if (reduce_work_) {
    reduce_work_->wait();
    reduce_work_.reset();
    if (options_.stage != 1 || options_.wire_dtype) release_storage(reduce_input_);
    if (options_.stage != 1 && options_.wire_dtype) release_storage(reduce_output_);
  }
  reduce_input_.reset();
  reduce_output_.reset();
  full_grad_.reset();
  grad_.reset();
  for (auto& g : pending_) g.reset();
  std::fill(arrived_.begin(), arrived_.end(), 0);
  arrived_count_ = 0;
}

at::Tensor ShardedUnit::gather_copy() const {
  at::Tensor out = at::empty({layout_.padded}, full_.options());
  at::Tensor input = shard_.variable_data();
  group_->_allgather_base(out, input)->wait();
  return out;
}

void ShardedUnit::load_full(const at::Tensor& flat) {
  TORCH_CHECK(flat.dim() == 1 && flat.numel() == layout_.total, "FullyShardedDataParallel: expected ", layout_.total,
              " elements for the unit holding '", names_.front(), "', got ", flat.numel());
  at::NoGradGuard no_grad;
  at::Tensor shard = shard_.detach();  // shares the version counter: the unit becomes stale
  shard.zero_();
  const int64_t begin = std::min(layout_.total, layout_.shard_begin(rank_));
  const int64_t end = std::min(layout_.total, begin + layout_.shard_numel);
  if (end > begin) shard.narrow(0, 0, end - begin).copy_(flat.narrow(0, begin, end - begin));
}

void ShardedUnit::load_shard(const at::Tensor& shard) {
  TORCH_CHECK(shard.dim() == 1 && shard.numel() == layout_.shard_numel, "FullyShardedDataParallel: expected a shard of ",
              layout_.shard_numel, " elements for the unit holding '", names_.front(), "', got ", shard.numel());
  at::NoGradGuard no_grad;
  shard_.detach().copy_(shard);
}

}  // namespace disttrain::shard
