#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {
namespace {
constexpr size_t kChainMinBytes = 64 << 10;
}

// Small: binomial tree (log p steps). Large: a pipelined chain from the root,
// each rank forwarding every frame as soon as it has landed, so the time is
// about one message transfer regardless of p.
void broadcast(TcpTransport& t, const OpSignature& sig, void* data, size_t bytes, int root, Deadline deadline) {
  const int p = t.world_size();
  if (p == 1) return;
  const int vr = (t.rank() - root + p) % p;
  auto real = [&](int v) { return (v + root) % p; };
  std::vector<SendSpec> sends;
  std::vector<RecvSpec> recvs;
  if (bytes >= kChainMinBytes && p > 2) {
    size_t received = 0;
    if (vr > 0) recvs.push_back({real(vr - 1), data, bytes, sig.count, nullptr, nullptr, 1, &received});
    if (vr < p - 1) sends.push_back({real(vr + 1), data, bytes, sig.count, vr > 0 ? &received : nullptr});
    add_root_check(t, sig, &sends, &recvs);
    t.exchange(FrameKind::kCollective, sig, 0, sends, recvs, deadline);
    return;
  }
  uint32_t step = 0;
  bool first = true;
  for (int mask = 1; mask < p; mask <<= 1, ++step) {
    sends.clear();
    recvs.clear();
    if (vr < mask && vr + mask < p) sends.push_back({real(vr + mask), data, bytes, sig.count});
    if (vr >= mask && vr < 2 * mask) recvs.push_back({real(vr - mask), data, bytes, sig.count});
    if (sends.empty() && recvs.empty()) continue;
    // The root check (tcp_collectives.h): sent in this rank's first exchange; received with
    // the data on the others, in the last exchange on the root.
    const bool receive_check = vr == 0 ? (mask << 1) >= p : !recvs.empty();
    add_root_check(t, sig, first ? &sends : nullptr, receive_check ? &recvs : nullptr);
    first = false;
    t.exchange(FrameKind::kCollective, sig, step, sends, recvs, deadline);
  }
}

}  // namespace disttrain::comm
