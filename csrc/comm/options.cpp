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

const char* transport_name(TransportChoice t) {
  return t == TransportChoice::kTcp ? "tcp" : t == TransportChoice::kShm ? "shm" : "auto";
}

const char* algorithm_name(AllreduceAlgorithm a) {
  return a == AllreduceAlgorithm::kRing ? "ring" : a == AllreduceAlgorithm::kRecursiveDoubling ? "rd" : "auto";
}

// The one list of settings: its order is the order `disttrain info` prints.
const std::vector<Setting>& settings() {
  static const std::vector<Setting> table = {
      {"transport", "DISTTRAIN_TRANSPORT",
       [](CommOptions& o, const std::string& v) {
         if (v == "auto") o.transport = TransportChoice::kAuto;
         else if (v == "tcp") o.transport = TransportChoice::kTcp;
         else if (v == "shm") o.transport = TransportChoice::kShm;
         else TORCH_CHECK_VALUE(false, "disttrain: setting transport='", v, "' is not one of auto, tcp, shm");
       },
       [](const CommOptions& o) { return std::string(transport_name(o.transport)); }},
      {"allreduce_algorithm", "DISTTRAIN_ALLREDUCE_ALGO",
       [](CommOptions& o, const std::string& v) {
         if (v == "auto") o.allreduce_algorithm = AllreduceAlgorithm::kAuto;
         else if (v == "ring") o.allreduce_algorithm = AllreduceAlgorithm::kRing;
         else if (v == "rd" || v == "recursive_doubling") o.allreduce_algorithm = AllreduceAlgorithm::kRecursiveDoubling;
         else TORCH_CHECK_VALUE(false, "disttrain: setting allreduce_algorithm='", v,
                                "' is not one of auto, ring, rd (recursive_doubling)");
       },
       [](const CommOptions& o) { return std::string(algorithm_name(o.allreduce_algorithm)); }},
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
       [](CommOptions& o, const std::string& v) {
         if (v == "auto") o.shm_wait = ShmWait::kAuto;
         else if (v == "yield") o.shm_wait = ShmWait::kYield;
         else if (v == "sleep") o.shm_wait = ShmWait::kSleep;
         else TORCH_CHECK_VALUE(false, "disttrain: setting shm_wait='", v, "' is not one of auto, yield, sleep");
       },
       [](const CommOptions& o) {
         return std::string(o.shm_wait == ShmWait::kYield ? "yield" : o.shm_wait == ShmWait::kSleep ? "sleep" : "auto");
       }},
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
