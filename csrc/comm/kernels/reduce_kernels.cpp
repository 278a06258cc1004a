#include "comm/kernels/reduce_kernels.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace disttrain::comm {
namespace {

struct Sum { template <typename T> static T apply(T a, T b) { return a + b; } };
struct Prod { template <typename T> static T apply(T a, T b) { return a * b; } };
// MIN/MAX propagate NaN, as torch.minimum/maximum do: a NaN on any rank gives NaN on
// every rank, whatever the order the algorithm combines the ranks in (`b != b` holds for
// a NaN b only; a NaN a stays because no comparison with it holds). Comparisons alone
// kept whichever operand came first, so the ranks of one all-reduce could disagree.
struct Min { template <typename T> static T apply(T a, T b) { return (b < a || b != b) ? b : a; } };
struct Max { template <typename T> static T apply(T a, T b) { return (a < b || b != b) ? b : a; } };
struct Band { template <typename T> static T apply(T a, T b) { return a & b; } };
struct Bor { template <typename T> static T apply(T a, T b) { return a | b; } };
struct Bxor { template <typename T> static T apply(T a, T b) { return a ^ b; } };

template <typename T> struct Compute { using type = T; };
template <> struct Compute<c10::Half> { using type = float; };
template <> struct Compute<c10::BFloat16> { using type = float; };
template <> struct Compute<int8_t> { using type = int8_t; };


template <typename T, typename Op>
inline void reduce_loop(T* __restrict dst, const T* a, const T* __restrict b, size_t n) {
  using C = typename Compute<T>::type;
  for (size_t i = 0; i < n; ++i) {
    dst[i] = static_cast<T>(Op::apply(static_cast<C>(a[i]), static_cast<C>(b[i])));
  }
}

#define DEFINE_KERNEL(NAME, T, OP)                                                \
  DISTTRAIN_KERNEL_TARGETS void NAME(void* dst, const void* a, const void* b, size_t n) { \
    reduce_loop<T, OP>(static_cast<T*>(dst), static_cast<const T*>(a),           \
                       static_cast<const T*>(b), n);                             \
  }

#define DEFINE_ARITH_KERNELS(TAG, T) \
  DEFINE_KERNEL(sum_##TAG, T, Sum)   \
  DEFINE_KERNEL(prod_##TAG, T, Prod) \
  DEFINE_KERNEL(min_##TAG, T, Min)   \
  DEFINE_KERNEL(max_##TAG, T, Max)

#define DEFINE_BIT_KERNELS(TAG, T)   \
  DEFINE_KERNEL(band_##TAG, T, Band) \
  DEFINE_KERNEL(bor_##TAG, T, Bor)   \
  DEFINE_KERNEL(bxor_##TAG, T, Bxor)

DEFINE_ARITH_KERNELS(f32, float)
DEFINE_ARITH_KERNELS(f64, double)
DEFINE_ARITH_KERNELS(f16, c10::Half)
DEFINE_ARITH_KERNELS(bf16, c10::BFloat16)
DEFINE_ARITH_KERNELS(i8, int8_t)
DEFINE_ARITH_KERNELS(u8, uint8_t)
DEFINE_ARITH_KERNELS(i16, int16_t)
DEFINE_ARITH_KERNELS(i32, int32_t)
DEFINE_ARITH_KERNELS(i64, int64_t)
DEFINE_BIT_KERNELS(i8, int8_t)
DEFINE_BIT_KERNELS(u8, uint8_t)
DEFINE_BIT_KERNELS(i16, int16_t)
DEFINE_BIT_KERNELS(i32, int32_t)
DEFINE_BIT_KERNELS(i64, int64_t)

// bool: SUM/MAX/BOR are logical or; PRODUCT/MIN/BAND logical and; BXOR exclusive or.
void or_bool(void* dst, const void* a, const void* b, size_t n) {
  bor_u8(dst, a, b, n);
}
void and_bool(void* dst, const void* a, const void* b, size_t n) {
  band_u8(dst, a, b, n);
}
// BXOR: exclusive or (torch's bools are the bytes 0 and 1, so the byte xor is one too), as gloo.
void xor_bool(void* dst, const void* a, const void* b, size_t n) {
  bxor_u8(dst, a, b, n);
}

#define ARITH_CASE(SCALAR, TAG)                  \
  case c10::ScalarType::SCALAR:                  \
    switch (op) {                                \
      case RedOp::kSum:                          \
      case RedOp::kAvg: return sum_##TAG;        \
      case RedOp::kProduct: return prod_##TAG;   \
      case RedOp::kMin: return min_##TAG;        \
      case RedOp::kMax: return max_##TAG;        \
      default: break;                            \
    }                                            \
    break;

#define INT_CASE(SCALAR, TAG)                    \
  case c10::ScalarType::SCALAR:                  \
    switch (op) {                                \
      case RedOp::kSum:                          \
      case RedOp::kAvg: return sum_##TAG;        \
      case RedOp::kProduct: return prod_##TAG;   \
      case RedOp::kMin: return min_##TAG;        \
      case RedOp::kMax: return max_##TAG;        \
      case RedOp::kBand: return band_##TAG;      \
      case RedOp::kBor: return bor_##TAG;        \
      case RedOp::kBxor: return bxor_##TAG;      \
      default: break;                            \
    }                                            \
    break;

}  // namespace

ReduceFn reduce_kernel(c10::ScalarType dtype, RedOp op) {
  switch (dtype) {
    ARITH_CASE(Float, f32)
    ARITH_CASE(Double, f64)
    ARITH_CASE(Half, f16)
    ARITH_CASE(BFloat16, bf16)
    INT_CASE(Char, i8)
    INT_CASE(Byte, u8)
    INT_CASE(Short, i16)
    INT_CASE(Int, i32)
    INT_CASE(Long, i64)
    case c10::ScalarType::Bool:
      switch (op) {
        case RedOp::kSum:
        case RedOp::kMax:
        case RedOp::kBor: return or_bool;
        case RedOp::kProduct:
        case RedOp::kMin:
        case RedOp::kBand: return and_bool;
        case RedOp::kBxor: return xor_bool;
        default: break;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK_VALUE(false, "disttrain: reduction ", redop_name(op), " is not supported for dtype ",
                    c10::toString(dtype));
}

const char* reduce_kernel_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512f";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "sse2";
}

}  // namespace disttrain::comm
