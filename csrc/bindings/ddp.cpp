#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "bindings/registry.h"
#include "ddp/bucket_plan.h"
#include "ddp/reducer.h"
#include "ddp/replica_sync.h"

namespace py = pybind11;
using disttrain::ddp::BackwardTrace;
using disttrain::ddp::Reducer;
using disttrain::ddp::ReducerOptions;

// torch.distributed's ProcessGroup objects arrive as c10::intrusive_ptr<c10d::ProcessGroup>
// (torch registers the type with that holder), so the reducer talks to gloo,
// disttrain or NCCL through the C++ interface.
DISTTRAIN_BINDINGS(ddp) {
  py::class_<Reducer>(m, "Reducer")
      .def(py::init([](std::vector<at::Tensor> params, std::vector<std::string> names,
                       c10::intrusive_ptr<c10d::ProcessGroup> group, int64_t bucket_cap_bytes,
                       int64_t first_bucket_cap_bytes, bool find_unused_parameters, bool gradient_as_bucket_view,
                       std::optional<at::ScalarType> wire_dtype, const std::string& reduce_on_caller) {
             ReducerOptions options;
             options.bucket_cap_bytes = bucket_cap_bytes;
             options.first_bucket_cap_bytes = first_bucket_cap_bytes;
             options.find_unused_parameters = find_unused_parameters;
             options.gradient_as_bucket_view = gradient_as_bucket_view;
             options.wire_dtype = wire_dtype;
             TORCH_CHECK_VALUE(reduce_on_caller == "none" || reduce_on_caller == "last" || reduce_on_caller == "all",
                               "Reducer: reduce_on_caller must be none, last or all, got '", reduce_on_caller, "'");
             options.reduce_on_caller = reduce_on_caller == "all"    ? ReducerOptions::OnCaller::kAll
                                        : reduce_on_caller == "last" ? ReducerOptions::OnCaller::kLast
                                                                     : ReducerOptions::OnCaller::kNone;
             return std::make_unique<Reducer>(std::move(params), std::move(names), std::move(group), options);
           }),
           py::arg("params"), py::arg("names"), py::arg("group"), py::arg("bucket_cap_bytes"),
           py::arg("first_bucket_cap_bytes"), py::arg("find_unused_parameters"), py::arg("gradient_as_bucket_view"),
           py::arg("wire_dtype"), py::arg("reduce_on_caller") = "last")
      .def("prepare_for_backward", &Reducer::prepare_for_backward, py::arg("outputs"),
           py::call_guard<py::gil_scoped_release>())
      .def("discard_unfinished_backward", &Reducer::discard_unfinished_backward,
           py::call_guard<py::gil_scoped_release>())
      .def(
          "set_fused_sgd",
          [](Reducer& r, const std::vector<std::tuple<double, double, double, double, bool, bool>>& settings,
             const std::vector<std::optional<at::Tensor>>& buffers, const std::vector<bool>& fresh) {
            std::vector<disttrain::ddp::SgdSettings> s;
            for (const auto& [lr, momentum, dampening, weight_decay, nesterov, maximize] : settings)
              s.push_back({lr, momentum, dampening, weight_decay, nesterov, maximize});
            std::vector<at::Tensor> b;
            for (const auto& t : buffers) b.push_back(t.value_or(at::Tensor()));
            py::gil_scoped_release release;
            r.set_fused_sgd(std::move(s), std::move(b), fresh);
          },
          py::arg("settings"), py::arg("buffers"), py::arg("fresh"))
      .def_property_readonly("fused_steps", &Reducer::fused_steps)
      .def("bucket_plan", &Reducer::bucket_plan)
      .def_property_readonly("rebuilt", &Reducer::rebuilt)
      .def("last_trace", [](const Reducer& r) {
        BackwardTrace t = r.last_trace();
        py::dict d;
        d["ready_ns"] = t.ready_ns;
        d["launch_ns"] = t.launch_ns;
        d["done_ns"] = t.done_ns;
        d["backward_start_ns"] = t.backward_start_ns;
        d["backward_end_ns"] = t.backward_end_ns;
        d["finalize_end_ns"] = t.finalize_end_ns;
        return d;
      });
  m.def("verify_replicas", &disttrain::ddp::verify_replicas, py::arg("group"), py::arg("params"), py::arg("names"),
        py::call_guard<py::gil_scoped_release>());
  m.def("broadcast_coalesced", &disttrain::ddp::broadcast_coalesced, py::arg("group"), py::arg("tensors"),
        py::arg("chunk_bytes"), py::arg("root") = 0, py::call_guard<py::gil_scoped_release>());
  m.def(
      "plan_buckets",
      [](const std::vector<int64_t>& bytes, const std::vector<at::ScalarType>& dtypes,
         const std::vector<int64_t>& order, int64_t first_cap_bytes, int64_t cap_bytes) {
        TORCH_CHECK_VALUE(bytes.size() == dtypes.size(), "plan_buckets: ", bytes.size(), " sizes but ",
                          dtypes.size(), " dtypes");
        std::vector<disttrain::ddp::TensorSlot> slots;
        for (size_t i = 0; i < bytes.size(); ++i) slots.push_back({bytes[i], dtypes[i]});
        return disttrain::ddp::plan_buckets(slots, order, first_cap_bytes, cap_bytes);
      },
      py::arg("bytes"), py::arg("dtypes"), py::arg("order"), py::arg("first_cap_bytes"), py::arg("cap_bytes"));
}
