#include "strategies/group_averager.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <future>
#include <set>
#include <stdexcept>

#include "comm/tcp/socket_util.h"

namespace disttrain::strategies {

namespace {

constexpr uint32_t kAverageMagic = 0x56415444;  // "DTAV"
constexpr uint8_t kVersion = 1;
constexpr size_t kTokenBytes = 32;
constexpr int kIoTimeoutMs = 30000;  // inactivity limit on one message's bytes
constexpr auto kConnectLimit = std::chrono::milliseconds(500);  // peers listen before they are announced: a refusal means gone
constexpr auto kProbeInterval = std::chrono::milliseconds(250);

#pragma pack(push, 1)
struct AverageHeader {
  uint32_t magic;
  uint8_t version;
  uint8_t phase;  // 1: a contribution to the owner's part, 2: the owner's averaged part
  uint8_t wire;
  uint8_t reserved0;
  uint8_t token[kTokenBytes];
  uint64_t round;
  uint32_t sender;
  uint32_t part;
  uint32_t group_size;
  float scale;
  uint64_t count;
  double weight;
  uint64_t payload_bytes;
};
#pragma pack(pop)
static_assert(sizeof(AverageHeader) == 88, "average header layout");

size_t wire_size(WireDtype wire) {
  switch (wire) {
    case WireDtype::kFloat32:
      return 4;
    case WireDtype::kBFloat16:
      return 2;
    case WireDtype::kInt8:
      return 1;
  }
  return 0;
}

const char* wire_name(WireDtype wire) {
  switch (wire) {
    case WireDtype::kFloat32:
      return "float32";
    case WireDtype::kBFloat16:
      return "bfloat16";
    case WireDtype::kInt8:
      return "int8";
  }
  return "unknown";
}

bool equal_tokens(const uint8_t* a, const uint8_t* b) {
  uint8_t diff = 0;  // constant time: no early exit on the first differing byte
  for (size_t i = 0; i < kTokenBytes; ++i) diff |= static_cast<uint8_t>(a[i] ^ b[i]);
  return diff == 0;
}

std::string peer_name(int fd) {
  sockaddr_in addr{};
  socklen_t len = sizeof(addr);
  char text[INET_ADDRSTRLEN] = "?";
  if (::getpeername(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0)
    ::inet_ntop(AF_INET, &addr.sin_addr, text, sizeof(text));
  return std::string(text) + ":" + std::to_string(ntohs(addr.sin_port));
}

std::pair<int64_t, int64_t> part_range(int64_t numel, int parts, int part) {
  int64_t base = numel / parts, rem = numel % parts;
  int64_t start = part * base + std::min<int64_t>(part, rem);
  return {start, base + (part < rem ? 1 : 0)};
}

// The bytes of `values` (float32) on the wire, and the int8 scale.
std::pair<torch::Tensor, float> encode(const torch::Tensor& values, WireDtype wire) {
  switch (wire) {
    case WireDtype::kFloat32:
      return {values.contiguous(), 1.0f};
    case WireDtype::kBFloat16:
      return {values.to(torch::kBFloat16).contiguous(), 1.0f};
    case WireDtype::kInt8: {
      float peak = values.numel() ? values.abs().max().item<float>() : 0.0f;
      float scale = peak > 0.0f ? peak / 127.0f : 1.0f;
      return {values.div(scale).round_().clamp_(-127, 127).to(torch::kInt8).contiguous(), scale};
    }
  }
  throw std::invalid_argument("unknown wire dtype");
}

torch::Tensor decode(const std::vector<uint8_t>& payload, uint64_t count, WireDtype wire, float scale) {
  auto* data = const_cast<uint8_t*>(payload.data());
  auto n = static_cast<int64_t>(count);
  switch (wire) {
    case WireDtype::kFloat32:
      return torch::from_blob(data, {n}, torch::kFloat32).clone();
    case WireDtype::kBFloat16:
      return torch::from_blob(data, {n}, torch::kBFloat16).to(torch::kFloat32);
    case WireDtype::kInt8:
      return torch::from_blob(data, {n}, torch::kInt8).to(torch::kFloat32).mul_(scale);
  }
  throw std::invalid_argument("unknown wire dtype");
}

}  // namespace

GroupAverager::GroupAverager(const std::string& secret, int port, int64_t max_message_bytes)
    : secret_(secret), max_message_bytes_(max_message_bytes) {
  if (secret_.size() != kTokenBytes)
    throw std::invalid_argument("the averager's token must be " + std::to_string(kTokenBytes) + " bytes, got " +
                                std::to_string(secret_.size()));
  if (max_message_bytes_ <= 0) throw std::invalid_argument("max_message_bytes must be positive");
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(listen_fd_, 128) != 0) {
    std::string error = std::strerror(errno);
    ::close(listen_fd_);
    throw std::runtime_error("cannot listen on port " + std::to_string(port) + ": " + error);
  }
  socklen_t len = sizeof(addr);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  if (::pipe2(wake_pipe_, O_CLOEXEC) != 0) {
    ::close(listen_fd_);
    throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  }
  acceptor_ = std::thread([this] { accept_loop(); });
}

GroupAverager::~GroupAverager() { close(); }

void GroupAverager::close() {
  if (closing_.exchange(true)) return;
  char byte = 0;
  (void)!::write(wake_pipe_[1], &byte, 1);
  if (acceptor_.joinable()) acceptor_.join();
  {
    std::unique_lock<std::mutex> lock(mu_);
    for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);  // handlers blocked in a read return now
    handlers_done_.wait(lock, [this] { return active_handlers_ == 0; });
  }
  ::close(listen_fd_);
  ::close(wake_pipe_[0]);
  ::close(wake_pipe_[1]);
  cv_.notify_all();
}

