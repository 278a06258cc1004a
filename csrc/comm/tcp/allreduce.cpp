#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "comm/tcp/tcp_collectives.h"

namespace disttrain::comm {
namespace {

// Measured crossover on loopback (scripts/allreduce_crossover.sh writes
// benchmarks/results/allreduce_crossover.csv): at 3 and 4 ranks recursive doubling
// is ahead up to 128 KiB (218 against 279 us at 3 ranks, 324 against 433 at 4),
// about even at 256-512 KiB, and the ring wins from 1 MiB: fewer steps beat
// moving less data per rank below this.
constexpr size_t kRecursiveDoublingMaxBytes = 128 << 10;

struct Segment {
  size_t offset;
  size_t length;
};

// Segment k of count elements split as evenly as possible into p parts.
Segment segment(size_t count, int p, int k, size_t elem) {
  k = ((k % p) + p) % p;
  size_t base = count / p, rem = count % p;
  size_t uk = static_cast<size_t>(k);
  return {(uk * base + std::min(uk, rem)) * elem, (base + (uk < rem ? 1 : 0)) * elem};
}

}  // namespace

AllreduceAlgorithm choose_allreduce(size_t bytes, int world_size) {
  return bytes <= kRecursiveDoublingMaxBytes ? AllreduceAlgorithm::kRecursiveDoubling : AllreduceAlgorithm::kRing;
}

void allreduce(TcpTransport& t, const OpSignature& sig, void* data, size_t count, c10::ScalarType dtype,
               Deadline deadline, AllreduceAlgorithm algorithm) {
  ReduceFn fn = reduce_kernel(dtype, sig.redop);
  size_t elem = c10::elementSize(dtype);
  if (t.world_size() == 1) return;
  if (algorithm == AllreduceAlgorithm::kAuto) algorithm = choose_allreduce(count * elem, t.world_size());
  if (algorithm == AllreduceAlgorithm::kRing) {
    ring_allreduce(t, sig, data, count, elem, fn, deadline);
  } else {
    recursive_doubling_allreduce(t, sig, data, count, elem, fn, deadline);
  }
}

void ring_allreduce(TcpTransport& t, const OpSignature& sig, void* data, size_t count, size_t elem,
                    ReduceFn reduce, Deadline deadline) {
  const int p = t.world_size(), r = t.rank();
  const int right = (r + 1) % p, left = (r - 1 + p) % p;
  auto* bytes = static_cast<uint8_t*>(data);
  uint32_t step = 0;
  std::vector<SendSpec> sends(1);
  std::vector<RecvSpec> recvs(1);
  // Reduce-scatter: after p-1 steps rank r holds the full reduction of segment r+1.
  for (int s = 0; s < p - 1; ++s, ++step) {
    Segment out = segment(count, p, r - s, elem), in = segment(count, p, r - s - 1, elem);
    sends[0] = SendSpec{right, bytes + out.offset, out.length, sig.count};
    recvs[0] = RecvSpec{left, bytes + in.offset, in.length, sig.count, reduce, nullptr, elem};
    t.exchange(FrameKind::kCollective, sig, step, sends, recvs, deadline);
  }
  // All-gather: pass the reduced segments around the ring, straight into place.
  for (int s = 0; s < p - 1; ++s, ++step) {
    Segment out = segment(count, p, r + 1 - s, elem), in = segment(count, p, r - s, elem);
    sends[0] = SendSpec{right, bytes + out.offset, out.length, sig.count};
    recvs[0] = RecvSpec{left, bytes + in.offset, in.length, sig.count};
    t.exchange(FrameKind::kCollective, sig, step, sends, recvs, deadline);
  }
}

// Ranks beyond the largest power of two first fold into a partner and get the
// result back at the end. Every rank combines the same operands (a+b == b+a),
// so all ranks end bit-identical.
void recursive_doubling_allreduce(TcpTransport& t, const OpSignature& sig, void* data, size_t count,
                                  size_t elem, ReduceFn reduce, Deadline deadline) {
  const int p = t.world_size(), r = t.rank();
  int p2 = 1;
  while (p2 * 2 <= p) p2 *= 2;
  const int extra = p - p2;
  const size_t bytes = count * elem;
  std::vector<SendSpec> sends;
  std::vector<RecvSpec> recvs;
  uint32_t step = 0;

  if (extra > 0) {
    sends.clear();
    recvs.clear();
    if (r >= p2) sends.push_back({r - p2, data, bytes, sig.count});
    if (r < extra) recvs.push_back({r + p2, data, bytes, sig.count, reduce, nullptr, elem});
    if (!sends.empty() || !recvs.empty()) t.exchange(FrameKind::kCollective, sig, step, sends, recvs, deadline);
  }
  ++step;
  if (r < p2) {
    // The partner reads what we send while we reduce into data: send a copy.
    std::vector<uint8_t> outgoing(bytes);
    for (int mask = 1; mask < p2; mask <<= 1, ++step) {
      int partner = r ^ mask;
      if (bytes > 0) std::memcpy(outgoing.data(), data, bytes);
      sends.assign(1, SendSpec{partner, outgoing.data(), bytes, sig.count});
      recvs.assign(1, RecvSpec{partner, data, bytes, sig.count, reduce, nullptr, elem});
      t.exchange(FrameKind::kCollective, sig, step, sends, recvs, deadline);
    }
  } else {
    for (int mask = 1; mask < p2; mask <<= 1) ++step;
  }
  if (extra > 0) {
    sends.clear();
    recvs.clear();
    if (r < extra) sends.push_back({r + p2, data, bytes, sig.count});
    if (r >= p2) recvs.push_back({r - p2, data, bytes, sig.count});
    if (!sends.empty() || !recvs.empty()) t.exchange(FrameKind::kCollective, sig, step, sends, recvs, deadline);
  }
}

}  // namespace disttrain::comm
