#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "bindings/registry.h"
#include "shard/flat_layout.h"
#include "shard/shard_engine.h"
#include "shard/tensor_memory_tracker.h"

namespace py = pybind11;
using namespace disttrain::shard;

DISTTRAIN_BINDINGS(fsdp) {
  py::class_<ShardedUnit>(m, "ShardedUnit")
      .def_property_readonly("names", &ShardedUnit::names)
      .def_property_readonly("shapes", [](const ShardedUnit& u) { return u.layout().shapes; })
      .def_property_readonly("numels", [](const ShardedUnit& u) { return u.layout().numels; })
      .def_property_readonly("total_numel", [](const ShardedUnit& u) { return u.layout().total; })
      .def_property_readonly("padded_numel", [](const ShardedUnit& u) { return u.layout().padded; })
      .def_property_readonly("shard_numel", [](const ShardedUnit& u) { return u.layout().shard_numel; })
      .def_property_readonly("shard", &ShardedUnit::shard)
      .def_property_readonly("full", &ShardedUnit::full)
      .def_property_readonly("gathered", &ShardedUnit::gathered)
      .def("set_shard", &ShardedUnit::set_shard, py::arg("param"))
      .def_property_readonly("params", &ShardedUnit::params)
      .def("gather_copy", &ShardedUnit::gather_copy, py::call_guard<py::gil_scoped_release>())
      .def("load_full", &ShardedUnit::load_full, py::arg("flat"))
      .def("load_shard", &ShardedUnit::load_shard, py::arg("shard"));

  py::class_<ShardEngine>(m, "ShardEngine")
      .def(py::init([](c10::intrusive_ptr<c10d::ProcessGroup> group, int stage, bool prefetch,
                       std::optional<at::ScalarType> wire_dtype, const std::string& backward_prefetch,
                       bool lean_backward) {
             ShardOptions options;
             options.stage = stage;
             options.prefetch = prefetch;
             options.backward_prefetch = parse_backward_prefetch(backward_prefetch);
             options.wire_dtype = wire_dtype;
             options.lean_backward = lean_backward;
             return std::make_unique<ShardEngine>(std::move(group), options);
           }),
           py::arg("group"), py::arg("stage"), py::arg("prefetch"), py::arg("wire_dtype"),
           py::arg("backward_prefetch") = "post", py::arg("lean_backward") = false)
      .def("add_unit", &ShardEngine::add_unit, py::arg("params"), py::arg("names"), py::arg("is_root"),
           py::arg("gather_for_backward") = true, py::call_guard<py::gil_scoped_release>())
      .def("unit", &ShardEngine::unit, py::arg("index"), py::return_value_policy::reference_internal)
      .def_property_readonly("num_units", &ShardEngine::num_units)
      .def("pre_forward", &ShardEngine::pre_forward, py::arg("index"), py::call_guard<py::gil_scoped_release>())
      .def("post_forward", &ShardEngine::post_forward, py::arg("index"), py::call_guard<py::gil_scoped_release>())
      .def("begin_forward", &ShardEngine::begin_forward, py::call_guard<py::gil_scoped_release>())
      .def("end_forward", &ShardEngine::end_forward, py::arg("backward_follows"),
           py::call_guard<py::gil_scoped_release>())
      .def("free_all", &ShardEngine::free_all, py::call_guard<py::gil_scoped_release>())
      .def("pre_backward", &ShardEngine::pre_backward, py::arg("index"), py::call_guard<py::gil_scoped_release>())
      .def("gather_stale", &ShardEngine::gather_stale, py::call_guard<py::gil_scoped_release>())
      .def("clip_grad_norm", &ShardEngine::clip_grad_norm, py::arg("max_norm"), py::arg("norm_type"),
           py::call_guard<py::gil_scoped_release>());

  m.def("reshard_flat", &reshard, py::arg("old_shards"), py::arg("total_numel"), py::arg("new_rank"),
        py::arg("new_world_size"));
  m.def("reshard_sources", [](int64_t total, int old_world, int new_rank, int new_world) {
    std::vector<int> ranks;
    for (const auto& p : reshard_plan(total, old_world, new_rank, new_world)) ranks.push_back(p.old_rank);
    return ranks;
  }, py::arg("total_numel"), py::arg("old_world_size"), py::arg("new_rank"), py::arg("new_world_size"));

  py::class_<TensorMemoryTracker>(m, "TensorMemoryTracker")
      .def(py::init<>())
      .def("start", &TensorMemoryTracker::start)
      .def("stop", &TensorMemoryTracker::stop)
      .def("reset_peak", &TensorMemoryTracker::reset_peak)
      .def_property_readonly("current_bytes", &TensorMemoryTracker::current_bytes)
      .def_property_readonly("peak_bytes", &TensorMemoryTracker::peak_bytes);
}
