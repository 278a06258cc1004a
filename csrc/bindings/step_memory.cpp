#include "bindings/registry.h"
#include "strategies/step_memory.h"

namespace py = pybind11;
namespace sm = disttrain::strategies;

DISTTRAIN_BINDINGS(step_memory) {
  m.def("step_memory_install", &sm::step_memory_install);
  m.def("step_memory_limits", &sm::step_memory_limits, py::arg("max_cached_bytes"), py::arg("min_bytes"));
  m.def("step_memory_enter", &sm::step_memory_enter);
  m.def("step_memory_exit", &sm::step_memory_exit);
  m.def("step_memory_depth", &sm::step_memory_depth);
  m.def("step_memory_release", &sm::step_memory_release);
  m.def("step_memory_stats", []() {
    sm::StepMemoryStats s = sm::step_memory_stats();
    py::dict d;
    d["installed"] = s.installed;
    d["reused"] = s.reused;
    d["fresh"] = s.fresh;
    d["cached_bytes"] = s.cached_bytes;
    d["live_bytes"] = s.live_bytes;
    d["max_cached_bytes"] = s.max_cached_bytes;
    d["min_bytes"] = s.min_bytes;
    return d;
  });
}
