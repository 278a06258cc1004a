// Snapshot reader: every byte it returns has passed its CRC-32C.
#include <ATen/Parallel.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "snapshot/crc32c.h"
#include "snapshot/snapshot_io.h"
#include "snapshot/snapshot_format.h"

namespace disttrain::snapshot {
namespace {

using namespace format;

constexpr uint64_t kReadChunk = 8ull << 20;

[[noreturn]] void corrupt(const std::string& path, const std::string& tensor, const std::string& why) {
  std::string where = tensor.empty() ? "" : " in tensor '" + tensor + "'";
  throw CorruptSnapshotError(path, tensor, "snapshot '" + path + "' is corrupt: " + why + where);
}

[[noreturn]] void system_error(const std::string& path, const char* doing, int error_number) {
  throw SnapshotReadError(path, error_number,
                          "snapshot: cannot " + std::string(doing) + " '" + path + "': " + std::strerror(error_number));
}

class ReadOnlyFile {
 public:
  explicit ReadOnlyFile(const std::string& path) : path_(path) {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) system_error(path, "open", errno);
    struct stat st;
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      ::close(fd_);
      system_error(path, "stat", err);
    }
    size_ = static_cast<uint64_t>(st.st_size);
  }
  ~ReadOnlyFile() { ::close(fd_); }
  uint64_t size() const { return size_; }

  // Reads exactly `length` bytes at `offset`; a short file is corruption.
  void read_at(void* out, uint64_t length, uint64_t offset, const std::string& tensor) const {
    char* p = static_cast<char*>(out);
    while (length > 0) {
      ssize_t n = ::pread(fd_, p, length, static_cast<off_t>(offset));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) system_error(path_, "read", errno);
      if (n == 0) corrupt(path_, tensor, "file ends early (truncated)");
      p += n;
      offset += n;
      length -= n;
    }
  }

 private:
  std::string path_;
  int fd_;
  uint64_t size_;
};

// Parses the table with bounds checks on every field: the table passed its
// CRC, but a CRC collision or a writer bug must still not crash the reader.
std::vector<TensorEntry> decode_table(const std::string& path, const std::string& table, const Header& h) {
  std::vector<TensorEntry> entries;
  size_t pos = 0;
  auto take = [&](void* out, size_t n) {
    if (pos + n > table.size()) corrupt(path, "", "tensor table is cut short");
    std::memcpy(out, table.data() + pos, n);
    pos += n;
  };
  const uint64_t data_end = h.data_offset + h.data_length;
  for (uint64_t i = 0; i < h.tensor_count; ++i) {
    TensorEntry e;
    uint32_t name_length;
    take(&name_length, 4);
    if (name_length > kMaxNameLength || pos + name_length > table.size()) corrupt(path, "", "bad tensor name length");
    e.name.assign(table.data() + pos, name_length);
    pos += name_length;
    uint8_t code, ndim;
    take(&code, 1);
    take(&ndim, 1);
    if (!dtype_from_code(code, &e.dtype)) corrupt(path, e.name, "unknown dtype code " + std::to_string(code));
    if (ndim > kMaxDims) corrupt(path, e.name, "too many dimensions");
    e.shape.resize(ndim);
    uint64_t numel = 1;
    for (auto& s : e.shape) {
      take(&s, 8);
      if (s < 0) corrupt(path, e.name, "negative dimension");
      if (s != 0 && numel > UINT64_MAX / static_cast<uint64_t>(s)) corrupt(path, e.name, "shape overflows");
      numel *= static_cast<uint64_t>(s);
    }
    take(&e.offset, 8);
    take(&e.nbytes, 8);
    take(&e.crc, 4);
    // The byte length must not wrap (a shape of 2 x (2^62 + 3) float32 is 24 bytes modulo 2^64) and must
    // fit torch's signed sizes, or at::empty throws below instead of this naming the corruption.
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, c10::elementSize(e.dtype), &bytes) ||
        bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      corrupt(path, e.name, "shape overflows");
    if (e.nbytes != bytes) corrupt(path, e.name, "byte length does not match its shape");
    if (e.offset < h.data_offset || e.offset > data_end || e.nbytes > data_end - e.offset)
      corrupt(path, e.name, "offset outside the data section");
    entries.push_back(std::move(e));
  }
  if (pos != table.size()) corrupt(path, "", "tensor table has trailing bytes");
  return entries;
}

}  // namespace

