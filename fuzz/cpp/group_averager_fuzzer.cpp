// libFuzzer target: the decentralised averager's message handling
// (csrc/strategies/group_averager.cpp, GroupAverager::handle_connection and
// the averaging of what it accepted), fed through a real socket: each input
// starts a GroupAverager and sends the input to its port as one connection.
//
// Input: byte 0 is a mode, the rest the connection's bytes (an 88-byte
// header, then payload).
//   bit 0: patch the magic and version; bit 1: patch the job token;
//   bit 2: make group size, sender and part valid for a group of two;
//   bit 3: make payload_bytes agree with count and the wire dtype;
//   bit 4: round 1, and the averager runs average() on round 1 in a group of
//          two (itself and a member that is gone) while the input arrives,
//          so accepted contributions are decoded and averaged in.
// The averager may refuse the message (a reason in take_refusals) or average
// it in; a sanitizer report, an exception out of it or a hang is a crash.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <future>
#include <string>
#include <vector>

#include "loopback.h"
#include "strategies/group_averager.h"

using namespace disttrain::strategies;

namespace {

// The wire header as group_averager.cpp lays it out (its struct is private to that file).
#pragma pack(push, 1)
struct WireHeader {
  uint32_t magic;
  uint8_t version, phase, wire, reserved0;
  uint8_t token[32];
  uint64_t round;
  uint32_t sender, part, group_size;
  float scale;
  uint64_t count;
  double weight;
  uint64_t payload_bytes;
};
#pragma pack(pop)
static_assert(sizeof(WireHeader) == 88, "average header layout");

const std::string kToken(32, 'k');


// A port nobody listens on: the averager's probes find the second member gone.
int closed_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  std::vector<uint8_t> bytes(data + 1, data + size);
  if (bytes.size() >= sizeof(WireHeader)) {
    WireHeader h;
    std::memcpy(&h, bytes.data(), sizeof(h));
    if (mode & 1) h.magic = 0x56415444, h.version = 1;
    if (mode & 2) std::memcpy(h.token, kToken.data(), sizeof(h.token));
    if (mode & 4) h.group_size = 2, h.sender %= 2, h.part %= 2;
    if (mode & 8) {
      h.wire %= 3;
      h.count %= 64;
      h.payload_bytes = h.count * (h.wire == 0 ? 4 : h.wire == 1 ? 2 : 1);
    }
    if (mode & 16) h.round = 1;
    std::memcpy(bytes.data(), &h, sizeof(h));
  }
  GroupAverager averager(kToken, 0, 1 << 16);
  std::future<AverageResult> round;
  if (mode & 16) {
    std::vector<GroupMember> group{{"127.0.0.1", averager.port()}, {"127.0.0.1", closed_port()}};
    round = std::async(std::launch::async, [&averager, group] {
      torch::Tensor vec = torch::zeros({16});
      return averager.average(vec, 1, group, 0, 1.0, WireDtype::kFloat32, std::chrono::milliseconds(100));
    });
  }
  int fd = connect_loopback(averager.port());
  size_t sent = 0;
  while (sent < bytes.size()) {
    ssize_t w = ::send(fd, bytes.data() + sent, bytes.size() - sent, MSG_NOSIGNAL);
    if (w <= 0) break;  // refused and closed: allowed
    sent += static_cast<size_t>(w);
  }
  ::shutdown(fd, SHUT_WR);
  char sink[256];
  while (true) {  // the averager closes the connection once it has judged the message
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20000) <= 0) __builtin_trap();  // it neither answered nor closed in 20 s: a hang
    if (::recv(fd, sink, sizeof(sink), 0) <= 0) break;
  }
  ::close(fd);
  if (round.valid()) round.get();
  averager.take_refusals();
  return 0;
}
