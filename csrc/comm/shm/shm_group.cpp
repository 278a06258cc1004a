#include "comm/shm/shm_group.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <sched.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <sstream>

#include "trace/timeline.h"

namespace disttrain::comm {
namespace {

constexpr int kSpinIterations = 2000;          // ~10-50 us of pause, with a core per rank
// Then, with a core per rank (ShmWait), the waiter yields its core (to whatever
// else wants it: this rank's own compute while DDP reduces in the background)
// and checks again, for up to an adaptive budget before sleeping. One
// epoch of a large all-reduce takes ~0.1-0.3 ms; a futex sleep and wake-up
// costs about as much again per wait (measured in the timeline: 0.1-0.2 ms per
// wait, three waits per 1 MiB epoch, ~20 ms of a 75 MB DDP step at 2 ranks).
// But when the peer is not running at all (other processes hold the cores)
// the wait lasts milliseconds and yielding burns CPU time for nothing: the
// budget doubles after a wait that yielding ended and halves after one that
// had to sleep, between these bounds.
constexpr int64_t kYieldMinNs = 20000;
constexpr int64_t kYieldMaxNs = 1000000;
constexpr int kSleepSliceMs = 10;              // how often a sleeper checks its peer and deadline

bool reached(uint32_t value, uint32_t target) { return static_cast<int32_t>(value - target) >= 0; }

long futex(std::atomic<uint32_t>* addr, int op, uint32_t value, const timespec* timeout) {
  return ::syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), op, value, timeout, nullptr, 0);
}

std::string segment_name(const uint8_t tag[8], int rank) {
  std::ostringstream name;
  name << "/disttrain-";
  for (int i = 0; i < 8; ++i) name << std::hex << (tag[i] >> 4) << (tag[i] & 15);
  name << std::dec << "-" << rank;
  return name.str();
}

}  // namespace

// A progress counter and the number of ranks asleep on it (so a store wakes
// only when somebody sleeps on that very counter).
struct ShmGroup::Flag {
  std::atomic<uint32_t> epoch;
  std::atomic<uint32_t> sleepers;
};

namespace {
// An OpSignature in 27 bytes, so that two fit beside a Flag in one cache line.
struct __attribute__((packed)) PackedSignature {
  uint64_t seq, count;
  int64_t aux;
  uint8_t op, dtype, redop;
};
static_assert(sizeof(PackedSignature) == 27);

PackedSignature pack(const OpSignature& s) {
  return {s.seq, s.count, s.aux, static_cast<uint8_t>(s.op), s.dtype, static_cast<uint8_t>(s.redop)};
}
OpSignature unpack(const PackedSignature& p) {
  return OpSignature{p.seq, static_cast<OpKind>(p.op), p.dtype, static_cast<RedOp>(p.redop), p.count, p.aux};
}
}  // namespace

// Each counter on its own cache line. The signatures share the line of
// `copied`: a peer waiting for this rank's data reads the counter and the
// signature it must check with one cache miss, not two (a small all-reduce is
// a handful of misses: each one counts).
struct ShmGroup::Control {
  alignas(64) Flag copied;            // epoch whose slot content is published
  PackedSignature sig[2];             // what this rank does in the epochs of each slot
  alignas(64) Flag reduced;           // epoch whose reduced slice is published
  alignas(64) Flag done;              // epoch whose reads of the others' slots are over
  static_assert(sizeof(Flag) + 2 * sizeof(PackedSignature) <= 64, "copied and the signatures share a line");
};

