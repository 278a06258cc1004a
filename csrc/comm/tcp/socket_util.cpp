#include "comm/tcp/socket_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>

namespace disttrain::comm {

int listen_any(int* port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  int one = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_ANY);
  addr.sin_port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 128) != 0) {
    ::close(fd);
    return -1;
  }
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  *port = ntohs(addr.sin_port);
  return fd;
}

void set_nonblocking(int fd) {
  int flags = ::fcntl(fd, F_GETFL, 0);
  ::fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

void tune_socket(int fd, int buffer_bytes) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (buffer_bytes > 0) {
    ::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buffer_bytes, sizeof(buffer_bytes));
    ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buffer_bytes, sizeof(buffer_bytes));
  }
}

int connect_retry(const std::string& host, int port, std::chrono::steady_clock::time_point deadline,
                  std::string* error) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &res);
  if (rc != 0 || res == nullptr) {
    *error = "cannot resolve '" + host + "': " + gai_strerror(rc);
    return -1;
  }
  auto delay = std::chrono::milliseconds(10);
  while (true) {
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
      ::freeaddrinfo(res);
      return fd;
    }
    *error = std::string("connect to ") + host + ":" + std::to_string(port) + " failed: " +
             std::strerror(errno);
    if (fd >= 0) ::close(fd);
    if (std::chrono::steady_clock::now() + delay > deadline) break;
    std::this_thread::sleep_for(delay);
    delay = std::min(delay * 2, std::chrono::milliseconds(500));
  }
  ::freeaddrinfo(res);
  return -1;
}

std::string local_address(const std::string& socket_addr, const std::string& master_addr) {
  if (!socket_addr.empty()) return socket_addr;
  const char* master = master_addr.c_str();
  if (!master_addr.empty()) {
    addrinfo hints{};
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_DGRAM;
    addrinfo* res = nullptr;
    if (::getaddrinfo(master, "9", &hints, &res) == 0 && res != nullptr) {
      // A UDP connect sends nothing; it only asks the kernel for the route.
      int fd = ::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
      std::string result;
      if (fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
        sockaddr_in local{};
        socklen_t len = sizeof(local);
        if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0) {
          char text[INET_ADDRSTRLEN];
          if (::inet_ntop(AF_INET, &local.sin_addr, text, sizeof(text))) result = text;
        }
      }
      if (fd >= 0) ::close(fd);
      ::freeaddrinfo(res);
      if (!result.empty()) return result;
    }
  }
  return "127.0.0.1";
}

static bool wait_fd(int fd, short events, int timeout_ms) {
  pollfd p{fd, events, 0};
  int rc;
  do {
    rc = ::poll(&p, 1, timeout_ms);
  } while (rc < 0 && errno == EINTR);
  return rc > 0 && (p.revents & events);
}

namespace {
using SteadyClock = std::chrono::steady_clock;

int ms_left(SteadyClock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - SteadyClock::now()).count();
  return left <= 0 ? 0 : static_cast<int>(std::min<int64_t>(left, 1000 * 1000));
}

// A time limit for each wait: the same for every piece, or what is left of one deadline.
struct Limit {
  int timeout_ms;
  bool overall;
  SteadyClock::time_point deadline;
  int next() const { return overall ? ms_left(deadline) : timeout_ms; }
};

bool read_limited(int fd, void* buf, size_t n, const Limit& limit) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n > 0) {
    if (!wait_fd(fd, POLLIN, limit.next())) return false;
    ssize_t r = ::recv(fd, p, n, MSG_DONTWAIT);
    if (r == 0) return false;
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return false;
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool write_limited(int fd, const void* buf, size_t n, const Limit& limit) {
  auto* p = static_cast<const uint8_t*>(buf);
  while (n > 0) {
    if (!wait_fd(fd, POLLOUT, limit.next())) return false;
    ssize_t r = ::send(fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return false;
    }
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

}  // namespace

bool read_full(int fd, void* buf, size_t n, int timeout_ms) {
  return read_limited(fd, buf, n, Limit{timeout_ms, false, {}});
}

bool write_full(int fd, const void* buf, size_t n, int timeout_ms) {
  return write_limited(fd, buf, n, Limit{timeout_ms, false, {}});
}

bool read_full_until(int fd, void* buf, size_t n, SteadyClock::time_point deadline) {
  return read_limited(fd, buf, n, Limit{0, true, deadline});
}

bool write_full_until(int fd, const void* buf, size_t n, SteadyClock::time_point deadline) {
  return write_limited(fd, buf, n, Limit{0, true, deadline});
}

bool equal_constant_time(const void* a, const void* b, size_t n) {
  // No early exit, and the compiler may not turn the loop into memcmp: every
  // byte is read through a volatile pointer and folded into one difference.
  const volatile uint8_t* x = static_cast<const volatile uint8_t*>(a);
  const volatile uint8_t* y = static_cast<const volatile uint8_t*>(b);
  uint8_t diff = 0;
  for (size_t i = 0; i < n; ++i) diff |= static_cast<uint8_t>(x[i] ^ y[i]);
  return diff == 0;
}

}  // namespace disttrain::comm
