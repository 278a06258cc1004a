#include "snapshot/snapshot_format.h"

#include <c10/util/Exception.h>


namespace disttrain::snapshot {
namespace format {
namespace {

struct DtypeInfo {
  at::ScalarType type;
  uint8_t code;
};

constexpr DtypeInfo kDtypes[] = {
    {at::kFloat, 1},         {at::kDouble, 2},
    {at::kHalf, 3},          {at::kBFloat16, 4},
    {at::kChar, 5},             {at::kByte, 6},
    {at::kShort, 7},           {at::kInt, 8},
    {at::kLong, 9},            {at::kBool, 10},
    {at::kComplexFloat, 11}, {at::kComplexDouble, 12},
    {at::ScalarType::UInt16, 13}, {at::ScalarType::UInt32, 14},
    {at::ScalarType::UInt64, 15}, {at::ScalarType::Float8_e4m3fn, 16},
    {at::ScalarType::Float8_e5m2, 17},
};

const DtypeInfo* find(at::ScalarType type) {
  for (const auto& d : kDtypes)
    if (d.type == type) return &d;
  return nullptr;
}

template <typename T>
void put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

}  // namespace

uint8_t dtype_code(at::ScalarType type) {
  const DtypeInfo* d = find(type);
  TORCH_CHECK(d != nullptr, "snapshot: dtype ", type, " cannot be stored in a snapshot");
  return d->code;
}

bool dtype_from_code(uint8_t code, at::ScalarType* out) {
  for (const auto& d : kDtypes)
    if (d.code == code) {
      *out = d.type;
      return true;
    }
  return false;
}

std::string encode_table(const std::vector<TensorEntry>& entries) {
  std::string out;
  for (const auto& e : entries) {
    put<uint32_t>(out, static_cast<uint32_t>(e.name.size()));
    out += e.name;
    put<uint8_t>(out, dtype_code(e.dtype));
    put<uint8_t>(out, static_cast<uint8_t>(e.shape.size()));
    for (int64_t s : e.shape) put<int64_t>(out, s);
    put<uint64_t>(out, e.offset);
    put<uint64_t>(out, e.nbytes);
    put<uint32_t>(out, e.crc);
  }
  return out;
}

}  // namespace format

}  // namespace disttrain::snapshot
