#include "bindings/registry.h"
#include "snapshot/async_snapshot_writer.h"
#include "snapshot/crc32c.h"
#include "snapshot/snapshot_io.h"

namespace py = pybind11;
using namespace disttrain::snapshot;

namespace {

std::vector<NamedTensor> zip_named(const std::vector<std::string>& names, const std::vector<at::Tensor>& tensors) {
  TORCH_CHECK(names.size() == tensors.size(), "snapshot: ", names.size(), " names for ", tensors.size(), " tensors");
  std::vector<NamedTensor> out;
  out.reserve(names.size());
  for (size_t i = 0; i < names.size(); ++i) out.push_back({names[i], tensors[i]});
  return out;
}

WriteOptions make_options(bool fsync, int64_t fail_after_bytes, int64_t kill_after_bytes,
                          bool fail_directory_fsync) {
  WriteOptions o;
  o.fsync = fsync;
  o.fail_after_bytes = fail_after_bytes;
  o.kill_after_bytes = kill_after_bytes;
  o.fail_directory_fsync = fail_directory_fsync;
  return o;
}

}  // namespace

DISTTRAIN_BINDINGS(snapshot) {
  // Python exceptions that carry the file (and tensor) as attributes.
  static py::handle corrupt_type = PyErr_NewException("disttrain._C.CorruptSnapshotError", PyExc_ValueError, nullptr);
  static py::handle write_type = PyErr_NewException("disttrain._C.SnapshotWriteError", PyExc_OSError, nullptr);
  static py::handle unsupported_type =
      PyErr_NewException("disttrain._C.UnsupportedSnapshotError", PyExc_ValueError, nullptr);
  m.attr("CorruptSnapshotError") = corrupt_type;
  m.attr("SnapshotWriteError") = write_type;
  m.attr("UnsupportedSnapshotError") = unsupported_type;
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CorruptSnapshotError& e) {
      py::object error = py::reinterpret_borrow<py::object>(corrupt_type)(e.what());
      error.attr("path") = e.path();
      error.attr("tensor") = e.tensor().empty() ? py::object(py::none()) : py::object(py::str(e.tensor()));
      PyErr_SetObject(corrupt_type.ptr(), error.ptr());
    } catch (const SnapshotWriteError& e) {
      py::object error = py::reinterpret_borrow<py::object>(write_type)(e.error_number(), e.what());
      error.attr("filename") = e.path();
      error.attr("replaced_target") = e.replaced_target();
      PyErr_SetObject(write_type.ptr(), error.ptr());
    } catch (const UnsupportedSnapshotError& e) {
      py::object error = py::reinterpret_borrow<py::object>(unsupported_type)(e.what());
      error.attr("path") = e.path();
      error.attr("version") = e.version();
      PyErr_SetObject(unsupported_type.ptr(), error.ptr());
    } catch (const SnapshotReadError& e) {
      // OSError(errno, ...) is the matching subclass: FileNotFoundError, PermissionError, ...
      py::object error = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.error_number(), e.what(), e.path());
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(error.ptr())), error.ptr());
    }
  });

  m.def("snapshot_write",
        [](const std::string& path, const py::bytes& metadata, const std::vector<std::string>& names,
           const std::vector<at::Tensor>& tensors, bool fsync, int64_t fail_after_bytes, int64_t kill_after_bytes,
           bool fail_directory_fsync) {
          std::string meta = metadata;
          py::gil_scoped_release release;
          return write_snapshot(path, meta, zip_named(names, tensors),
                                make_options(fsync, fail_after_bytes, kill_after_bytes, fail_directory_fsync));
        },
        py::arg("path"), py::arg("metadata"), py::arg("names"), py::arg("tensors"), py::arg("fsync") = true,
        py::arg("fail_after_bytes") = -1, py::arg("kill_after_bytes") = -1, py::arg("fail_directory_fsync") = false);

  m.def("snapshot_read", [](const std::string& path) {
    Snapshot s;
    {
      py::gil_scoped_release release;
      s = read_snapshot(path);
    }
    std::vector<std::string> names;
    std::vector<at::Tensor> tensors;
    for (auto& t : s.tensors) {
      names.push_back(std::move(t.name));
      tensors.push_back(std::move(t.tensor));
    }
    return py::make_tuple(py::bytes(s.metadata), names, tensors);
  });

  py::class_<AsyncSnapshotWriter>(m, "AsyncSnapshotWriter")
      .def(py::init<>())
      .def("save",
           [](AsyncSnapshotWriter& w, const std::string& path, const py::bytes& metadata,
              const std::vector<std::string>& names, const std::vector<at::Tensor>& tensors,
              const std::vector<std::string>& remove_after_commit, bool fsync, int64_t fail_after_bytes,
              int64_t kill_after_bytes, bool copy_in_background, bool fail_directory_fsync) {
             std::string meta = metadata;
             py::gil_scoped_release release;
             w.save(path, meta, zip_named(names, tensors), remove_after_commit,
                    make_options(fsync, fail_after_bytes, kill_after_bytes, fail_directory_fsync), copy_in_background);
           },
           py::arg("path"), py::arg("metadata"), py::arg("names"), py::arg("tensors"),
           py::arg("remove_after_commit"), py::arg("fsync") = true, py::arg("fail_after_bytes") = -1,
           py::arg("kill_after_bytes") = -1, py::arg("copy_in_background") = false,
           py::arg("fail_directory_fsync") = false)
      .def("wait_staged", &AsyncSnapshotWriter::wait_staged, py::call_guard<py::gil_scoped_release>())
      .def("wait", &AsyncSnapshotWriter::wait, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("busy", &AsyncSnapshotWriter::busy)
      .def_property_readonly("last_staging_seconds", &AsyncSnapshotWriter::last_staging_seconds)
      .def_property_readonly("last_write_seconds", &AsyncSnapshotWriter::last_write_seconds);

  m.def("crc32c", [](const py::bytes& data, uint32_t crc) {
    std::string_view view = data;
    return crc32c_update(crc, view.data(), view.size());
  }, py::arg("data"), py::arg("crc") = 0);
  m.def("crc32c_combine", &crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("length_b"));
  m.attr("crc32c_implementation") = crc32c_implementation();
}
