#include "ddp/replica_sync.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <sstream>

namespace disttrain::ddp {
namespace {

// A parameter's description as int64s: dtype, ndim, sizes...
std::vector<int64_t> describe(const std::vector<at::Tensor>& params) {
  std::vector<int64_t> out{static_cast<int64_t>(params.size())};
  for (const auto& p : params) {
    out.push_back(static_cast<int64_t>(p.scalar_type()));
    out.push_back(p.dim());
    for (int64_t s : p.sizes()) out.push_back(s);
  }
  return out;
}

struct ParamDesc {
  c10::ScalarType dtype;
  std::vector<int64_t> sizes;
  bool operator==(const ParamDesc& o) const { return dtype == o.dtype && sizes == o.sizes; }
};

std::vector<ParamDesc> decode(const int64_t* data, int64_t length) {
  std::vector<ParamDesc> out;
  int64_t pos = 0;
  const int64_t count = data[pos++];
  for (int64_t i = 0; i < count && pos + 1 < length; ++i) {
    ParamDesc d;
    d.dtype = static_cast<c10::ScalarType>(data[pos++]);
    const int64_t ndim = data[pos++];
    for (int64_t k = 0; k < ndim && pos < length; ++k) d.sizes.push_back(data[pos++]);
    out.push_back(std::move(d));
  }
  return out;
}

std::string show(const ParamDesc& d) {
  std::ostringstream s;
  s << c10::toString(d.dtype) << "[";
  for (size_t k = 0; k < d.sizes.size(); ++k) s << (k ? ", " : "") << d.sizes[k];
  s << "]";
  return s.str();
}

void wait(const c10::intrusive_ptr<c10d::Work>& work) { work->wait(); }

}  // namespace

void verify_replicas(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::vector<at::Tensor>& params,
                     const std::vector<std::string>& names) {
  TORCH_CHECK(params.size() == names.size(), "verify_replicas: ", params.size(), " parameters but ", names.size(),
              " names");
  const int world = group->getSize();
  const std::vector<int64_t> mine = describe(params);

  // Descriptions have different lengths on mismatching ranks: agree on the
  // longest, then all-gather padded copies so every rank sees every rank.
  auto length = at::tensor({static_cast<int64_t>(mine.size())}, at::kLong);
  std::vector<at::Tensor> length_vec{length};
  c10d::AllreduceOptions max_opts;
  max_opts.reduceOp = c10d::ReduceOp::MAX;
  wait(group->allreduce(length_vec, max_opts));
  const int64_t longest = length.item<int64_t>();

  auto padded = at::full({longest}, -1, at::kLong);
  padded.narrow(0, 0, static_cast<int64_t>(mine.size())).copy_(at::tensor(mine, at::kLong));
  std::vector<at::Tensor> inputs{padded};
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int r = 0; r < world; ++r) outputs[0].push_back(at::empty({longest}, at::kLong));
  wait(group->allgather(outputs, inputs));

  std::vector<std::vector<ParamDesc>> all;
  for (int r = 0; r < world; ++r) all.push_back(decode(outputs[0][r].data_ptr<int64_t>(), longest));

  // The first position where some rank disagrees with rank 0, and who.
  size_t most = 0;
  for (const auto& d : all) most = std::max(most, d.size());
  for (size_t i = 0; i < most; ++i) {
    for (int r = 1; r < world; ++r) {
      const bool r0_has = i < all[0].size(), r_has = i < all[r].size();
      if (r0_has && r_has && all[0][i] == all[r][i]) continue;
      std::ostringstream msg;
      msg << "DistributedDataParallel: model replicas differ between ranks at parameter " << i;
      if (i < names.size()) msg << " ('" << names[i] << "' on rank " << group->getRank() << ")";
      msg << ": ";
      if (!r0_has || !r_has) {
        msg << "rank 0 has " << all[0].size() << " parameters, rank " << r << " has " << all[r].size();
      } else {
        msg << "rank 0 has " << show(all[0][i]) << ", rank " << r << " has " << show(all[r][i]);
      }
      msg << ". Every rank must build the same model (same parameters, shapes, dtypes, registration order).";
      TORCH_CHECK(false, msg.str());
    }
  }
}

void broadcast_coalesced(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const std::vector<at::Tensor>& tensors,
                         int64_t chunk_bytes, int root) {
  TORCH_CHECK(chunk_bytes > 0, "broadcast_coalesced: chunk_bytes must be positive, got ", chunk_bytes);
  // Tensors of one dtype are packed in their given order; dtypes go in the
  // order they first appear, which is the same on every rank.
  std::vector<c10::ScalarType> dtypes;
  for (const auto& t : tensors) {
    if (std::find(dtypes.begin(), dtypes.end(), t.scalar_type()) == dtypes.end()) dtypes.push_back(t.scalar_type());
  }
  c10d::BroadcastOptions opts;
  opts.rootRank = root;
  for (auto dtype : dtypes) {
    std::vector<at::Tensor> chunk;
    int64_t bytes = 0;
    auto flush = [&]() {
      if (chunk.empty()) return;
      std::vector<at::Tensor> flats;
      for (const auto& t : chunk) flats.push_back(t.detach().reshape({-1}));
      std::vector<at::Tensor> flat{at::cat(flats)};
      wait(group->broadcast(flat, opts));
      if (group->getRank() != root) {
        int64_t offset = 0;
        for (const auto& t : chunk) {
          at::NoGradGuard no_grad;
          t.detach().copy_(flat[0].narrow(0, offset, t.numel()).view(t.sizes()));
          offset += t.numel();
        }
      }
      chunk.clear();
      bytes = 0;
    };
    for (const auto& t : tensors) {
      if (t.scalar_type() != dtype) continue;
      chunk.push_back(t);
      bytes += t.numel() * t.element_size();
      if (bytes >= chunk_bytes) flush();
    }
    flush();
  }
}

}  // namespace disttrain::ddp
