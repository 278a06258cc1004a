#include "comm/shm_group.h"

#include <c10/util/Exception.h>
#include <fcntl.h>
#include <immintrin.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace disttrain::comm {
namespace {

// Measured (benchmarks/results/allreduce_bandwidth_*_shm.csv): 1 MiB slots keep an
// epoch's copy-reduce-copy in cache; 256 KiB loses to the extra waits with more
// ranks than cores, 4 MiB to cache misses.
constexpr size_t kDefaultSlotBytes = 1 << 20;
constexpr int kSpinIterations = 2000;          // ~10-50 us before sleeping
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

size_t env_slot_bytes() {
  const char* v = std::getenv("DISTTRAIN_SHM_SLOT_BYTES");
  size_t n = v ? std::strtoull(v, nullptr, 10) : kDefaultSlotBytes;
  return std::max<size_t>(4096, n & ~size_t(4095));
}

}  // namespace

struct alignas(64) ShmGroup::Control {
  alignas(64) std::atomic<uint32_t> copied;   // epoch whose slot content is published
  alignas(64) std::atomic<uint32_t> reduced;  // epoch whose reduced slice is published
  alignas(64) std::atomic<uint32_t> done;     // epoch whose reads of the others' slots are over
  alignas(64) std::atomic<uint32_t> waiters;  // sleepers on this block's flags
  alignas(64) OpSignature sig[2];             // what this rank does in the epochs of each slot
};

ShmGroup::ShmGroup(c10::intrusive_ptr<c10d::Store> store, TcpTransport& tcp, const uint8_t tag[8])
    : tcp_(tcp), rank_(tcp.rank()), size_(tcp.world_size()), slot_bytes_(env_slot_bytes()) {
  segment_bytes_ = sizeof(Control) + 2 * slot_bytes_;
  segments_.assign(size_, nullptr);
  auto fail = [&](const std::string& what) {
    for (auto* s : segments_)
      if (s) ::munmap(s, segment_bytes_);
    ::shm_unlink(segment_name(tag, rank_).c_str());
    TORCH_CHECK(false, "disttrain: shared-memory transport: ", what, " (", std::strerror(errno),
                "); set DISTTRAIN_TRANSPORT=tcp to use sockets only");
  };
  std::string mine = segment_name(tag, rank_);
  int fd = ::shm_open(mine.c_str(), O_CREAT | O_EXCL | O_RDWR, S_IRUSR | S_IWUSR);
  if (fd < 0) fail("cannot create " + mine);
  if (::ftruncate(fd, static_cast<off_t>(segment_bytes_)) != 0) {
    ::close(fd);
    fail("cannot size " + mine);
  }
  void* addr = ::mmap(nullptr, segment_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  ::close(fd);
  if (addr == MAP_FAILED) fail("cannot map " + mine);
  segments_[rank_] = static_cast<uint8_t*>(addr);
  new (segments_[rank_]) Control{};
  store->set("disttrain/shm/created/" + std::to_string(rank_), std::vector<uint8_t>{1});
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    store->wait({"disttrain/shm/created/" + std::to_string(q)});
    std::string name = segment_name(tag, q);
    int qfd = ::shm_open(name.c_str(), O_RDWR, 0);
    if (qfd < 0) fail("cannot open rank " + std::to_string(q) + "'s segment " + name);
    void* qaddr = ::mmap(nullptr, segment_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, qfd, 0);
    ::close(qfd);
    if (qaddr == MAP_FAILED) fail("cannot map " + name);
    segments_[q] = static_cast<uint8_t*>(qaddr);
  }
  // Once everyone has mapped everything, the names go: the memory lives
  // exactly as long as the last mapping, crash or not.
  store->add("disttrain/shm/mapped", 1);
  while (store->add("disttrain/shm/mapped", 0) < size_) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ::shm_unlink(mine.c_str());
}

ShmGroup::~ShmGroup() {
  for (auto* s : segments_)
    if (s) ::munmap(s, segment_bytes_);
}

ShmGroup::Control* ShmGroup::control(int q) const { return reinterpret_cast<Control*>(segments_[q]); }

uint8_t* ShmGroup::slot(int q, uint32_t epoch) const {
  return segments_[q] + sizeof(Control) + (epoch % 2) * slot_bytes_;
}

void ShmGroup::wake(Control* c) {
  if (c->waiters.load() > 0) {
    futex(&c->copied, FUTEX_WAKE, INT_MAX, nullptr);
    futex(&c->reduced, FUTEX_WAKE, INT_MAX, nullptr);
    futex(&c->done, FUTEX_WAKE, INT_MAX, nullptr);
  }
}

void ShmGroup::wait_for(int q, std::atomic<uint32_t>& flag, uint32_t target, const char* what) {
  for (int i = 0; i < kSpinIterations; ++i) {
    if (reached(flag.load(std::memory_order_acquire), target)) return;
    _mm_pause();
  }
  Control* owner = control(q);
  while (true) {
    uint32_t seen = flag.load();
    if (reached(seen, target)) return;
    owner->waiters.fetch_add(1);
    if (!reached(flag.load(), target)) {
      timespec slice{0, kSleepSliceMs * 1000000L};
      futex(&flag, FUTEX_WAIT, seen, &slice);
    }
    owner->waiters.fetch_sub(1);
    if (reached(flag.load(std::memory_order_acquire), target)) return;
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
  if (epoch_ > 2) {
    for (int q = 0; q < size_; ++q) wait_for(q, control(q)->done, epoch_ - 2, "slot reuse");
  }
  control(rank_)->sig[epoch_ % 2] = sig;
  return slot(rank_, epoch_);
}

void ShmGroup::publish() {
  Control* me = control(rank_);
  me->copied.store(epoch_);
  wake(me);
}

const uint8_t* ShmGroup::peer(int q) {
  Control* c = control(q);
  wait_for(q, c->copied, epoch_, "data");
  const OpSignature& theirs = c->sig[epoch_ % 2];
  if (theirs.seq != sig_.seq || theirs.op != sig_.op || theirs.dtype != sig_.dtype || theirs.redop != sig_.redop ||
      theirs.count != sig_.count || theirs.aux != sig_.aux) {
    tcp_.abort("collective mismatch at sequence number " + std::to_string(sig_.seq) + ": rank " +
               std::to_string(tcp_.group_rank(rank_)) + " called " + describe(sig_) + ", rank " +
               std::to_string(tcp_.group_rank(q)) + " called " + describe(theirs));
  }
  return slot(q, epoch_);
}

void ShmGroup::mark_reduced() {
  Control* me = control(rank_);
  me->reduced.store(epoch_);
  wake(me);
}

const uint8_t* ShmGroup::reduced(int q) {
  wait_for(q, control(q)->reduced, epoch_, "reduced data");
  return slot(q, epoch_);
}

void ShmGroup::finish() {
  Control* me = control(rank_);
  me->done.store(epoch_);
  wake(me);
}

}  // namespace disttrain::comm
