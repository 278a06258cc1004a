// libFuzzer target: the TCP transport's connection handshake and frame parser
// (csrc/comm/tcp/tcp_transport.cpp), fed through real sockets. Neither check
// is callable on its own (both are private members run by the transport's
// threads), and csrc/comm is not changed for the fuzzer: each input builds a
// real rank 0 of a two-rank group over an in-process HashStore, and the
// harness plays rank 1.
//
// Input: byte 0 is a mode, bytes 1..28 a hello message, the rest the byte
// stream rank 1 sends after the handshake, while rank 0 receives one
// allreduce(float32, 64 elements) from it.
//   mode bit 0/1/2: patch in the job secret / the hello magic and world size /
//                   rank 1, so the fuzzer can reach an accepted hello;
//   mode bit 3:     patch the first frame header to the signature rank 0
//                   expects, so mutations reach the length and payload checks.
// A rejected hello is followed by a valid one (so the job can still form, as
// it must: a stranger knocking may not stop it). Rank 0 may throw (a clean
// DistBackendError or c10::Error); a sanitizer report, another exception
// type, or a hang past libFuzzer's -timeout is a crash.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <chrono>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "comm/tcp/frame.h"
#include "loopback.h"
#include "comm/tcp/tcp_transport.h"

using namespace disttrain::comm;

namespace {


void send_all(int fd, const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) return;  // rank 0 closed the connection: what it may do with garbage
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// True when rank 0 acknowledged the hello; false when it closed the connection.
bool acknowledged(int fd) {
  uint32_t ack = 0;
  size_t got = 0;
  while (got < sizeof(ack)) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20000) <= 0) __builtin_trap();  // neither an answer nor a close in 20 s: a hang
    ssize_t n = ::recv(fd, reinterpret_cast<char*>(&ack) + got, sizeof(ack) - got, 0);
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return ack == kHelloMagic;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1 + sizeof(HelloMessage)) return 0;
  const uint8_t mode = data[0];
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::unique_ptr<TcpTransport> rank0;
  std::thread setup([&] {
    try {
      rank0 = std::make_unique<TcpTransport>(store, 0, 2, std::chrono::milliseconds(10000));
    } catch (const std::exception&) {
    }
  });
  const std::vector<uint8_t> secret = store->get("disttrain/secret");
  const std::vector<uint8_t> address = store->get("disttrain/addr/0");
  const std::string addr(address.begin(), address.end());
  const int port = std::stoi(addr.substr(addr.rfind(':') + 1));

  HelloMessage hello;
  std::memcpy(&hello, data + 1, sizeof(hello));
  if (mode & 1) std::memcpy(hello.secret, secret.data(), sizeof(hello.secret));
  if (mode & 2) hello.magic = kHelloMagic, hello.world_size = 2;
  if (mode & 4) hello.rank = 1;
  int fd = connect_loopback(port);
  send_all(fd, &hello, sizeof(hello));
  if (!acknowledged(fd)) {
    ::close(fd);
    HelloMessage valid{kHelloMagic, 1, 2, {}};
    std::memcpy(valid.secret, secret.data(), sizeof(valid.secret));
    fd = connect_loopback(port);
    send_all(fd, &valid, sizeof(valid));
    if (!acknowledged(fd)) __builtin_trap();  // a stranger's connection stopped the job from forming
  }
  setup.join();
  if (!rank0) __builtin_trap();

  std::vector<uint8_t> stream(data + 1 + sizeof(HelloMessage), data + size);
  OpSignature sig;
  sig.op = OpKind::kAllreduce;
  sig.dtype = 6;  // c10::ScalarType::Float
  sig.redop = RedOp::kSum;
  sig.count = 64;
  if ((mode & 8) && stream.size() >= sizeof(FrameHeader)) {
    FrameHeader h;
    std::memcpy(&h, stream.data(), sizeof(h));
    h.magic = kFrameMagic;
    h.kind = static_cast<uint8_t>(FrameKind::kCollective);
    h.op = static_cast<uint8_t>(sig.op);
    h.dtype = sig.dtype;
    h.redop = static_cast<uint8_t>(sig.redop);
    h.seq = sig.seq;
    h.count = sig.count;
    h.aux = sig.aux;
    h.step = 0;
    std::memcpy(stream.data(), &h, sizeof(h));
  }
  std::vector<float> dst(64);
  std::thread receiver([&] {
    std::vector<SendSpec> sends;
    std::vector<RecvSpec> recvs{RecvSpec{1, dst.data(), dst.size() * sizeof(float), sig.count}};
    try {
      rank0->exchange(FrameKind::kCollective, sig, 0, sends, recvs, Clock::now() + std::chrono::seconds(10));
    } catch (const std::exception&) {
    }
  });
  send_all(fd, stream.data(), stream.size());
  ::shutdown(fd, SHUT_WR);  // the end of the input: rank 0 must see a lost peer, not wait
  receiver.join();
  ::close(fd);
  rank0.reset();
  return 0;
}
