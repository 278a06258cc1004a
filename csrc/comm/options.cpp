#include "comm/options.h"

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdlib>
#include <functional>
#include <limits>

namespace disttrain::comm {
namespace {

// A whole number in [lo, hi]; anything else (sign, suffix, overflow) is rejected.
uint64_t parse_uint(const std::string& name, const std::string& text, uint64_t lo, uint64_t hi) {
  bool digits = !text.empty() && text.find_first_not_of("0123456789") == std::string::npos;
  errno = 0;
  unsigned long long v = digits ? std::strtoull(text.c_str(), nullptr, 10) : 0;
  TORCH_CHECK_VALUE(digits && errno == 0 && v >= lo && v <= hi, "disttrain: setting ", name, "='", text,
                    "' is not a whole number in [", lo, ", ", hi, "]");
  return v;
}

struct Setting {
  const char* name;
  const char* env;  // the environment variable that sets it, or nullptr
  std::function<void(CommOptions&, const std::string&)> parse;
  std::function<std::string(const CommOptions&)> print;
};

// The values an enumerated setting accepts, in the order its error lists them.
template <class E>
struct Choice {
  const char* name;
  E value;
};

const Choice<TransportChoice> kTransports[] = {
    {"auto", TransportChoice::kAuto}, {"tcp", TransportChoice::kTcp}, {"shm", TransportChoice::kShm}};
const Choice<AllreduceAlgorithm> kAlgorithms[] = {{"auto", AllreduceAlgorithm::kAuto},
                                                  {"ring", AllreduceAlgorithm::kRing},
                                                  {"rd", AllreduceAlgorithm::kRecursiveDoubling},
                                                  {"recursive_doubling", AllreduceAlgorithm::kRecursiveDoubling}};
const Choice<ShmWait> kWaits[] = {{"auto", ShmWait::kAuto}, {"yield", ShmWait::kYield}, {"sleep", ShmWait::kSleep}};

template <class E, size_t N>
E one_of(const char* setting, const std::string& v, const Choice<E> (&choices)[N]) {
  std::string names;
  for (const auto& c : choices) {
    if (v == c.name) return c.value;
    names += std::string(names.empty() ? "" : ", ") + c.name;
  }
  TORCH_CHECK_VALUE(false, "disttrain: setting ", setting, "='", v, "' is not one of ", names);
  return choices[0].value;  // not reached
}

// The first name of `value` (its canonical one).
template <class E, size_t N>
std::string name_of(E value, const Choice<E> (&choices)[N]) {
  for (const auto& c : choices)
    if (c.value == value) return c.name;
  return "?";
}

// The one list of settings: its order is the order `disttrain info` prints.
const std::vector<Setting>& settings() {
  static const std::vector<Setting> table = {
      {"transport", "DISTTRAIN_TRANSPORT",
       [](CommOptions& o, const std::string& v) { o.transport = one_of("transport", v, kTransports); },
       [](const CommOptions& o) { return name_of(o.transport, kTransports); }},
      {"allreduce_algorithm", "DISTTRAIN_ALLREDUCE_ALGO",
       [](CommOptions& o, const std::string& v) {
         o.allreduce_algorithm = one_of("allreduce_algorithm", v, kAlgorithms);
       },
       [](const CommOptions& o) { return name_of(o.allreduce_algorithm, kAlgorithms); }},
      {"chunk_bytes", "DISTTRAIN_CHUNK_BYTES",
       [](CommOptions& o, const std::string& v) {
         o.tcp.chunk_bytes = parse_uint("chunk_bytes", v, 4096, kMaxFramePayload) & ~size_t(63);
       },
       [](const CommOptions& o) { return std::to_string(o.tcp.chunk_bytes); }},
      {"socket_buffer_bytes", "DISTTRAIN_SOCKET_BUFFER",
       [](CommOptions& o, const std::string& v) {
         o.tcp.socket_buffer_bytes = static_cast<int>(
             parse_uint("socket_buffer_bytes", v, 0, std::numeric_limits<int>::max()));
       },
       [](const CommOptions& o) { return std::to_string(o.tcp.socket_buffer_bytes); }},
      {"socket_addr", "DISTTRAIN_SOCKET_ADDR",
       [](CommOptions& o, const std::string& v) { o.tcp.socket_addr = v; },
       [](const CommOptions& o) { return o.tcp.socket_addr; }},
      {"master_addr", "MASTER_ADDR",
       [](CommOptions& o, const std::string& v) { o.tcp.master_addr = v; },
       [](const CommOptions& o) { return o.tcp.master_addr; }},
      {"shm_slot_bytes", "DISTTRAIN_SHM_SLOT_BYTES",
       [](CommOptions& o, const std::string& v) {
         o.shm_slot_bytes = parse_uint("shm_slot_bytes", v, 4096, size_t(1) << 30) & ~size_t(4095);
       },
       [](const CommOptions& o) { return std::to_string(o.shm_slot_bytes); }},
      {"shm_wait", "DISTTRAIN_SHM_WAIT",
       [](CommOptions& o, const std::string& v) { o.shm_wait = one_of("shm_wait", v, kWaits); },
       [](const CommOptions& o) { return name_of(o.shm_wait, kWaits); }},
      {"host_id", "DISTTRAIN_HOST_ID", [](CommOptions& o, const std::string& v) { o.host_id = v; },
       [](const CommOptions& o) { return o.host_id; }},
      {"restart_attempt", "TORCHELASTIC_RESTART_COUNT",
       [](CommOptions& o, const std::string& v) {
         o.restart_attempt = static_cast<int>(parse_uint("restart_attempt", v, 0, 1 << 30));
       },
       [](const CommOptions& o) { return std::to_string(o.restart_attempt); }},
  };
  return table;
}

}  // namespace

CommOptions CommOptions::resolve(const std::map<std::string, std::string>& overrides) {
  CommOptions o;
  for (const auto& [name, value] : overrides) {
    bool known = false;
    for (const auto& s : settings()) known = known || name == s.name;
    if (!known) {
      std::string names;
      for (const auto& s : settings()) names += std::string(names.empty() ? "" : ", ") + s.name;
      TORCH_CHECK_VALUE(false, "disttrain: unknown backend option '", name, "'; the options are ", names);
    }
  }
  for (const auto& s : settings()) {
    o.source_[s.name] = "default";
    const char* env = s.env ? std::getenv(s.env) : nullptr;
    if (env != nullptr && *env != '\0') {
      s.parse(o, env);
      o.source_[s.name] = std::string("environment ") + s.env;
    }
    auto it = overrides.find(s.name);
    if (it != overrides.end()) {
      s.parse(o, it->second);
      o.source_[s.name] = "options";
    }
  }
  return o;
}


std::vector<CommOptions::Described> CommOptions::describe() const {
  std::vector<Described> out;
  for (const auto& s : settings()) {
    auto it = source_.find(s.name);
    out.push_back({s.name, s.print(*this), it == source_.end() ? "default" : it->second, s.env ? s.env : ""});
  }
  return out;
}

}  // namespace disttrain::comm
