#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "bindings/registry.h"
#include "comm/backend.h"
#include "comm/kernels/reduce_kernels.h"

namespace py = pybind11;
using disttrain::comm::DisttrainBackend;

DISTTRAIN_BINDINGS(distributed) {
  py::class_<DisttrainBackend, c10d::Backend, c10::intrusive_ptr<DisttrainBackend>>(m, "ProcessGroupDisttrain")
      .def(py::init([](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                       std::chrono::milliseconds timeout) {
             return c10::make_intrusive<DisttrainBackend>(store, rank, size, timeout);
           }),
           py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("timeout"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("address", &DisttrainBackend::address)
      .def_property_readonly("transport", &DisttrainBackend::transport_name)
      .def_property_readonly("rejected_connections", &DisttrainBackend::rejected_connections);
  m.def("reduce_kernel_isa", &disttrain::comm::reduce_kernel_isa);
}
