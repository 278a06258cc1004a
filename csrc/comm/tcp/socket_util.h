// Small POSIX socket helpers for the TCP transport.
#pragma once
#include <chrono>
#include <string>

namespace disttrain::comm {

// Listening socket on all interfaces, an ephemeral port; returns the fd, sets *port.
int listen_any(int* port);
// Connects to host:port, retrying refused connections until the deadline; -1 on failure.
int connect_retry(const std::string& host, int port, std::chrono::steady_clock::time_point deadline,
                  std::string* error);
// The address other hosts reach this one at: DISTTRAIN_SOCKET_ADDR, else the
// local address of the route to MASTER_ADDR, else 127.0.0.1.
std::string local_address();
void set_nonblocking(int fd);
void tune_socket(int fd);
// Reads/writes exactly n bytes on a blocking fd, waiting at most timeout_ms; false on failure.
bool read_full(int fd, void* buf, size_t n, int timeout_ms);
bool write_full(int fd, const void* buf, size_t n, int timeout_ms);

}  // namespace disttrain::comm
