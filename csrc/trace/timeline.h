// A process-wide timeline of what the C++ core does, for Chrome traces
// (disttrain.trace on the Python side turns it into JSON for Perfetto or
// chrome://tracing, merged across ranks).
//
// The lowest layer: comm/ and ddp/ both record into it, neither knows of the
// other. Off by default; while off, a record site costs one relaxed atomic
// load. While on, events go into a mutex-guarded vector (a training step
// records a few dozen: per DDP bucket and per collective, not per tensor).
// Times are steady-clock nanoseconds (CLOCK_MONOTONIC, Python's
// time.monotonic_ns()): one clock for every process of a host.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace disttrain::trace {

struct Event {
  std::string name;
  std::string category;  // "ddp", "comm", "python": what the track is about
  char phase = 'X';      // 'X' span [start_ns, end_ns]; 'i' instant at start_ns
  int64_t start_ns = 0;
  int64_t end_ns = 0;
  int64_t thread = 0;  // the OS thread id (gettid); thread_names() says whose
  int64_t id = -1;     // bucket index or op sequence number, -1 if none
  int64_t bytes = -1;  // payload size, -1 if none
};

int64_t now_ns();

// On/off for the whole process. Starting clears what an earlier run left.
void start();
void stop();
inline std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}
inline bool enabled() { return enabled_flag().load(std::memory_order_relaxed); }

void record(Event event);
// Shorthands; no-ops while off.
void span(const char* category, const char* name, int64_t start_ns, int64_t end_ns, int64_t id = -1,
          int64_t bytes = -1);
void instant(const char* category, const char* name, int64_t at_ns, int64_t id = -1, int64_t bytes = -1);

// Everything recorded so far, removed from the timeline.
std::vector<Event> drain();

// Names the calling thread in traces ("progress", "autograd"); kept across runs.
void name_this_thread(const std::string& name);
// (thread id, name) of every named thread.
std::vector<std::pair<int64_t, std::string>> thread_names();
int64_t this_thread_id();

}  // namespace disttrain::trace
