#include "snapshot/async_snapshot_writer.h"

#include <ATen/Parallel.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <unistd.h>

#include "snapshot/snapshot_format.h"

namespace disttrain::snapshot {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct CopyChunk {
  const char* src;
  char* dst;
  size_t length;
};

// On the caller's thread the copy is spread over torch's intra-op threads
// (one core does not saturate memory bandwidth). In the background it stays
// on the writer thread: the intra-op threads are busy with forward/backward,
// and queueing behind them would delay the copy the training step waits for.
void copy_chunks(const std::vector<CopyChunk>& chunks, bool parallel) {
  if (!parallel) {
    for (const auto& c : chunks) std::memcpy(c.dst, c.src, c.length);
    return;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(chunks[i].dst, chunks[i].src, chunks[i].length);
  });
}

}  // namespace

AsyncSnapshotWriter::~AsyncSnapshotWriter() {
  try {
    wait();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "disttrain: snapshot write failed: %s\n", e.what());
  }
}

void AsyncSnapshotWriter::wait() {
  if (worker_.joinable()) worker_.join();
  std::lock_guard<std::mutex> lock(mutex_);
  running_ = false;
  if (error_) {
    auto error = error_;
    error_ = nullptr;
    std::rethrow_exception(error);
  }
}

bool AsyncSnapshotWriter::busy() {
  std::lock_guard<std::mutex> lock(mutex_);
  return running_;
}

double AsyncSnapshotWriter::last_write_seconds() {
  std::lock_guard<std::mutex> lock(mutex_);
  return write_seconds_;
}

void AsyncSnapshotWriter::wait_staged() {
  std::unique_lock<std::mutex> lock(mutex_);
  staged_cv_.wait(lock, [&] { return staged_; });
}

std::vector<NamedTensor> AsyncSnapshotWriter::stage(const std::vector<NamedTensor>& tensors, bool parallel) {
  const auto start = std::chrono::steady_clock::now();
  constexpr uint64_t kChunk = 4ull << 20;
  uint64_t total = 0;
  for (const auto& t : tensors) total = format::align_up(total, format::kTensorAlign) + t.tensor.nbytes();
  if (!staging_ || staging_->size() < total) staging_ = std::make_shared<HostMapping>(total);

  std::vector<NamedTensor> staged;
  std::vector<CopyChunk> chunks;
  uint64_t offset = 0;
  char* base = staging_->data();
  for (const auto& t : tensors) {
    offset = format::align_up(offset, format::kTensorAlign);
    const uint64_t nbytes = t.tensor.nbytes();
    at::Tensor typed = tensor_in(staging_, offset, t.tensor.sizes(), t.tensor.scalar_type());
    if (t.tensor.device().is_cpu() && t.tensor.is_contiguous()) {
      const char* src = static_cast<const char*>(t.tensor.data_ptr());
      for (uint64_t done = 0; done < nbytes; done += kChunk)
        chunks.push_back({src + done, base + offset + done, static_cast<size_t>(std::min(kChunk, nbytes - done))});
    } else {
      typed.copy_(t.tensor);  // device-to-host or strided gather
    }
    staged.push_back({t.name, typed});
    offset += nbytes;
  }
  copy_chunks(chunks, parallel);
  staging_seconds_ = seconds_since(start);
  return staged;
}

void AsyncSnapshotWriter::save(const std::string& path, const std::string& metadata,
                               const std::vector<NamedTensor>& tensors,
                               const std::vector<std::string>& remove_after_commit, const WriteOptions& options,
                               bool copy_in_background) {
  wait();
  for (const auto& t : tensors)
    TORCH_CHECK(t.tensor.layout() == at::kStrided, "snapshot: tensor '", t.name, "' is not a dense tensor");
  std::vector<NamedTensor> staged;
  if (!copy_in_background) staged = stage(tensors, /*parallel=*/true);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    running_ = true;
    staged_ = !copy_in_background;
  }
  std::vector<NamedTensor> sources = copy_in_background ? tensors : std::vector<NamedTensor>{};
  worker_ = std::thread([this, path, metadata, staged = std::move(staged), sources = std::move(sources),
                         remove_after_commit, options, copy_in_background]() mutable {
    const auto write_start = std::chrono::steady_clock::now();
    std::exception_ptr error;
    try {
      if (copy_in_background) {
        std::exception_ptr stage_error;
        try {
          staged = stage(sources, /*parallel=*/false);
        } catch (...) {
          stage_error = std::current_exception();
        }
        sources.clear();  // drop the references to the live tensors
        {
          std::lock_guard<std::mutex> lock(mutex_);
          staged_ = true;
        }
        staged_cv_.notify_all();
        if (stage_error) std::rethrow_exception(stage_error);
      }
      write_snapshot(path, metadata, staged, options);
      for (const auto& old : remove_after_commit)
        if (old != path) ::unlink(old.c_str());
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = error;
    write_seconds_ = seconds_since(write_start);
    running_ = false;
    staged_ = true;
    staged_cv_.notify_all();
  });
}

}  // namespace disttrain::snapshot
