#include "comm/tcp/tcp_transport.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <random>
#include <set>
#include <sstream>

#include "comm/tcp/socket_util.h"
#include "comm/thread_util.h"

namespace disttrain::comm {
namespace {

const char* kSecretKey = "disttrain/secret";
const char* kAbortKey = "disttrain/abort";

std::string addr_key(int rank) { return "disttrain/addr/" + std::to_string(rank); }

std::string to_string(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::vector<uint8_t> to_bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

int ms_until(Deadline deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  return static_cast<int>(std::clamp<int64_t>(left, 0, 1000 * 1000));
}

}  // namespace

struct TcpTransport::SendState {
  SendSpec spec;
  size_t sent = 0;
  bool any_frame = false;
  FrameHeader hdr{};
  size_t hdr_left = 0;
  size_t frame_left = 0;
  bool done = false;
};

struct TcpTransport::RecvState {
  RecvSpec spec;
  size_t received = 0;
  bool any_frame = false;
  FrameHeader hdr{};
  size_t hdr_got = 0;
  size_t frame_len = 0;
  size_t frame_left = 0;
  uint8_t* scratch = nullptr;
  bool done = false;
};

TcpTransport::TcpTransport(c10::intrusive_ptr<c10d::Store> store, int rank, int world_size,
                           std::chrono::milliseconds timeout, TcpSettings settings,
                           c10::intrusive_ptr<c10d::Store> abort_store)
    : store_(std::move(store)),
      abort_store_(abort_store ? std::move(abort_store) : store_),
      rank_(rank),
      world_size_(world_size),
      settings_(std::move(settings)) {
  TORCH_CHECK_VALUE(world_size >= 1, "disttrain: world size must be >= 1, got ", world_size);
  TORCH_CHECK_VALUE(rank >= 0 && rank < world_size, "disttrain: rank ", rank,
                    " outside [0, ", world_size, ")");
  peers_.resize(world_size);
  if (world_size == 1) return;
  try {
    setup_mesh(timeout);
  } catch (...) {
    // No destructor runs for a half-built object: stop the acceptor here.
    close();
    throw;
  }
}

TcpTransport::~TcpTransport() { close(); }

void TcpTransport::close() {
  if (closed_) return;
  closed_ = true;
  stopping_ = true;
  // Wakes the acceptor's poll at once (a listening socket shut down reports a hang-up).
  if (listen_fd_ >= 0) ::shutdown(listen_fd_, SHUT_RDWR);
  join_or_detach(acceptor_);
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  std::lock_guard<std::mutex> lock(setup_mu_);
  for (auto& p : peers_) {
    if (p.fd >= 0) ::close(p.fd);
    p.fd = -1;
    p.closed = true;
  }
}

void TcpTransport::setup_mesh(std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  // The job secret: rank 0 draws it, every connection must present it.
  if (rank_ == 0) {
    std::random_device rd;
    for (auto& b : secret_) b = static_cast<uint8_t>(rd());
    store_->set(kSecretKey, std::vector<uint8_t>(secret_, secret_ + sizeof(secret_)));
  } else {
    auto s = store_->get(kSecretKey);
    TORCH_CHECK(s.size() == sizeof(secret_), "disttrain: malformed job secret in the store");
    std::memcpy(secret_, s.data(), sizeof(secret_));
  }

  int port = 0;
  listen_fd_ = listen_any(&port);
  TORCH_CHECK(listen_fd_ >= 0, "disttrain: cannot open a listening socket: ", std::strerror(errno));
  address_ = local_address(settings_.socket_addr, settings_.master_addr) + ":" + std::to_string(port);
  store_->set(addr_key(rank_), to_bytes(address_));

  // Higher ranks connect to lower ones; the acceptor takes the others and,
  // after setup, keeps dropping whatever else knocks on the port.
  acceptor_ = std::thread([this] { run_thread_body("connection acceptor", [this] { accept_loop(); }); });

  for (int peer = 0; peer < rank_; ++peer) {
    std::string addr = to_string(store_->get(addr_key(peer)));
    auto colon = addr.rfind(':');
    TORCH_CHECK(colon != std::string::npos, "disttrain: malformed address for rank ", peer, ": ", addr);
    std::string error;
    int fd = connect_retry(addr.substr(0, colon), std::stoi(addr.substr(colon + 1)), deadline, &error);
    TORCH_CHECK(fd >= 0, "disttrain: rank ", rank_, " cannot reach rank ", peer, " at ", addr, ": ", error);
    HelloMessage hello{kHelloMagic, static_cast<uint32_t>(rank_), static_cast<uint32_t>(world_size_), {}};
    std::memcpy(hello.secret, secret_, sizeof(secret_));
    uint32_t ack = 0;
    bool ok = write_full_until(fd, &hello, sizeof(hello), deadline) &&
              read_full_until(fd, &ack, sizeof(ack), deadline) && ack == kHelloMagic;
    if (!ok) {
      ::close(fd);
      TORCH_CHECK(false, "disttrain: rank ", rank_, " failed the handshake with rank ", peer, " at ", addr);
    }
    tune_socket(fd, settings_.socket_buffer_bytes);
    set_nonblocking(fd);
    std::lock_guard<std::mutex> lock(setup_mu_);
    peers_[peer].fd = fd;
  }

  // Wait for every higher rank to have connected.
  while (true) {
    std::vector<int> missing;
    {
      std::lock_guard<std::mutex> lock(setup_mu_);
      for (int p = rank_ + 1; p < world_size_; ++p)
        if (peers_[p].fd < 0) missing.push_back(p);
    }
    if (missing.empty()) break;
    if (Clock::now() > deadline) {
      std::ostringstream m;
      for (size_t i = 0; i < missing.size(); ++i) m << (i ? ", " : "") << missing[i];
      TORCH_CHECK(false, "disttrain: rank ", rank_, " timed out after ", timeout.count(),
                  " ms waiting for ranks [", m.str(), "] to connect");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  setup_done_ = true;
}

// The acceptor reads every connection's hello side by side (non-blocking,
// one poll over all of them), each under its own overall deadline: a stranger
// that dribbles, stalls or floods delays no other connection, and is dropped
// by kHelloDeadline after it connected whatever it sends.
void TcpTransport::accept_loop() {
  struct Pending {
    int fd;
    Deadline deadline;
    HelloMessage hello;
    size_t got;
  };
  std::vector<Pending> pending;
  std::vector<pollfd> fds;
  auto reject = [this](int fd) {
    rejected_++;  // counted before the close a stranger may be waiting to see
    ::close(fd);
  };
  while (!stopping_) {
    fds.assign(1, pollfd{listen_fd_, POLLIN, 0});
    int wait_ms = 200;
    for (auto& c : pending) {
      fds.push_back({c.fd, POLLIN, 0});
      wait_ms = std::min(wait_ms, ms_until(c.deadline) + 1);
    }
    int rc = ::poll(fds.data(), fds.size(), wait_ms);
    if (stopping_) break;
    if (rc < 0) {
      if (errno != EINTR) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;  // revents unset: nothing to read; deadlines are checked next time round
    }
    const auto now = Clock::now();
    // Connections already waiting, then the new one (not yet in fds).
    std::vector<Pending> still;
    for (size_t i = 0; i < pending.size(); ++i) {
      Pending& c = pending[i];
      bool failed = false, complete = false;
      if (fds[i + 1].revents != 0) {
        ssize_t n = ::recv(c.fd, reinterpret_cast<uint8_t*>(&c.hello) + c.got, sizeof(HelloMessage) - c.got,
                           MSG_DONTWAIT);
        if (n > 0) c.got += static_cast<size_t>(n);
        else if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) failed = true;
        complete = c.got == sizeof(HelloMessage);
      }
      if (complete && !setup_done_ && accept_hello(c.fd, c.hello)) continue;
      if (complete || failed || setup_done_ || now >= c.deadline) {
        reject(c.fd);
        continue;
      }
      still.push_back(c);
    }
    pending.swap(still);
    if (fds[0].revents != 0) {
      int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd >= 0) {
        // After set-up, every new connection is closed unread.
        if (setup_done_ || pending.size() >= kMaxPendingHellos) reject(fd);
        else pending.push_back(Pending{fd, Clock::now() + kHelloDeadline, HelloMessage{}, 0});
      }
    }
  }
  for (auto& c : pending) ::close(c.fd);
}

// A connection is kept only if it presents the job secret, a valid rank that
// is still expected, and our world size; anything else is closed unanswered.
bool TcpTransport::accept_hello(int fd, const HelloMessage& hello) {
  // The secret is compared first and in constant time, whatever else is wrong.
  const bool secret_ok = equal_constant_time(hello.secret, secret_, sizeof(secret_));
  if (!secret_ok || hello.magic != kHelloMagic || hello.world_size != static_cast<uint32_t>(world_size_)) return false;
  if (hello.rank <= static_cast<uint32_t>(rank_) || hello.rank >= static_cast<uint32_t>(world_size_)) return false;
  const int peer = static_cast<int>(hello.rank);
  {
    std::lock_guard<std::mutex> lock(setup_mu_);
    if (peers_[peer].fd >= 0) return false;  // that rank is connected already
  }
  // Four bytes into a fresh connection's empty send buffer: they go at once or never.
  uint32_t ack = kHelloMagic;
  if (::send(fd, &ack, sizeof(ack), MSG_DONTWAIT | MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(ack))) return false;
  tune_socket(fd, settings_.socket_buffer_bytes);
  std::lock_guard<std::mutex> lock(setup_mu_);
  peers_[peer].fd = fd;
  return true;
}

std::string TcpTransport::abort_reason() const {
  std::lock_guard<std::mutex> lock(abort_mu_);
  return abort_reason_;
}

void TcpTransport::check_alive() const {
  if (shut_down_) C10_THROW_ERROR(DistBackendError, "disttrain: " + abort_reason());
  if (aborted_) {
    C10_THROW_ERROR(DistBackendError, "disttrain: the process group was aborted earlier: " + abort_reason());
  }
}

std::string TcpTransport::recorded_abort_reason() {
  try {
    if (abort_store_->check({kAbortKey})) return to_string(abort_store_->get(kAbortKey));
  } catch (...) {
  }
  return "";
}

void TcpTransport::abort(const std::string& reason) {
  abort_quietly(reason);
  C10_THROW_ERROR(DistBackendError, "disttrain: " + abort_reason());
}

void TcpTransport::abort_quietly(const std::string& reason) {
  if (aborted_) return;
  std::string message = reason;
  try {
    // First writer wins: its reason is the root cause every rank reports.
    // One atomic round trip sets the reason if none is recorded and returns
    // whichever is.
    message = to_string(abort_store_->compareSet(kAbortKey, {}, to_bytes(reason)));
  } catch (...) {
    // The store may be gone with a dead rank; report our own view then.
  }
  mark_aborted(message, false);
}

void TcpTransport::shut_down(const std::string& reason) { mark_aborted(reason, true); }

void TcpTransport::mark_aborted(const std::string& reason, bool local) {
  {
    std::lock_guard<std::mutex> lock(abort_mu_);
    if (aborted_) return;  // the first failure (or teardown) is the one reported
    abort_reason_ = reason;
    if (local) shut_down_ = true;
    aborted_ = true;
  }
  // Wakes a poll() on these sockets at once; the fds stay open (and valid)
  // until close(), so a progress thread still using them reads EOF, not a reused fd.
  std::lock_guard<std::mutex> lock(setup_mu_);
  for (auto& p : peers_) {
    if (p.fd >= 0) ::shutdown(p.fd, SHUT_RDWR);
  }
}

void TcpTransport::connection_lost(int peer, const OpSignature& sig, const char* what) {
  if (aborted_) abort(abort_reason());
  std::string reason = recorded_abort_reason();
  if (!reason.empty()) abort(reason);
  lost_peer(peer, sig, what);
}

void TcpTransport::lost_peer(int peer, const OpSignature& sig, const char* what) {
  std::ostringstream m;
  m << "rank " << group_rank(peer) << " " << what << " while rank " << group_rank(rank_) << " was in " << describe(sig)
    << " (the process exited, was killed or aborted)";
  abort(m.str());
}

bool TcpTransport::peer_connected(int peer) const {
  if (peer == rank_) return true;
  if (peers_[peer].fd < 0 || aborted_) return false;
  pollfd p{peers_[peer].fd, POLLRDHUP, 0};
  return !(::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)));
}

