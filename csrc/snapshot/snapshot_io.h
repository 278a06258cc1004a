// The snapshot file format and its synchronous reader and writer.
//
// Layout (little-endian):
//   [0, 128)              header: magic, version, section offsets/lengths,
//                         CRC of metadata+table, CRC of the header itself
//   [128, ...)            metadata (opaque bytes; the Python layer writes JSON)
//   [..., data_offset)    tensor table: per tensor name, dtype, shape, offset,
//                         byte length, CRC-32C of its bytes; zero padding
//   [data_offset, end)    raw tensor bytes, each tensor 64-byte aligned
//   [end, end + 16)       footer: CRC-32C of every byte before it, end magic
//
// A file is written to a temporary name in the target directory, fsynced,
// renamed over the target and the directory fsynced, so a crash at any instant
// leaves the old file or the new one, never a torn one.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace disttrain::snapshot {

struct NamedTensor {
  std::string name;
  at::Tensor tensor;
};

// A snapshot that fails verification: which file, and which tensor when the
// damage is inside one (empty when it is in the header, table or footer).
class CorruptSnapshotError : public std::runtime_error {
 public:
  CorruptSnapshotError(std::string path, std::string tensor, const std::string& what)
      : std::runtime_error(what), path_(std::move(path)), tensor_(std::move(tensor)) {}
  const std::string& path() const { return path_; }
  const std::string& tensor() const { return tensor_; }

 private:
  std::string path_, tensor_;
};

// A snapshot whose format version this build does not read (written by a
// newer disttrain): not damaged, but not loadable here either.
class UnsupportedSnapshotError : public std::runtime_error {
 public:
  UnsupportedSnapshotError(std::string path, uint32_t version, const std::string& what)
      : std::runtime_error(what), path_(std::move(path)), version_(version) {}
  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }

 private:
  std::string path_;
  uint32_t version_;
};

// Reading failed at the operating system (EIO, EACCES, EISDIR, ...): the
// file's content is unknown. Python sees an OSError with errno and filename.
class SnapshotReadError : public std::runtime_error {
 public:
  SnapshotReadError(std::string path, int error_number, const std::string& what)
      : std::runtime_error(what), path_(std::move(path)), errno_(error_number) {}
  const std::string& path() const { return path_; }
  int error_number() const { return errno_; }

 private:
  std::string path_;
  int errno_;
};

// Writing failed (full disk, unwritable directory, ...). Unless
// replaced_target() is true, the file that was at the target path before, if
// any, is untouched. replaced_target(): the new file was renamed into place
// (the old one is gone) but making the rename durable (the directory's fsync)
// failed, so a machine crash could still lose it.
class SnapshotWriteError : public std::runtime_error {
 public:
  SnapshotWriteError(std::string path, int error_number, const std::string& what, bool replaced_target = false)
      : std::runtime_error(what), path_(std::move(path)), errno_(error_number), replaced_target_(replaced_target) {}
  const std::string& path() const { return path_; }
  int error_number() const { return errno_; }
  bool replaced_target() const { return replaced_target_; }

 private:
  std::string path_;
  int errno_;
  bool replaced_target_;
};

struct WriteOptions {
  // fsync the file and its directory; off only where durability does not
  // matter (a tmpfs, a benchmark of the format alone).
  bool fsync = true;
  // Fault injection for tests: fail with ENOSPC once this many bytes of the
  // file are written, or SIGKILL the process there (a crash mid-write).
  int64_t fail_after_bytes = -1;
  int64_t kill_after_bytes = -1;
  // Fault injection for tests: the directory's fsync after the rename fails (EIO).
  bool fail_directory_fsync = false;
};

// Writes `tensors` (CPU, contiguous, unique names) and `metadata` to `path`
// atomically. Returns the file size. Throws SnapshotWriteError on I/O errors.
uint64_t write_snapshot(const std::string& path, const std::string& metadata,
                        const std::vector<NamedTensor>& tensors, const WriteOptions& options = {});

struct Snapshot {
  std::string metadata;
  std::vector<NamedTensor> tensors;
};

// Reads and verifies every checksum. Throws CorruptSnapshotError naming the
// file and tensor for a truncated or damaged file, UnsupportedSnapshotError
// for another format version, SnapshotReadError when the system fails a read.
Snapshot read_snapshot(const std::string& path);

}  // namespace disttrain::snapshot