void GroupAverager::refuse(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (refusals_.size() < 1000) refusals_.push_back(reason);
}

std::vector<std::string> GroupAverager::take_refusals() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> out;
  out.swap(refusals_);
  return out;
}

void GroupAverager::accept_loop() {
  while (!closing_) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_pipe_[0], POLLIN, 0}};
    int rc = ::poll(fds, 2, -1);
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0 || (fds[1].revents & POLLIN) || closing_) break;
    if (!(fds[0].revents & POLLIN)) continue;
    int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (active_handlers_ >= 256) {  // a flood of connections is refused, never queued without bound
        refusals_.push_back("too many connections at once; refused " + peer_name(fd));
        ::close(fd);
        continue;
      }
      ++active_handlers_;
      open_fds_.insert(fd);
    }
    std::thread([this, fd] {
      handle_connection(fd);
      std::lock_guard<std::mutex> lock(mu_);
      open_fds_.erase(fd);
      ::close(fd);
      if (--active_handlers_ == 0) handlers_done_.notify_all();
    }).detach();
  }
}

// One connection attempt that never outlasts `limit` (a blocking connect to a
// host that vanished waits for the kernel's SYN retries, minutes). Returns the
// connected, blocking fd, or -1 with *refused telling a refusal from a timeout.
static int connect_once(const GroupMember& member, std::chrono::milliseconds limit, bool* refused) {
  *refused = false;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (::getaddrinfo(member.host.c_str(), std::to_string(member.port).c_str(), &hints, &res) != 0 || !res) return -1;
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  int rc = fd < 0 ? -1 : ::connect(fd, res->ai_addr, res->ai_addrlen);
  ::freeaddrinfo(res);
  if (fd < 0) return -1;
  if (rc != 0 && errno != EINPROGRESS) {
    *refused = errno == ECONNREFUSED;
    ::close(fd);
    return -1;
  }
  if (rc != 0) {
    pollfd p{fd, POLLOUT, 0};
    int error = 0;
    socklen_t len = sizeof(error);
    if (::poll(&p, 1, static_cast<int>(limit.count())) <= 0 ||
        ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0 || error != 0) {
      *refused = error == ECONNREFUSED;
      ::close(fd);
      return -1;
    }
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL, 0) & ~O_NONBLOCK);
  return fd;
}

// Connects before the deadline, retrying refusals (a peer may be a moment
// late to listen); -1 when the deadline passes.
static int connect_before(const GroupMember& member, std::chrono::steady_clock::time_point deadline) {
  auto pause = std::chrono::milliseconds(10);
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return -1;
    bool refused;
    int fd = connect_once(member, left, &refused);
    if (fd >= 0 || !refused) return fd;
    if (std::chrono::steady_clock::now() + pause >= deadline) return -1;
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, std::chrono::milliseconds(250));
  }
}

