// Collectives over ShmGroup. Each works in epochs of at most one slot of data
// per rank; every epoch checks every rank's signature before any data is used.
#include <algorithm>
#include <cstring>

#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include "comm/shm/shm_collectives.h"
#include "comm/shm/shm_group.h"

namespace disttrain::comm {
namespace {

// Below this, every rank reduces the whole buffer itself (one phase); above,
// each rank reduces a 1/p slice and the slices are gathered (two phases).
constexpr size_t kDirectReduceMaxBytes = 32 << 10;

struct Slice {
  size_t offset, length;  // elements
};

Slice slice(size_t n, int p, int k) {
  size_t base = n / p, rem = n % p, uk = static_cast<size_t>(k);
  return {uk * base + std::min(uk, rem), base + (uk < rem ? 1 : 0)};
}

// Block of the blocked reductions below: small enough that the destination
// block stays in L1 while every source is folded into it.
constexpr size_t kReduceBlockBytes = 8 << 10;

// x[i] /= d. For a power of two d, 1/d is exact and x * (1/d) == x / d bit
// for bit (scaling by a power of two only changes the exponent, including
// into subnormals: both round the same exact value once), and a multiply
// costs a fraction of a divide (measured: AVG of 75 MB at 2 ranks spent 6 ms
// more than SUM, all in the divides).
template <typename T>
void divide_block(T* x, size_t n, int d) {
  if ((d & (d - 1)) == 0) {
    const T inv = T(1) / static_cast<T>(d);
    for (size_t i = 0; i < n; ++i) x[i] *= inv;
  } else {
    const T div = static_cast<T>(d);
    for (size_t i = 0; i < n; ++i) x[i] /= div;
  }
}

// dst = srcs[0] op srcs[1] op ... (in that order, so every rank computes the
// same bits), block by block: dst is written once per block instead of once
// per source. With `copy_to`, each finished block is also copied there while
// it is still in cache. dst may alias srcs[0].
// With `divide_by` > 0 (float32 or float64 only), each finished block is
// divided by it (AVG) while in cache. With `consume`, each finished block is
// then handed to it (at byte offset `consume_at` + the block's).
void reduce_blocked(ReduceFn fn, uint8_t* dst, c10::ArrayRef<const uint8_t*> srcs, size_t count, size_t elem,
                    uint8_t* copy_to = nullptr, c10::ScalarType dtype = c10::ScalarType::Undefined, int divide_by = 0,
                    const BlockConsumer* consume = nullptr, size_t consume_at = 0) {
  const size_t block = std::max<size_t>(1, kReduceBlockBytes / elem);
  for (size_t at = 0; at < count; at += block) {
    const size_t n = std::min(block, count - at), off = at * elem;
    fn(dst + off, srcs[0] + off, srcs[1] + off, n);
    for (size_t q = 2; q < srcs.size(); ++q) fn(dst + off, dst + off, srcs[q] + off, n);
    if (divide_by > 0) {
      if (dtype == c10::ScalarType::Float) {
        divide_block(reinterpret_cast<float*>(dst + off), n, divide_by);
      } else {
        TORCH_INTERNAL_ASSERT(dtype == c10::ScalarType::Double, "fused AVG on ", dtype);
        divide_block(reinterpret_cast<double*>(dst + off), n, divide_by);
      }
    }
    if (consume) (*consume)(consume_at + off, dst + off, n * elem);
    if (copy_to) std::memcpy(copy_to + off, dst + off, n * elem);
  }
}

// Segments read and written as one virtual buffer.
class Scattered {
 public:
  explicit Scattered(c10::ArrayRef<MemoryPiece> segments) {
    size_t at = 0;
    for (const auto& s : segments) {
      if (s.bytes == 0) continue;
      segments_.push_back(s);
      starts_.push_back(at);
      at += s.bytes;
    }
  }
  void gather(size_t offset, size_t bytes, uint8_t* dst) const {
    for_range(offset, bytes, [&](uint8_t* p, size_t n, size_t at) { std::memcpy(dst + at, p, n); });
  }
  void scatter(size_t offset, size_t bytes, const uint8_t* src) const {
    for_range(offset, bytes, [&](uint8_t* p, size_t n, size_t at) { std::memcpy(p, src + at, n); });
  }
  // The address of [offset, offset + bytes) when it lies within one segment, else nullptr.
  uint8_t* contiguous(size_t offset, size_t bytes) const {
    if (bytes == 0) return nullptr;
    const size_t i = segment_at(offset), inside = offset - starts_[i];
    return inside + bytes <= segments_[i].bytes ? segments_[i].data + inside : nullptr;
  }

