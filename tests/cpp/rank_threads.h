// Ranks as threads for the C++ tests: one helper for "run this on every rank at
// once and collect what each one failed with".
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace disttrain::testing {

// Runs body(rank) on `world` threads at once; returns each rank's error message
// ("" if none): a c10::Error without its backtrace, or any std::exception.
inline std::vector<std::string> on_rank_threads(int world, const std::function<void(int)>& body) {
  std::vector<std::string> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (const c10::Error& e) {
        errors[r] = e.what_without_backtrace();
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace disttrain::testing
