// The sampler engine without Python: the Feistel permutation is a bijection for
// every size, the index streams split the global order as documented, and bad
// options raise clean errors.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "data/feistel_permutation.h"
#include "data/sampler_engine.h"

using namespace disttrain::data;

namespace {

std::vector<int64_t> drain(IndexStream& stream, int64_t chunk) {
  std::vector<int64_t> all;
  std::vector<int64_t> buffer(chunk);
  while (int64_t got = stream.fill(buffer.data(), chunk)) all.insert(all.end(), buffer.begin(), buffer.begin() + got);
  return all;
}

SamplerOptions stream_options(int64_t n, int64_t replicas, int64_t rank, bool drop_last = false) {
  SamplerOptions o;
  o.dataset_size = n;
  o.num_replicas = replicas;
  o.rank = rank;
  o.seed = 42;
  o.drop_last = drop_last;
  o.mode = SamplerMode::kStream;
  return o;
}

}  // namespace

TEST(FeistelPermutation, IsABijectionForEverySmallSize) {
  for (int64_t n = 0; n <= 600; ++n) {
    for (uint64_t key : {0ULL, 1ULL, 0xdeadbeefULL}) {
      FeistelPermutation perm(n, key);
      std::vector<bool> seen(n, false);
      for (int64_t x = 0; x < n; ++x) {
        const int64_t y = perm(x);
        ASSERT_GE(y, 0);
        ASSERT_LT(y, n);
        ASSERT_FALSE(seen[y]) << "n=" << n << " key=" << key << " repeats " << y;
        seen[y] = true;
      }
    }
  }
}

TEST(FeistelPermutation, IsABijectionAroundTheFastDivisionLimit) {
  // Rectangles just under and over 2^32 take different division paths; check
  // injectivity on a window of inputs for each.
  for (int64_t n : {int64_t{4294836225}, int64_t{4294967296}, int64_t{4295098369}, int64_t{1} << 40}) {
    FeistelPermutation perm(n, 7);
    std::vector<int64_t> images;
    for (int64_t x = n - 200000; x < n; ++x) images.push_back(perm(x));
    std::sort(images.begin(), images.end());
    EXPECT_EQ(std::adjacent_find(images.begin(), images.end()), images.end()) << "n=" << n;
    EXPECT_GE(images.front(), 0);
    EXPECT_LT(images.back(), n);
  }
}

TEST(IndexStream, RanksInterleaveIntoEveryIndexOnce) {
  for (int64_t n : {1, 5, 97, 1000, 65537}) {
    for (int64_t replicas : {1, 3, 4}) {
      std::vector<std::vector<int64_t>> per_rank;
      for (int64_t r = 0; r < replicas; ++r) {
        IndexStream stream(stream_options(n, replicas, r), 3, 0);
        per_rank.push_back(drain(stream, 1000));
        ASSERT_EQ(static_cast<int64_t>(per_rank.back().size()), (n + replicas - 1) / replicas);
      }
      std::vector<int64_t> order;
      for (size_t k = 0; k < per_rank[0].size(); ++k)
        for (int64_t r = 0; r < replicas; ++r) order.push_back(per_rank[r][k]);
      std::vector<int64_t> head(order.begin(), order.begin() + n);
      std::sort(head.begin(), head.end());
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(head[i], i);
      for (size_t p = n; p < order.size(); ++p) ASSERT_EQ(order[p], order[p - n]) << "padding repeats the start";
    }
  }
}

TEST(IndexStream, ResumeContinuesTheSameOrder) {
  const int64_t n = 1001, replicas = 3;
  for (int64_t r = 0; r < replicas; ++r) {
    IndexStream whole(stream_options(n, replicas, r), 1, 0);
    const auto expected = drain(whole, 64);
    IndexStream resumed(stream_options(n, replicas, r), 1, 30 * replicas);
    const auto rest = drain(resumed, 7);
    ASSERT_EQ(rest, std::vector<int64_t>(expected.begin() + 30, expected.end()));
  }
}

TEST(IndexStream, TorchModeIsRandpermSeededWithSeedPlusEpoch) {
  SamplerOptions o = stream_options(50, 1, 0);
  o.mode = SamplerMode::kTorch;
  IndexStream stream(o, 5, 0);
  auto generator = at::make_generator<at::CPUGeneratorImpl>(o.seed + 5);
  const at::Tensor expected = at::randperm(50, generator, at::kLong);
  const auto got = drain(stream, 8);
  for (int64_t i = 0; i < 50; ++i) ASSERT_EQ(got[i], expected[i].item<int64_t>());
}

TEST(SamplerOptions, BadInputRaisesCleanErrors) {
  EXPECT_THROW(check_sampler_options(stream_options(10, 0, 0)), c10::ValueError);
  EXPECT_THROW(check_sampler_options(stream_options(10, 3, 3)), c10::ValueError);
  EXPECT_THROW(check_sampler_options(stream_options(-1, 3, 0)), c10::ValueError);
  EXPECT_THROW(parse_sampler_mode("fast"), c10::ValueError);
  EXPECT_EQ(samples_per_rank(10, 4, false, 0), 3);
  EXPECT_EQ(samples_per_rank(10, 4, true, 0), 2);
  EXPECT_EQ(samples_per_rank(10, 4, false, 12), 0);
}
