#include <cstring>

#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {

// Ring: at step s rank r forwards block r-s to the right and receives block
// r-s-1 from the left, straight into its place in out.
void allgather(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t bytes_per_rank,
               Deadline deadline) {
  const int p = t.world_size(), r = t.rank();
  auto* o = static_cast<uint8_t*>(out);
  auto block = [&](int k) { return o + static_cast<size_t>(((k % p) + p) % p) * bytes_per_rank; };
  if (block(r) != in && bytes_per_rank > 0) std::memmove(block(r), in, bytes_per_rank);
  if (p == 1) return;
  std::vector<SendSpec> sends(1);
  std::vector<RecvSpec> recvs(1);
  for (int s = 0; s < p - 1; ++s) {
    sends[0] = SendSpec{(r + 1) % p, block(r - s), bytes_per_rank, sig.count};
    recvs[0] = RecvSpec{(r - 1 + p) % p, block(r - s - 1), bytes_per_rank, sig.count};
    t.exchange(FrameKind::kCollective, sig, static_cast<uint32_t>(s), sends, recvs, deadline);
  }
}

}  // namespace disttrain::comm
