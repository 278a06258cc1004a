#include <cstring>

#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {

// Pairwise exchange: at step s rank r sends to r+s and receives from r-s, so
// every step is a permutation and no rank ever waits on two others.
void alltoall(TcpTransport& t, const OpSignature& sig, const void* in, const std::vector<size_t>& send_offset,
              const std::vector<size_t>& send_bytes, void* out, const std::vector<size_t>& recv_offset,
              const std::vector<size_t>& recv_bytes, size_t elem_size, Deadline deadline) {
  const int p = t.world_size(), r = t.rank();
  auto* src = static_cast<const uint8_t*>(in);
  auto* dst = static_cast<uint8_t*>(out);
  TORCH_CHECK_VALUE(send_bytes[r] == recv_bytes[r], "disttrain: all_to_all: rank ", r, " sends ",
                    send_bytes[r] / elem_size, " elements to itself but expects ", recv_bytes[r] / elem_size);
  if (send_bytes[r] > 0) std::memmove(dst + recv_offset[r], src + send_offset[r], send_bytes[r]);
  std::vector<SendSpec> sends(1);
  std::vector<RecvSpec> recvs(1);
  // Each message also carries (aux) the count its sender expects back from the receiver, and
  // each receive expects there the count this rank sends that peer: when a pair's ranks disagree
  // on their split sizes, both raise the mismatch in this op. The count alone told only the rank
  // that received the wrong amount; the other returned, and raised at its next op.
  OpSignature send_sig = sig, recv_sig = sig;
  for (int s = 1; s < p; ++s) {
    int to = (r + s) % p, from = (r - s + p) % p;
    send_sig.aux = static_cast<int64_t>(recv_bytes[to] / elem_size);
    recv_sig.aux = static_cast<int64_t>(send_bytes[from] / elem_size);
    sends[0] = SendSpec{to, src + send_offset[to], send_bytes[to], send_bytes[to] / elem_size};
    sends[0].sig = &send_sig;
    recvs[0] = RecvSpec{from, dst + recv_offset[from], recv_bytes[from], recv_bytes[from] / elem_size};
    recvs[0].sig = &recv_sig;
    t.exchange(FrameKind::kCollective, sig, static_cast<uint32_t>(s), sends, recvs, deadline);
  }
}

}  // namespace disttrain::comm
