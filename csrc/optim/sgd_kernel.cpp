#include "optim/sgd_kernel.h"

#include "comm/kernels/reduce_kernels.h"

namespace disttrain::optim {
namespace {

// The branches hoisted out of the loop, so that each variant vectorises.
template <class T, bool kDecay, bool kMomentum, bool kNesterov, bool kZero>
__attribute__((always_inline)) inline void sgd_loop(T* __restrict p, T* __restrict buf, T* g, size_t n,
                                                    const SgdSettings& s, bool fresh) {
  const T neg_lr = static_cast<T>(-s.lr), decay = static_cast<T>(s.weight_decay), mom = static_cast<T>(s.momentum),
          keep = static_cast<T>(1.0 - s.dampening);
  const T sign = s.maximize ? T(-1) : T(1);
  for (size_t i = 0; i < n; ++i) {
    T d = sign * g[i];
    if constexpr (kZero) g[i] = T(0);
    if constexpr (kDecay) d = d + decay * p[i];
    if constexpr (kMomentum) {
      const T b = fresh ? d : buf[i] * mom + keep * d;
      buf[i] = b;
      if constexpr (kNesterov) {
        d = d + mom * b;
      } else {
        d = b;
      }
    }
    p[i] = p[i] + neg_lr * d;
  }
}

template <class T, bool kZero>
__attribute__((always_inline)) inline void sgd_variant(T* p, T* buf, T* g, size_t n, const SgdSettings& s,
                                                       bool fresh) {
  const bool decay = s.weight_decay != 0;
  if (s.momentum == 0) {
    decay ? sgd_loop<T, true, false, false, kZero>(p, buf, g, n, s, fresh)
          : sgd_loop<T, false, false, false, kZero>(p, buf, g, n, s, fresh);
  } else if (s.nesterov) {
    decay ? sgd_loop<T, true, true, true, kZero>(p, buf, g, n, s, fresh)
          : sgd_loop<T, false, true, true, kZero>(p, buf, g, n, s, fresh);
  } else {
    decay ? sgd_loop<T, true, true, false, kZero>(p, buf, g, n, s, fresh)
          : sgd_loop<T, false, true, false, kZero>(p, buf, g, n, s, fresh);
  }
}

template <class T>
__attribute__((always_inline)) inline void sgd_any(T* p, T* buf, const T* grad, size_t n, const SgdSettings& s,
                                                   bool fresh, bool zero_grad) {
  // Written only with zero_grad, whose caller passes writable memory.
  T* g = const_cast<T*>(grad);
  zero_grad ? sgd_variant<T, true>(p, buf, g, n, s, fresh) : sgd_variant<T, false>(p, buf, g, n, s, fresh);
}

}  // namespace

DISTTRAIN_KERNEL_TARGETS void sgd_step(float* param, float* buf, const float* grad, size_t n, const SgdSettings& s,
                                       bool fresh, bool zero_grad) {
  sgd_any(param, buf, grad, n, s, fresh, zero_grad);
}

DISTTRAIN_KERNEL_TARGETS void sgd_step(double* param, double* buf, const double* grad, size_t n,
                                       const SgdSettings& s, bool fresh, bool zero_grad) {
  sgd_any(param, buf, grad, n, s, fresh, zero_grad);
}

}  // namespace disttrain::optim