ShmGroup::ShmGroup(c10::intrusive_ptr<c10d::Store> store, TcpTransport& tcp, std::chrono::milliseconds timeout,
                   size_t slot_bytes, ShmWait wait)
    : tcp_(tcp), rank_(tcp.rank()), size_(tcp.world_size()), slot_bytes_(std::max<size_t>(4096, slot_bytes & ~size_t(4095))) {
  const Deadline deadline = Clock::now() + timeout;
  segments_.assign(size_, nullptr);
  done_seen_.assign(size_, 0);
  uint8_t tag[8];
  bool have_tag = false;
  // A failure during set-up (ours, or a peer that died) removes every name of
  // the group, not only ours: a peer killed before the names went cannot.
  auto fail = [&](const std::string& what, bool with_errno) {
    const std::string cause = with_errno ? std::string(" (") + std::strerror(errno) + ")" : "";
    for (auto*& seg : segments_) {
      if (seg) ::munmap(seg, segment_bytes_);
      seg = nullptr;
    }
    if (have_tag) {
      for (int q = 0; q < size_; ++q) ::shm_unlink(segment_name(tag, q).c_str());
    }
    TORCH_CHECK(false, "disttrain: shared-memory transport: ", what, cause,
                "; set DISTTRAIN_TRANSPORT=tcp to use sockets only");
  };
  // Waits for a key of the set-up, watching the peers' connections and the deadline.
  auto await = [&](const std::string& key, const std::string& what) {
    auto sleep = std::chrono::milliseconds(1);
    while (!store->check({key})) {
      for (int q = 0; q < size_; ++q) {
        if (!tcp_.peer_connected(q)) {
          fail("rank " + std::to_string(tcp_.group_rank(q)) + " exited during set-up, while rank " +
                   std::to_string(tcp_.group_rank(rank_)) + " waited for " + what,
               false);
        }
      }
      if (Clock::now() >= deadline) {
        fail("rank " + std::to_string(tcp_.group_rank(rank_)) + " timed out after " + std::to_string(timeout.count()) +
                 " ms waiting for " + what,
             false);
      }
      std::this_thread::sleep_for(sleep);
      sleep = std::min(sleep * 2, std::chrono::milliseconds(20));
    }
  };

  // The names' tag: random, drawn by rank 0 for this group alone; it tells
  // nobody anything about the job secret.
  const std::string tag_key = "disttrain/shm/tag";
  if (rank_ == 0) {
    std::random_device rd;
    for (auto& b : tag) b = static_cast<uint8_t>(rd());
    store->set(tag_key, std::vector<uint8_t>(tag, tag + sizeof(tag)));
  } else {
    await(tag_key, "rank " + std::to_string(tcp_.group_rank(0)) + "'s segment tag");
    const std::vector<uint8_t> got = store->get(tag_key);
    TORCH_CHECK(got.size() == sizeof(tag), "disttrain: shared-memory transport: malformed segment tag in the store");
    std::memcpy(tag, got.data(), sizeof(tag));
  }
  have_tag = true;

  // With more ranks than cores, the peer a rank waits for is often not
  // running: spinning would hold the very core it needs (measured: half the
  // CPU time per all-reduce without it), and so does yielding, which also
  // keeps the core from going idle, so the scheduler never moves the waiting
  // peer onto it. A waiter there sleeps at once (ShmWait::kAuto; measured with
  // 4 ranks on 2 cores: DDP steps 0.07-0.13x of the no-communication step
  // faster, a 4 KB all-reduce 0.2-0.3 ms against 4-8 ms under load; docs/ddp.md).
  cpu_set_t cpus;
  oversubscribed_ = ::sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && size_ > CPU_COUNT(&cpus);
  yield_ = wait == ShmWait::kYield || (wait == ShmWait::kAuto && !oversubscribed_);
  segment_bytes_ = sizeof(Control) + 2 * slot_bytes_;

  std::string mine = segment_name(tag, rank_);
  int fd = ::shm_open(mine.c_str(), O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW, S_IRUSR | S_IWUSR);
  if (fd < 0) fail("cannot create " + mine, true);
  // Exactly 0600 whatever the umask: peers check it.
  if (::fchmod(fd, S_IRUSR | S_IWUSR) != 0 || ::ftruncate(fd, static_cast<off_t>(segment_bytes_)) != 0) {
    ::close(fd);
    fail("cannot size " + mine, true);
  }
  void* addr = ::mmap(nullptr, segment_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (addr == MAP_FAILED) fail("cannot map " + mine, true);
  segments_[rank_] = static_cast<uint8_t*>(addr);
  new (segments_[rank_]) Control{};
  store->set("disttrain/shm/created/" + std::to_string(rank_), std::vector<uint8_t>{1});
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    const std::string who = "rank " + std::to_string(tcp_.group_rank(q));
    await("disttrain/shm/created/" + std::to_string(q), who + "'s segment");
    std::string name = segment_name(tag, q);
    int qfd = ::shm_open(name.c_str(), O_RDWR | O_NOFOLLOW, 0);
    if (qfd < 0) fail("cannot open " + who + "'s segment " + name, true);
    // Map only what a rank of this job made: our own user's, 0600, of the
    // size agreed (a smaller file would fault on access).
    struct stat st {};
    if (::fstat(qfd, &st) != 0) {
      ::close(qfd);
      fail("cannot inspect " + who + "'s segment " + name, true);
    }
    const mode_t mode = st.st_mode & 07777;
    if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid() || mode != (S_IRUSR | S_IWUSR) ||
        static_cast<uint64_t>(st.st_size) != segment_bytes_) {
      ::close(qfd);
      std::ostringstream m;
      m << "refusing " << who << "'s segment " << name << ": owner uid " << st.st_uid << ", mode 0" << std::oct
        << mode << std::dec << ", " << st.st_size << " bytes, where uid " << ::geteuid() << ", mode 0600 and "
        << segment_bytes_ << " bytes are expected (not made by a rank of this job)";
      fail(m.str(), false);
    }
    void* qaddr = ::mmap(nullptr, segment_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, qfd, 0);
    ::close(qfd);
    if (qaddr == MAP_FAILED) fail("cannot map " + name, true);
    segments_[q] = static_cast<uint8_t*>(qaddr);
  }
  // Once everyone has mapped everything, the names go: the memory lives
  // exactly as long as the last mapping, crash or not. Every rank unlinks
  // every name (the second unlink of a name fails harmlessly), so a rank
  // killed right after the count is reached leaves nothing either.
  const std::string mapped_key = "disttrain/shm/mapped";
  store->add(mapped_key, 1);
  auto sleep = std::chrono::milliseconds(1);
  while (true) {
    const int64_t mapped = store->add(mapped_key, 0);
    if (mapped >= size_) break;
    for (int q = 0; q < size_; ++q) {
      if (!tcp_.peer_connected(q)) {
        fail("rank " + std::to_string(tcp_.group_rank(q)) + " exited during set-up, before every rank had mapped " +
                 "every segment",
             false);
      }
    }
    if (Clock::now() >= deadline) {
      fail("timed out after " + std::to_string(timeout.count()) + " ms with " + std::to_string(mapped) + " of " +
               std::to_string(size_) + " ranks done mapping every segment (a rank is hung or stopped)",
           false);
    }
    std::this_thread::sleep_for(sleep);
    sleep = std::min(sleep * 2, std::chrono::milliseconds(20));
  }
  for (int q = 0; q < size_; ++q) ::shm_unlink(segment_name(tag, q).c_str());
}