 private:
  size_t segment_at(size_t offset) const {
    return static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), offset) - starts_.begin()) - 1;
  }
  // f(address, bytes, position in the range) for each segment piece of [offset, offset + bytes).
  template <class F>
  void for_range(size_t offset, size_t bytes, F f) const {
    if (bytes == 0) return;
    size_t i = segment_at(offset);
    for (size_t done = 0; done < bytes; ++i) {
      const size_t inside = offset + done - starts_[i];
      const size_t n = std::min(segments_[i].bytes - inside, bytes - done);
      f(segments_[i].data + inside, n, done);
      done += n;
    }
  }
  // Inline for the usual one to a few tensors: a small all-reduce allocates nothing here.
  c10::SmallVector<MemoryPiece, 4> segments_;
  c10::SmallVector<size_t, 4> starts_;
};

}  // namespace

void shm_allreduce(ShmGroup& g, const OpSignature& sig, c10::ArrayRef<MemoryPiece> pieces, size_t count,
                   c10::ScalarType dtype, bool divide, Deadline deadline, const BlockConsumer& consume) {
  const ReduceFn fn = reduce_kernel(dtype, sig.redop);
  const size_t elem = c10::elementSize(dtype);
  const int p = g.size(), r = g.rank(), divide_by = divide ? p : 0;
  const Scattered user(pieces);
  const size_t max_elems = g.slot_bytes() / elem;
  c10::SmallVector<const uint8_t*, 8> slots(p);
  std::vector<uint8_t> scratch;
  size_t offset = 0;
  do {
    const size_t n = std::min(count - offset, max_elems), base = offset * elem;
    uint8_t* mine = g.begin(sig, deadline);
    if (n * elem <= kDirectReduceMaxBytes) {
      user.gather(base, n * elem, mine);
      g.publish();
      // Everyone combines the slots in rank order: identical results everywhere.
      for (int q = 0; q < p; ++q) slots[q] = q == r ? mine : g.peer(q);
      uint8_t* out = user.contiguous(base, n * elem);
      if (!out) {
        scratch.resize(n * elem);
        out = scratch.data();
      }
      reduce_blocked(fn, out, slots, n, elem, nullptr, dtype, divide_by, consume ? &consume : nullptr, base);
      if (out == scratch.data() && !consume) user.scatter(base, n * elem, out);
    } else {
      // Only the slices the others reduce go through the slot on the way in;
      // this rank's own slice is reduced where it is, then shared, unless it
      // spans two tensors: then it is reduced in the slot and copied back.
      Slice s = slice(n, p, r);
      uint8_t* own = user.contiguous(base + s.offset * elem, s.length * elem);
      for (int q = 0; q < p; ++q) {
        Slice t = slice(n, p, q);
        if (q != r || !own) user.gather(base + t.offset * elem, t.length * elem, mine + t.offset * elem);
      }
      g.publish();
      uint8_t* in_slot = mine + s.offset * elem;
      uint8_t* dst = own ? own : in_slot;
      // This rank's slice first, then the others' in rank order.
      slots[0] = dst;
      for (int q = 0, k = 1; q < p; ++q)
        if (q != r) slots[k++] = g.peer(q) + s.offset * elem;
      reduce_blocked(fn, dst, slots, s.length, elem, own ? in_slot : nullptr, dtype, divide_by,
                     consume ? &consume : nullptr, base + s.offset * elem);
      g.mark_reduced();
      for (int q = 0; q < p; ++q) {
        Slice t = slice(n, p, q);
        if (consume) {  // this rank's slice was handed over as it was reduced
          if (q != r) consume(base + t.offset * elem, g.reduced(q) + t.offset * elem, t.length * elem);
        } else if (q != r || !own)
          user.scatter(base + t.offset * elem, t.length * elem, (q == r ? mine : g.reduced(q)) + t.offset * elem);
      }
    }
    g.finish();
    offset += n;
  } while (offset < count);
}

