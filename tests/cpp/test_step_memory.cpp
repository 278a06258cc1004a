// Step memory (csrc/strategies/step_memory.h): the CPU allocator that reuses a
// training step's large blocks. The allocator is process-wide and its cap only
// ever rises (step_memory_limits keeps the largest value asked for), so every
// test starts from release() and sizes its blocks from the cap in force.
#include <gtest/gtest.h>

#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <future>
#include <thread>
#include <utility>
#include <vector>

#include "strategies/step_memory.h"

namespace sm = disttrain::strategies;

namespace {

constexpr uint64_t kMiB = 1 << 20;

// Installs the allocator with a 1 MiB threshold and at least `cap` bytes of
// free blocks kept, and empties its free list.
void fresh_start(uint64_t cap = 8 * kMiB) {
  ASSERT_TRUE(sm::step_memory_install()) << "another allocator replaced torch's default CPU allocator";
  sm::step_memory_limits(cap, kMiB);
  sm::step_memory_release();
  ASSERT_EQ(sm::step_memory_depth(), 0);
  ASSERT_EQ(sm::step_memory_stats().cached_bytes, 0u);
}

c10::DataPtr allocate(size_t n) {
  c10::DataPtr p = c10::GetCPUAllocator()->allocate(n);
  std::memset(p.get(), 0x5a, n);  // the memory is usable, all of it
  return p;
}

// A scope for the calling thread, closed however the test ends.
struct Scope {
  Scope() { sm::step_memory_enter(); }
  ~Scope() { sm::step_memory_exit(); }
};

}  // namespace

TEST(StepMemory, ReusesAScopedBlockInTheNextStep) {
  fresh_start();
  const size_t n = 3 * kMiB;
  void* first = nullptr;
  const auto before = sm::step_memory_stats();
  {
    Scope step;
    c10::DataPtr grad = allocate(n);
    first = grad.get();
    EXPECT_EQ(sm::step_memory_stats().live_bytes, before.live_bytes + n);
  }  // the block dies after the scope closed, as gradients do
  EXPECT_EQ(sm::step_memory_stats().cached_bytes, n);
  for (int step_index = 0; step_index < 3; ++step_index) {
    Scope step;
    c10::DataPtr grad = allocate(n);
    EXPECT_EQ(grad.get(), first) << "step " << step_index << " took new memory";
  }
  const auto after = sm::step_memory_stats();
  EXPECT_EQ(after.fresh - before.fresh, 1u);
  EXPECT_EQ(after.reused - before.reused, 3u);
  EXPECT_EQ(after.live_bytes, before.live_bytes);
  sm::step_memory_release();
  EXPECT_EQ(sm::step_memory_stats().cached_bytes, 0u);
}

TEST(StepMemory, SmallestFitWithinAnEighth) {
  fresh_start();
  void* small = nullptr;
  void* large = nullptr;
  {
    Scope step;
    c10::DataPtr a = allocate(2 * kMiB);
    c10::DataPtr b = allocate(4 * kMiB);
    small = a.get();
    large = b.get();
  }
  Scope step;
  // 1.9 MiB fits the 2 MiB block (wastes less than an eighth), not the 4 MiB one.
  c10::DataPtr c = allocate(2 * kMiB - kMiB / 10);
  EXPECT_EQ(c.get(), small);
  // 3 MiB would waste a quarter of the 4 MiB block: new memory.
  c10::DataPtr d = allocate(3 * kMiB);
  EXPECT_NE(d.get(), large);
  EXPECT_NE(d.get(), small);
  EXPECT_EQ(sm::step_memory_stats().cached_bytes, 4 * kMiB);
  c.clear();
  d.clear();
  sm::step_memory_release();
}

TEST(StepMemory, KeepsNoMoreThanTheCapOfFreeBlocks) {
  fresh_start(4 * kMiB);
  const uint64_t cap = sm::step_memory_stats().max_cached_bytes;  // >= 4 MiB (earlier tests may have raised it)
  ASSERT_GE(cap, 4 * kMiB);
  // Two blocks of which one fits under the cap, not both.
  const size_t n = cap / 2 + kMiB;
  const auto before = sm::step_memory_stats();
  {
    Scope step;
    c10::DataPtr a = allocate(n);
    c10::DataPtr b = allocate(n);
    EXPECT_EQ(sm::step_memory_stats().live_bytes, before.live_bytes + 2 * n);
  }
  const auto after = sm::step_memory_stats();
  EXPECT_EQ(after.cached_bytes, n) << "the free list went past its cap of " << cap << " bytes";
  EXPECT_LE(after.cached_bytes, cap);
  EXPECT_EQ(after.live_bytes, before.live_bytes);
  sm::step_memory_release();
}

