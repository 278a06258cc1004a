#include <torch/version.h>

#include "bindings/registry.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "disttrain C++ core";
  auto all = disttrain::bindings::binders();
  std::sort(all.begin(), all.end());
  for (auto& [name, bind] : all) bind(m);

  py::dict info;
  info["compiler"] = DISTTRAIN_CXX_COMPILER;
  info["cxx_flags"] = DISTTRAIN_CXX_FLAGS;
  info["torch_version"] = TORCH_VERSION;
  info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
  info["cplusplus"] = static_cast<long>(__cplusplus);
  info["nccl"] = static_cast<bool>(DISTTRAIN_WITH_NCCL);  // decided by CMakeLists.txt
  info["nccl_status"] = DISTTRAIN_NCCL_STATUS;
  py::list components;
  for (auto& [name, bind] : all) components.append(name);
  info["components"] = components;
  m.attr("build_info") = info;
}
