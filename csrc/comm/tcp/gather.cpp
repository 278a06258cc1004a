#include <cstring>

#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {

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
  if (p == 1) return;
  add_root_check(t, sig, &sends, &recvs);
  t.exchange(FrameKind::kCollective, sig, 0, sends, recvs, deadline);
}

}  // namespace disttrain::comm