void shm_allreduce(ShmGroup& g, const OpSignature& sig, void* data, size_t count, c10::ScalarType dtype,
                   Deadline deadline) {
  const MemoryPiece whole{static_cast<uint8_t*>(data), count * c10::elementSize(dtype)};
  shm_allreduce(g, sig, c10::ArrayRef<MemoryPiece>(whole), count, dtype,
                /*divide=*/false, deadline);
}

void shm_broadcast(ShmGroup& g, const OpSignature& sig, void* data, size_t bytes, int root, Deadline deadline) {
  const int p = g.size(), r = g.rank();
  auto* out = static_cast<uint8_t*>(data);
  size_t offset = 0;
  do {
    const size_t n = std::min(bytes - offset, g.slot_bytes());
    uint8_t* mine = g.begin(sig, deadline);
    if (r == root && n > 0) std::memcpy(mine, out + offset, n);
    g.publish();
    for (int q = 0; q < p; ++q) {
      if (q == r) continue;
      const uint8_t* src = g.peer(q);
      if (q == root && n > 0) std::memcpy(out + offset, src, n);
    }
    g.finish();
    offset += n;
  } while (offset < bytes);
}

void shm_allgather(ShmGroup& g, const OpSignature& sig, const void* in, void* out, size_t bytes_per_rank,
                   Deadline deadline) {
  const int p = g.size(), r = g.rank();
  auto* src_all = static_cast<const uint8_t*>(in);
  auto* dst_all = static_cast<uint8_t*>(out);
  size_t offset = 0;
  do {
    const size_t n = std::min(bytes_per_rank - offset, g.slot_bytes());
    uint8_t* mine = g.begin(sig, deadline);
    if (n > 0) std::memcpy(mine, src_all + offset, n);
    g.publish();
    for (int q = 0; q < p; ++q) {
      const uint8_t* src = q == r ? mine : g.peer(q);
      if (n > 0) std::memcpy(dst_all + q * bytes_per_rank + offset, src, n);
    }
    g.finish();
    offset += n;
  } while (offset < bytes_per_rank);
}

void shm_reduce_scatter(ShmGroup& g, const OpSignature& sig, const void* in, void* out, size_t count,
                        c10::ScalarType dtype, Deadline deadline) {
  const ReduceFn fn = reduce_kernel(dtype, sig.redop);
  const size_t elem = c10::elementSize(dtype);
  const int p = g.size(), r = g.rank();
  auto* input = static_cast<const uint8_t*>(in);
  auto* output = static_cast<uint8_t*>(out);
  const size_t max_elems = std::max<size_t>(1, g.slot_bytes() / (elem * p));
  size_t offset = 0;
  c10::SmallVector<const uint8_t*, 8> slots(p);
  do {
    const size_t n = std::min(count - offset, max_elems);
    uint8_t* mine = g.begin(sig, deadline);
    for (int b = 0; b < p && n > 0; ++b) std::memcpy(mine + b * n * elem, input + (b * count + offset) * elem, n * elem);
    g.publish();
    for (int q = 0; q < p; ++q) slots[q] = (q == r ? mine : g.peer(q)) + r * n * elem;
    reduce_blocked(fn, output + offset * elem, slots, n, elem);
    g.finish();
    offset += n;
  } while (offset < count);
}

void shm_barrier(ShmGroup& g, const OpSignature& sig, Deadline deadline) {
  g.begin(sig, deadline);
  g.publish();
  for (int q = 0; q < g.size(); ++q)
    if (q != g.rank()) g.peer(q);
  g.finish();
}

}  // namespace disttrain::comm