void TcpTransport::check_peer(int peer, const OpSignature& sig) {
  check_alive();
  if (peer == rank_ || peers_[peer].fd < 0) return;
  pollfd p{peers_[peer].fd, POLLRDHUP, 0};
  if (::poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
    connection_lost(peer, sig, "closed its connection");
  }
}

// ---------------------------------------------------------------------------
// The exchange engine.

bool TcpTransport::do_send(SendState& s, const FrameKind kind, const OpSignature& sig, uint32_t step) {
  Peer& peer = peers_[s.spec.peer];
  while (!s.done) {
    if (s.hdr_left == 0 && s.frame_left == 0) {
      if (s.sent == s.spec.bytes && s.any_frame) {
        s.done = true;
        break;
      }
      size_t avail = s.spec.available ? std::min(*s.spec.available, s.spec.bytes) : s.spec.bytes;
      size_t n = std::min(settings_.chunk_bytes, avail - s.sent);
      if (n == 0 && (s.spec.bytes > 0 || s.any_frame)) return false;  // gated: wait for data
      s.hdr = FrameHeader{kFrameMagic, static_cast<uint8_t>(kind), static_cast<uint8_t>(sig.op), sig.dtype,
                          static_cast<uint8_t>(sig.redop), sig.seq, s.spec.count, sig.aux, step,
                          static_cast<uint32_t>(n)};
      s.hdr_left = sizeof(FrameHeader);
      s.frame_left = n;
      s.any_frame = true;
    }
    iovec iov[2];
    int iovcnt = 0;
    if (s.hdr_left > 0) {
      iov[iovcnt++] = {reinterpret_cast<uint8_t*>(&s.hdr) + sizeof(FrameHeader) - s.hdr_left, s.hdr_left};
    }
    if (s.frame_left > 0) {
      iov[iovcnt++] = {const_cast<uint8_t*>(static_cast<const uint8_t*>(s.spec.data)) + s.sent, s.frame_left};
    }
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = iovcnt;
    ssize_t r = ::sendmsg(peer.fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return false;
      connection_lost(s.spec.peer, sig, "closed its connection");
    }
    size_t wrote = static_cast<size_t>(r);
    size_t from_hdr = std::min(wrote, s.hdr_left);
    s.hdr_left -= from_hdr;
    wrote -= from_hdr;
    s.frame_left -= wrote;
    s.sent += wrote;
  }
  return true;
}

