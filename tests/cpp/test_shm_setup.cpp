// Set-up of the shared-memory transport (comm/shm/shm_group): segment names
// carry a random tag, nothing of the job secret; a peer's segment that is not
// ours (mode, size, owner) is refused before it is mapped; the "all mapped"
// wait has a deadline; and a rank that fails or dies during set-up leaves
// nothing in /dev/shm. Ranks are threads over a HashStore, except for the
// crash, where they are processes (a kill -9 takes a whole process).
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/shm/shm_group.h"
#include "comm/tcp/tcp_transport.h"

using namespace disttrain::comm;
using namespace std::chrono_literals;

namespace {

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string hex(const uint8_t* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < n; ++i) out += std::string{digits[p[i] >> 4], digits[p[i] & 15]};
  return out;
}

// The names in /dev/shm that contain `part`.
std::vector<std::string> shm_names_with(const std::string& part) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name.find(part) != std::string::npos) out.push_back(name);
    }
    ::closedir(d);
  }
  return out;
}

// A store that lets a test act at one step of the set-up: `on_set` runs before
// a key is set, `on_add` before a counter is added to (key without the prefix).
class HookStore : public c10d::PrefixStore {
 public:
  explicit HookStore(c10::intrusive_ptr<c10d::Store> store) : c10d::PrefixStore("t", std::move(store)) {}
  std::function<void(const std::string&)> on_set, on_add;
  void set(const std::string& key, const std::vector<uint8_t>& value) override {
    if (on_set) on_set(key);
    c10d::PrefixStore::set(key, value);
  }
  int64_t add(const std::string& key, int64_t value) override {
    if (on_add && value != 0) on_add(key);
    return c10d::PrefixStore::add(key, value);
  }
};

std::string segment_tag(const c10::intrusive_ptr<c10d::Store>& base) {
  auto tag = base->get("t/disttrain/shm/tag");
  return hex(tag.data(), tag.size());
}

