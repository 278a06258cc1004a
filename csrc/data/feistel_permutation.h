// A keyed bijection of [0, n): the shuffle of stream mode. Each value is
// computed on its own in O(1) time and memory, so nothing of size n is ever
// materialised.
#pragma once

#include <array>
#include <cstdint>
#include <utility>

namespace disttrain::data {

// Feistel network over the smallest power-of-two domain 2^b >= n, restricted to
// [0, n) by cycle walking: a value that lands outside [0, n) is permuted again
// until it lands inside. The domain is under 2n, so a lookup costs fewer than
// two network evaluations on average. Requires n >= 0.
class FeistelPermutation {
 public:
  static constexpr int kRounds = 6;

  FeistelPermutation(int64_t n, uint64_t key);

  // The image of x; requires 0 <= x < n.
  int64_t operator()(int64_t x) const {
    uint64_t v = static_cast<uint64_t>(x);
    do {
      v = network(v);
    } while (v >= n_);
    return static_cast<int64_t>(v);
  }

  int64_t size() const { return static_cast<int64_t>(n_); }

 private:
  uint64_t network(uint64_t v) const;

  uint64_t n_;
  int left_bits_;
  int right_bits_;
  std::array<uint64_t, kRounds> round_keys_;
};

// splitmix64's finaliser: a cheap, well-mixed 64-bit hash, used both for the
// key schedule and as the round function.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace disttrain::data