void TcpTransport::accept_header(RecvState& r, const FrameHeader& h, FrameKind kind,
                                 const OpSignature& sig, uint32_t step) {
  const int peer = group_rank(r.spec.peer), me = group_rank(rank_);
  if (h.magic != kFrameMagic) {
    abort("corrupt stream from rank " + std::to_string(peer) + " to rank " + std::to_string(me) +
          " during " + describe(sig) + " (bad frame magic)");
  }
  bool same = h.kind == static_cast<uint8_t>(kind) && h.op == static_cast<uint8_t>(sig.op) &&
              h.dtype == sig.dtype && h.redop == static_cast<uint8_t>(sig.redop) && h.seq == sig.seq &&
              h.count == r.spec.count && h.aux == sig.aux;
  if (!same) {
    OpSignature theirs{h.seq, static_cast<OpKind>(h.op), h.dtype, static_cast<RedOp>(h.redop), h.count, h.aux};
    OpSignature mine = sig;
    mine.count = r.spec.count;
    std::ostringstream m;
    if (kind == FrameKind::kPointToPoint || h.kind == static_cast<uint8_t>(FrameKind::kPointToPoint)) {
      m << "point-to-point mismatch: rank " << me << " expected "
        << (kind == FrameKind::kPointToPoint ? "recv " + describe(mine) : describe(mine)) << " from rank "
        << peer << ", but rank " << peer << " sent "
        << (h.kind == static_cast<uint8_t>(FrameKind::kPointToPoint) ? "send " : "") << describe(theirs);
    } else {
      m << "collective mismatch at sequence number " << sig.seq << ": rank " << me << " called "
        << describe(mine) << ", rank " << peer << " called " << describe(theirs);
    }
    abort(m.str());
  }
  if (h.step != step) {
    abort("collective mismatch in " + describe(sig) + ": rank " + std::to_string(peer) + " is at step " +
          std::to_string(h.step) + ", rank " + std::to_string(me) + " at step " + std::to_string(step));
  }
  size_t left = r.spec.bytes - r.received;
  if (h.len > left || h.len > kMaxFramePayload || (r.spec.reduce && h.len % r.spec.elem_size != 0)) {
    abort("rank " + std::to_string(peer) + " sent " + std::to_string(h.len) + " bytes in a frame of " +
          describe(sig) + " where rank " + std::to_string(me) + " expected at most " +
          std::to_string(std::min<size_t>(left, kMaxFramePayload)));
  }
  r.any_frame = true;
  r.frame_len = h.len;
  r.frame_left = h.len;
}

