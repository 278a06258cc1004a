// Weighted averaging of one flat float32 vector among a group of peers that
// found each other at run time (decentralised training, DiLoCo / hivemind
// style). No process group, no rendezvous: every peer listens on one TCP port,
// and a round's group is a list of (host, port) agreed by the caller.
//
// A round is a butterfly all-reduce, as in hivemind: the vector is cut into one
// part per member; member j owns part j. Phase 1: each member sends part j of
// its vector to member j. The owner checks every contribution on its own
// (secret, shape, dtype, finite values), averages the ones that pass with its
// own, weighted by the senders' weights, and, phase 2, sends the averaged part
// to every member. Because each contribution reaches its owner alone, a bad
// one is rejected by name and never averaged in, which a ring reduction (that
// only ever sees partial sums) cannot do.
//
// Every message is its own connection: a header (magic, job secret, round,
// phase, sender, part, element count, wire dtype, weight, int8 scale) and the
// payload. Messages that arrive before the local peer enters the round wait in
// a bounded mailbox. Nothing blocks forever: a member that is dead (it refuses
// connections; missing members are probed while waiting), late or rejected is
// reported in the result and the caller decides (the strategy aborts the
// round and retries it without that member).
#pragma once

#include <torch/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

namespace disttrain::strategies {

enum class WireDtype : uint8_t { kFloat32 = 0, kBFloat16 = 1, kInt8 = 2 };

struct GroupMember {
  std::string host;
  int port = 0;
};

struct AverageResult {
  // Members (by index in the group) that a message could not be sent to or
  // whose message did not arrive in time.
  std::vector<int> unreachable;
  // (member index, reason) of each message that was received and rejected.
  std::vector<std::pair<int, std::string>> rejected;
  // How many members' contributions went into the part this peer owns (itself included).
  int contributors = 0;
  uint64_t bytes_sent = 0;
  uint64_t bytes_received = 0;
  bool complete() const { return unreachable.empty() && rejected.empty(); }
};

class GroupAverager {
 public:
  // Listens on all interfaces at `port` (0: any free port). `secret` is a
  // 32-byte token derived from the job secret; messages without it are refused.
  GroupAverager(const std::string& secret, int port, int64_t max_message_bytes);
  ~GroupAverager();
  GroupAverager(const GroupAverager&) = delete;
  GroupAverager& operator=(const GroupAverager&) = delete;

  int port() const { return port_; }

  // Replaces `vec` (contiguous float32) by the weighted average of the members'
  // vectors. `round` must be new for every attempt (older messages are dropped).
  // Parts whose owner's result did not arrive keep this peer's own values.
  AverageResult average(torch::Tensor vec, uint64_t round, const std::vector<GroupMember>& group, int my_index,
                        double weight, WireDtype wire, std::chrono::milliseconds timeout);

  // Reasons for every message refused since the last call (bad secret,
  // garbage, oversize, late), including those outside any round.
  std::vector<std::string> take_refusals();

  void close();

 private:
  struct Message {
    int sender = 0;
    uint32_t part = 0;
    uint32_t group_size = 0;
    uint64_t count = 0;
    WireDtype wire = WireDtype::kFloat32;
    double weight = 0.0;
    float scale = 1.0f;
    std::vector<uint8_t> payload;
  };
  using Key = std::tuple<uint64_t, uint8_t, int>;  // round, phase, sender

  void accept_loop();
  void handle_connection(int fd);
  void refuse(const std::string& reason);
  // Waits until every sender in `senders` has a message for (round, phase) or
  // the deadline passes; moves out what arrived.
  std::map<int, Message> collect(uint64_t round, uint8_t phase, const std::vector<int>& senders,
                                 const std::vector<GroupMember>& group,
                                 std::chrono::steady_clock::time_point deadline);

  std::string secret_;
  int64_t max_message_bytes_;
  int listen_fd_ = -1;
  int wake_pipe_[2] = {-1, -1};
  int port_ = 0;
  std::atomic<bool> closing_{false};
  std::thread acceptor_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::map<Key, Message> mailbox_;
  int64_t mailbox_bytes_ = 0;
  uint64_t oldest_round_ = 0;  // messages for rounds below this are late
  std::vector<std::string> refusals_;
  std::set<int> open_fds_;
  int active_handlers_ = 0;
  std::condition_variable handlers_done_;
};

}  // namespace disttrain::strategies