// Whether a member is certainly gone: its port refuses connections. A member
// slow to answer is given the benefit of the doubt (the round's deadline
// bounds the wait for it).
static bool refuses_connections(const GroupMember& member) {
  bool refused;
  int fd = connect_once(member, std::chrono::milliseconds(200), &refused);
  if (fd >= 0) ::close(fd);  // a probe: the other side sees a connection closed before any byte
  return fd < 0 && refused;
}

void GroupAverager::handle_connection(int fd) {
  comm::tune_socket(fd, 0);
  std::string from = peer_name(fd);
  {
    pollfd p{fd, POLLIN, 0};
    char byte;
    if (::poll(&p, 1, kIoTimeoutMs) > 0 && ::recv(fd, &byte, 1, MSG_PEEK) == 0) return;  // a liveness probe
  }
  AverageHeader h{};
  if (!comm::read_full(fd, &h, sizeof(h), kIoTimeoutMs)) {
    refuse("incomplete header from " + from);
    return;
  }
  if (h.magic != kAverageMagic || h.version != kVersion) {
    refuse("garbage from " + from + " (not an averaging message)");
    return;
  }
  if (!equal_tokens(h.token, reinterpret_cast<const uint8_t*>(secret_.data()))) {
    refuse("wrong secret from " + from);
    return;
  }
  if ((h.phase != 1 && h.phase != 2) || h.wire > static_cast<uint8_t>(WireDtype::kInt8) || h.group_size == 0 ||
      h.sender >= h.group_size || h.part >= h.group_size) {
    refuse("malformed header from " + from);
    return;
  }
  auto wire = static_cast<WireDtype>(h.wire);
  if (h.count > static_cast<uint64_t>(max_message_bytes_) ||
      h.payload_bytes != h.count * wire_size(wire) ||
      h.payload_bytes > static_cast<uint64_t>(max_message_bytes_)) {
    refuse("message of " + std::to_string(h.payload_bytes) + " bytes (" + std::to_string(h.count) + " x " +
           wire_name(wire) + ") from " + from + " is inconsistent or above the limit of " +
           std::to_string(max_message_bytes_) + " bytes");
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (h.round < oldest_round_) {
      refusals_.push_back("late message for round " + std::to_string(h.round) + " from " + from);
      return;
    }
    if (mailbox_bytes_ + static_cast<int64_t>(h.payload_bytes) > 4 * max_message_bytes_) {
      refusals_.push_back("mailbox full; dropped a message from " + from);
      return;
    }
    mailbox_bytes_ += static_cast<int64_t>(h.payload_bytes);  // reserved before the read
  }
  Message m;
  m.sender = static_cast<int>(h.sender);
  m.part = h.part;
  m.group_size = h.group_size;
  m.count = h.count;
  m.wire = wire;
  m.weight = h.weight;
  m.scale = h.scale;
  m.payload.resize(h.payload_bytes);
  bool ok = comm::read_full(fd, m.payload.data(), m.payload.size(), kIoTimeoutMs);
  std::lock_guard<std::mutex> lock(mu_);
  Key key{h.round, h.phase, m.sender};
  if (!ok || h.round < oldest_round_ || mailbox_.count(key)) {
    mailbox_bytes_ -= static_cast<int64_t>(h.payload_bytes);
    refusals_.push_back(!ok                         ? "truncated message from " + from
                        : h.round < oldest_round_ ? "late message for round " + std::to_string(h.round) + " from " + from
                                                    : "duplicate message from " + from);
    return;
  }
  mailbox_.emplace(key, std::move(m));
  cv_.notify_all();
}

