#include "bindings/registry.h"
#include "strategies/group_averager.h"

namespace py = pybind11;
using disttrain::strategies::AverageResult;
using disttrain::strategies::GroupAverager;
using disttrain::strategies::GroupMember;
using disttrain::strategies::WireDtype;

DISTTRAIN_BINDINGS(decentralised) {
  py::class_<GroupAverager>(m, "GroupAverager")
      .def(py::init([](const py::bytes& token, int port, int64_t max_message_bytes) {
             return std::make_unique<GroupAverager>(std::string(token), port, max_message_bytes);
           }),
           py::arg("token"), py::arg("port") = 0, py::arg("max_message_bytes") = int64_t{1} << 31)
      .def_property_readonly("port", &GroupAverager::port)
      .def(
          "average",
          [](GroupAverager& self, torch::Tensor vec, uint64_t round, const std::vector<std::pair<std::string, int>>& group,
             int my_index, double weight, const std::string& wire, double timeout_s) {
            WireDtype w;
            if (wire == "float32") w = WireDtype::kFloat32;
            else if (wire == "bfloat16") w = WireDtype::kBFloat16;
            else if (wire == "int8") w = WireDtype::kInt8;
            else throw std::invalid_argument("wire must be float32, bfloat16 or int8, got '" + wire + "'");
            std::vector<GroupMember> members;
            for (const auto& [host, port] : group) members.push_back({host, port});
            auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
            AverageResult r;
            {
              py::gil_scoped_release release;
              r = self.average(vec, round, members, my_index, weight, w, timeout);
            }
            py::dict out;
            out["unreachable"] = r.unreachable;
            out["rejected"] = r.rejected;
            out["contributors"] = r.contributors;
            out["bytes_sent"] = r.bytes_sent;
            out["bytes_received"] = r.bytes_received;
            return out;
          },
          py::arg("vec"), py::arg("round"), py::arg("group"), py::arg("my_index"), py::arg("weight"), py::arg("wire"),
          py::arg("timeout_s"))
      .def("take_refusals", &GroupAverager::take_refusals)
      .def("close", &GroupAverager::close, py::call_guard<py::gil_scoped_release>());
}