void TcpTransport::consume_payload(RecvState& r, const uint8_t* data, size_t len) {
  auto* dst = static_cast<uint8_t*>(r.spec.dst) + r.received;
  if (r.spec.reduce) {
    const auto* base = r.spec.base ? static_cast<const uint8_t*>(r.spec.base) + r.received : dst;
    r.spec.reduce(dst, base, data, len / r.spec.elem_size);
  } else if (data != dst && len > 0) {
    std::memcpy(dst, data, len);
  }
  r.received += len;
  if (r.spec.progress) *r.spec.progress = r.received;
}

// Reads the header of the peer's next frame into its partial frame without
// blocking, and sizes the payload for it once complete: true when the whole
// header is there (now or before), false while it has not arrived (or the peer closed).
bool TcpTransport::read_header(int peer_rank, const OpSignature& sig) {
  Peer& peer = peers_[peer_rank];
  InFrame& f = peer.partial_frame;
  while (peer.hdr_got < sizeof(FrameHeader)) {
    ssize_t n = ::recv(peer.fd, reinterpret_cast<uint8_t*>(&f.hdr) + peer.hdr_got, sizeof(FrameHeader) - peer.hdr_got,
                       MSG_DONTWAIT);
    if (n == 0) {
      peer.closed = true;
      return false;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) peer.closed = true;
      return false;
    }
    peer.hdr_got += static_cast<size_t>(n);
    if (peer.hdr_got < sizeof(FrameHeader)) continue;
    if (f.hdr.magic != kFrameMagic || f.hdr.len > kMaxFramePayload) {
      abort("corrupt stream from rank " + std::to_string(group_rank(peer_rank)) + " to rank " +
            std::to_string(group_rank(rank_)) + " during " + describe(sig));
    }
    f.payload.resize(f.hdr.len);
  }
  return true;
}

