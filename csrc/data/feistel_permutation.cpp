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
  left_bits_ = bits / 2;
  right_bits_ = bits - left_bits_;
  uint64_t state = key;
  for (auto& round_key : round_keys_) {
    state += 0x9e3779b97f4a7c15ULL;
    round_key = mix64(state);
  }
}

uint64_t FeistelPermutation::network(uint64_t v) const {
  // Unbalanced halves swap widths every round; each round stays a bijection
  // between 2^l x 2^r and 2^r x 2^l, so the whole network permutes [0, 2^b).
  int lbits = left_bits_;
  int rbits = right_bits_;
  uint64_t left = v >> rbits;
  uint64_t right = v & low_mask(rbits);
  for (uint64_t round_key : round_keys_) {
    const uint64_t new_right = (left ^ mix64(right ^ round_key)) & low_mask(lbits);
    left = right;
    right = new_right;
    std::swap(lbits, rbits);
  }
  return (left << rbits) | right;
}

}  // namespace disttrain::data
