#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {
namespace {
// The root check's frames carry this step in whichever exchange they ride.
constexpr uint32_t kRootCheckStep = 0;
}  // namespace

// A rooted op's frames flow only from the root (broadcast, scatter) or only to
// it (gather), so ranks that disagree on the root may never read a frame of a
// rank they disagree with: two ranks that each think they are the root both
// send and return (a silently wrong broadcast or scatter), or both wait (a
// gather that hangs until the timeout). Every frame carries the signature,
// root included, so an empty frame from each rank to every other settles it:
// unless all agree, every rank has a peer that disagrees with it, so every
// rank raises the mismatch in this op (a ring of frames would catch it too,
// but a rank whose neighbour agreed would go on and return as if nothing were
// wrong). The frames ride in the op's own exchanges, so they cost no round of
// their own: see tcp_collectives.h for where.
void add_root_check(TcpTransport& t, const OpSignature& sig, std::vector<SendSpec>* sends,
                    std::vector<RecvSpec>* recvs) {
  const int p = t.world_size(), r = t.rank();
  std::vector<SendSpec> check_sends;
  std::vector<RecvSpec> check_recvs;
  for (int q = 0; q < p; ++q) {
    if (q == r) continue;
    check_sends.push_back({q, nullptr, 0, sig.count, nullptr, nullptr, &kRootCheckStep});
    check_recvs.push_back({q, nullptr, 0, sig.count, nullptr, nullptr, 1, nullptr, nullptr, &kRootCheckStep});
  }
  if (sends) sends->insert(sends->begin(), check_sends.begin(), check_sends.end());
  if (recvs) recvs->insert(recvs->begin(), check_recvs.begin(), check_recvs.end());
}

}  // namespace disttrain::comm
