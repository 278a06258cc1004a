#include "trace/timeline.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>

namespace disttrain::trace {
namespace {

struct Store {
  std::mutex mu;
  std::vector<Event> events;
  std::map<int64_t, std::string> names;
};

Store& store() {
  static Store* s = new Store();  // never destroyed: threads may record during exit
  return *s;
}

}  // namespace

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t this_thread_id() {
  thread_local const int64_t tid = static_cast<int64_t>(::syscall(SYS_gettid));
  return tid;
}

void start() {
  {
    std::lock_guard<std::mutex> lock(store().mu);
    store().events.clear();
  }
  enabled_flag().store(true);
}

void stop() { enabled_flag().store(false); }

void record(Event event) {
  if (!enabled()) return;
  if (event.thread == 0) event.thread = this_thread_id();
  std::lock_guard<std::mutex> lock(store().mu);
  store().events.push_back(std::move(event));
}

void span(const char* category, const char* name, int64_t start_ns, int64_t end_ns, int64_t id, int64_t bytes) {
  if (!enabled()) return;
  record(Event{name, category, 'X', start_ns, end_ns, 0, id, bytes});
}

void instant(const char* category, const char* name, int64_t at_ns, int64_t id, int64_t bytes) {
  if (!enabled()) return;
  record(Event{name, category, 'i', at_ns, at_ns, 0, id, bytes});
}

std::vector<Event> drain() {
  std::vector<Event> out;
  std::lock_guard<std::mutex> lock(store().mu);
  out.swap(store().events);
  return out;
}

void name_this_thread(const std::string& name) {
  std::lock_guard<std::mutex> lock(store().mu);
  store().names[this_thread_id()] = name;
}

std::vector<std::pair<int64_t, std::string>> thread_names() {
  std::lock_guard<std::mutex> lock(store().mu);
  return {store().names.begin(), store().names.end()};
}

}  // namespace disttrain::trace
