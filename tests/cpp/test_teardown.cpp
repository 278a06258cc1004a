// Teardown of the disttrain backend (ranks as threads, one in-memory store):
// a pending op fails at once with an error naming it, never at the group
// timeout; the backend may be destroyed on its own progress thread; shutdown()
// leaves no op runnable; a peer already gone does not hold the teardown.
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <ATen/ATen.h>

#include <chrono>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "comm/backend.h"

using namespace disttrain::comm;
using namespace std::chrono_literals;

namespace {

using Backend = c10::intrusive_ptr<DisttrainBackend>;

// A group long timeout: a test that waits for it has failed.
constexpr auto kGroupTimeout = 60000ms;

std::vector<Backend> make_group(int world, const std::string& transport = "auto",
                                c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::HashStore>()) {
  std::vector<Backend> backends(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        backends[r] = c10::make_intrusive<DisttrainBackend>(store, r, world, kGroupTimeout,
                                                            CommOptions::resolve({{"transport", transport}}));
      } catch (const c10::Error& e) {  // a failed set-up fails the test, not the whole binary
        ADD_FAILURE() << "rank " << r << ": " << e.what_without_backtrace();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (const auto& b : backends) {
    if (!b) throw std::runtime_error("the group could not be made");
  }
  return backends;
}

c10::intrusive_ptr<c10d::Work> allreduce(DisttrainBackend& b, at::Tensor t) {
  std::vector<at::Tensor> ts{std::move(t)};
  return b.allreduce(ts, c10d::AllreduceOptions());
}

// The error a Work ended with ("" if none).
std::string error_of(const c10::intrusive_ptr<c10d::Work>& w) {
  try {
    w->wait();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

class Teardown : public ::testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(Teardown, PendingOpsFailAtOnceNamingThemselves) {
  auto group = make_group(2, GetParam());
  // Rank 0 issues three ops rank 1 never joins: the first is in progress
  // (waiting for rank 1), the others queued behind it.
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (int i = 0; i < 3; ++i) works.push_back(allreduce(*group[0], at::ones({1000})));
  std::this_thread::sleep_for(50ms);
  auto t0 = std::chrono::steady_clock::now();
  group[0]->shutdown();
  EXPECT_LT(seconds_since(t0), 5.0);  // not the 60 s group timeout
  std::string first = error_of(works[0]);
  EXPECT_NE(first.find("shut down"), std::string::npos) << first;
  EXPECT_NE(first.find("allreduce (sequence number 0)"), std::string::npos) << first;
  for (int i = 1; i < 3; ++i) {
    std::string e = error_of(works[i]);
    EXPECT_NE(e.find("before allreduce (sequence number " + std::to_string(i) + ") ran"), std::string::npos) << e;
  }
  // Nothing runs on a group that was shut down.
  try {
    allreduce(*group[0], at::ones({4}));
    FAIL() << "an op after shutdown() must raise";
  } catch (const c10::DistBackendError& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("shut down"), std::string::npos);
  }
  group[0].reset();
  group[1].reset();
}

TEST_P(Teardown, DestroyingWithAnOpInProgressDoesNotWaitForTheTimeout) {
  auto group = make_group(2, GetParam());
  auto work = allreduce(*group[1], at::ones({1 << 20}));  // rank 0 never joins
  std::this_thread::sleep_for(50ms);
  auto t0 = std::chrono::steady_clock::now();
  group[1].reset();  // the destructor: as at interpreter exit
  EXPECT_LT(seconds_since(t0), 5.0);
  std::string e = error_of(work);
  EXPECT_NE(e.find("destroyed"), std::string::npos) << e;
  EXPECT_NE(e.find("allreduce (sequence number 0)"), std::string::npos) << e;
  group[0].reset();
}

TEST_P(Teardown, BackendDestroyedOnItsOwnProgressThread) {
  auto group = make_group(2, GetParam());
  // Only a completion callback holds rank 0's backend: when the op completes,
  // the callback drops the last reference on the progress thread. Joining
  // that thread from itself would terminate the process.
  std::atomic<bool> destroyed{false};
  auto w0 = allreduce(*group[0], at::ones({8}));  // cannot complete before rank 1 joins
  w0->getFuture()->addCallback([held = group[0], &destroyed](c10::ivalue::Future&) mutable {
    held.reset();
    destroyed = true;
  });
  group[0].reset();
  auto w1 = allreduce(*group[1], at::ones({8}));
  EXPECT_EQ(error_of(w1), "");
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (!destroyed && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  EXPECT_TRUE(destroyed.load());
  EXPECT_EQ(error_of(w0), "");
  std::this_thread::sleep_for(50ms);  // the detached thread finishes on its own
  group[1].reset();
}

TEST_P(Teardown, AnyOrderAndAPeerAlreadyGone) {
  for (int order = 0; order < 2; ++order) {
    auto group = make_group(3, GetParam());
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (auto& b : group) works.push_back(allreduce(*b, at::ones({16})));
    for (auto& b : group) works.push_back(b->barrier(c10d::BarrierOptions()));
    for (auto& w : works) EXPECT_EQ(error_of(w), "");
    // Rank 2 goes first (shutdown, or simply destroyed); then the others,
    // in either order, one of them with an op its peers never join.
    if (order == 0) group[2]->shutdown();
    group[2].reset();
    auto orphan = allreduce(*group[order], at::ones({4}));
    auto t0 = std::chrono::steady_clock::now();
    group[order].reset();
    group[1 - order].reset();
    EXPECT_LT(seconds_since(t0), 5.0);
    // Either it noticed rank 2 gone, or it waited for the idle rank until the teardown.
    std::string e = error_of(orphan);
    EXPECT_TRUE(e.find("rank 2") != std::string::npos || e.find("destroyed") != std::string::npos) << e;
  }
}

// init_process_group after destroy_process_group: torch names the new default
// group as it named the old one, on the same store. The new group read the old
// one's keys (a segment tag whose segments were unlinked: "cannot open rank 0's
// segment"; a count of mapped segments already complete).
TEST_P(Teardown, AGroupMadeAgainOnTheSameStoreReadsNoneOfTheOldOnesKeys) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  for (int round = 0; round < 3; ++round) {
    auto group = make_group(3, GetParam(), store);
    std::vector<at::Tensor> values(3);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int r = 0; r < 3; ++r) {
      values[r] = at::full({1000}, static_cast<float>(r + 1 + round));
      works.push_back(allreduce(*group[r], values[r]));
    }
    for (int r = 0; r < 3; ++r) {
      EXPECT_EQ(error_of(works[r]), "") << "round " << round << ", rank " << r;
      EXPECT_TRUE(values[r].eq(6.0f + 3 * round).all().item<bool>()) << "round " << round << ", rank " << r;
    }
    for (auto& b : group) b->shutdown();
    group.clear();
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, Teardown, ::testing::Values("tcp", "shm"));
