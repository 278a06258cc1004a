// Each binding file registers itself with DISTTRAIN_BINDINGS(name) { ... };
// module.cpp runs them all in name order. Adding a component touches no
// shared file.
#pragma once
#include <pybind11/chrono.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

namespace disttrain::bindings {

using Binder = void (*)(pybind11::module_&);

inline std::vector<std::pair<std::string, Binder>>& binders() {
  static std::vector<std::pair<std::string, Binder>> all;
  return all;
}

struct Registration {
  Registration(const char* name, Binder binder) { binders().emplace_back(name, binder); }
};

}  // namespace disttrain::bindings

#define DISTTRAIN_BINDINGS(name)                                                                     \
  static void disttrain_bind_##name(pybind11::module_& m);                                           \
  static ::disttrain::bindings::Registration disttrain_registration_##name(#name, &disttrain_bind_##name); \
  static void disttrain_bind_##name(pybind11::module_& m)