ShmGroup::~ShmGroup() {
  for (auto* s : segments_)
    if (s) ::munmap(s, segment_bytes_);
}

ShmGroup::Control* ShmGroup::control(int q) const { return reinterpret_cast<Control*>(segments_[q]); }

uint8_t* ShmGroup::slot(int q, uint32_t epoch) const {
  return segments_[q] + sizeof(Control) + (epoch % 2) * slot_bytes_;
}

void ShmGroup::signal(Flag& f) {
  f.epoch.store(epoch_, std::memory_order_release);
  if (f.sleepers.load() > 0) futex(&f.epoch, FUTEX_WAKE, INT_MAX, nullptr);
}

void ShmGroup::wait_for(int q, Flag& f, uint32_t target, const char* what) {
  const int64_t from = trace::enabled() ? trace::now_ns() : 0;
  if (!oversubscribed_) {
    for (int i = 0; i < kSpinIterations; ++i) {
      if (reached(f.epoch.load(std::memory_order_acquire), target)) return;
      _mm_pause();
    }
  }
  // Past the spinning: a wait worth seeing in the timeline (named by what it waits for, id = the peer).
  struct Traced {
    int64_t from;
    const char* what;
    int q;
    ~Traced() {
      if (from) trace::span("comm.wait", what, from, trace::now_ns(), q);
    }
  } traced{from, what, q};
  if (yield_) {
    const auto yield_until = std::chrono::steady_clock::now() + std::chrono::nanoseconds(yield_budget_ns_);
    do {
      if (reached(f.epoch.load(std::memory_order_acquire), target)) {
        yield_budget_ns_ = std::min(kYieldMaxNs, 2 * yield_budget_ns_);
        return;
      }
      ::sched_yield();
    } while (std::chrono::steady_clock::now() < yield_until);
    yield_budget_ns_ = std::max(kYieldMinNs, yield_budget_ns_ / 2);
  }
  while (true) {
    uint32_t seen = f.epoch.load();
    if (reached(seen, target)) return;
    f.sleepers.fetch_add(1);
    if (!reached(f.epoch.load(), target)) {
      timespec slice{0, kSleepSliceMs * 1000000L};
      futex(&f.epoch, FUTEX_WAIT, seen, &slice);
    }
    f.sleepers.fetch_sub(1);
    if (reached(f.epoch.load(std::memory_order_acquire), target)) return;
    tcp_.check_peer(q, sig_);
    if (Clock::now() >= deadline_) {
      tcp_.abort("timeout: rank " + std::to_string(tcp_.group_rank(rank_)) + " waited more than the group timeout in " +
                 describe(sig_) + " for rank(s) " + std::to_string(tcp_.group_rank(q)) + " (shared memory, " + what +
                 "), which never arrived (hung, stopped, or skipped this collective)");
    }
  }
}

