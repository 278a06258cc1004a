// Same-host shared-memory transport. Every rank of the host owns one segment
// (a control block plus two data slots); all ranks map all segments, then the
// names are unlinked at once, so nothing is left in /dev/shm whatever happens
// to the processes afterwards. During set-up a rank that fails, or sees a peer
// die (its TCP connection closes), unlinks every name of the group before it
// raises. Names carry a random tag drawn for the group (nothing of the job
// secret), and a peer's segment is mapped only if it is ours: owner, mode 0600
// and size checked on the open descriptor. Ranks move data through their own slot and
// read each other's slots directly; progress is signalled with epoch counters
// in the control blocks, waited on by bounded spinning and then futex sleep.
#pragma once
#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "comm/op_signature.h"
#include "comm/tcp/tcp_transport.h"

namespace disttrain::comm {

// Bytes of each of a rank's two data slots. Measured
// (benchmarks/results/allreduce_bandwidth_*_shm.csv): 1 MiB slots keep an
// epoch's copy-reduce-copy in cache; 256 KiB loses to the extra waits with more
// ranks than cores, 4 MiB to cache misses. With more ranks than cores too,
// now that waits there sleep (ShmWait): DDP at 3 and 4 ranks on 2 cores was
// 0.02-0.11x of the no-communication step faster than with 4 MiB slots, which
// had been the default there while waits yielded (docs/ddp.md).
constexpr size_t kDefaultShmSlotBytes = 1 << 20;

// How a rank waits for a peer past the first spinning: kYield gives its core
// away with sched_yield for an adaptive budget before it sleeps (the peer is
// usually a moment away); kSleep sleeps at once (futex), leaving the core idle
// so the scheduler can move a runnable peer onto it; kAuto is kYield with a
// core per rank and kSleep when the host's ranks outnumber its cores.
enum class ShmWait { kAuto, kYield, kSleep };

class ShmGroup {
 public:
  // Requires every rank of `tcp`'s group to be on this host and to call it.
  // The TCP mesh stays the control path: set-up barriers go through the
  // store, and a peer that dies is noticed through its socket closing.
  // Set-up (every store wait included) ends within `timeout`, with an error
  // naming what was missing.
  ShmGroup(c10::intrusive_ptr<c10d::Store> store, TcpTransport& tcp, std::chrono::milliseconds timeout,
           size_t slot_bytes = kDefaultShmSlotBytes, ShmWait wait = ShmWait::kAuto);
  ~ShmGroup();
  ShmGroup(const ShmGroup&) = delete;
  ShmGroup& operator=(const ShmGroup&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  size_t slot_bytes() const { return slot_bytes_; }

  // One epoch of the protocol, the unit every collective is made of:
  //   begin(sig)  waits until this rank's slot may be overwritten, returns it
  //   publish()   announces this rank's slot content (and its signature)
  //   peer(q)     waits for rank q's content of this epoch, checks its signature, returns its slot
  //   mark_reduced()/reduced(q)  a second phase (all-reduce's reduced slices)
  //   finish()    announces this rank has finished reading the others' slots
  uint8_t* begin(const OpSignature& sig, Deadline deadline);
  void publish();
  const uint8_t* peer(int q);
  void mark_reduced();
  const uint8_t* reduced(int q);
  void finish();

 private:
  struct Flag;
  struct Control;
  Control* control(int q) const;
  uint8_t* slot(int q, uint32_t epoch) const;
  void wait_for(int q, Flag& flag, uint32_t target, const char* what);
  void signal(Flag& flag);

  TcpTransport& tcp_;
  int rank_;
  int size_;
  size_t slot_bytes_;
  bool oversubscribed_;  // more ranks on this host than cores this process may run on
  bool yield_ = true;    // yield before sleeping (ShmWait)
  size_t segment_bytes_;
  std::vector<uint8_t*> segments_;
  uint32_t epoch_ = 0;
  // How long a wait past the spinning yields before it sleeps (adaptive: see wait_for).
  int64_t yield_budget_ns_ = 200000;
  std::vector<uint32_t> done_seen_;  // per rank: an epoch its `done` is known to have reached
  OpSignature sig_;
  Deadline deadline_;
};

}  // namespace disttrain::comm
