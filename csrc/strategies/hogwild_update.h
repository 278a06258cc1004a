// Lock-free optimizer updates for Hogwild! training (Niu et al., 2011).
//
// Several processes update the same parameters, in shared memory, with no
// lock: each reads the parameters and the optimizer state as they are, and
// writes its update over them. The updates run here, on one flat buffer per
// tensor kind, with the GIL released by the binding, so a process spends no
// interpreter time on its optimizer step. The formulas are torch.optim.SGD's
// and torch.optim.Adam's (AdamW's with decoupled weight decay), element by
// element; with one process the result equals the torch optimizer's up to
// floating-point contraction.
//
// The step counter is an int64 tensor: shared between the processes (one
// counter for the whole job, advanced atomically, so Adam's bias correction
// sees the global step count) or one per process (each process corrects
// with its own step count): the caller decides and says so to its user.
#pragma once

#include <torch/types.h>

#include <cstdint>

#include "optim/sgd_kernel.h"

namespace disttrain::strategies {

using SgdSettings = optim::SgdSettings;

struct AdamSettings {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = false;  // AdamW
  bool maximize = false;
};

// One SGD step over `param` (flat, contiguous, float32 or float64) with
// gradient `grad` (same shape and dtype). `momentum_buffer` must be defined
// when settings.momentum != 0; it takes the gradient itself on the job's
// first step (step counter 0), as torch.optim.SGD does. `step` (int64, one
// element) is advanced atomically. When `zero_grad` is set, each gradient
// element is zeroed right after it is read (one pass over memory instead of
// two), ready for the next backward to accumulate into. Returns the step
// number this update took (1-based).
int64_t sgd_update(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& momentum_buffer,
                   const torch::Tensor& step, const SgdSettings& settings, bool zero_grad);

// One Adam (or AdamW) step; exp_avg and exp_avg_sq like param. The bias
// correction uses the step number taken from `step` (advanced atomically).
int64_t adam_update(const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& exp_avg,
                    const torch::Tensor& exp_avg_sq, const torch::Tensor& step, const AdamSettings& settings,
                    bool zero_grad);

}  // namespace disttrain::strategies
