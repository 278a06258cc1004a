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
// The address other hosts reach this one at: socket_addr when given, else the
// local address of the route to master_addr, else 127.0.0.1.
std::string local_address(const std::string& socket_addr, const std::string& master_addr);
void set_nonblocking(int fd);
// TCP_NODELAY; with buffer_bytes > 0 also fixed kernel buffers of that size.
void tune_socket(int fd, int buffer_bytes);
// Reads/writes exactly n bytes on a blocking fd, waiting at most timeout_ms; false on failure.
bool read_full(int fd, void* buf, size_t n, int timeout_ms);
bool write_full(int fd, const void* buf, size_t n, int timeout_ms);

}  // namespace disttrain::comm
