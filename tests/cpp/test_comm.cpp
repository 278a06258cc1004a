// Transport and algorithm tests with threads as ranks, sharing an in-memory store.
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <c10/util/Half.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "comm/tcp/socket_util.h"
#include "comm/tcp/tcp_collectives.h"
#include "comm/kernels/reduce_kernels.h"
#include "rank_threads.h"

using namespace disttrain::comm;
using namespace std::chrono_literals;

namespace {

// Runs fn(transport) on `world` threads; returns each rank's error message ("" if none).
std::vector<std::string> run_ranks(int world, const std::function<void(TcpTransport&)>& fn,
                                   std::chrono::milliseconds timeout = 20000ms) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  return disttrain::testing::on_rank_threads(world, [&](int r) {
    TcpTransport t(store, r, world, timeout);
    fn(t);
  });
}

Deadline soon(std::chrono::milliseconds ms = 20000ms) { return Clock::now() + ms; }

OpSignature sig_for(OpKind op, uint64_t count, RedOp redop = RedOp::kSum, c10::ScalarType dtype = c10::kFloat) {
  return OpSignature{0, op, static_cast<uint8_t>(dtype), redop, count, 0};
}

void expect_no_errors(const std::vector<std::string>& errors) {
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

}  // namespace

TEST(ReduceKernels, SumMinMaxProductFloat) {
  std::vector<float> a{1, -2, 3.5f, 0}, b{2, 5, -1, 7}, out(4);
  reduce_kernel(c10::kFloat, RedOp::kSum)(out.data(), a.data(), b.data(), 4);
  EXPECT_EQ(out, (std::vector<float>{3, 3, 2.5f, 7}));
  reduce_kernel(c10::kFloat, RedOp::kMin)(out.data(), a.data(), b.data(), 4);
  EXPECT_EQ(out, (std::vector<float>{1, -2, -1, 0}));
  reduce_kernel(c10::kFloat, RedOp::kMax)(out.data(), a.data(), b.data(), 4);
  EXPECT_EQ(out, (std::vector<float>{2, 5, 3.5f, 7}));
  reduce_kernel(c10::kFloat, RedOp::kProduct)(a.data(), a.data(), b.data(), 4);  // in place
  EXPECT_EQ(a, (std::vector<float>{2, -10, -3.5f, 0}));
}

TEST(ReduceKernels, HalfAccumulatesInFloatAndRoundsOnce) {
  // 2048 + 1 is not representable in fp16; the sum must round like float->half.
  std::vector<c10::Half> a(1000, c10::Half(2048.0f)), b(1000, c10::Half(1.0f)), out(1000);
  reduce_kernel(c10::kHalf, RedOp::kSum)(out.data(), a.data(), b.data(), out.size());
  for (auto v : out) EXPECT_EQ(static_cast<float>(v), static_cast<float>(c10::Half(2049.0f)));
}

TEST(ReduceKernels, BitwiseOnIntegersAndClearErrorOnFloat) {
  std::vector<int32_t> a{0b1100, 7}, b{0b1010, 1}, out(2);
  reduce_kernel(c10::kInt, RedOp::kBxor)(out.data(), a.data(), b.data(), 2);
  EXPECT_EQ(out, (std::vector<int32_t>{0b0110, 6}));
  try {
    reduce_kernel(c10::kFloat, RedOp::kBand);
    FAIL() << "BAND on float must throw";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("BAND"), std::string::npos);
  }
}

class AllreduceTest : public ::testing::TestWithParam<std::tuple<int, AllreduceAlgorithm>> {};

TEST_P(AllreduceTest, EveryRankGetsTheSum) {
  auto [world, algo] = GetParam();
  for (size_t count : {size_t(0), size_t(1), size_t(3), size_t(1001), size_t(300000)}) {
    auto errors = run_ranks(world, [&, algo = algo](TcpTransport& t) {
      std::vector<float> data(count, static_cast<float>(t.rank() + 1));
      allreduce(t, sig_for(OpKind::kAllreduce, count), data.data(), count, c10::kFloat, soon(), algo);
      float expected = world * (world + 1) / 2.0f;
      for (size_t i = 0; i < count; ++i) {
        if (data[i] != expected) throw std::runtime_error("wrong value at " + std::to_string(i));
      }
    });
    expect_no_errors(errors);
  }
}

