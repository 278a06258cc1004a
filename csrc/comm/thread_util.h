// Threads that must never take the process down: a body that lets no
// exception escape (an escaping exception is std::terminate), and a join that
// cannot be a self-join (a destructor reached on the thread it would join,
// through a callback that dropped the last reference: std::thread::join would
// throw there, and a std::thread destroyed while joinable is std::terminate).
#pragma once
#include <cxxabi.h>

#include <cstdio>
#include <exception>
#include <thread>
#include <utility>

namespace disttrain::comm {

// Runs body(); an exception is reported on stderr and ends the thread quietly.
// A forced unwind (pthread_exit, e.g. Python ending a thread that asks for the
// GIL during interpreter shutdown) must go on: swallowing it aborts the process.
template <typename Body>
void run_thread_body(const char* what, Body&& body) {
  try {
    std::forward<Body>(body)();
  } catch (abi::__forced_unwind&) {
    throw;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "disttrain: %s thread stopped on an error: %s\n", what, e.what());
  } catch (...) {
    std::fprintf(stderr, "disttrain: %s thread stopped on an unknown error\n", what);
  }
}

// Joins t, or detaches it when called on t itself. Returns true if joined.
inline bool join_or_detach(std::thread& t) {
  if (!t.joinable()) return true;
  if (t.get_id() == std::this_thread::get_id()) {
    t.detach();
    return false;
  }
  t.join();
  return true;
}

}  // namespace disttrain::comm
