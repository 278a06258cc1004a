// The sharding engine's arithmetic: a unit's flat layout (offsets, padding,
// each rank's slice) and resharding a flat buffer saved at one world size
// into the shards of another.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <vector>

#include "shard/flat_layout.h"

using disttrain::shard::FlatLayout;
using disttrain::shard::reshard;
using disttrain::shard::reshard_plan;
using disttrain::shard::ReshardPiece;

namespace {

// The old shards of 0, 1, ..., total-1 padded with zeros, split over `world` ranks.
std::vector<at::Tensor> shards_of_iota(int64_t total, int world) {
  const int64_t shard = (total + world - 1) / world;
  at::Tensor padded = at::zeros({shard * world}, at::kFloat);
  padded.narrow(0, 0, total).copy_(at::arange(total, at::kFloat));
  std::vector<at::Tensor> out;
  for (int r = 0; r < world; ++r) out.push_back(padded.narrow(0, r * shard, shard).clone());
  return out;
}

}  // namespace

TEST(FlatLayout, OffsetsPaddingAndSlices) {
  // 2x3 + 4 + 1x1 = 11 elements over 4 ranks: padded to 12, 3 per rank.
  const FlatLayout l = FlatLayout::make({{2, 3}, {4}, {1, 1}}, 4);
  EXPECT_EQ(l.numels, (std::vector<int64_t>{6, 4, 1}));
  EXPECT_EQ(l.offsets, (std::vector<int64_t>{0, 6, 10}));
  EXPECT_EQ(l.total, 11);
  EXPECT_EQ(l.padded, 12);
  EXPECT_EQ(l.shard_numel, 3);
  EXPECT_EQ(l.shard_begin(0), 0);
  EXPECT_EQ(l.shard_begin(3), 9);
  EXPECT_EQ(l.split_sizes(), (std::vector<int64_t>{6, 4, 1, 1}));  // the padding last
}

TEST(FlatLayout, NoPaddingWhenDivisibleAndScalarsCountOne) {
  const FlatLayout l = FlatLayout::make({{4, 2}, {}}, 3);  // 8 + a 0-d parameter = 9
  EXPECT_EQ(l.total, 9);
  EXPECT_EQ(l.padded, 9);
  EXPECT_EQ(l.shard_numel, 3);
  EXPECT_EQ(l.split_sizes(), (std::vector<int64_t>{8, 1, 0}));
}

TEST(FlatLayout, FewerElementsThanRanks) {
  const FlatLayout l = FlatLayout::make({{2}}, 5);
  EXPECT_EQ(l.shard_numel, 1);
  EXPECT_EQ(l.padded, 5);
  EXPECT_THROW(FlatLayout::make({{2}}, 0), c10::Error);
}

TEST(ReshardPlan, PiecesCoverEachNewSliceExactlyOnce) {
  for (const int64_t total : {1, 7, 10, 12, 13}) {
    for (const int old_world : {1, 2, 3, 4}) {
      for (const int new_world : {1, 2, 3, 5}) {
        const int64_t old_shard = (total + old_world - 1) / old_world;
        const int64_t new_shard = (total + new_world - 1) / new_world;
        for (int rank = 0; rank < new_world; ++rank) {
          int64_t next = 0;  // pieces come in order, back to back, from position 0 of the new slice
          for (const ReshardPiece& p : reshard_plan(total, old_world, rank, new_world)) {
            EXPECT_EQ(p.new_offset, next);
            EXPECT_GT(p.numel, 0);
            EXPECT_LE(p.old_offset + p.numel, old_shard);  // within one old shard
            EXPECT_EQ(p.old_rank * old_shard + p.old_offset, rank * new_shard + p.new_offset);  // same element
            next += p.numel;
          }
          // Everything up to the end of the real elements; the padding is left out.
          const int64_t begin = std::min(total, rank * new_shard);
          EXPECT_EQ(next, std::min(total, begin + new_shard) - begin)
              << "total " << total << " " << old_world << " -> " << new_world << " rank " << rank;
        }
      }
    }
  }
}

TEST(ReshardPlan, SameWorldSizeIsOnePiecePerRank) {
  const auto pieces = reshard_plan(10, 3, 1, 3);  // shards of 4: rank 1 owns [4, 8)
  ASSERT_EQ(pieces.size(), 1u);
  EXPECT_EQ(pieces[0].old_rank, 1);
  EXPECT_EQ(pieces[0].old_offset, 0);
  EXPECT_EQ(pieces[0].numel, 4);
}

TEST(Reshard, ThreeToTwoToThreeRoundTrips) {
  const int64_t total = 11;
  const auto three = shards_of_iota(total, 3);  // shards of 4, one padding element
  std::vector<at::Tensor> two;
  for (int r = 0; r < 2; ++r) two.push_back(reshard(three, total, r, 2));
  const auto expect_two = shards_of_iota(total, 2);  // shards of 6, one padding element
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(at::equal(two[r], expect_two[r])) << "rank " << r;
  for (int r = 0; r < 3; ++r) EXPECT_TRUE(at::equal(reshard(two, total, r, 3), three[r])) << "rank " << r;
}

TEST(Reshard, UsesOnlyTheShardsItNeeds) {
  const int64_t total = 12;
  auto four = shards_of_iota(total, 4);  // shards of 3; new rank 0 of 2 needs old ranks 0 and 1 only
  four[2] = at::Tensor();
  four[3] = at::Tensor();
  EXPECT_TRUE(at::equal(reshard(four, total, 0, 2), at::arange(6, at::kFloat)));
  EXPECT_THROW(reshard(four, total, 1, 2), c10::Error);  // needs old ranks 2 and 3
}

TEST(Reshard, RejectsBadInput) {
  EXPECT_THROW(reshard_plan(10, 0, 0, 2), c10::Error);
  EXPECT_THROW(reshard_plan(10, 2, 2, 2), c10::Error);
  EXPECT_THROW(reshard_plan(10, 2, -1, 2), c10::Error);
  std::vector<at::Tensor> short_shards{at::zeros({5}), at::zeros({2})};  // rank 1 should hold 5
  EXPECT_THROW(reshard(short_shards, 10, 0, 1), c10::Error);
  EXPECT_THROW(reshard_plan(-1, 1, 0, 1), c10::Error);
  EXPECT_THROW(reshard_plan(std::numeric_limits<int64_t>::max(), 1, 0, 1), c10::Error);
}

TEST(Reshard, RefusesATotalItsShardsDoNotHoldBeforeAllocating) {
  // a corrupt manifest's 2^40 elements (4 TiB of floats): refused by the shard's size, not by the allocator
  std::vector<at::Tensor> one{at::zeros({29})};
  try {
    reshard(one, int64_t{1} << 40, 0, 1);
    ADD_FAILURE() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("shard has 29 elements"), std::string::npos) << e.what();
  }
}
