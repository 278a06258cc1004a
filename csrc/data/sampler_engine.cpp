#include "data/sampler_engine.h"

#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>

#include <mutex>

namespace disttrain::data {

SamplerMode parse_sampler_mode(const std::string& name) {
  if (name == "torch") return SamplerMode::kTorch;
  if (name == "stream") return SamplerMode::kStream;
  TORCH_CHECK_VALUE(false, "DistributedSampler mode must be 'torch' or 'stream', got '", name, "'");
}

void check_sampler_options(const SamplerOptions& o) {
  TORCH_CHECK_VALUE(o.dataset_size >= 0, "dataset size must be >= 0, got ", o.dataset_size);
  TORCH_CHECK_VALUE(o.num_replicas >= 1, "num_replicas must be >= 1, got ", o.num_replicas);
  TORCH_CHECK_VALUE(o.rank >= 0 && o.rank < o.num_replicas, "Invalid rank ", o.rank,
                    ", rank should be in the interval [0, ", o.num_replicas - 1, "]");
}

int64_t samples_per_rank(int64_t dataset_size, int64_t num_replicas, bool drop_last, int64_t start) {
  TORCH_CHECK_VALUE(num_replicas >= 1, "num_replicas must be >= 1, got ", num_replicas);
  TORCH_CHECK_VALUE(start >= 0, "consumed sample count must be >= 0, got ", start);
  const int64_t remaining = start >= dataset_size ? 0 : dataset_size - start;
  return drop_last ? remaining / num_replicas : (remaining + num_replicas - 1) / num_replicas;
}

namespace {

// Python's torch.Generator().manual_seed(s) takes s modulo 2^64; so do we, so
// that seed + epoch gives PyTorch's generator state for every epoch value.
at::Generator seeded_cpu_generator(uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::lock_guard<std::mutex> lock(generator.mutex());
  generator.set_current_seed(seed);
  return generator;
}

uint64_t stream_key(uint64_t seed, int64_t epoch) {
  return mix64(seed ^ mix64(static_cast<uint64_t>(epoch) + 0x632be59bd9b4e019ULL));
}

}  // namespace

IndexStream::IndexStream(const SamplerOptions& options, int64_t epoch, int64_t start)
    : options_(options) {
  check_sampler_options(options);
  size_ = samples_per_rank(options.dataset_size, options.num_replicas, options.drop_last, start);
  if (size_ == 0) return;
  const auto n = static_cast<uint64_t>(options.dataset_size);
  position_ = (static_cast<uint64_t>(start) + static_cast<uint64_t>(options.rank)) % n;
  step_ = static_cast<uint64_t>(options.num_replicas) % n;
  if (!options.shuffle) return;
  if (options.mode == SamplerMode::kTorch) {
    auto generator = seeded_cpu_generator(options.seed + static_cast<uint64_t>(epoch));
    permutation_ = at::randperm(options.dataset_size, generator, at::kLong);
  } else {
    feistel_.emplace(options.dataset_size, stream_key(options.seed, epoch));
  }
}

template <typename IndexOf>
int64_t IndexStream::fill_with(int64_t* out, int64_t count, IndexOf index_of) {
  const uint64_t n = static_cast<uint64_t>(options_.dataset_size);
  uint64_t position = position_;
  for (int64_t i = 0; i < count; ++i) {
    out[i] = index_of(position);
    position += step_;
    position -= position >= n ? n : 0;
  }
  position_ = position;
  produced_ += count;
  return count;
}

int64_t IndexStream::fill(int64_t* out, int64_t capacity) {
  TORCH_CHECK_VALUE(capacity >= 0, "chunk capacity must be >= 0, got ", capacity);
  const int64_t count = std::min(capacity, remaining());
  if (count == 0) return 0;
  if (permutation_.defined()) {
    const int64_t* perm = permutation_.const_data_ptr<int64_t>();
    return fill_with(out, count, [perm](uint64_t p) { return perm[p]; });
  }
  if (feistel_) {
    // Positions first, then the network's first pass over blocks of
    // independent values (their multiply chains overlap), then the rare walks.
    constexpr int kBlock = 8;
    const FeistelPermutation& feistel = *feistel_;
    fill_with(out, count, [](uint64_t p) { return static_cast<int64_t>(p); });
    auto* values = reinterpret_cast<uint64_t*>(out);
    const int64_t blocked = count - count % kBlock;
    for (int64_t i = 0; i < blocked; i += kBlock) feistel.network_block<kBlock>(values + i);
    for (int64_t i = blocked; i < count; ++i) values[i] = feistel.network(values[i]);
    for (int64_t i = 0; i < count; ++i) out[i] = feistel.walk(values[i]);
    return count;
  }
  return fill_with(out, count, [](uint64_t p) { return static_cast<int64_t>(p); });
}

int64_t IndexStream::fill_tensor(const at::Tensor& out) {
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == at::kLong && out.is_contiguous(),
                    "index buffer must be a contiguous CPU int64 tensor, got ", out.toString(), " on ",
                    out.device(), out.is_contiguous() ? "" : " (not contiguous)");
  return fill(out.mutable_data_ptr<int64_t>(), out.numel());
}

}  // namespace disttrain::data
