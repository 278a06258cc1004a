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
// Reads/writes exactly n bytes, waiting at most timeout_ms for each piece (an
// inactivity limit: a peer that keeps sending a byte at a time never runs into
// it); false on failure.
bool read_full(int fd, void* buf, size_t n, int timeout_ms);
bool write_full(int fd, const void* buf, size_t n, int timeout_ms);
// The same with one overall deadline for all n bytes (a handshake with a peer
// not yet trusted: dribbling cannot stretch it).
bool read_full_until(int fd, void* buf, size_t n, std::chrono::steady_clock::time_point deadline);
bool write_full_until(int fd, const void* buf, size_t n, std::chrono::steady_clock::time_point deadline);
// Compares n bytes in time independent of where they differ (secrets, tokens).
bool equal_constant_time(const void* a, const void* b, size_t n);

}  // namespace disttrain::comm
