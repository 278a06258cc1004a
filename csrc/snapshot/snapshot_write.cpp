// Synchronous, atomic snapshot writer.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <csignal>
#include <cstring>
#include <unordered_set>

#include "snapshot/crc32c.h"
#include "snapshot/snapshot_io.h"
#include "snapshot/snapshot_format.h"

namespace disttrain::snapshot {
namespace {

// Large writes keep the disk busy; the chunk is small enough that its CRC
// pass leaves it in cache for the copy into the page cache that follows.
constexpr uint64_t kWriteChunk = 8ull << 20;

std::string parent_directory(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string base_name(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

[[noreturn]] void fail(const std::string& path, const char* doing, int error_number) {
  throw SnapshotWriteError(path, error_number,
                           "snapshot: cannot write '" + path + "': " + doing + " failed: " +
                               std::strerror(error_number) + " (errno " + std::to_string(error_number) +
                               "); any previous snapshot is untouched");
}

// The mode a plain open(O_CREAT, 0666) would give: 0666 less the process's
// umask, read from /proc (calling umask() to read it would change it for
// every thread for a moment). Owner-only when it cannot be read.
mode_t published_mode() {
  FILE* f = std::fopen("/proc/self/status", "re");
  if (f == nullptr) return 0600;
  char line[256];
  unsigned mask = 077;
  while (std::fgets(line, sizeof(line), f) != nullptr)
    if (std::sscanf(line, "Umask: %o", &mask) == 1) break;
  std::fclose(f);
  return static_cast<mode_t>(0666 & ~mask);
}

// One open temporary file; removed unless commit() renamed it.
class TempFile {
 public:
  TempFile(std::string target, const WriteOptions& options) : target_(std::move(target)), options_(options) {
    static std::atomic<uint64_t> counter{0};
    temp_ = parent_directory(target_) + "/." + base_name(target_) + ".tmp." + std::to_string(::getpid()) + "." +
            std::to_string(counter++);
    // Created here and nowhere else: exclusively (a file, or a symlink planted at
    // the name, is an error, never written through) and readable by the owner
    // only until it is complete.
    fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd_ < 0) fail(target_, ("creating '" + temp_ + "'").c_str(), errno);
  }
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(temp_.c_str());
  }

  void write_at(const void* data, uint64_t length, uint64_t offset) {
    const char* p = static_cast<const char*>(data);
    while (length > 0) {
      size_t n = length;
      if (options_.fail_after_bytes >= 0 || options_.kill_after_bytes >= 0) n = inject_faults(n);
      ssize_t done = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
      if (done < 0) {
        if (errno == EINTR) continue;
        fail(target_, "write", errno);
      }
      p += done;
      offset += done;
      length -= done;
      written_ += done;
    }
  }

  void commit() {
    // Complete: it becomes readable as any file the user creates is.
    if (::fchmod(fd_, published_mode()) != 0) fail(target_, "fchmod", errno);
    if (options_.fsync && ::fsync(fd_) != 0) fail(target_, "fsync", errno);
    if (::close(fd_) != 0) {
      fd_ = -1;
      fail(target_, "close", errno);
    }
    fd_ = -1;
    if (::rename(temp_.c_str(), target_.c_str()) != 0) fail(target_, "rename", errno);
    committed_ = true;
    if (options_.fsync) {
      // The rename is durable only once the directory entry is. From here on
      // the previous file is gone: an error must not claim it is untouched.
      int dir = ::open(parent_directory(target_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
      if (dir < 0) fail_after_rename("opening its directory for fsync", errno);
      int rc = options_.fail_directory_fsync ? (errno = EIO, -1) : ::fsync(dir);
      int err = errno;
      ::close(dir);
      if (rc != 0) fail_after_rename("fsync of its directory", err);
    }
  }

 private:
  // Caps a write so the injected fault lands exactly at the requested byte.
  size_t inject_faults(size_t n) {
    auto limit = [&](int64_t at) -> int64_t { return at >= 0 ? at - static_cast<int64_t>(written_) : INT64_MAX; };
    if (limit(options_.kill_after_bytes) <= 0) ::raise(SIGKILL);
    if (limit(options_.fail_after_bytes) <= 0) fail(target_, "write", ENOSPC);
    int64_t room = std::min(limit(options_.kill_after_bytes), limit(options_.fail_after_bytes));
    return static_cast<size_t>(std::min<int64_t>(static_cast<int64_t>(n), room));
  }

  [[noreturn]] void fail_after_rename(const char* doing, int error_number) {
    throw SnapshotWriteError(target_, error_number,
                             "snapshot: '" + target_ + "' is complete and renamed into place, but " + doing +
                                 " failed: " + std::strerror(error_number) + " (errno " +
                                 std::to_string(error_number) +
                                 "); it replaced the previous file and may not survive a crash of the machine",
                             /*replaced_target=*/true);
  }

  std::string target_, temp_;
  WriteOptions options_;
  int fd_ = -1;
  uint64_t written_ = 0;
  bool committed_ = false;
};

}  // namespace

uint64_t write_snapshot(const std::string& path, const std::string& metadata,
                        const std::vector<NamedTensor>& tensors, const WriteOptions& options) {
  using namespace format;
  std::vector<TensorEntry> entries;
  entries.reserve(tensors.size());
  std::unordered_set<std::string> names;
  for (const auto& t : tensors) {
    TORCH_CHECK(names.insert(t.name).second, "snapshot: tensor name '", t.name, "' appears twice");
    TORCH_CHECK(t.name.size() <= kMaxNameLength, "snapshot: tensor name longer than ", kMaxNameLength, " bytes");
    TORCH_CHECK(t.tensor.device().is_cpu() && t.tensor.is_contiguous(), "snapshot: tensor '", t.name,
                "' must be a contiguous CPU tensor");
    TORCH_CHECK(t.tensor.dim() <= static_cast<int64_t>(kMaxDims), "snapshot: tensor '", t.name, "' has ",
                t.tensor.dim(), " dimensions, more than ", kMaxDims);
    TensorEntry e;
    e.name = t.name;
    e.dtype = t.tensor.scalar_type();
    dtype_code(e.dtype);  // rejects unsupported dtypes before any I/O
    e.shape = t.tensor.sizes().vec();
    e.nbytes = t.tensor.nbytes();
    entries.push_back(std::move(e));
  }

  // The table's size does not depend on the offsets and CRCs it holds, so the
  // layout is fixed before any byte is written.
  const uint64_t table_length = encode_table(entries).size();
  const uint64_t data_offset = align_up(kHeaderSize + metadata.size() + table_length, kDataAlign);
  uint64_t cursor = data_offset;
  for (auto& e : entries) {
    e.offset = align_up(cursor, kTensorAlign);
    cursor = e.offset + e.nbytes;
  }
  const uint64_t data_end = cursor;

  TempFile file(path, options);
  static const char zeros[kTensorAlign] = {};
  uint32_t data_crc = 0;
  cursor = data_offset;
  for (size_t i = 0; i < entries.size(); ++i) {
    auto& e = entries[i];
    const uint64_t pad = e.offset - cursor;
    data_crc = crc32c_combine(data_crc, crc32c_update(0, zeros, pad), pad);
    const char* src = static_cast<const char*>(tensors[i].tensor.data_ptr());
    uint32_t crc = 0;
    for (uint64_t done = 0; done < e.nbytes; done += kWriteChunk) {
      const uint64_t n = std::min(kWriteChunk, e.nbytes - done);
      crc = crc32c_update(crc, src + done, n);
      file.write_at(src + done, n, e.offset + done);
    }
    e.crc = crc;
    data_crc = crc32c_combine(data_crc, crc, e.nbytes);
    cursor = e.offset + e.nbytes;
  }

  // Header, metadata, table and the padding up to the data, as one write.
  std::string prefix(data_offset, '\0');
  const std::string table = encode_table(entries);
  Header header{};
  std::memcpy(header.magic, kMagic, sizeof(kMagic));
  header.version = kVersion;
  header.metadata_offset = kHeaderSize;
  header.metadata_length = metadata.size();
  header.table_offset = kHeaderSize + metadata.size();
  header.table_length = table.size();
  header.tensor_count = entries.size();
  header.data_offset = data_offset;
  header.data_length = data_end - data_offset;
  header.file_length = data_end + kFooterSize;
  header.metadata_table_crc = crc32c_update(crc32c_update(0, metadata.data(), metadata.size()), table.data(), table.size());
  header.header_crc = crc32c_update(0, &header, sizeof(header));
  std::memcpy(&prefix[0], &header, sizeof(header));
  std::memcpy(&prefix[header.metadata_offset], metadata.data(), metadata.size());
  std::memcpy(&prefix[header.table_offset], table.data(), table.size());
  file.write_at(prefix.data(), prefix.size(), 0);

  Footer footer{};
  footer.file_crc = crc32c_combine(crc32c_update(0, prefix.data(), prefix.size()), data_crc, data_end - data_offset);
  std::memcpy(footer.end_magic, kEndMagic, sizeof(kEndMagic));
  file.write_at(&footer, sizeof(footer), data_end);
  file.commit();
  return header.file_length;
}

}  // namespace disttrain::snapshot
