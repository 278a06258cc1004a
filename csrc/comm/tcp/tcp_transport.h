// TCP transport: a full mesh of non-blocking sockets between the ranks of one
// group, set up through the c10d::Store torch hands the backend, and an
// exchange engine that runs the sends and receives of one algorithm step at
// the same time (full duplex), in frames, reducing each frame as it lands.
#pragma once
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/tcp/frame.h"
#include "comm/op_signature.h"
#include "comm/kernels/reduce_kernels.h"

namespace disttrain::comm {

using Clock = std::chrono::steady_clock;
using Deadline = Clock::time_point;

struct SendSpec {
  int peer;
  const void* data;
  size_t bytes;
  uint64_t count;                     // signature count announced to the peer
  const size_t* available = nullptr;  // when set, only the first *available bytes may go yet
  // When set, this message's own signature (a batch of point-to-point
  // messages, each with its pair's sequence number and tag); else the exchange's.
  const OpSignature* sig = nullptr;
  // When set, this message's step; else the exchange's (the root check of a
  // rooted op rides in each rank's first exchange, whatever its step).
  const uint32_t* step = nullptr;
};

struct RecvSpec {
  int peer;
  void* dst;
  size_t bytes;
  uint64_t count;              // signature count this rank expects from the peer
  ReduceFn reduce = nullptr;   // when set: dst = reduce(base or dst, incoming)
  const void* base = nullptr;
  size_t elem_size = 1;
  size_t* progress = nullptr;  // updated with the bytes of dst that are final
  const OpSignature* sig = nullptr;  // as SendSpec::sig
  const uint32_t* step = nullptr;    // as SendSpec::step
};

// How long a connection during set-up may take to present its hello, in all
// (not per byte): a stranger that dribbles, stalls or sends garbage is dropped
// by then, and connections are read side by side, so none delays another.
constexpr std::chrono::milliseconds kHelloDeadline{2000};
// Connections read side by side during set-up at most; more are dropped at once.
constexpr size_t kMaxPendingHellos = 64;

// How a transport sizes its frames and sockets and which address it
// advertises; parsed once into CommOptions (comm/options.h).
struct TcpSettings {
  size_t chunk_bytes = kDefaultChunkBytes;  // payload of one frame
  int socket_buffer_bytes = 0;              // SO_SNDBUF/SO_RCVBUF; 0: the kernel autotunes (faster on loopback)
  std::string socket_addr;                  // the address other hosts reach this rank at; empty: see master_addr
  std::string master_addr;                  // the route to it picks the local address; empty: 127.0.0.1
};

class TcpTransport {
 public:
  // Connects to every other rank; requires all ranks of the group to call it.
  // Throws DistBackendError naming the missing ranks if that takes longer than timeout.
  // abort_store, when given, is where failures are recorded (a group built of
  // several transports shares one, so every rank reports the same failure).
  TcpTransport(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
               std::chrono::milliseconds timeout, TcpSettings settings = {},
               c10::intrusive_ptr<c10d::Store> abort_store = {});
  ~TcpTransport();
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  size_t chunk_bytes() const { return settings_.chunk_bytes; }
  const std::string& address() const { return address_; }

  // Runs one step's sends and receives concurrently until all are complete.
  // Every send emits at least one frame, so even empty messages are checked
  // against the receiver's signature. Several sends to one peer (or receives
  // from one) run one after the other, in list order; sends and receives and
  // different peers run side by side. On a mismatch, a lost peer or the
  // deadline, the whole group is aborted (see abort) and this throws.
  void exchange(FrameKind kind, const OpSignature& sig, uint32_t step,
                std::vector<SendSpec>& sends, std::vector<RecvSpec>& recvs, Deadline deadline);

  // For a receive from any source: waits until some peer's next frame (in
  // its stream's order) is a point-to-point frame with the tag `sig.aux`, and
  // returns that peer. Only the frame's header is read; the frame stays queued
  // for the exchange() that receives it, which checks the rest of the
  // signature (dtype, element count, the pair's sequence number). A peer
  // whose next frame is anything else (a collective it is ahead in, another
  // tag) cannot send a match before this receive ends: it is passed over, and
  // when every peer is passed over or gone this aborts the group naming what
  // each one sent. At the deadline it aborts with a timeout, like exchange().
  // Peers are tried in turn from the one after the last match, so no sender starves.
  int first_sender(const OpSignature& sig, Deadline deadline);