std::map<int, GroupAverager::Message> GroupAverager::collect(uint64_t round, uint8_t phase,
                                                             const std::vector<int>& senders,
                                                             const std::vector<GroupMember>& group,
                                                             std::chrono::steady_clock::time_point deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  std::set<int> dead;
  auto missing = [&] {
    std::vector<int> out;
    for (int s : senders)
      if (!dead.count(s) && !mailbox_.count(Key{round, phase, s})) out.push_back(s);
    return out;
  };
  // A member that died after it received this peer's message but before it sent
  // its own would be waited for until the deadline: probe the missing ones
  // every kProbeInterval and stop waiting for those that refuse connections.
  while (!closing_) {
    auto waiting = missing();
    auto now = std::chrono::steady_clock::now();
    if (waiting.empty() || now >= deadline) break;
    if (cv_.wait_until(lock, std::min(deadline, now + kProbeInterval),
                       [&] { return closing_.load() || missing().empty(); }))
      break;
    waiting = missing();
    lock.unlock();
    for (int s : waiting)
      if (refuses_connections(group[s])) dead.insert(s);
    lock.lock();
  }
  std::map<int, Message> out;
  for (int s : senders) {
    auto it = mailbox_.find(Key{round, phase, s});
    if (it == mailbox_.end()) continue;
    mailbox_bytes_ -= static_cast<int64_t>(it->second.payload.size());
    out.emplace(s, std::move(it->second));
    mailbox_.erase(it);
  }
  return out;
}

