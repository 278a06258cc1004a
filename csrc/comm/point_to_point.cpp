#include <cstring>

#include "comm/collectives.h"

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

void gather(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t bytes, int root,
            Deadline deadline) {
  const int p = t.world_size(), r = t.rank();
  std::vector<SendSpec> sends;
  std::vector<RecvSpec> recvs;
  if (r == root) {
    auto* o = static_cast<uint8_t*>(out);
    if (bytes > 0 && o + r * bytes != in) std::memmove(o + r * bytes, in, bytes);
    for (int q = 0; q < p; ++q)
      if (q != r) recvs.push_back({q, o + q * bytes, bytes, sig.count});
  } else {
    sends.push_back({root, in, bytes, sig.count});
  }
  if (p > 1) t.exchange(FrameKind::kCollective, sig, 0, sends, recvs, deadline);
}

void scatter(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t bytes, int root,
             Deadline deadline) {
  const int p = t.world_size(), r = t.rank();
  std::vector<SendSpec> sends;
  std::vector<RecvSpec> recvs;
  if (r == root) {
    auto* i = static_cast<const uint8_t*>(in);
    if (bytes > 0 && i + r * bytes != out) std::memmove(out, i + r * bytes, bytes);
    for (int q = 0; q < p; ++q)
      if (q != r) sends.push_back({q, i + q * bytes, bytes, sig.count});
  } else {
    recvs.push_back({root, out, bytes, sig.count});
  }
  if (p > 1) t.exchange(FrameKind::kCollective, sig, 0, sends, recvs, deadline);
}

}  // namespace disttrain::comm
