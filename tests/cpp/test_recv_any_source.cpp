// Receives from any source on the disttrain backend (ranks as threads, one
// in-memory store): recvAnysource matches whichever peer sends, Work::sourceRank()
// names it, receives from a given rank posted before or after it keep each
// pair's order, a receive nobody sends fails at the group timeout, and one
// that can never match fails at once, never hangs.
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "comm/backend.h"
#include "rank_threads.h"

using namespace disttrain::comm;
using namespace std::chrono_literals;

namespace {

using Backend = c10::intrusive_ptr<DisttrainBackend>;
using WorkPtr = c10::intrusive_ptr<c10d::Work>;

// Runs fn(rank, backend) on `world` threads, each with its own backend of one
// group; returns each rank's error message ("" if none).
std::vector<std::string> run_group(int world, const std::function<void(int, DisttrainBackend&)>& fn,
                                   const std::string& transport = "tcp",
                                   std::chrono::milliseconds timeout = 30000ms) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  return disttrain::testing::on_rank_threads(world, [&](int r) {
    auto b = c10::make_intrusive<DisttrainBackend>(store, r, world, timeout,
                                                   CommOptions::resolve({{"transport", transport}}));
    fn(r, *b);
  });
}

WorkPtr send(DisttrainBackend& b, float value, int dst, int tag = 0, int64_t n = 10) {
  std::vector<at::Tensor> ts{at::full({n}, value)};
  return b.send(ts, dst, tag);
}

struct Received {
  WorkPtr work;
  at::Tensor tensor;
};

Received recv_any(DisttrainBackend& b, int tag = 0, int64_t n = 10) {
  std::vector<at::Tensor> ts{at::full({n}, -1.0f)};
  auto w = b.recvAnysource(ts, tag);
  return {w, ts[0]};
}

Received recv_from(DisttrainBackend& b, int src, int tag = 0, int64_t n = 10) {
  std::vector<at::Tensor> ts{at::full({n}, -1.0f)};
  auto w = b.recv(ts, src, tag);
  return {w, ts[0]};
}

// The value every element of a received tensor has (it throws if they differ).
float value_of(const Received& r) {
  float v = r.tensor[0].item<float>();
  if (!at::all(r.tensor == v).item<bool>()) throw std::runtime_error("a received tensor is torn");
  return v;
}