// Reads whatever a peer sent ahead of its receive into that peer's backlog,
// so that two ranks sending to each other at once never block each other.
void TcpTransport::read_ahead(int peer_rank, const OpSignature& sig) {
  Peer& peer = peers_[peer_rank];
  while (true) {
    InFrame& f = peer.partial_frame;
    if (!read_header(peer_rank, sig)) return;
    if (peer.payload_got < f.payload.size()) {
      ssize_t n = ::recv(peer.fd, f.payload.data() + peer.payload_got, f.payload.size() - peer.payload_got,
                         MSG_DONTWAIT);
      if (n == 0) {
        peer.closed = true;
        return;
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) peer.closed = true;
        return;
      }
      peer.payload_got += static_cast<size_t>(n);
      if (peer.payload_got < f.payload.size()) continue;
    }
    peer.backlog.push_back(std::move(f));
    peer.partial_frame = InFrame{};
    peer.hdr_got = 0;
    peer.payload_got = 0;
  }
}

const FrameHeader* TcpTransport::peek_header(int peer_rank, const OpSignature& sig) {
  Peer& peer = peers_[peer_rank];
  if (!peer.backlog.empty()) return &peer.backlog.front().hdr;
  // Even a peer seen closing (`closed`) may have left frames in the socket:
  // they are read until the end of its stream. The payload follows into the
  // partial frame, as read_ahead() reads it.
  if (peer.hdr_got < sizeof(FrameHeader) && peer.fd < 0) return nullptr;
  return read_header(peer_rank, sig) ? &peer.partial_frame.hdr : nullptr;
}

