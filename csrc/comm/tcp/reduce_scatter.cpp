#include <cstring>

#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {

// Ring: at step s rank r sends its partial sum of block r-s-1 to the right
// and folds the left neighbour's partial of block r-s-2 into its own input,
// so after p-1 steps block r is complete. The input is never written.
void reduce_scatter(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t count,
                    c10::ScalarType dtype, Deadline deadline) {
  const int p = t.world_size(), r = t.rank();
  ReduceFn reduce = reduce_kernel(dtype, sig.redop);
  const size_t elem = c10::elementSize(dtype), bytes = count * elem;
  auto* input = static_cast<const uint8_t*>(in);
  if (p == 1) {
    if (bytes > 0 && out != in) std::memmove(out, in, bytes);
    return;
  }
  auto idx = [&](int k) { return static_cast<size_t>(((k % p) + p) % p); };
  std::vector<uint8_t> partial(bytes * p);
  std::vector<SendSpec> sends(1);
  std::vector<RecvSpec> recvs(1);
  for (int s = 0; s < p - 1; ++s) {
    size_t send_blk = idx(r - s - 1), recv_blk = idx(r - s - 2);
    const uint8_t* src = s == 0 ? input + send_blk * bytes : partial.data() + send_blk * bytes;
    uint8_t* dst = s == p - 2 ? static_cast<uint8_t*>(out) : partial.data() + recv_blk * bytes;
    sends[0] = SendSpec{(r + 1) % p, src, bytes, sig.count};
    recvs[0] = RecvSpec{(r - 1 + p) % p, dst, bytes, sig.count, reduce, input + recv_blk * bytes, elem};
    t.exchange(FrameKind::kCollective, sig, static_cast<uint32_t>(s), sends, recvs, deadline);
  }
}

}  // namespace disttrain::comm