Snapshot read_snapshot(const std::string& path) {
  ReadOnlyFile file(path);
  if (file.size() < kHeaderSize + kFooterSize)
    corrupt(path, "", "file is " + std::to_string(file.size()) + " bytes, too short for a snapshot (truncated)");

  Header h;
  file.read_at(&h, sizeof(h), 0, "");
  if (std::memcmp(h.magic, kMagic, sizeof(kMagic)) != 0) corrupt(path, "", "not a disttrain snapshot (bad magic)");
  const uint32_t stored_header_crc = h.header_crc;
  h.header_crc = 0;
  if (crc32c_update(0, &h, sizeof(h)) != stored_header_crc) corrupt(path, "", "header CRC mismatch");
  h.header_crc = stored_header_crc;
  if (h.version != kVersion)
    throw UnsupportedSnapshotError(path, h.version,
                                   "snapshot '" + path + "' has format version " + std::to_string(h.version) +
                                       "; this disttrain reads version " + std::to_string(kVersion));
  // Every size and offset is checked against the others with overflow-checked
  // sums, and against the file's real length, before anything is allocated
  // from them: a header with a valid CRC may still come from a hostile or
  // buggy writer (it could claim a terabyte of metadata, or offsets that wrap).
  uint64_t table_offset, table_end, data_end, file_end;
  if (h.metadata_offset != kHeaderSize ||
      __builtin_add_overflow(h.metadata_offset, h.metadata_length, &table_offset) || h.table_offset != table_offset ||
      __builtin_add_overflow(h.table_offset, h.table_length, &table_end) || h.data_offset < table_end ||
      __builtin_add_overflow(h.data_offset, h.data_length, &data_end) ||
      __builtin_add_overflow(data_end, kFooterSize, &file_end) || h.file_length != file_end)
    corrupt(path, "", "inconsistent section offsets in the header");
  if (h.data_offset > file.size() - kFooterSize)
    corrupt(path, "", "header claims " + std::to_string(h.data_offset) + " bytes before the tensor data; the file has " +
                          std::to_string(file.size()) + " (truncated or not a snapshot)");
  // Each table entry takes at least 31 bytes (name length, dtype, ndim, offset, size, CRC).
  if (h.tensor_count > h.table_length / 31) corrupt(path, "", "tensor count does not fit the tensor table");

  std::string prefix(h.data_offset, '\0');
  file.read_at(&prefix[0], prefix.size(), 0, "");
  const char* meta_table = prefix.data() + h.metadata_offset;
  if (crc32c_update(0, meta_table, h.metadata_length + h.table_length) != h.metadata_table_crc)
    corrupt(path, "", "metadata or tensor table CRC mismatch");
  auto entries = decode_table(path, prefix.substr(h.table_offset, h.table_length), h);

  if (file.size() < h.file_length) {
    // Name the first tensor the truncation cut into, the most useful fact.
    for (const auto& e : entries)
      if (e.offset + e.nbytes > file.size())
        corrupt(path, e.name, "file is " + std::to_string(file.size()) + " of " + std::to_string(h.file_length) +
                                  " bytes (truncated)");
    corrupt(path, "", "file is " + std::to_string(file.size()) + " of " + std::to_string(h.file_length) +
                          " bytes (truncated before the footer)");
  }
  if (file.size() > h.file_length) corrupt(path, "", "unexpected bytes after the footer");

  Snapshot out;
  out.metadata.assign(meta_table, h.metadata_length);
  out.tensors.reserve(entries.size());

  // Chunks are read and checksummed on torch's intra-op threads: one core
  // cannot both fault in fresh pages and copy at the disk cache's speed.
  struct Chunk {
    size_t entry;
    uint64_t begin, length;
    uint32_t crc;
  };
  std::vector<Chunk> chunks;
  // Tensors come from torch's allocator, which recycles memory a previous
  // load freed; one populated mapping per file measured slower on reloads.
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    out.tensors.push_back({e.name, at::empty(e.shape, at::TensorOptions().dtype(e.dtype))});
    for (uint64_t done = 0; done < e.nbytes; done += kReadChunk)
      chunks.push_back({i, done, std::min(kReadChunk, e.nbytes - done), 0});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Chunk& chunk = chunks[c];
      const auto& e = entries[chunk.entry];
      char* dst = static_cast<char*>(out.tensors[chunk.entry].tensor.data_ptr()) + chunk.begin;
      file.read_at(dst, chunk.length, e.offset + chunk.begin, e.name);
      chunk.crc = crc32c_update(0, dst, chunk.length);
    }
  });

  uint32_t data_crc = 0;
  uint64_t cursor = h.data_offset;
  std::string gap;
  size_t next_chunk = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const auto& e = entries[i];
    if (e.offset < cursor) corrupt(path, e.name, "overlaps the tensor before it");
    gap.resize(e.offset - cursor);
    file.read_at(&gap[0], gap.size(), cursor, e.name);
    data_crc = crc32c_combine(data_crc, crc32c_update(0, gap.data(), gap.size()), gap.size());
    uint32_t crc = 0;
    for (; next_chunk < chunks.size() && chunks[next_chunk].entry == i; ++next_chunk)
      crc = crc32c_combine(crc, chunks[next_chunk].crc, chunks[next_chunk].length);
    if (crc != e.crc) corrupt(path, e.name, "CRC mismatch");
    data_crc = crc32c_combine(data_crc, crc, e.nbytes);
    cursor = e.offset + e.nbytes;
  }
  if (cursor != data_end) corrupt(path, "", "data section length does not match the table");

  Footer footer;
  file.read_at(&footer, sizeof(footer), data_end, "");
  if (std::memcmp(footer.end_magic, kEndMagic, sizeof(kEndMagic)) != 0) corrupt(path, "", "bad end marker");
  const uint32_t file_crc = crc32c_combine(crc32c_update(0, prefix.data(), prefix.size()), data_crc, h.data_length);
  if (file_crc != footer.file_crc) corrupt(path, "", "file CRC mismatch (padding or footer damaged)");
  return out;
}

}  // namespace disttrain::snapshot
