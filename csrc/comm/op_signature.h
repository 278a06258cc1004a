// What every rank must agree on for one operation. Two ranks whose signatures
// differ are calling different collectives: the transport reports both sides.
#pragma once
#include <cstdint>
#include <string>

namespace disttrain::comm {

enum class OpKind : uint8_t {
  kAllreduce = 1,
  kBroadcast,
  kAllgather,
  kReduceScatter,
  kAlltoall,
  kBarrier,
  kReduce,
  kGather,
  kScatter,
  kSend,
};

enum class RedOp : uint8_t { kSum = 0, kAvg, kProduct, kMin, kMax, kBand, kBor, kBxor, kNone = 255 };

struct OpSignature {
  uint64_t seq = 0;
  OpKind op = OpKind::kAllreduce;
  uint8_t dtype = 0;      // c10::ScalarType value
  RedOp redop = RedOp::kNone;
  uint64_t count = 0;     // elements (op specific: total, or per rank)
  int64_t aux = 0;        // root rank or tag
};

const char* op_name(OpKind op);
const char* redop_name(RedOp op);
std::string dtype_name(uint8_t dtype);
// "allreduce(seq=3, dtype=float32, numel=100, op=SUM)"
std::string describe(const OpSignature& sig);

}  // namespace disttrain::comm