namespace {
// "recv from any source (dtype=Float, numel=10, tag=3)": its sequence number
// is the chosen sender's, unknown until a sender is found.
std::string describe_any_source(const OpSignature& sig) {
  return "recv from any source (dtype=" + dtype_name(sig.dtype) + ", numel=" + std::to_string(sig.count) +
         ", tag=" + std::to_string(sig.aux) + ")";
}

std::string describe_header(const FrameHeader& h) {
  OpSignature theirs{h.seq, static_cast<OpKind>(h.op), h.dtype, static_cast<RedOp>(h.redop), h.count, h.aux};
  return (h.kind == static_cast<uint8_t>(FrameKind::kPointToPoint) ? "send " : "") + describe(theirs);
}
}  // namespace

int TcpTransport::first_sender(const OpSignature& sig, Deadline deadline) {
  check_alive();
  TORCH_INTERNAL_ASSERT(world_size_ > 1);
  std::vector<pollfd> fds;
  while (true) {
    fds.clear();
    std::ostringstream passed, gone;  // peers that cannot match, for the error messages
    for (int i = 0; i < world_size_; ++i) {
      const int p = (next_any_source_ + i) % world_size_;
      if (p == rank_) continue;
      if (const FrameHeader* h = peek_header(p, sig)) {
        if (h->kind == static_cast<uint8_t>(FrameKind::kPointToPoint) && h->aux == sig.aux) {
          next_any_source_ = (p + 1) % world_size_;
          return p;
        }
        passed << (passed.tellp() > 0 ? "; " : "") << "rank " << group_rank(p) << " sent "
               << describe_header(*h) << " first";
      } else if (peers_[p].closed || peers_[p].fd < 0) {
        gone << (gone.tellp() > 0 ? ", " : "") << group_rank(p);
      } else {
        fds.push_back({peers_[p].fd, static_cast<short>(POLLIN | POLLRDHUP), 0});
      }
    }
    const std::string me = std::to_string(group_rank(rank_));
    auto why_not = [&] {
      std::string m;
      if (passed.tellp() > 0) m += "; " + passed.str();
      if (gone.tellp() > 0) m += "; rank(s) " + gone.str() + " closed the connection";
      return m;
    };
    if (fds.empty()) {
      // Nobody left who could send it: a failure recorded elsewhere is the
      // cause, else the program's order of operations.
      std::string reason = recorded_abort_reason();
      if (!reason.empty()) abort(reason);
      abort("rank " + me + "'s " + describe_any_source(sig) + " cannot be matched" + why_not() +
            " (each pair's messages are matched in the order the ranks issued them)");
    }
    int rc = ::poll(fds.data(), fds.size(), ms_until(deadline));
    if (rc < 0 && errno == EINTR) continue;
    if (aborted_) abort(abort_reason());  // torn down (or failed on a sibling) while we waited
    if (rc == 0 && Clock::now() >= deadline) {
      std::string reason = recorded_abort_reason();
      if (!reason.empty()) abort(reason);
      abort("timeout: rank " + me + " waited more than the group timeout in " + describe_any_source(sig) +
            " and no rank sent it" + why_not());
    }
  }
}

