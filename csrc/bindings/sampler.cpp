#include "bindings/registry.h"
#include "data/sampler_engine.h"

namespace py = pybind11;
using disttrain::data::IndexStream;
using disttrain::data::SamplerOptions;

DISTTRAIN_BINDINGS(sampler) {
  py::class_<IndexStream>(m, "SamplerIndexStream")
      .def(py::init([](int64_t dataset_size, int64_t num_replicas, int64_t rank, bool shuffle, uint64_t seed,
                       bool drop_last, const std::string& mode, int64_t epoch, int64_t start) {
             SamplerOptions options;
             options.dataset_size = dataset_size;
             options.num_replicas = num_replicas;
             options.rank = rank;
             options.shuffle = shuffle;
             options.seed = seed;
             options.drop_last = drop_last;
             options.mode = disttrain::data::parse_sampler_mode(mode);
             return std::make_unique<IndexStream>(options, epoch, start);
           }),
           py::arg("dataset_size"), py::arg("num_replicas"), py::arg("rank"), py::arg("shuffle"), py::arg("seed"),
           py::arg("drop_last"), py::arg("mode"), py::arg("epoch"), py::arg("start"),
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("size", &IndexStream::size)
      .def_property_readonly("produced", &IndexStream::produced)
      .def_property_readonly("remaining", &IndexStream::remaining)
      .def("fill", &IndexStream::fill_tensor, py::arg("out"), py::call_guard<py::gil_scoped_release>());
  m.def("sampler_samples_per_rank", &disttrain::data::samples_per_rank, py::arg("dataset_size"),
        py::arg("num_replicas"), py::arg("drop_last"), py::arg("start"));
}
