#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {

void send(TcpTransport& t, const OpSignature& sig, const void* data, size_t bytes, int dst, Deadline deadline) {
  std::vector<SendSpec> sends{{dst, data, bytes, sig.count}};
  std::vector<RecvSpec> recvs;
  t.exchange(FrameKind::kPointToPoint, sig, 0, sends, recvs, deadline);
}

void recv(TcpTransport& t, const OpSignature& sig, void* data, size_t bytes, int src, Deadline deadline) {
  std::vector<SendSpec> sends;
  std::vector<RecvSpec> recvs{{src, data, bytes, sig.count}};
  t.exchange(FrameKind::kPointToPoint, sig, 0, sends, recvs, deadline);
}

}  // namespace disttrain::comm
