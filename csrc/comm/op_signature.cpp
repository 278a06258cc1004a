#include "comm/op_signature.h"

#include <c10/core/ScalarType.h>
#include <sstream>

namespace disttrain::comm {

const char* op_name(OpKind op) {
  switch (op) {
    case OpKind::kAllreduce: return "allreduce";
    case OpKind::kBroadcast: return "broadcast";
    case OpKind::kAllgather: return "allgather";
    case OpKind::kReduceScatter: return "reduce_scatter";
    case OpKind::kAlltoall: return "all_to_all";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kReduce: return "reduce";
    case OpKind::kGather: return "gather";
    case OpKind::kScatter: return "scatter";
    case OpKind::kSend: return "send/recv";
  }
  return "unknown-op";
}

const char* redop_name(RedOp op) {
  switch (op) {
    case RedOp::kSum: return "SUM";
    case RedOp::kAvg: return "AVG";
    case RedOp::kProduct: return "PRODUCT";
    case RedOp::kMin: return "MIN";
    case RedOp::kMax: return "MAX";
    case RedOp::kBand: return "BAND";
    case RedOp::kBor: return "BOR";
    case RedOp::kBxor: return "BXOR";
    case RedOp::kNone: return "none";
  }
  return "unknown";
}

std::string dtype_name(uint8_t dtype) {
  if (dtype >= static_cast<uint8_t>(c10::ScalarType::NumOptions)) return "dtype#" + std::to_string(dtype);
  return c10::toString(static_cast<c10::ScalarType>(dtype));
}

std::string describe(const OpSignature& sig) {
  std::ostringstream out;
  out << op_name(sig.op) << "(seq=" << sig.seq << ", dtype=" << dtype_name(sig.dtype)
      << ", numel=" << sig.count;
  if (sig.redop != RedOp::kNone) out << ", op=" << redop_name(sig.redop);
  if (sig.op == OpKind::kBroadcast || sig.op == OpKind::kReduce || sig.op == OpKind::kGather ||
      sig.op == OpKind::kScatter)
    out << ", root=" << sig.aux;
  if (sig.op == OpKind::kSend) out << ", tag=" << sig.aux;
  // One pair's message of an all_to_all: numel to the receiver, numel_back the other way.
  if (sig.op == OpKind::kAlltoall && (sig.count != 0 || sig.aux != 0)) out << ", numel_back=" << sig.aux;
  out << ")";
  return out.str();
}

}  // namespace disttrain::comm