INSTANTIATE_TEST_SUITE_P(Worlds, AllreduceTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4),
                                            ::testing::Values(AllreduceAlgorithm::kRing,
                                                              AllreduceAlgorithm::kRecursiveDoubling)));

// A rooted op's signature names its root (aux), as the backend's do.
OpSignature rooted(OpKind op, uint64_t count, int root) {
  OpSignature sig = sig_for(op, count, RedOp::kNone, c10::kByte);
  sig.aux = root;
  return sig;
}

TEST(Collectives, BroadcastTreeAndChainFromEveryRoot) {
  for (int world : {3, 4}) {
    for (size_t bytes : {size_t(5), size_t(1 << 20)}) {
      for (int root = 0; root < world; ++root) {
        auto errors = run_ranks(world, [&](TcpTransport& t) {
          std::vector<uint8_t> data(bytes, t.rank() == root ? 0xAB : 0);
          broadcast(t, rooted(OpKind::kBroadcast, bytes, root), data.data(), bytes, root, soon());
          for (auto v : data)
            if (v != 0xAB) throw std::runtime_error("broadcast lost data");
        });
        expect_no_errors(errors);
      }
    }
  }
}

TEST(Collectives, GatherAndScatterFromEveryRoot) {
  const int world = 3;
  const size_t bytes = 1000;
  for (int root = 0; root < world; ++root) {
    auto errors = run_ranks(world, [&](TcpTransport& t) {
      std::vector<uint8_t> in(bytes, static_cast<uint8_t>(t.rank() + 1)), all(bytes * world), out(bytes);
      gather(t, rooted(OpKind::kGather, bytes, root), in.data(), all.data(), bytes, root, soon());
      if (t.rank() == root)
        for (size_t i = 0; i < all.size(); ++i)
          if (all[i] != i / bytes + 1) throw std::runtime_error("gather block " + std::to_string(i / bytes));
      for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint8_t>(10 + i / bytes);
      scatter(t, rooted(OpKind::kScatter, bytes, root), all.data(), out.data(), bytes, root, soon());
      for (auto v : out)
        if (v != 10 + t.rank()) throw std::runtime_error("scatter block");
    });
    expect_no_errors(errors);
  }
}

// Ranks that name different roots: before the root check, a broadcast or scatter
// returned wrong data on some ranks and a gather hung to the timeout. Every rank
// must raise the mismatch in that op, within the op (not at the deadline).
TEST(Collectives, RootMismatchRaisesOnEveryRankInTheOp) {
  for (int world : {2, 3}) {
    for (size_t bytes : {size_t(5), size_t(1 << 20)}) {
      for (OpKind op : {OpKind::kBroadcast, OpKind::kGather, OpKind::kScatter}) {
        auto start = Clock::now();
        auto errors = run_ranks(world, [&](TcpTransport& t) {
          const int root = t.rank() % 2;
          std::vector<uint8_t> one(bytes, 1), all(bytes * world, 1);
          OpSignature sig = rooted(op, bytes, root);
          if (op == OpKind::kBroadcast) broadcast(t, sig, one.data(), bytes, root, soon());
          if (op == OpKind::kGather) gather(t, sig, one.data(), all.data(), bytes, root, soon());
          if (op == OpKind::kScatter) scatter(t, sig, all.data(), one.data(), bytes, root, soon());
        });
        for (int r = 0; r < world; ++r) {
          EXPECT_NE(errors[r].find("collective mismatch"), std::string::npos)
              << describe(rooted(op, bytes, 0)) << " world " << world << " rank " << r << ": '" << errors[r] << "'";
        }
        EXPECT_LT(Clock::now() - start, 10s) << "the mismatch waited for the deadline";
      }
    }
  }
}

