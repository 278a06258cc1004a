#include "comm/host_identity.h"

#include <unistd.h>

#include <fstream>
#include <sstream>

namespace disttrain::comm {

std::string host_identity(const std::string& extra) {
  std::ostringstream id;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  std::getline(boot, boot_id);
  char netns[256] = {0};
  ssize_t n = ::readlink("/proc/self/ns/net", netns, sizeof(netns) - 1);
  if (n < 0) netns[0] = '\0';
  char host[256] = {0};
  ::gethostname(host, sizeof(host) - 1);
  id << boot_id << "|" << netns << "|" << host;
  // Splits one machine into several "hosts" (tests of the cross-host paths).
  if (!extra.empty()) id << "|" << extra;
  return id.str();
}

}  // namespace disttrain::comm
