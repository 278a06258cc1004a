// libFuzzer target: read_snapshot (csrc/snapshot/snapshot_read.cpp) on arbitrary
// bytes. The first input byte selects a mode; the rest is the file.
//   bit 0 set: before reading, the harness recomputes the header CRC, the
//              metadata+table CRC and the footer's file CRC from the file's own
//              (possibly hostile) header fields, so mutations reach the size,
//              offset and table checks behind the checksums, as a hostile
//              writer (not a disk error) would.
// The reader must either return or throw one of its three documented errors;
// anything else (another exception, a sanitizer report, a huge allocation,
// a hang) is a crash. The file lives in a memfd: no disk I/O per input.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "snapshot/crc32c.h"
#include "snapshot/snapshot_format.h"
#include "snapshot/snapshot_io.h"

namespace fmt = disttrain::snapshot::format;
using namespace disttrain::snapshot;

static void fix_crcs(std::vector<uint8_t>& file) {
  if (file.size() < fmt::kHeaderSize + fmt::kFooterSize) return;
  fmt::Header h;
  std::memcpy(&h, file.data(), sizeof(h));
  const uint64_t size = file.size();
  if (h.metadata_offset <= size && h.metadata_length <= size - h.metadata_offset &&
      h.table_length <= size - h.metadata_offset - h.metadata_length)
    h.metadata_table_crc = crc32c_update(0, file.data() + h.metadata_offset, h.metadata_length + h.table_length);
  h.header_crc = 0;
  h.header_crc = crc32c_update(0, &h, sizeof(h));
  std::memcpy(file.data(), &h, sizeof(h));
  const uint64_t body = size - fmt::kFooterSize;
  uint32_t file_crc = crc32c_update(0, file.data(), body);
  std::memcpy(file.data() + body, &file_crc, sizeof(file_crc));
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t mode = data[0];
  std::vector<uint8_t> file(data + 1, data + size);
  if (mode & 1) fix_crcs(file);
  static const int fd = memfd_create("snapshot_fuzz", MFD_CLOEXEC);
  if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, file.data(), file.size(), 0) != static_cast<ssize_t>(file.size()))
    __builtin_trap();
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  try {
    Snapshot s = read_snapshot(path);
    // A snapshot that verifies must be self-consistent: every tensor's bytes lie in the file.
    uint64_t total = 0;
    for (const auto& t : s.tensors) total += t.tensor.nbytes();
    if (total > file.size()) __builtin_trap();
  } catch (const CorruptSnapshotError&) {
  } catch (const UnsupportedSnapshotError&) {
  } catch (const SnapshotReadError&) {
  }
  return 0;
}
