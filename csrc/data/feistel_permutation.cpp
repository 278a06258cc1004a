#include "data/feistel_permutation.h"

#include <cmath>

namespace disttrain::data {

FeistelPermutation::FeistelPermutation(int64_t n, uint64_t key) : n_(static_cast<uint64_t>(n)) {
  // Both sides at least 2, so each half-round moves something.
  uint64_t side = static_cast<uint64_t>(std::sqrt(static_cast<double>(n_)));
  while (side * side < n_) ++side;  // the double root may be one short for large n
  height_ = side < 2 ? 2 : side;
  width_ = (n_ + height_ - 1) / height_;
  if (width_ < 2) width_ = 2;
  if (height_ * width_ <= (uint64_t{1} << 32)) width_magic_ = ~uint64_t{0} / width_ + 1;
  uint64_t state = key;
  for (auto& round_key : round_keys_) {
    state += 0x9e3779b97f4a7c15ULL;
    round_key = mix64(state);
  }
}

}  // namespace disttrain::data
