// Every setting of the comm layer, in one struct, parsed once when a process
// group is created and passed down from there: no layer below reads the
// environment. A setting comes from (in rising priority) its default, its
// environment variable, and the options given to init_process_group /
// new_group (`pg_options`). An unknown key or a malformed value is rejected
// with a ValueError naming the setting, the value and what is accepted, so a
// typo never silently falls back to a default.
//
// The table of settings (kSettings in options.cpp) is the only list: the
// parser, `describe()` (what `disttrain info` prints) and docs/settings.md
// follow it.
#pragma once
#include <cstddef>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "comm/shm/shm_group.h"
#include "comm/tcp/tcp_collectives.h"
#include "comm/tcp/tcp_transport.h"

namespace disttrain::comm {

enum class TransportChoice { kAuto, kTcp, kShm };

struct CommOptions {
  TransportChoice transport = TransportChoice::kAuto;
  AllreduceAlgorithm allreduce_algorithm = AllreduceAlgorithm::kAuto;  // TCP paths only
  TcpSettings tcp;                                                      // chunk size, socket buffers, address
  size_t shm_slot_bytes = kDefaultShmSlotBytes;
  ShmWait shm_wait = ShmWait::kAuto;
  std::string host_id;          // appended to the host identity (splits one machine into "hosts")
  int restart_attempt = 0;      // torchrun's restart count: scopes the store keys of one attempt

  // Defaults, overridden by the environment, overridden by `overrides`
  // (setting name -> value as text). Throws c10::ValueError on an unknown
  // name or a malformed value.
  static CommOptions resolve(const std::map<std::string, std::string>& overrides = {});
  // Every setting's effective value as text, in table order, with where it came from.
  struct Described {
    std::string name, value, source, env;
  };
  std::vector<Described> describe() const;

 private:
  std::map<std::string, std::string> source_;  // name -> "default", "environment" or "options"
};

}  // namespace disttrain::comm