TEST(Collectives, AllgatherAndReduceScatterRing) {
  const int world = 3;
  const size_t n = 1000;
  auto errors = run_ranks(world, [&](TcpTransport& t) {
    std::vector<int64_t> in(n, t.rank()), out(n * world);
    allgather(t, sig_for(OpKind::kAllgather, n, RedOp::kNone, c10::kLong), in.data(), out.data(), n * 8, soon());
    for (int r = 0; r < world; ++r)
      for (size_t i = 0; i < n; ++i)
        if (out[r * n + i] != r) throw std::runtime_error("allgather block " + std::to_string(r));
    std::vector<int64_t> blocks(n * world), mine(n);
    for (int b = 0; b < world; ++b) std::fill(blocks.begin() + b * n, blocks.begin() + (b + 1) * n, b * 10 + t.rank());
    reduce_scatter(t, sig_for(OpKind::kReduceScatter, n, RedOp::kSum, c10::kLong), blocks.data(), mine.data(), n,
                   c10::kLong, soon());
    int64_t expected = t.rank() * 10 * world + (0 + 1 + 2);
    for (auto v : mine)
      if (v != expected) throw std::runtime_error("reduce_scatter got " + std::to_string(v));
  });
  expect_no_errors(errors);
}

TEST(Collectives, MismatchRaisesTheSameErrorOnEveryRank) {
  auto errors = run_ranks(2, [](TcpTransport& t) {
    size_t count = t.rank() == 0 ? 10 : 20;
    std::vector<float> data(count, 1.0f);
    allreduce(t, sig_for(OpKind::kAllreduce, count), data.data(), count, c10::kFloat, soon());
  });
  ASSERT_NE(errors[0], "");
  EXPECT_EQ(errors[0], errors[1]);
  EXPECT_NE(errors[0].find("collective mismatch"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("numel=10"), std::string::npos);
  EXPECT_NE(errors[0].find("numel=20"), std::string::npos);
}

TEST(Collectives, SilentPeerTimesOutNamingIt) {
  auto errors = run_ranks(2, [](TcpTransport& t) {
    if (t.rank() == 1) {
      std::this_thread::sleep_for(1500ms);
      return;
    }
    std::vector<float> data(4, 1.0f);
    allreduce(t, sig_for(OpKind::kAllreduce, 4), data.data(), 4, c10::kFloat, Clock::now() + 300ms);
  });
  EXPECT_NE(errors[0].find("timeout"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("rank(s) 1"), std::string::npos) << errors[0];
}

// A rooted op waits on a silent rank for two messages (its root-check frame and its data): the
// timeout names it once ("rank(s) 2, 2" before).
TEST(Collectives, SilentPeerOfAGatherIsNamedOnce) {
  auto errors = run_ranks(3, [](TcpTransport& t) {
    if (t.rank() == 2) {
      std::this_thread::sleep_for(1500ms);
      return;
    }
    std::vector<uint8_t> in(8, 1), all(24);
    // The root times out first (rank 1 waits only for rank 2's root-check frame).
    auto deadline = Clock::now() + (t.rank() == 0 ? 300ms : 1000ms);
    gather(t, rooted(OpKind::kGather, 8, 0), in.data(), all.data(), 8, 0, deadline);
  });
  EXPECT_NE(errors[0].find("rank 0 waited"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("for rank(s) 2, which"), std::string::npos) << errors[0];
}

TEST(Collectives, SimultaneousLargeSendsDoNotDeadlock) {
  // Every rank sends to the next before receiving from the previous one, far
  // beyond the socket buffers: a pair (2 ranks) and a cycle (3 ranks).
  const size_t bytes = 32 << 20;
  for (int world : {2, 3}) {
    auto errors = run_ranks(world, [&](TcpTransport& t) {
      int next = (t.rank() + 1) % world, prev = (t.rank() + world - 1) % world;
      std::vector<uint8_t> out(bytes, static_cast<uint8_t>(t.rank() + 1)), in(bytes);
      OpSignature sig{0, OpKind::kSend, static_cast<uint8_t>(c10::kByte), RedOp::kNone, bytes, 0};
      send(t, sig, out.data(), bytes, next, soon());
      recv(t, sig, in.data(), bytes, prev, soon());
      for (auto v : in)
        if (v != prev + 1) throw std::runtime_error("wrong payload");
    });
    expect_no_errors(errors);
  }
}

TEST(Collectives, OneExchangeRunsSeveralMessagesPerPeerInOrder) {
  // A batch of point-to-point messages (batch_isend_irecv): each rank receives
  // two messages from every peer and sends two to each, each with its own
  // signature (sequence number, tag, size), all in one exchange. A peer's
  // messages must arrive whole and in order: their frames never interleave.
  const size_t big = 3 << 20, small = 100;
  for (int world : {2, 3}) {
    auto errors = run_ranks(world, [&](TcpTransport& t) {
      std::vector<OpSignature> sigs;
      std::vector<std::vector<uint8_t>> out, in;
      std::vector<SendSpec> sends;
      std::vector<RecvSpec> recvs;
      sigs.reserve(4 * world);  // specs point into it
      for (int p = 0; p < world; ++p) {
        if (p == t.rank()) continue;
        for (int i = 0; i < 2; ++i) {
          const size_t bytes = i == 0 ? big : small;
          sigs.push_back(OpSignature{static_cast<uint64_t>(i), OpKind::kSend, static_cast<uint8_t>(c10::kByte),
                                     RedOp::kNone, bytes, i});
          in.emplace_back(bytes);
          RecvSpec r{p, in.back().data(), bytes, bytes};
          r.sig = &sigs.back();
          recvs.push_back(r);
          out.emplace_back(bytes, static_cast<uint8_t>(10 * t.rank() + i));
          sends.push_back({p, out.back().data(), bytes, bytes, nullptr, &sigs.back()});
        }
      }
      // in/out stop growing here, so the pointers above stay valid
      t.exchange(FrameKind::kPointToPoint, sigs.front(), 0, sends, recvs, soon());
      for (const auto& r : recvs) {
        const auto* data = static_cast<const uint8_t*>(r.dst);
        const uint8_t want = static_cast<uint8_t>(10 * r.peer + r.sig->aux);
        for (size_t k = 0; k < r.bytes; ++k)
          if (data[k] != want) throw std::runtime_error("wrong payload from rank " + std::to_string(r.peer));
      }
    });
    expect_no_errors(errors);
  }
}

// ---------------------------------------------------------------------------
// The handshake during set-up: rank 0 is real, this test plays everyone else.

namespace {

int connect_to(const std::string& address) {
  std::string error;
  auto colon = address.rfind(':');
  int fd = connect_retry(address.substr(0, colon), std::stoi(address.substr(colon + 1)), soon(), &error);
  if (fd < 0) throw std::runtime_error(error);
  return fd;
}

HelloMessage hello_for(uint32_t rank, uint32_t world, const std::vector<uint8_t>& secret) {
  HelloMessage h{kHelloMagic, rank, world, {}};
  std::memcpy(h.secret, secret.data(), sizeof(h.secret));
  return h;
}

// What rank 0 answers a complete hello with: "ack", "closed" (dropped
// unanswered) or "silence" (nothing within 10 s: it is not even being read).
std::string answer_to(const HelloMessage& h, const std::string& address, int* kept_fd = nullptr) {
  int fd = connect_to(address);
  if (::send(fd, &h, sizeof(h), MSG_NOSIGNAL) != static_cast<ssize_t>(sizeof(h))) {
    ::close(fd);
    return "closed";
  }
  pollfd p{fd, POLLIN, 0};
  std::string result = "silence";
  if (::poll(&p, 1, 10000) > 0) {
    uint32_t ack = 0;
    ssize_t n = ::recv(fd, &ack, sizeof(ack), MSG_WAITALL);
    result = n == static_cast<ssize_t>(sizeof(ack)) && ack == kHelloMagic ? "ack" : n <= 0 ? "closed" : "garbage";
  }
  if (kept_fd && result == "ack") *kept_fd = fd;
  else ::close(fd);
  return result;
}

}  // namespace

TEST(Handshake, StrangersDuringSetUpAreDroppedWithoutDelayingIt) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::unique_ptr<TcpTransport> rank0;
  std::string error;
  std::atomic<bool> ready{false};
  std::thread setup([&] {
    try {
      rank0 = std::make_unique<TcpTransport>(store, 0, 3, 30000ms);
      ready = true;
    } catch (const c10::Error& e) {
      error = e.what_without_backtrace();
    }
  });
  const std::vector<uint8_t> secret = store->get("disttrain/secret");
  const std::vector<uint8_t> addr_bytes = store->get("disttrain/addr/0");
  const std::string address(addr_bytes.begin(), addr_bytes.end());

  // First in: a sender that dribbles a valid hello (the right secret even) at
  // one byte a second; it would take 28 s. Its deadline is for the whole hello.
  int dribbler = connect_to(address);
  const auto dribble_start = Clock::now();
  std::atomic<int64_t> dropped_after_ms{-1};
  std::thread dribble([&] {
    HelloMessage h = hello_for(1, 3, secret);
    const auto* bytes = reinterpret_cast<const uint8_t*>(&h);
    for (size_t i = 0; i < sizeof(h); ++i) {
      if (::send(dribbler, bytes + i, 1, MSG_NOSIGNAL) != 1) break;
      pollfd p{dribbler, POLLIN | POLLRDHUP, 0};
      if (::poll(&p, 1, 1000) > 0) break;  // rank 0 closed it (it never answers a byte)
    }
    dropped_after_ms = std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - dribble_start).count();
  });

  // Strangers, each answered (by a close) while the dribbler is still being read.
  HelloMessage wrong_secret = hello_for(1, 3, secret);
  wrong_secret.secret[15] ^= 1;
  HelloMessage bad_magic = hello_for(1, 3, secret);
  bad_magic.magic ^= 1;
  for (const auto& [what, h] : std::vector<std::pair<std::string, HelloMessage>>{
           {"wrong secret", wrong_secret},
           {"its own rank", hello_for(0, 3, secret)},
           {"rank == world", hello_for(3, 3, secret)},
           {"rank 1000", hello_for(1000, 3, secret)},
           {"wrong world size", hello_for(1, 4, secret)},
           {"bad magic", bad_magic}}) {
    EXPECT_EQ(answer_to(h, address), "closed") << what;
  }
  // Rank 1 gets in while the dribbler is pending; a second rank 1 does not.
  int rank1 = -1, rank2 = -1;
  EXPECT_EQ(answer_to(hello_for(1, 3, secret), address, &rank1), "ack") << "rank 1";
  EXPECT_EQ(answer_to(hello_for(1, 3, secret), address), "closed") << "duplicate rank 1";

  // The dribbler goes at its deadline, while set-up still waits for rank 2.
  dribble.join();
  EXPECT_GE(dropped_after_ms.load(), kHelloDeadline.count() - 100);
  EXPECT_LT(dropped_after_ms.load(), kHelloDeadline.count() + 8000) << "dropped only when its hello was complete";
  EXPECT_FALSE(ready.load());

  EXPECT_EQ(answer_to(hello_for(2, 3, secret), address, &rank2), "ack") << "rank 2";
  setup.join();
  EXPECT_EQ(error, "");
  ASSERT_TRUE(rank0);
  EXPECT_EQ(rank0->rejected_connections(), 8u);  // six strangers, the duplicate and the dribbler
  for (int fd : {dribbler, rank1, rank2})
    if (fd >= 0) ::close(fd);
}

TEST(Handshake, SecretsCompareInConstantTimeHelper) {
  const uint8_t a[16] = {1, 2, 3}, b[16] = {1, 2, 3};
  uint8_t c[16] = {1, 2, 3};
  EXPECT_TRUE(equal_constant_time(a, b, sizeof(a)));
  c[15] = 1;
  EXPECT_FALSE(equal_constant_time(a, c, sizeof(a)));
  c[15] = 0, c[0] = 0;
  EXPECT_FALSE(equal_constant_time(a, c, sizeof(a)));
  EXPECT_TRUE(equal_constant_time(a, c, 0));
}
