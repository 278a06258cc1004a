// The same-host collectives over a ShmGroup's shared memory, one free function
// each. Same contracts as the TCP algorithms in comm/tcp/tcp_collectives.h:
// every rank calls the same function with the same signature, buffers are
// contiguous host memory, and a mismatch, a lost peer or the deadline throws
// DistBackendError on every rank.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "comm/shm/shm_group.h"

namespace disttrain::comm {
void shm_allreduce(ShmGroup& g, const OpSignature& sig, void* data, size_t count, c10::ScalarType dtype,
                   Deadline deadline);
void shm_broadcast(ShmGroup& g, const OpSignature& sig, void* data, size_t bytes, int root, Deadline deadline);
void shm_allgather(ShmGroup& g, const OpSignature& sig, const void* in, void* out, size_t bytes_per_rank,
                   Deadline deadline);
void shm_reduce_scatter(ShmGroup& g, const OpSignature& sig, const void* in, void* out, size_t count,
                        c10::ScalarType dtype, Deadline deadline);
void shm_barrier(ShmGroup& g, const OpSignature& sig, Deadline deadline);

// One piece of a buffer made of several tensors' memory.
struct MemoryPiece {
  uint8_t* data;
  size_t bytes;
};
// shm_allreduce of `count` elements held in `pieces`, read and written where
// they are (the tensors of an all_reduce_coalesced: no flattened copy). With
// `divide`, every element ends divided by the world size (AVG) inside the
// reduction; it requires float32 or float64, and every rank must pass the same.
//
// With `consume`, the result is handed over instead of written back: every
// byte range of the reduced buffer is passed once, as consume(offset into the
// virtual buffer, the reduced bytes, their length), each while it is still in
// cache where that can be; the pieces then hold unspecified values. The
// ranks need not agree on it (the same bytes travel either way).
using BlockConsumer = std::function<void(size_t offset, const uint8_t* reduced, size_t bytes)>;
void shm_allreduce(ShmGroup& g, const OpSignature& sig, c10::ArrayRef<MemoryPiece> pieces, size_t count,
                   c10::ScalarType dtype, bool divide, Deadline deadline, const BlockConsumer& consume = {});
}  // namespace disttrain::comm