// Runs a `world`-rank group set-up as threads; hook(rank, store) may arm the
// rank's store. Returns each rank's error ("" if none).
std::vector<std::string> set_up(int world, const c10::intrusive_ptr<c10d::Store>& base,
                                const std::function<void(int, HookStore&)>& hook,
                                std::chrono::milliseconds shm_timeout = 30000ms,
                                const std::function<void(int)>& finished = {}) {
  std::vector<std::string> errors(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        auto store = c10::make_intrusive<HookStore>(base);
        hook(r, *store);
        TcpTransport tcp(store, r, world, 30000ms);
        ShmGroup group(store, tcp, shm_timeout, 4096);
      } catch (const c10::Error& e) {
        errors[r] = e.what_without_backtrace();
      }
      if (finished) finished(r);
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace

TEST(ShmSetup, SegmentNamesCarryARandomTagNotTheSecret) {
  auto base = c10::make_intrusive<c10d::HashStore>();
  std::mutex mu;
  std::vector<std::string> seen;  // /dev/shm while the names exist (every rank has mapped)
  auto errors = set_up(2, base, [&](int, HookStore& store) {
    store.on_add = [&](const std::string& key) {
      if (!ends_with(key, "shm/mapped")) return;
      std::lock_guard<std::mutex> lock(mu);
      for (auto& n : shm_names_with("disttrain-")) seen.push_back(n);
    };
  });
  EXPECT_EQ(errors, (std::vector<std::string>{"", ""}));
  const std::string tag = segment_tag(base);
  auto secret = base->get("t/disttrain/secret");
  ASSERT_EQ(tag.size(), 16u);
  EXPECT_NE(tag, hex(secret.data(), 8));
  int ours = 0;
  for (const auto& name : seen) {
    ours += name.find(tag) != std::string::npos;
    for (size_t i = 0; i + 4 <= secret.size(); ++i)  // no 4 bytes of the secret in any name
      EXPECT_EQ(name.find(hex(secret.data() + i, 4)), std::string::npos) << name;
  }
  EXPECT_GE(ours, 2) << "the group's own segments were seen";
  EXPECT_TRUE(shm_names_with(tag).empty());
}

// A rank's segment changed before its peer opens it: refused, and nothing is left.
TEST(ShmSetup, RefusesASegmentThatIsNotOurs) {
  struct Case {
    std::string name, expected;
    std::function<void(int fd)> spoil;
  };
  std::vector<Case> cases{
      {"mode", "mode 0644", [](int fd) { ASSERT_EQ(::fchmod(fd, 0644), 0); }},
      {"size", ", 4096 bytes, where", [](int fd) { ASSERT_EQ(::ftruncate(fd, 4096), 0); }},
  };
  if (::geteuid() == 0) cases.push_back({"owner", "owner uid 4242", [](int fd) { ASSERT_EQ(::fchown(fd, 4242, -1), 0); }});
  for (const auto& c : cases) {
    auto base = c10::make_intrusive<c10d::HashStore>();
    auto errors = set_up(2, base, [&](int rank, HookStore& store) {
      if (rank != 1) return;
      store.on_set = [&, base](const std::string& key) {
        if (!ends_with(key, "shm/created/1")) return;
        const std::string name = "/disttrain-" + segment_tag(base) + "-1";
        int fd = ::shm_open(name.c_str(), O_RDWR, 0);
        ASSERT_GE(fd, 0) << name;
        c.spoil(fd);
        ::close(fd);
      };
    });
    EXPECT_NE(errors[0].find("refusing rank 1's segment"), std::string::npos) << c.name << ": " << errors[0];
    EXPECT_NE(errors[0].find(c.expected), std::string::npos) << c.name << ": " << errors[0];
    EXPECT_NE(errors[1], "") << c.name;
    EXPECT_TRUE(shm_names_with(segment_tag(base)).empty()) << c.name;
  }
}

TEST(ShmSetup, AllMappedWaitHasADeadline) {
  auto base = c10::make_intrusive<c10d::HashStore>();
  std::atomic<bool> rank0_done{false};
  auto errors = set_up(
      2, base,
      [&](int rank, HookStore& store) {
        if (rank != 1) return;
        store.on_add = [&](const std::string& key) {  // rank 1 hangs before it counts itself
          const auto cap = std::chrono::steady_clock::now() + 60s;
          while (ends_with(key, "shm/mapped") && !rank0_done && std::chrono::steady_clock::now() < cap)
            std::this_thread::sleep_for(10ms);
        };
      },
      1500ms, [&](int rank) { rank0_done = rank0_done || rank == 0; });
  EXPECT_NE(errors[0].find("timed out after 1500 ms with 1 of 2 ranks done mapping"), std::string::npos)
      << errors[0];
  EXPECT_TRUE(shm_names_with(segment_tag(base)).empty());
}

// kill -9 of a rank in the middle of the set-up (its segment made, the
// others' mapped, before the names are gone): the others fail at once naming
// it, and /dev/shm holds nothing of the group.
TEST(ShmSetup, RankKilledDuringSetUpLeavesNothingInDevShm) {
  char dir[] = "/tmp/disttrain_shm_setup_XXXXXX";
  ASSERT_NE(::mkdtemp(dir), nullptr);
  const std::string path = std::string(dir) + "/store";
  const int world = 3;
  std::vector<pid_t> pids;
  std::vector<int> pipes;
  for (int r = 0; r < world; ++r) {
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(fds[0]);
      std::string outcome = "ok";
      try {
        auto store = c10::make_intrusive<HookStore>(c10::make_intrusive<c10d::FileStore>(path, world + 1));
        if (r == world - 1) {
          store->on_add = [](const std::string& key) {
            if (ends_with(key, "shm/mapped")) ::kill(::getpid(), SIGKILL);
          };
        }
        TcpTransport tcp(store, r, world, 30000ms);
        ShmGroup group(store, tcp, 30000ms, 4096);
      } catch (const c10::Error& e) {
        outcome = e.what_without_backtrace();
      } catch (const std::exception& e) {
        outcome = e.what();
      }
      (void)!::write(fds[1], outcome.data(), outcome.size());
      ::_exit(0);
    }
    ::close(fds[1]);
    pids.push_back(pid);
    pipes.push_back(fds[0]);
  }
  // Collect each rank's outcome (end of its pipe), 60 s at most in all.
  std::vector<std::string> outcome(world);
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  for (int r = 0; r < world; ++r) {
    char buf[4096];
    while (true) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      pollfd p{pipes[r], POLLIN, 0};
      if (left.count() <= 0 || ::poll(&p, 1, static_cast<int>(left.count())) <= 0) {
        outcome[r] = "<no outcome within 60 s>";
        break;
      }
      ssize_t n = ::read(pipes[r], buf, sizeof(buf));
      if (n <= 0) break;
      outcome[r].append(buf, static_cast<size_t>(n));
    }
    ::close(pipes[r]);
  }
  for (pid_t pid : pids) {
    ::kill(pid, SIGKILL);  // only those still running (a hang): the test has failed then
    ::waitpid(pid, nullptr, 0);
  }
  auto base = c10::make_intrusive<c10d::FileStore>(path, world + 1);
  const std::string tag = segment_tag(base);
  // Each survivor fails; the first to notice names rank 2 (the other may see
  // the first one go, or find the names already removed).
  bool named = false;
  for (int r = 0; r < world - 1; ++r) {
    EXPECT_NE(outcome[r], "ok") << "rank " << r;
    EXPECT_EQ(outcome[r].find("<no outcome"), std::string::npos) << "rank " << r << " hung";
    named = named || outcome[r].find("rank 2 exited during set-up") != std::string::npos;
  }
  EXPECT_TRUE(named) << outcome[0] << "\n" << outcome[1];
  EXPECT_EQ(outcome[world - 1], "") << "rank 2 was killed";
  EXPECT_EQ(shm_names_with(tag), std::vector<std::string>{});
  for (const auto& n : shm_names_with(tag)) ::shm_unlink(("/" + n).c_str());
  std::remove(path.c_str());
  ::rmdir(dir);
}
