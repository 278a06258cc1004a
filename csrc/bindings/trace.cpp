#include "bindings/registry.h"
#include "trace/timeline.h"

namespace py = pybind11;
namespace trace = disttrain::trace;

// The C++ core's timeline (csrc/trace/timeline.h); disttrain.trace is its Python face.
DISTTRAIN_BINDINGS(trace) {
  m.def("trace_start", &trace::start);
  m.def("trace_stop", &trace::stop);
  m.def("trace_enabled", &trace::enabled);
  // (name, category, phase, start_ns, end_ns, thread, id, bytes) per event; drains the timeline.
  m.def("trace_drain", [] {
    std::vector<std::tuple<std::string, std::string, std::string, int64_t, int64_t, int64_t, int64_t, int64_t>> out;
    for (auto& e : trace::drain())
      out.emplace_back(std::move(e.name), std::move(e.category), std::string(1, e.phase), e.start_ns, e.end_ns,
                       e.thread, e.id, e.bytes);
    return out;
  });
  m.def("trace_thread_names", &trace::thread_names);
  m.def("trace_span", [](const std::string& category, const std::string& name, int64_t start_ns, int64_t end_ns,
                         int64_t id) {
    trace::record(trace::Event{name, category, 'X', start_ns, end_ns, 0, id, -1});
  }, py::arg("category"), py::arg("name"), py::arg("start_ns"), py::arg("end_ns"), py::arg("id") = -1);
}
