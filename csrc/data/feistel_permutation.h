// A keyed bijection of [0, n): the shuffle of stream mode. Each value is
// computed on its own in O(1) time and memory, so nothing of size n is ever
// materialised.
#pragma once

#include <array>
#include <cstdint>

namespace disttrain::data {

// splitmix64's finaliser: a cheap, well-mixed 64-bit hash, used both for the
// key schedule and as the round function.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

inline uint64_t mul_high(uint64_t a, uint64_t b) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
}

// Maps a 64-bit hash onto [0, m) with one multiply (Lemire's reduction).
inline uint64_t reduce_to(uint64_t hash, uint64_t m) { return mul_high(hash, m); }

// A Feistel network on the rectangle [0, a) x [0, b), a * b >= n with a and b
// about sqrt(n), restricted to [0, n) by cycle walking: a value that lands in
// [n, a * b) is permuted again until it lands inside. The rectangle exceeds n
// by less than a, so walks are rare (a power-of-two domain would need up to
// twice the work). Requires n >= 0.
class FeistelPermutation {
 public:
  static constexpr int kRounds = 4;  // Luby-Rackoff: four rounds give a strong pseudo-random permutation
  static_assert(kRounds % 2 == 0, "network() runs rounds in pairs");

  FeistelPermutation(int64_t n, uint64_t key);

  // The image of x; requires 0 <= x < n.
  int64_t operator()(int64_t x) const { return walk(network(static_cast<uint64_t>(x))); }

  // One pass of the network over the whole rectangle [0, a * b); the result
  // may lie outside [0, n). Split from walk() so a caller can run many
  // independent first passes back to back, which keeps the multipliers busy.
  uint64_t network(uint64_t v) const {
    // Each half-round adds a keyed hash of one half to the other, modulo that
    // half's range: invertible given the other half, so the network is a
    // bijection of the rectangle whatever a and b are.
    uint64_t left = width_magic_ != 0 ? mul_high(v, width_magic_) : v / width_;
    uint64_t right = v - left * width_;
    for (int round = 0; round < kRounds; round += 2) {
      left += reduce_to(mix64(right ^ round_keys_[round]), height_);
      left -= left >= height_ ? height_ : 0;
      right += reduce_to(mix64(left ^ round_keys_[round + 1]), width_);
      right -= right >= width_ ? width_ : 0;
    }
    return left * width_ + right;
  }

  // network() on each of kBlock values in place. The values are independent,
  // so running the rounds across the whole block overlaps their multiply
  // chains, which one value at a time would leave waiting on each other.
  template <int kBlock>
  void network_block(uint64_t* values) const {
    uint64_t left[kBlock];
    uint64_t right[kBlock];
    for (int i = 0; i < kBlock; ++i) {
      left[i] = width_magic_ != 0 ? mul_high(values[i], width_magic_) : values[i] / width_;
      right[i] = values[i] - left[i] * width_;
    }
    for (int round = 0; round < kRounds; round += 2) {
      for (int i = 0; i < kBlock; ++i) {
        left[i] += reduce_to(mix64(right[i] ^ round_keys_[round]), height_);
        left[i] -= left[i] >= height_ ? height_ : 0;
      }
      for (int i = 0; i < kBlock; ++i) {
        right[i] += reduce_to(mix64(left[i] ^ round_keys_[round + 1]), width_);
        right[i] -= right[i] >= width_ ? width_ : 0;
      }
    }
    for (int i = 0; i < kBlock; ++i) values[i] = left[i] * width_ + right[i];
  }

  // Finishes the cycle walk from a first pass's result.
  int64_t walk(uint64_t v) const {
    while (v >= n_) v = network(v);
    return static_cast<int64_t>(v);
  }

  int64_t size() const { return static_cast<int64_t>(n_); }

 private:
  uint64_t n_;
  uint64_t height_;  // a: the range of the left half
  uint64_t width_;   // b: the range of the right half
  // ceil(2^64 / b) when the rectangle fits 32 bits: then v / b == mul_high(v, magic)
  // exactly (Lemire, Kaser, Kurz 2019), and the division, the slowest step, goes.
  uint64_t width_magic_ = 0;
  std::array<uint64_t, kRounds> round_keys_;
};

}  // namespace disttrain::data
