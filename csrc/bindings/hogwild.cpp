#include "bindings/registry.h"
#include "strategies/hogwild_update.h"

namespace py = pybind11;
using disttrain::strategies::AdamSettings;
using disttrain::strategies::SgdSettings;

DISTTRAIN_BINDINGS(hogwild) {
  m.def(
      "hogwild_sgd_update",
      [](const torch::Tensor& param, const torch::Tensor& grad, const std::optional<torch::Tensor>& momentum_buffer,
         const torch::Tensor& step, double lr, double momentum, double dampening, double weight_decay, bool nesterov,
         bool maximize, bool zero_grad) {
        SgdSettings s{lr, momentum, dampening, weight_decay, nesterov, maximize};
        py::gil_scoped_release release;
        return disttrain::strategies::sgd_update(param, grad, momentum_buffer.value_or(torch::Tensor()), step, s,
                                                 zero_grad);
      },
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("step"), py::arg("lr"),
      py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"),
      py::arg("zero_grad"));
  m.def(
      "hogwild_adam_update",
      [](const torch::Tensor& param, const torch::Tensor& grad, const torch::Tensor& exp_avg,
         const torch::Tensor& exp_avg_sq, const torch::Tensor& step, double lr, double beta1, double beta2, double eps,
         double weight_decay, bool decoupled_weight_decay, bool maximize, bool zero_grad) {
        AdamSettings s{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
        py::gil_scoped_release release;
        return disttrain::strategies::adam_update(param, grad, exp_avg, exp_avg_sq, step, s, zero_grad);
      },
      py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled_weight_decay"),
      py::arg("maximize"), py::arg("zero_grad"));
}
