// The reducer's bucket assignment: caps, dtypes and launch order.
#include <gtest/gtest.h>

#include <vector>

#include "ddp/bucket_plan.h"

using disttrain::ddp::plan_buckets;
using disttrain::ddp::TensorSlot;
using Plan = std::vector<std::vector<int64_t>>;

TEST(BucketPlan, SmallFirstBucketThenCap) {
  const std::vector<TensorSlot> slots(6, TensorSlot{40, c10::kFloat});
  // First bucket holds at most 50 bytes (one tensor), later ones 100 (two).
  EXPECT_EQ(plan_buckets(slots, {5, 4, 3, 2, 1, 0}, 50, 100), (Plan{{5}, {4, 3}, {2, 1}, {0}}));
}

TEST(BucketPlan, LargeTensorGetsItsOwnBucketWithoutHoldingBackSmallOnes) {
  const std::vector<TensorSlot> slots{{8, c10::kFloat}, {1000, c10::kFloat}, {8, c10::kFloat}, {8, c10::kFloat}};
  EXPECT_EQ(plan_buckets(slots, {3, 2, 1, 0}, 64, 256), (Plan{{3, 2}, {1}, {0}}));
}

TEST(BucketPlan, OneDtypePerBucketInOrderOfFirstReadiness) {
  const std::vector<TensorSlot> slots{{4, c10::kFloat}, {2, c10::kHalf}, {4, c10::kFloat}, {2, c10::kHalf}};
  EXPECT_EQ(plan_buckets(slots, {0, 1, 2, 3}, 1 << 20, 1 << 20), (Plan{{0, 2}, {1, 3}}));
}

TEST(BucketPlan, FollowsTheGivenOrder) {
  const std::vector<TensorSlot> slots(4, TensorSlot{4, c10::kFloat});
  EXPECT_EQ(plan_buckets(slots, {2, 0, 3, 1}, 8, 8), (Plan{{2, 0}, {3, 1}}));
}

TEST(BucketPlan, RejectsBadInput) {
  const std::vector<TensorSlot> slots(2, TensorSlot{4, c10::kFloat});
  EXPECT_THROW(plan_buckets(slots, {0, 2}, 8, 8), c10::Error);
  EXPECT_THROW(plan_buckets(slots, {0, 1}, 0, 8), c10::Error);
}