uint8_t* ShmGroup::begin(const OpSignature& sig, Deadline deadline) {
  tcp_.check_alive();
  sig_ = sig;
  deadline_ = deadline;
  ++epoch_;
  // Our slot for this epoch was last read in epoch-2; wait until everyone is past it.
  // A peer's `done` is read only when what is known of it does not settle it:
  // in lockstep, peer() below has already shown it (one cache miss less per peer).
  if (epoch_ > 2) {
    for (int q = 0; q < size_; ++q) {
      if (q == rank_ || reached(done_seen_[q], epoch_ - 2)) continue;
      wait_for(q, control(q)->done, epoch_ - 2, "slot reuse");
      done_seen_[q] = epoch_ - 2;
    }
  }
  control(rank_)->sig[epoch_ % 2] = pack(sig);
  return slot(rank_, epoch_);
}

void ShmGroup::publish() { signal(control(rank_)->copied); }

const uint8_t* ShmGroup::peer(int q) {
  Control* c = control(q);
  wait_for(q, c->copied, epoch_, "data");
  // q published this epoch after finishing the previous one (its `done` store
  // precedes its `copied` store, which this rank has just acquired).
  if (reached(epoch_ - 1, done_seen_[q])) done_seen_[q] = epoch_ - 1;
  const OpSignature theirs = unpack(c->sig[epoch_ % 2]);
  if (theirs.seq != sig_.seq || theirs.op != sig_.op || theirs.dtype != sig_.dtype || theirs.redop != sig_.redop ||
      theirs.count != sig_.count || theirs.aux != sig_.aux) {
    tcp_.abort("collective mismatch at sequence number " + std::to_string(sig_.seq) + ": rank " +
               std::to_string(tcp_.group_rank(rank_)) + " called " + describe(sig_) + ", rank " +
               std::to_string(tcp_.group_rank(q)) + " called " + describe(theirs));
  }
  return slot(q, epoch_);
}

void ShmGroup::mark_reduced() { signal(control(rank_)->reduced); }

const uint8_t* ShmGroup::reduced(int q) {
  wait_for(q, control(q)->reduced, epoch_, "reduced data");
  return slot(q, epoch_);
}

void ShmGroup::finish() { signal(control(rank_)->done); }

}  // namespace disttrain::comm
