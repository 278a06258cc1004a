// torch.optim.SGD's update, element by element (its single-tensor loop: the
// same operations in the same order), for flat float32 / float64 memory. One
// kernel for every optimizer step the core applies itself: DDP's fused step
// (ddp/reducer.cpp) and Hogwild's lock-free updates (strategies/hogwild_update.cpp).
#pragma once
#include <cstddef>

namespace disttrain::optim {

struct SgdSettings {
  double lr = 0.01;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
  bool maximize = false;
};

// n elements of `param` stepped with `grad`. `buf`: the momentum buffer (null
// without momentum); `fresh`: it takes the step's direction itself, as on
// torch's first step. With `zero_grad`, each gradient element is zeroed right
// after it is read (one pass over memory instead of two), so `grad` must then
// be writable. One copy per ISA, as the reduction kernels.
void sgd_step(float* param, float* buf, const float* grad, size_t n, const SgdSettings& s, bool fresh,
              bool zero_grad = false);
void sgd_step(double* param, double* buf, const double* grad, size_t n, const SgdSettings& s, bool fresh,
              bool zero_grad = false);

}  // namespace disttrain::optim