void TcpTransport::do_recv(RecvState& r, FrameKind kind, const OpSignature& sig, uint32_t step) {
  Peer& peer = peers_[r.spec.peer];
  // Frames that arrived ahead come first, in order.
  if (peer.mid_frame()) {
    read_ahead(r.spec.peer, sig);
    if (peer.mid_frame()) {
      if (peer.closed) connection_lost(r.spec.peer, sig, "closed its connection");
      return;
    }
  }
  while (!r.done && !peer.backlog.empty()) {
    InFrame f = std::move(peer.backlog.front());
    peer.backlog.pop_front();
    accept_header(r, f.hdr, kind, sig, step);
    consume_payload(r, f.payload.data(), f.payload.size());
    r.frame_left = 0;
    if (r.received == r.spec.bytes) r.done = true;
  }
  while (!r.done) {
    if (r.frame_left == 0) {
      ssize_t n = ::recv(peer.fd, reinterpret_cast<uint8_t*>(&r.hdr) + r.hdr_got, sizeof(FrameHeader) - r.hdr_got,
                         MSG_DONTWAIT);
      if (n == 0) connection_lost(r.spec.peer, sig, "closed its connection");
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return;
        connection_lost(r.spec.peer, sig, "reset its connection");
      }
      r.hdr_got += static_cast<size_t>(n);
      if (r.hdr_got < sizeof(FrameHeader)) continue;
      r.hdr_got = 0;
      accept_header(r, r.hdr, kind, sig, step);
      if (r.frame_len == 0) {
        if (r.received == r.spec.bytes) r.done = true;
        continue;
      }
    }
    // Payload: straight into place, or into scratch to be reduced.
    uint8_t* target = r.spec.reduce ? r.scratch + (r.frame_len - r.frame_left)
                                    : static_cast<uint8_t*>(r.spec.dst) + r.received + (r.frame_len - r.frame_left);
    ssize_t n = ::recv(peer.fd, target, r.frame_left, MSG_DONTWAIT);
    if (n == 0) connection_lost(r.spec.peer, sig, "closed its connection");
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      connection_lost(r.spec.peer, sig, "reset its connection");
    }
    r.frame_left -= static_cast<size_t>(n);
    if (r.frame_left == 0) {
      if (r.spec.reduce) {
        consume_payload(r, r.scratch, r.frame_len);
      } else {
        r.received += r.frame_len;
        if (r.spec.progress) *r.spec.progress = r.received;
      }
      if (r.received == r.spec.bytes) r.done = true;
    }
  }
}