void expect_no_errors(const std::vector<std::string>& errors) {
  for (size_t r = 0; r < errors.size(); ++r) EXPECT_EQ(errors[r], "") << "rank " << r;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class RecvAnySource : public ::testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(RecvAnySource, MatchesEverySenderAndNamesIt) {
  // Ranks 1..3 send rank 0 two messages each (value 10 * rank + i); rank 0
  // posts all six receives from any source before waiting for any of them.
  const int world = 4;
  std::vector<std::pair<int, float>> got;  // (sourceRank, value), rank 0's
  auto errors = run_group(world, [&](int rank, DisttrainBackend& b) {
    if (rank == 0) {
      std::vector<Received> rs;
      for (int i = 0; i < 2 * (world - 1); ++i) rs.push_back(recv_any(b));
      for (auto& r : rs) {
        r.work->wait();
        got.emplace_back(r.work->sourceRank(), value_of(r));
      }
    } else {
      for (int i = 0; i < 2; ++i) send(b, 10.0f * rank + i, 0)->wait();
    }
  }, GetParam());
  expect_no_errors(errors);
  ASSERT_EQ(got.size(), 6u);
  std::map<int, std::vector<float>> by_sender;
  for (auto [src, v] : got) {
    EXPECT_EQ(static_cast<int>(v) / 10, src) << "value " << v << " reported as from rank " << src;
    by_sender[src].push_back(v);
  }
  for (int src = 1; src < world; ++src)  // each sender's messages arrive in its order
    EXPECT_EQ(by_sender[src], (std::vector<float>{10.0f * src, 10.0f * src + 1})) << "from rank " << src;
}

TEST_P(RecvAnySource, BeforeAndAfterReceivesFromOneRank) {
  // Rank 1 sends 10, 11, 12, 13. Rank 0 posts, before waiting: any, recv(1),
  // recv(1), any. The pair's order decides: 10, 11, 12, 13.
  std::vector<float> values;
  std::vector<int> sources;
  auto errors = run_group(2, [&](int rank, DisttrainBackend& b) {
    if (rank == 0) {
      std::vector<Received> rs{recv_any(b), recv_from(b, 1), recv_from(b, 1), recv_any(b)};
      for (auto& r : rs) {
        r.work->wait();
        values.push_back(value_of(r));
        sources.push_back(r.work->sourceRank());
      }
    } else {
      WorkPtr last;
      for (int i = 0; i < 4; ++i) last = send(b, 10.0f + i, 0);
      last->wait();  // sends run in issue order: all four are out
    }
  }, GetParam());
  expect_no_errors(errors);
  EXPECT_EQ(values, (std::vector<float>{10, 11, 12, 13}));
  EXPECT_EQ(sources, (std::vector<int>{1, 1, 1, 1}));
}

TEST_P(RecvAnySource, MixedWithReceivesFromGivenRanks) {
  // Ranks 1 and 2 send 10, 11 and 20, 21. Rank 0 posts recv(2), any, recv(1),
  // any: whichever sender the first any takes, every message arrives once, each
  // pair's in order, and sourceRank says who sent it.
  std::vector<std::pair<int, float>> got;
  auto errors = run_group(3, [&](int rank, DisttrainBackend& b) {
    if (rank == 0) {
      std::vector<Received> rs{recv_from(b, 2), recv_any(b), recv_from(b, 1), recv_any(b)};
      for (auto& r : rs) {
        r.work->wait();
        got.emplace_back(r.work->sourceRank(), value_of(r));
      }
    } else {
      send(b, 10.0f * rank, 0)->wait();
      send(b, 10.0f * rank + 1, 0)->wait();
    }
  }, GetParam());
  expect_no_errors(errors);
  ASSERT_EQ(got.size(), 4u);
  EXPECT_EQ(got[0], std::make_pair(2, 20.0f));
  EXPECT_EQ(got[2].first, 1);
  std::map<int, std::vector<float>> by_sender;
  for (auto [src, v] : got) {
    EXPECT_EQ(static_cast<int>(v) / 10, src) << "value " << v << " reported as from rank " << src;
    by_sender[src].push_back(v);
  }
  EXPECT_EQ(by_sender[1], (std::vector<float>{10, 11}));
  EXPECT_EQ(by_sender[2], (std::vector<float>{20, 21}));
}

TEST_P(RecvAnySource, PassesOverAPeerAheadInACollective) {
  // Rank 1 is already in the all-reduce that follows rank 0's receive (over
  // TCP its frames reach rank 0 first); rank 2 sends, then joins it.
  std::vector<float> sum(3, 0.0f);
  int source = -1;
  auto errors = run_group(3, [&](int rank, DisttrainBackend& b) {
    std::vector<at::Tensor> t{at::full({4}, static_cast<float>(rank + 1))};
    if (rank == 0) {
      auto r = recv_any(b);
      r.work->wait();
      source = r.work->sourceRank();
      if (value_of(r) != 7.0f) throw std::runtime_error("received the wrong message");
    } else if (rank == 2) {
      std::this_thread::sleep_for(300ms);
      send(b, 7.0f, 0)->wait();
    }
    b.allreduce(t, c10d::AllreduceOptions())->wait();
    sum[rank] = t[0][0].item<float>();
  }, GetParam());
  expect_no_errors(errors);
  EXPECT_EQ(source, 2);
  EXPECT_EQ(sum, (std::vector<float>{6, 6, 6}));
}

TEST_P(RecvAnySource, TimesOutAtTheGroupTimeoutWhenNobodySends) {
  const auto timeout = 1500ms;
  double waited = 0;
  auto errors = run_group(3, [&](int rank, DisttrainBackend& b) {
    if (rank == 0) {
      auto r = recv_any(b);
      auto t0 = std::chrono::steady_clock::now();
      try {
        r.work->wait();
      } catch (...) {
        waited = seconds_since(t0);
        throw;
      }
    } else {
      std::this_thread::sleep_for(2 * timeout);  // alive, silent
    }
  }, GetParam(), timeout);
  EXPECT_NE(errors[0].find("timeout"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("recv from any source"), std::string::npos) << errors[0];
  EXPECT_GE(waited, 1.0);
  EXPECT_LT(waited, 10.0);
}

TEST_P(RecvAnySource, ThatCanNeverMatchFailsAtOnce) {
  // The only peer's next message has another tag: no sender is left, which
  // is said at once (naming what it sent), not at the 30 s group timeout.
  auto t0 = std::chrono::steady_clock::now();
  auto errors = run_group(2, [&](int rank, DisttrainBackend& b) {
    if (rank == 0) {
      recv_any(b, /*tag=*/3).work->wait();
    } else {
      send(b, 1.0f, 0, /*tag=*/5)->wait();
      std::vector<at::Tensor> t{at::ones({1})};
      b.allreduce(t, c10d::AllreduceOptions())->wait();  // fails when rank 0 gives up
    }
  }, GetParam());
  EXPECT_LT(seconds_since(t0), 15.0);
  EXPECT_NE(errors[0].find("cannot be matched"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("tag=5"), std::string::npos) << errors[0];
  EXPECT_NE(errors[1], "");
}

TEST_P(RecvAnySource, SizeMismatchIsAPointToPointMismatch) {
  auto errors = run_group(2, [&](int rank, DisttrainBackend& b) {
    if (rank == 0) {
      recv_any(b, 0, /*n=*/10).work->wait();
    } else {
      send(b, 1.0f, 0, 0, /*n=*/4)->wait();
      std::vector<at::Tensor> t{at::ones({1})};
      b.allreduce(t, c10d::AllreduceOptions())->wait();
    }
  }, GetParam());
  EXPECT_NE(errors[0].find("point-to-point mismatch"), std::string::npos) << errors[0];
  EXPECT_NE(errors[0].find("numel=4"), std::string::npos) << errors[0];
}

TEST(RecvAnySourceWork, SourceRankOfOtherOpsIsTorchsError) {
  auto errors = run_group(2, [&](int rank, DisttrainBackend& b) {
    std::vector<at::Tensor> t{at::ones({1})};
    auto w = b.allreduce(t, c10d::AllreduceOptions());
    w->wait();
    EXPECT_THROW(w->sourceRank(), c10::Error);
    if (rank == 0) {
      auto r = recv_from(b, 1);
      EXPECT_EQ(r.work->sourceRank(), 1);  // known before it ran
      r.work->wait();
      EXPECT_EQ(r.work->sourceRank(), 1);
    } else {
      send(b, 1.0f, 0)->wait();
    }
  });
  expect_no_errors(errors);
}

INSTANTIATE_TEST_SUITE_P(Transports, RecvAnySource, ::testing::Values("tcp", "auto"));
