// The collective algorithms, one free function each, over a TcpTransport.
// Every rank of the group calls the same function with the same signature;
// buffers are contiguous host memory. All functions throw DistBackendError
// (after aborting the group) on mismatch, a lost peer or the deadline.
#pragma once
#include <c10/core/ScalarType.h>

#include <vector>

#include "comm/tcp/tcp_transport.h"

namespace disttrain::comm {

enum class AllreduceAlgorithm { kAuto, kRing, kRecursiveDoubling };

// Picks an algorithm for `bytes` on this group: recursive doubling (log p
// steps, whole buffer each) for small messages, ring (2(p-1) steps, 1/p of the
// buffer each) for large ones. The allreduce_algorithm option forces one.
AllreduceAlgorithm choose_allreduce(size_t bytes, int world_size);

// In place: data holds count elements of dtype on every rank.
void allreduce(TcpTransport& t, const OpSignature& sig, void* data, size_t count, c10::ScalarType dtype,
               Deadline deadline, AllreduceAlgorithm algorithm = AllreduceAlgorithm::kAuto);
void ring_allreduce(TcpTransport& t, const OpSignature& sig, void* data, size_t count, size_t elem_size,
                    ReduceFn reduce, Deadline deadline);
void recursive_doubling_allreduce(TcpTransport& t, const OpSignature& sig, void* data, size_t count,
                                  size_t elem_size, ReduceFn reduce, Deadline deadline);

// The rooted ops below check that every rank names the same root: an empty
// frame to and from every other rank (root_check.cpp). On a disagreement every
// rank raises the collective mismatch, in that op. The frames are put ahead of
// an exchange's messages (null: not in this exchange): the sends in a rank's
// first exchange of the op, so that they go ahead of any data to a peer; the
// receives in its first exchange that receives data (ahead of a peer's data,
// which follows that peer's frame), or, on a rank that receives none, its
// last one (a broadcast's root is not held up by the check before it has sent).
void add_root_check(TcpTransport& t, const OpSignature& sig, std::vector<SendSpec>* sends,
                    std::vector<RecvSpec>* recvs);

// data holds bytes on every rank; root's content ends up everywhere.
void broadcast(TcpTransport& t, const OpSignature& sig, void* data, size_t bytes, int root, Deadline deadline);

// out holds world_size blocks of bytes_per_rank; block r comes from rank r's `in`.
void allgather(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t bytes_per_rank,
               Deadline deadline);

// in holds world_size blocks of count elements; out gets the reduction of block `rank`.
void reduce_scatter(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t count,
                    c10::ScalarType dtype, Deadline deadline);

// Rank r sends send_bytes[d] bytes at in + send_offset[d] to each rank d and
// receives recv_bytes[s] bytes from each rank s into out + recv_offset[s].
void alltoall(TcpTransport& t, const OpSignature& sig, const void* in, const std::vector<size_t>& send_offset,
              const std::vector<size_t>& send_bytes, void* out, const std::vector<size_t>& recv_offset,
              const std::vector<size_t>& recv_bytes, size_t elem_size, Deadline deadline);

// Root receives world_size blocks of `bytes` into out (block r from rank r).
void gather(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t bytes, int root,
            Deadline deadline);
// Root sends block r of in to rank r; every rank receives into out.
void scatter(TcpTransport& t, const OpSignature& sig, const void* in, void* out, size_t bytes, int root,
             Deadline deadline);

// Point to point; sig.seq is the per-pair message number, sig.aux the tag.
void send(TcpTransport& t, const OpSignature& sig, const void* data, size_t bytes, int dst, Deadline deadline);
void recv(TcpTransport& t, const OpSignature& sig, void* data, size_t bytes, int src, Deadline deadline);

}  // namespace disttrain::comm
