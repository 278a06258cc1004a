// On-disk structures of the snapshot format shared by the reader and the
// writer (see snapshot.h for the layout). Internal to csrc/train.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>
#include <string>

namespace disttrain::snapshot::format {

constexpr char kMagic[8] = {'\x89', 'D', 'T', 'S', 'N', 'A', 'P', '\n'};
constexpr char kEndMagic[8] = {'D', 'T', 'S', 'N', 'A', 'P', 'E', '\n'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kHeaderSize = 128;
constexpr uint64_t kFooterSize = 16;
constexpr uint64_t kTensorAlign = 64;
constexpr uint64_t kDataAlign = 4096;
// Bounds that keep a damaged table from making the reader allocate wildly.
constexpr uint32_t kMaxDims = 64;
constexpr uint32_t kMaxNameLength = 65535;

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the snapshot format is little-endian");

struct Header {
  char magic[8];
  uint32_t version;
  uint32_t header_crc;  // of these 128 bytes with this field zero
  uint64_t metadata_offset;
  uint64_t metadata_length;
  uint64_t table_offset;
  uint64_t table_length;
  uint64_t tensor_count;
  uint64_t data_offset;
  uint64_t data_length;
  uint64_t file_length;
  uint32_t metadata_table_crc;
  uint8_t reserved[kHeaderSize - 84];
};
static_assert(sizeof(Header) == kHeaderSize, "header must be 128 bytes");

struct Footer {
  uint32_t file_crc;  // of every byte before the footer
  uint32_t reserved;
  char end_magic[8];
};
static_assert(sizeof(Footer) == kFooterSize, "footer must be 16 bytes");

// Table entry, serialised field by field:
//   u32 name_length, name bytes, u8 dtype code, u8 ndim, i64 shape[ndim],
//   u64 offset, u64 nbytes, u32 crc
struct TensorEntry {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t offset = 0;
  uint64_t nbytes = 0;
  uint32_t crc = 0;
};

// Stable codes: the file must not depend on at::ScalarType's numbering.
uint8_t dtype_code(at::ScalarType type);                 // throws for unsupported
bool dtype_from_code(uint8_t code, at::ScalarType* out);  // false for unknown

inline uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

std::string encode_table(const std::vector<TensorEntry>& entries);

}  // namespace disttrain::snapshot::format