  // Records the first failure of the group in the store (so that every rank
  // raises the same message), shuts every connection down and throws it.
  [[noreturn]] void abort(const std::string& reason);
  // The same without throwing: for tearing down the sibling transports of a failed one.
  void abort_quietly(const std::string& reason);
  // Local teardown (the group is being destroyed): fails whatever op is in
  // progress with `reason` at once, without recording anything in the store
  // (which may be gone at exit; peers see their connections close). Thread-safe.
  void shut_down(const std::string& reason);
  // Stops the acceptor thread and closes every socket; idempotent. Only once
  // no op runs any more (the destructor calls it too).
  void close();
  bool aborted() const { return aborted_.load(); }
  std::string abort_reason() const;
  // Throws the recorded failure if the group was aborted before (or shut down).
  void check_alive() const;

  // False once the connection to `peer` has closed (the process exited or was
  // killed): for set-up steps beside this transport, which raise their own error.
  bool peer_connected(int peer) const;
  // Raises (after aborting the group) if the connection to `peer` has closed:
  // how waits that do not read from sockets notice a dead peer.
  void check_peer(int peer, const OpSignature& sig);
  // Error messages name ranks of the whole process group: a transport over a
  // subset of it (one host, or the hosts' leaders) is told their numbers.
  void set_group_ranks(std::vector<int> group_ranks) { group_ranks_ = std::move(group_ranks); }
  int group_rank(int r) const { return group_ranks_.empty() ? r : group_ranks_[r]; }

  // Connection attempts rejected since set-up began (bad secret, rank or world
  // size, a rank already connected, garbage, too slow, or late).
  uint64_t rejected_connections() const { return rejected_.load(); }

 private:
  struct InFrame {
    FrameHeader hdr;
    std::vector<uint8_t> payload;
  };
  struct Peer {
    int fd = -1;
    bool closed = false;
    std::deque<InFrame> backlog;  // frames read ahead of the receive they belong to
    InFrame partial_frame;        // the backlog frame being read
    size_t hdr_got = 0;
    size_t payload_got = 0;
    bool mid_frame() const { return hdr_got > 0; }
  };
  struct SendState;
  struct RecvState;

  void setup_mesh(std::chrono::milliseconds timeout);
  void accept_loop();
  // Whether a complete hello is from a rank this one still expects (then the
  // connection becomes that rank's, acknowledged).
  bool accept_hello(int fd, const HelloMessage& hello);
  bool do_send(SendState& s, const FrameKind kind, const OpSignature& sig, uint32_t step);
  void do_recv(RecvState& r, FrameKind kind, const OpSignature& sig, uint32_t step);
  void read_ahead(int peer, const OpSignature& sig);
  // The next frame's header from `peer` into its partial frame, without
  // blocking; true once it is complete (checked, payload sized).
  bool read_header(int peer, const OpSignature& sig);
  // The header of the next frame from `peer`, reading no further than its end
  // without blocking; nullptr while it has not fully arrived (or the peer closed).
  const FrameHeader* peek_header(int peer, const OpSignature& sig);
  void accept_header(RecvState& r, const FrameHeader& h, FrameKind kind, const OpSignature& sig,
                     uint32_t step);
  void consume_payload(RecvState& r, const uint8_t* data, size_t len);
  [[noreturn]] void lost_peer(int peer, const OpSignature& sig, const char* what);
  // A connection closed or failed under an op: our own teardown's reason if
  // we shut down, else the failure a peer recorded, else "rank q closed it".
  [[noreturn]] void connection_lost(int peer, const OpSignature& sig, const char* what);
  // Sets the failure (first one wins) and shuts every connection down.
  void mark_aborted(const std::string& reason, bool local);
  std::string recorded_abort_reason();

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Store> abort_store_;
  int rank_;
  int world_size_;
  TcpSettings settings_;
  std::vector<Peer> peers_;
  std::vector<int> group_ranks_;
  std::vector<uint8_t> scratch_;
  int next_any_source_ = 0;  // first_sender() starts looking here
  std::string address_;
  uint8_t secret_[16];

  int listen_fd_ = -1;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};
  std::atomic<bool> setup_done_{false};
  std::mutex setup_mu_;  // guards peers_[*].fd during setup
  std::atomic<uint64_t> rejected_{0};

  std::atomic<bool> aborted_{false};
  std::atomic<bool> shut_down_{false};  // aborted by our own teardown, not a failure
  mutable std::mutex abort_mu_;
  std::string abort_reason_;
  bool closed_ = false;
};

}  // namespace disttrain::comm
