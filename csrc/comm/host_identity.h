// Which ranks share a host (and so can share memory): same kernel boot, same
// network namespace, same host name. Network namespaces count as hosts so that
// multi-host tests on one machine exercise the cross-host path.
#pragma once
#include <string>

namespace disttrain::comm {
// `extra` (the host_id option) splits one machine into several "hosts".
std::string host_identity(const std::string& extra);
}