void TcpTransport::exchange(FrameKind kind, const OpSignature& sig, uint32_t step, std::vector<SendSpec>& sends,
                            std::vector<RecvSpec>& recvs, Deadline deadline) {
  check_alive();
  std::vector<SendState> ss(sends.size());
  std::vector<RecvState> rs(recvs.size());
  size_t reducing = 0;
  for (size_t i = 0; i < sends.size(); ++i) ss[i].spec = sends[i];
  for (size_t i = 0; i < recvs.size(); ++i) {
    rs[i].spec = recvs[i];
    if (recvs[i].reduce) reducing++;
  }
  if (scratch_.size() < reducing * kMaxFramePayload) scratch_.resize(reducing * kMaxFramePayload);
  for (size_t i = 0, k = 0; i < rs.size(); ++i) {
    if (rs[i].spec.reduce) rs[i].scratch = scratch_.data() + (k++) * kMaxFramePayload;
  }
  for (auto& s : ss) {
    TORCH_INTERNAL_ASSERT(s.spec.peer != rank_ && s.spec.peer >= 0 && s.spec.peer < world_size_);
    if (peers_[s.spec.peer].closed) connection_lost(s.spec.peer, sig, "had closed its connection");
  }
  for (auto& r : rs) {
    TORCH_INTERNAL_ASSERT(r.spec.peer != rank_ && r.spec.peer >= 0 && r.spec.peer < world_size_);
  }

  std::vector<pollfd> fds;
  std::vector<int> fd_peer;
  std::vector<char> recv_from(world_size_, 0), send_to(world_size_, 0);
  while (true) {
    // Progress everything that can move without waiting: per peer and
    // direction, the first message not done (its frames must not interleave
    // with the next one's); when it completes, the next one starts at once.
    bool pending = false;
    std::fill(recv_from.begin(), recv_from.end(), 0);
    std::fill(send_to.begin(), send_to.end(), 0);
    for (auto& r : rs) {
      if (r.done || recv_from[r.spec.peer]) continue;
      do_recv(r, kind, r.spec.sig ? *r.spec.sig : sig, r.spec.step ? *r.spec.step : step);
      if (!r.done) recv_from[r.spec.peer] = 1;
    }
    for (auto& s : ss) {
      if (s.done || send_to[s.spec.peer]) continue;
      do_send(s, kind, s.spec.sig ? *s.spec.sig : sig, s.spec.step ? *s.spec.step : step);
      if (!s.done) send_to[s.spec.peer] = 1;
    }
    std::fill(recv_from.begin(), recv_from.end(), 0);
    std::fill(send_to.begin(), send_to.end(), 0);
    for (auto& r : rs) {
      if (!r.done) {
        recv_from[r.spec.peer] = 1;
        pending = true;
      }
    }
    for (auto& s : ss) {
      if (!s.done) {
        // A gated send waits on its receive, not on the socket.
        bool gated = s.hdr_left == 0 && s.frame_left == 0;
        if (!gated) send_to[s.spec.peer] = 1;
        pending = true;
      }
    }
    if (!pending) return;

    // While a send is blocked, whatever any other peer sends us is read ahead
    // into its backlog: in a cycle of ranks each sending to the next, someone
    // must read, or nobody's send ever completes.
    bool send_blocked = std::find(send_to.begin(), send_to.end(), 1) != send_to.end();
    fds.clear();
    fd_peer.clear();
    for (int p = 0; p < world_size_; ++p) {
      if (p == rank_ || peers_[p].fd < 0) continue;
      short events = POLLRDHUP;
      if (recv_from[p] || (send_blocked && !peers_[p].closed)) events |= POLLIN;
      if (send_to[p]) events |= POLLOUT;
      if (peers_[p].closed && !recv_from[p] && !send_to[p]) continue;
      fds.push_back({peers_[p].fd, events, 0});
      fd_peer.push_back(p);
    }
    int timeout_ms = ms_until(deadline);
    int rc = ::poll(fds.data(), fds.size(), timeout_ms);
    if (rc < 0 && errno == EINTR) continue;
    if (aborted_) abort(abort_reason());  // torn down (or failed on a sibling) while we waited
    if (rc == 0 && Clock::now() >= deadline) {
      // Each peer once, though several messages from (or to) it may be pending (a rooted op's
      // root-check frame and its data).
      std::set<int> peers_waited;
      for (auto& r : rs)
        if (!r.done) peers_waited.insert(group_rank(r.spec.peer));
      for (auto& s : ss)
        if (!s.done) peers_waited.insert(group_rank(s.spec.peer));
      std::ostringstream waiting;
      bool first = true;
      for (int p : peers_waited) waiting << (first ? "" : ", ") << p, first = false;
      std::string reason = recorded_abort_reason();
      if (!reason.empty()) abort(reason);
      abort("timeout: rank " + std::to_string(group_rank(rank_)) + " waited more than the group timeout in " + describe(sig) +
            " for rank(s) " + waiting.str() + ", which sent nothing (hung, stopped, or skipped this collective)");
    }
    for (size_t i = 0; i < fds.size(); ++i) {
      int p = fd_peer[i];
      short ev = fds[i].revents;
      if (ev == 0) continue;
      if (send_blocked && !recv_from[p] && (ev & POLLIN)) read_ahead(p, sig);
      if (send_to[p] && peers_[p].closed) connection_lost(p, sig, "closed its connection");
      if ((ev & (POLLRDHUP | POLLHUP | POLLERR)) && !recv_from[p] && !send_to[p]) {
        // A peer not in this step went away: an error only if the group aborted.
        peers_[p].closed = true;
        std::string reason = recorded_abort_reason();
        if (!reason.empty()) abort(reason);
      }
    }
  }
}

}  // namespace disttrain::comm