AverageResult GroupAverager::average(torch::Tensor vec, uint64_t round, const std::vector<GroupMember>& group,
                                     int my_index, double weight, WireDtype wire,
                                     std::chrono::milliseconds timeout) {
  const int n = static_cast<int>(group.size());
  if (n < 1) throw std::invalid_argument("the group is empty");
  if (my_index < 0 || my_index >= n)
    throw std::invalid_argument("my_index " + std::to_string(my_index) + " is outside the group of " +
                                std::to_string(n));
  if (!vec.is_contiguous() || vec.scalar_type() != torch::kFloat32 || !vec.device().is_cpu() || vec.dim() != 1)
    throw std::invalid_argument("average() takes a contiguous one-dimensional float32 CPU tensor");
  if (!std::isfinite(weight) || weight <= 0) throw std::invalid_argument("the weight must be positive and finite");
  if (closing_) throw std::runtime_error("the averager is closed");
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  {
    std::lock_guard<std::mutex> lock(mu_);
    oldest_round_ = std::max(oldest_round_, round);
    for (auto it = mailbox_.begin(); it != mailbox_.end();) {
      if (std::get<0>(it->first) < oldest_round_) {
        mailbox_bytes_ -= static_cast<int64_t>(it->second.payload.size());
        it = mailbox_.erase(it);
      } else {
        ++it;
      }
    }
  }
  AverageResult result;
  std::set<int> unreachable;
  std::vector<int> others;
  for (int j = 0; j < n; ++j)
    if (j != my_index) others.push_back(j);

  auto send_all = [&](uint8_t phase, const std::vector<int>& targets, auto&& part_of) {
    std::vector<std::future<std::pair<bool, uint64_t>>> sends;
    for (int j : targets) {
      sends.push_back(std::async(std::launch::async, [&, j] {
        auto [values, part] = part_of(j);
        auto [bytes, scale] = encode(values, wire);
        AverageHeader h{};
        h.magic = kAverageMagic;
        h.version = kVersion;
        h.phase = phase;
        h.wire = static_cast<uint8_t>(wire);
        std::memcpy(h.token, secret_.data(), kTokenBytes);
        h.round = round;
        h.sender = static_cast<uint32_t>(my_index);
        h.part = static_cast<uint32_t>(part);
        h.group_size = static_cast<uint32_t>(n);
        h.scale = scale;
        h.count = static_cast<uint64_t>(values.numel());
        h.weight = weight;
        h.payload_bytes = static_cast<uint64_t>(bytes.numel()) * bytes.element_size();
        int fd = connect_before(group[j], std::min(deadline, std::chrono::steady_clock::now() + kConnectLimit));
        if (fd < 0) return std::make_pair(false, uint64_t{0});
        comm::tune_socket(fd, 0);
        int left_ms = static_cast<int>(std::max<int64_t>(
            1, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now())
                   .count()));
        bool ok = comm::write_full(fd, &h, sizeof(h), left_ms) &&
                  comm::write_full(fd, bytes.data_ptr(), h.payload_bytes, left_ms);
        ::close(fd);
        return std::make_pair(ok, ok ? sizeof(h) + h.payload_bytes : uint64_t{0});
      }));
    }
    for (size_t i = 0; i < sends.size(); ++i) {
      auto [ok, bytes] = sends[i].get();
      result.bytes_sent += bytes;
      if (!ok) unreachable.insert(targets[i]);
    }
  };
  auto reachable = [&](const std::vector<int>& members) {
    std::vector<int> out;
    for (int j : members)
      if (!unreachable.count(j)) out.push_back(j);
    return out;
  };

  // Phase 1: part j of this peer's vector to its owner j.
  send_all(1, others, [&](int j) {
    auto [start, size] = part_range(vec.numel(), n, j);
    return std::make_pair(vec.narrow(0, start, size), j);
  });
  auto [my_start, my_size] = part_range(vec.numel(), n, my_index);
  torch::Tensor mine = vec.narrow(0, my_start, my_size);
  torch::Tensor sum = mine.mul(weight);
  double total_weight = weight;
  result.contributors = 1;
  auto contributions = collect(round, 1, reachable(others), group, deadline);
  for (int j : others) {
    auto it = contributions.find(j);
    if (it == contributions.end()) {
      unreachable.insert(j);
      continue;
    }
    const Message& m = it->second;
    std::string reason;
    if (m.group_size != static_cast<uint32_t>(n) || m.part != static_cast<uint32_t>(my_index))
      reason = "a contribution for another group or part";
    else if (m.count != static_cast<uint64_t>(my_size))
      reason = "wrong shape: " + std::to_string(m.count) + " elements, expected " + std::to_string(my_size);
    else if (m.wire != wire)
      reason = std::string("wrong dtype: ") + wire_name(m.wire) + ", expected " + wire_name(wire);
    else if (!std::isfinite(m.weight) || m.weight <= 0 || !std::isfinite(m.scale) || m.scale <= 0)
      reason = "a weight or scale that is not positive and finite";
    torch::Tensor values;
    if (reason.empty()) {
      values = decode(m.payload, m.count, m.wire, m.scale);
      if (!torch::isfinite(values).all().item<bool>()) reason = "non-finite values (NaN or inf)";
    }
    result.bytes_received += sizeof(AverageHeader) + m.payload.size();
    if (!reason.empty()) {
      result.rejected.emplace_back(j, reason);
      continue;
    }
    sum.add_(values, m.weight);
    total_weight += m.weight;
    ++result.contributors;
  }
  torch::Tensor averaged = sum.div_(total_weight);

  // Phase 2: the averaged part to every member still reachable; theirs back.
  send_all(2, reachable(others), [&](int) { return std::make_pair(averaged, my_index); });
  auto results = collect(round, 2, reachable(others), group, deadline);
  for (int j : others) {
    auto it = results.find(j);
    if (it == results.end()) {
      unreachable.insert(j);
      continue;
    }
    const Message& m = it->second;
    auto [start, size] = part_range(vec.numel(), n, j);
    result.bytes_received += sizeof(AverageHeader) + m.payload.size();
    std::string reason;
    if (m.part != static_cast<uint32_t>(j) || m.count != static_cast<uint64_t>(size) || m.wire != wire)
      reason = "an averaged part of the wrong shape or dtype";
    torch::Tensor values;
    if (reason.empty()) {
      values = decode(m.payload, m.count, m.wire, m.scale);
      if (!torch::isfinite(values).all().item<bool>()) reason = "an averaged part with non-finite values";
    }
    if (!reason.empty()) {
      result.rejected.emplace_back(j, reason);
      continue;
    }
    vec.narrow(0, start, size).copy_(values);
  }
  // The own part goes through the wire format too, so that every member ends with the same bytes.
  if (wire == WireDtype::kFloat32 || n == 1) {
    mine.copy_(averaged);
  } else {
    auto [bytes, scale] = encode(averaged, wire);
    std::vector<uint8_t> raw(static_cast<size_t>(bytes.numel() * bytes.element_size()));
    std::memcpy(raw.data(), bytes.data_ptr(), raw.size());
    mine.copy_(decode(raw, static_cast<uint64_t>(averaged.numel()), wire, scale));
  }
  result.unreachable.assign(unreachable.begin(), unreachable.end());
  return result;
}

}  // namespace disttrain::strategies
