#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "bindings/registry.h"
#include "comm/backend.h"
#include "comm/kernels/reduce_kernels.h"
#include "comm/options.h"
#include "comm/shm/shm_group.h"

namespace py = pybind11;
using disttrain::comm::CommOptions;
using disttrain::comm::DisttrainBackend;

namespace {
py::list describe(const CommOptions& options) {
  py::list out;
  for (const auto& d : options.describe()) out.append(py::make_tuple(d.name, d.value, d.source, d.env));
  return out;
}
}  // namespace

DISTTRAIN_BINDINGS(distributed) {
  py::class_<DisttrainBackend, c10d::Backend, c10::intrusive_ptr<DisttrainBackend>>(m, "ProcessGroupDisttrain")
      .def(py::init([](const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                       std::chrono::milliseconds timeout, const std::map<std::string, std::string>& options) {
             return c10::make_intrusive<DisttrainBackend>(store, rank, size, timeout, CommOptions::resolve(options));
           }),
           py::arg("store"), py::arg("rank"), py::arg("size"), py::arg("timeout"),
           py::arg("options") = std::map<std::string, std::string>{}, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("address", &DisttrainBackend::address)
      .def_property_readonly("transport", &DisttrainBackend::transport_name)
      .def_property_readonly("rejected_connections", &DisttrainBackend::rejected_connections)
      .def_property_readonly("host_ranks", &DisttrainBackend::host_ranks)
      .def_property_readonly("caller_thread_ops", &DisttrainBackend::caller_thread_ops)
      .def_property_readonly("options", [](const DisttrainBackend& b) { return describe(b.options()); });
  m.def(
      "comm_options",
      [](const std::map<std::string, std::string>& overrides) { return describe(CommOptions::resolve(overrides)); },
      py::arg("overrides") = std::map<std::string, std::string>{});
  m.def("reduce_kernel_isa", &disttrain::comm::reduce_kernel_isa);
}