TEST(StepMemory, OutsideAScopeOrBelowTheThresholdNothingIsKept) {
  fresh_start();
  const auto before = sm::step_memory_stats();
  {
    c10::DataPtr outside = allocate(3 * kMiB);  // no scope on this thread
    EXPECT_EQ(sm::step_memory_stats().live_bytes, before.live_bytes);
  }
  {
    Scope step;
    c10::DataPtr tiny = allocate(kMiB / 2);  // under min_bytes
  }
  const auto after = sm::step_memory_stats();
  EXPECT_EQ(after.cached_bytes, 0u);
  EXPECT_EQ(after.fresh, before.fresh);
  EXPECT_EQ(after.reused, before.reused);
  EXPECT_EQ(after.live_bytes, before.live_bytes);
  // A block kept by a step is not handed out outside a scope either.
  {
    Scope step;
    c10::DataPtr grad = allocate(3 * kMiB);
  }
  ASSERT_EQ(sm::step_memory_stats().cached_bytes, 3 * kMiB);
  {
    c10::DataPtr outside = allocate(3 * kMiB);
    EXPECT_EQ(sm::step_memory_stats().cached_bytes, 3 * kMiB);
    EXPECT_EQ(sm::step_memory_stats().reused, after.reused);
  }
  sm::step_memory_release();
}

TEST(StepMemory, ScopesBelongToTheirThread) {
  fresh_start();
  {
    Scope step;  // leaves a 3 MiB block on the free list
    c10::DataPtr grad = allocate(3 * kMiB);
  }
  const auto before = sm::step_memory_stats();
  ASSERT_EQ(before.cached_bytes, 3 * kMiB);
  std::promise<void> opened, checked;
  std::thread other([&] {
    Scope step;  // open on the other thread only, while this thread allocates
    EXPECT_EQ(sm::step_memory_depth(), 1);
    opened.set_value();
    checked.get_future().wait();
  });
  opened.get_future().wait();
  EXPECT_EQ(sm::step_memory_depth(), 0);
  {
    c10::DataPtr here = allocate(3 * kMiB);  // no scope here: not served from the free list, not kept
    EXPECT_EQ(sm::step_memory_stats().reused, before.reused);
    EXPECT_EQ(sm::step_memory_stats().fresh, before.fresh);
    EXPECT_EQ(sm::step_memory_stats().cached_bytes, 3 * kMiB);
  }
  EXPECT_EQ(sm::step_memory_stats().cached_bytes, 3 * kMiB);
  checked.set_value();
  other.join();
  sm::step_memory_release();
}

TEST(StepMemory, BlockFreedOnAnotherThreadIsReused) {
  fresh_start();
  void* first = nullptr;
  c10::DataPtr grad;
  {
    Scope step;
    grad = allocate(3 * kMiB);
    first = grad.get();
  }
  // Freed on a thread that never opened a scope (a data loader, the progress thread).
  std::thread other([moved = std::move(grad)]() mutable { moved.clear(); });
  other.join();
  EXPECT_EQ(sm::step_memory_stats().cached_bytes, 3 * kMiB);
  Scope step;
  c10::DataPtr again = allocate(3 * kMiB);
  EXPECT_EQ(again.get(), first);
  again.clear();
  sm::step_memory_release();
}

TEST(StepMemory, ManyThreadsFreeingAtOnceLoseNothing) {
  fresh_start(64 * kMiB);
  const auto before = sm::step_memory_stats();
  constexpr int kBlocks = 16;
  std::vector<c10::DataPtr> blocks;
  {
    Scope step;
    for (int i = 0; i < kBlocks; ++i) blocks.push_back(allocate(2 * kMiB));
  }
  EXPECT_EQ(sm::step_memory_stats().live_bytes, before.live_bytes + kBlocks * 2 * kMiB);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    std::vector<c10::DataPtr> share;
    for (int i = t; i < kBlocks; i += 4) share.push_back(std::move(blocks[i]));
    threads.emplace_back([share = std::move(share)]() mutable { share.clear(); });
  }
  for (auto& t : threads) t.join();
  const auto after = sm::step_memory_stats();
  EXPECT_EQ(after.live_bytes, before.live_bytes);
  EXPECT_EQ(after.cached_bytes, kBlocks * 2 * kMiB);
  {
    Scope step;
    for (int i = 0; i < kBlocks; ++i) blocks[i] = allocate(2 * kMiB);
  }
  EXPECT_EQ(sm::step_memory_stats().reused - after.reused, static_cast<uint64_t>(kBlocks));
  blocks.clear();
  sm::step_memory_release();
}
