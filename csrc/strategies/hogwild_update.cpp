#include "strategies/hogwild_update.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace disttrain::strategies {
namespace {

void check_flat(const torch::Tensor& t, const torch::Tensor& like, const char* what) {
  if (!t.defined()) throw std::invalid_argument(std::string("hogwild: ") + what + " is not defined");
  if (t.device().type() != torch::kCPU) throw std::invalid_argument(std::string("hogwild: ") + what + " is not on the CPU");
  if (!t.is_contiguous()) throw std::invalid_argument(std::string("hogwild: ") + what + " is not contiguous");
  if (t.scalar_type() != like.scalar_type())
    throw std::invalid_argument(std::string("hogwild: ") + what + " has dtype " + std::string(c10::toString(t.scalar_type())) +
                                ", the parameters " + std::string(c10::toString(like.scalar_type())));
  if (t.numel() != like.numel())
    throw std::invalid_argument(std::string("hogwild: ") + what + " has " + std::to_string(t.numel()) +
                                " elements, the parameters " + std::to_string(like.numel()));
}

void check_param(const torch::Tensor& param) {
  if (!param.defined() || param.device().type() != torch::kCPU || !param.is_contiguous())
    throw std::invalid_argument("hogwild: the parameters must be a contiguous CPU tensor");
  if (param.scalar_type() != torch::kFloat && param.scalar_type() != torch::kDouble)
    throw std::invalid_argument(std::string("hogwild: parameters of dtype ") +
                                std::string(c10::toString(param.scalar_type())) + " are not supported (float32, float64)");
}

// Advances the step counter atomically (other processes may share it) and
// returns the new step number.
int64_t next_step(const torch::Tensor& step) {
  if (!step.defined() || step.scalar_type() != torch::kLong || step.numel() != 1 || step.device().type() != torch::kCPU)
    throw std::invalid_argument("hogwild: the step counter must be a one-element int64 CPU tensor");
  return __atomic_add_fetch(step.data_ptr<int64_t>(), 1, __ATOMIC_RELAXED);
}

template <typename T>
void adam_kernel(T* p, T* g, T* m, T* v, int64_t n, const AdamSettings& s, int64_t step, bool zero_grad) {
  const T w1 = static_cast<T>(1.0 - s.beta1), b2 = static_cast<T>(s.beta2), w2 = static_cast<T>(1.0 - s.beta2);
  const double bc1 = 1.0 - std::pow(s.beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(s.beta2, static_cast<double>(step));
  const T neg_step_size = static_cast<T>(-s.lr / bc1);
  const T bc2_sqrt = static_cast<T>(std::sqrt(bc2));
  const T eps = static_cast<T>(s.eps), wd = static_cast<T>(s.weight_decay);
  const T decay = static_cast<T>(1.0 - s.lr * s.weight_decay);
  const T sign = s.maximize ? T(-1) : T(1);
  for (int64_t i = 0; i < n; ++i) {
    T d = sign * g[i];
    if (zero_grad) g[i] = T(0);
    T pi = p[i];
    if (wd != T(0)) {
      if (s.decoupled_weight_decay) pi = pi * decay;
      else d = d + wd * pi;
    }
    const T mi = m[i] + w1 * (d - m[i]);
    const T vi = v[i] * b2 + w2 * d * d;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi + neg_step_size * (mi / (std::sqrt(vi) / bc2_sqrt + eps));
  }
}

}  // namespace

int64_t sgd_update(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& momentum_buffer,
                   const torch::Tensor& step, const SgdSettings& settings, bool zero_grad) {
  check_param(param);
  check_flat(grad, param, "the gradient");
  const bool use_momentum = settings.momentum != 0.0;
  if (use_momentum) check_flat(momentum_buffer, param, "the momentum buffer");
  const int64_t n = param.numel();
  const int64_t s = next_step(step);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "hogwild_sgd", [&] {
    optim::sgd_step(param.data_ptr<scalar_t>(), use_momentum ? momentum_buffer.data_ptr<scalar_t>() : nullptr,
                    grad.data_ptr<scalar_t>(), static_cast<size_t>(n), settings, s == 1, zero_grad);
  });
  return s;
}

int64_t adam_update(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& exp_avg,
                    const torch::Tensor& exp_avg_sq, const torch::Tensor& step, const AdamSettings& settings,
                    bool zero_grad) {
  check_param(param);
  check_flat(grad, param, "the gradient");
  check_flat(exp_avg, param, "exp_avg");
  check_flat(exp_avg_sq, param, "exp_avg_sq");
  const int64_t n = param.numel();
  const int64_t s = next_step(step);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "hogwild_adam", [&] {
    adam_kernel<scalar_t>(param.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(),
                          exp_avg_sq.data_ptr<scalar_t>(), n, settings, s, zero_grad);
  });
  return s;
}

}  // namespace disttrain::strategies
