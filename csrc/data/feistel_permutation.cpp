#include "data/feistel_permutation.h"

namespace disttrain::data {

namespace {

int bits_for(uint64_t n) {
  // At least two bits, so both halves of the network are non-empty.
  int bits = 2;
  while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
  return bits;
}

inline uint64_t low_mask(int bits) { return bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1; }

}  // namespace

FeistelPermutation::FeistelPermutation(int64_t n, uint64_t key) : n_(static_cast<uint64_t>(n)) {
  const int bits = bits_for(n_);
  right_bits_ = bits - bits / 2;
  left_mask_ = low_mask(bits / 2);
  right_mask_ = low_mask(right_bits_);
  uint64_t state = key;
  for (auto& round_key : round_keys_) {
    state += 0x9e3779b97f4a7c15ULL;
    round_key = mix64(state);
  }
}

}  // namespace disttrain::data
