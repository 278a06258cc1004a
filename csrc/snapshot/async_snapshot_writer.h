// Writes snapshots in a background thread so training is blocked only for
// the copy of its tensors into host staging memory.
#pragma once

#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "snapshot/host_memory.h"
#include "snapshot/snapshot_io.h"

namespace disttrain::snapshot {

class AsyncSnapshotWriter {
 public:
  AsyncSnapshotWriter() = default;
  // Waits for a write in flight; its error, if any, is printed, not thrown.
  ~AsyncSnapshotWriter();
  AsyncSnapshotWriter(const AsyncSnapshotWriter&) = delete;
  AsyncSnapshotWriter& operator=(const AsyncSnapshotWriter&) = delete;

  // Waits for the previous write (rethrowing its error), copies `tensors`
  // into staging memory, and returns while a background thread writes them
  // to `path`. After the new file is committed, the files in
  // `remove_after_commit` are deleted (the keep-last-K policy); they are
  // kept if the write fails.
  // With copy_in_background the copy, too, runs in the background thread and
  // save() returns at once: the caller must not modify the tensors until
  // wait_staged() returns (a trainer calls it before its optimizer step, so
  // the copy overlaps forward and backward).
  void save(const std::string& path, const std::string& metadata, const std::vector<NamedTensor>& tensors,
            const std::vector<std::string>& remove_after_commit, const WriteOptions& options,
            bool copy_in_background = false);

  // Waits until the tensors of the last save() are copied to staging memory.
  void wait_staged();

  // Waits for the write in flight and rethrows its error (once).
  void wait();

  // True while a write is in flight.
  bool busy();

  // Seconds the last save() spent copying into staging memory, and the
  // last completed background write took.
  double last_staging_seconds() const { return staging_seconds_; }
  double last_write_seconds();

 private:
  // Copies into the (reused) staging memory; returns views of it.
  std::vector<NamedTensor> stage(const std::vector<NamedTensor>& tensors, bool parallel);

  std::thread worker_;
  std::mutex mutex_;
  bool running_ = false;
  bool staged_ = true;
  std::condition_variable staged_cv_;
  std::exception_ptr error_;
  // Reused between saves: fresh memory would cost page faults on the
  // training thread. Staged tensors keep it alive while they are written.
  std::shared_ptr<HostMapping> staging_;
  std::atomic<double> staging_seconds_{0};
  double write_seconds_ = 0;
};

}  // namespace disttrain::snapshot
