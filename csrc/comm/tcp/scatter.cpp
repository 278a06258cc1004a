#include <cstring>

#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {

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
  if (p == 1) return;
  add_root_check(t, sig, &sends, &recvs);
  t.exchange(FrameKind::kCollective, sig, 0, sends, recvs, deadline);
}

}  // namespace disttrain::comm
