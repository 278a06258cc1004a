// A keyed bijection of [0, n): the shuffle of stream mode. Each value is
// computed on its own in O(1) time and memory, so nothing of size n is ever
// materialised.
#pragma once

#include <array>
#include <cstdint>
#include <utility>

namespace disttrain::data {

// splitmix64's finaliser: a cheap, well-mixed 64-bit hash, used both for the
// key schedule and as the round function.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Feistel network over the smallest power-of-two domain 2^b >= n, restricted to
// [0, n) by cycle walking: a value that lands outside [0, n) is permuted again
// until it lands inside. The domain is under 2n, so a lookup costs fewer than
// two network evaluations on average. Requires n >= 0.
class FeistelPermutation {
 public:
  static constexpr int kRounds = 6;
  static_assert(kRounds % 2 == 0, "network() runs rounds in pairs");

  FeistelPermutation(int64_t n, uint64_t key);

  // The image of x; requires 0 <= x < n.
  int64_t operator()(int64_t x) const { return walk(network(static_cast<uint64_t>(x))); }

  // One pass of the network over the whole domain [0, 2^b); the result may lie
  // outside [0, n). Split from walk() so a caller can run many independent
  // first passes back to back, which keeps the multipliers busy.
  uint64_t network(uint64_t v) const {
    // Each round XORs one half with a keyed hash of the other, which is its own
    // inverse given the other half: a bijection of [0, 2^b) even when the
    // halves differ in width (b odd). Rounds alternate halves in pairs.
    uint64_t left = v >> right_bits_;
    uint64_t right = v & right_mask_;
    for (int round = 0; round < kRounds; round += 2) {
      left ^= mix64(right ^ round_keys_[round]) & left_mask_;
      right ^= mix64(left ^ round_keys_[round + 1]) & right_mask_;
    }
    return (left << right_bits_) | right;
  }

  // Finishes the cycle walk from a first pass's result.
  int64_t walk(uint64_t v) const {
    while (v >= n_) v = network(v);
    return static_cast<int64_t>(v);
  }

  int64_t size() const { return static_cast<int64_t>(n_); }

 private:
  uint64_t n_;
  int right_bits_;
  uint64_t left_mask_;
  uint64_t right_mask_;
  std::array<uint64_t, kRounds> round_keys_;
};

}  // namespace disttrain::data
