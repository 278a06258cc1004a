// The `disttrain` torch.distributed backend: a c10d::Backend whose ops run on
// one progress thread per group, in issue order, over shared memory and TCP.
// One exception: a synchronous all-reduce over shared memory that fits one
// slot runs on the caller's thread when nothing is queued or running (see
// run_or_enqueue()); issue order holds either way.
//
// Teardown (shutdown(), abort(), or the destructor: destroy_process_group(),
// interpreter exit, any order, other backends alive or not) stops the
// progress thread without waiting for the group timeout: the op in progress
// and every queued op fail with a DistBackendError naming them; nothing is
// written to the store and no peer is contacted (it may be gone).
#pragma once
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "comm/options.h"
#include "comm/shm/shm_collectives.h"
#include "comm/shm/shm_group.h"
#include "comm/tcp/tcp_collectives.h"
#include "comm/tcp/tcp_transport.h"

namespace disttrain::comm {

// A Work whose future completes with the op's output tensors (DDP reads them).
// One op: what the progress thread runs (`Task`) and what callers wait on.
using Task = std::function<void(Deadline)>;

// A receive's sender and sequence number, known once the progress thread
// matches it (the sequence numbers of a pair are counted there, in issue
// order, so that a receive from any source takes the chosen sender's next one).
struct RecvMatch {
  std::atomic<int> source{-1};
  std::atomic<uint64_t> seq{0};
  std::atomic<bool> numbered{false};  // seq is set (the receive has begun)
};

class DisttrainWork : public c10d::Work {
 public:
  // Without `eager_future`, the Work must be completed before anyone else sees
  // it (the caller-thread path): its future is made on the first getFuture(),
  // already complete, so the common case (nobody asks) never builds one.
  // `match` (receives only) is shared with the task, which fills it in.
  DisttrainWork(int rank, c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs, Task task,
                bool eager_future = true, std::shared_ptr<RecvMatch> match = nullptr);
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;
  std::vector<at::Tensor> result() override { return outputs_; }
  uint64_t getSequencenumber() const override { return match_ ? match_->seq.load() : seq_; }
  // The sender of a receive (for one from any source: the rank it matched,
  // once it has; torch reads it after wait()). Other ops: torch's error.
  int sourceRank() const override;
  // Waits, then releases the task's buffers at once, on the caller's thread.
  bool wait(std::chrono::milliseconds timeout = kNoTimeout) override;
  void run(Deadline deadline) { task_(deadline); }  // progress thread
  // Completes the future, then the Work, then its followers; only the first
  // call has an effect.
  void complete(std::exception_ptr error);
  // A send or receive issued inside a coalescing block (batch_isend_irecv)
  // completes with the block's Work, however that ends (run, failed, or
  // failed by a teardown while queued). Before the block ends, wait() on it
  // raises instead of waiting for an op that cannot start yet.
  void follow(c10::intrusive_ptr<DisttrainWork> member) { followers_.push_back(std::move(member)); }
  void set_batched(bool pending) { awaiting_batch_.store(pending); }
  // "allreduce (sequence number 7)", for error messages.
  std::string describe() const;

 private:
  void release_task();
  std::atomic<bool> completed_{false};
  uint64_t seq_;
  std::shared_ptr<RecvMatch> match_;
  std::vector<at::Tensor> outputs_;
  const bool eager_future_;
  std::mutex future_mu_;  // the lazy future only
  std::exception_ptr error_;  // the outcome, for a lazy future
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  std::mutex task_mu_;
  Task task_;
  std::vector<c10::intrusive_ptr<DisttrainWork>> followers_;  // set before the Work is queued
  std::atomic<bool> awaiting_batch_{false};
};

// What the progress thread shares with the backend. It lives as long as
// either of them: the backend may be destroyed on the progress thread itself
// (a completion callback dropping the group's last reference), and the
// thread then still finds its queue.
struct ProgressState {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<c10::intrusive_ptr<DisttrainWork>> queue;
  // Ops the progress thread has finished, released on a caller's thread.
  std::vector<c10::intrusive_ptr<DisttrainWork>> finished;
  // The op being run or completed; its outcome when teardown completes it.
  c10::intrusive_ptr<DisttrainWork> running;
  std::exception_ptr running_error;
  bool running_ran = false;
  // The progress thread is inside an op (from taking it off the queue until
  // it has run; its completion follows): a caller may not run one meanwhile.
  bool busy = false;
  // A caller's thread is running an op itself (enqueue's caller-thread path):
  // the progress thread takes nothing off the queue meanwhile, and teardown
  // waits for it before closing the transports.
  bool caller_running = false;
  bool stop = false;
  std::string stop_reason;
  // Ops the progress thread has run, to be completed (their futures' callbacks
  // run) on a completion thread, never on the progress thread: a callback may
  // issue another op and wait for it (PowerSGD's hook does), which needs the
  // progress thread free to run it. A callback may also wait for a later op's
  // future, so a completion that finds every completion thread busy starts
  // another one (threads stay until teardown; as many as callbacks ever
  // blocked at once, plus one).
  std::deque<std::pair<c10::intrusive_ptr<DisttrainWork>, std::exception_ptr>> to_complete;
  std::condition_variable completion_cv;
  std::vector<std::thread> completers;
  size_t idle_completers = 0;
  bool completers_stop = false;
};

class DisttrainBackend : public c10d::Backend {
 public:
  // `options` is parsed once, here (CommOptions::resolve), and passed down.
  DisttrainBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                   std::chrono::milliseconds timeout, CommOptions options = CommOptions::resolve());
  ~DisttrainBackend() override;

  const std::string getBackendName() const override { return "disttrain"; }
  void setTimeout(std::chrono::milliseconds timeout) override { timeout_ = timeout; }

  // destroy_process_group() calls shutdown(), torch's abort path abort(): both
  // tear the group down at once (see the top of this file); later ops raise.
  void shutdown() override;
  void abort() override;

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  // Sparse COO tensors (SUM), as gloo: dist.all_reduce of a sparse tensor.
  c10::intrusive_ptr<c10d::Work> allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                  const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                     const c10d::AllreduceCoalescedOptions& opts) override;
  // An AVG all-reduce of `tensors` (contiguous float32 or float64 of one
  // dtype, the concatenation of an all_reduce_coalesced) whose result is
  // handed to `consume` (see shm_allreduce) instead of written back: over
  // shared memory block by block as it is reduced, otherwise the whole
  // result at once. The tensors then hold unspecified values. On the wire it
  // is the all_reduce_coalesced AVG of the same tensors (the other ranks may
  // call either). `async_op` false: run on the caller's thread when it can.
  c10::intrusive_ptr<c10d::Work> allreduce_avg_consumed(std::vector<at::Tensor>& tensors, BlockConsumer consume,
                                                        bool async_op);
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors, const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs, const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                 std::vector<at::Tensor>& inputs,
                                                                 const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& output_split_sizes,
                                               std::vector<int64_t>& input_split_sizes,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dst_rank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int src_rank, int tag) override;
  // dist.recv / dist.irecv without a source: the progress thread takes the
  // first peer whose next message is a send with this tag (TcpTransport::first_sender).
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;

  // Coalescing (dist.batch_isend_irecv, _coalescing_manager): the sends and
  // receives issued between start and end are queued as one op that runs
  // them side by side, so a batch whose receives come before its sends (on
  // every rank) cannot deadlock the way ops run one at a time in issue order
  // would. Other ops issued meanwhile are queued as usual, ahead of the batch.
  bool supportsCoalescing() const override { return true; }
  void startCoalescing() override;
  c10::intrusive_ptr<c10d::Work> endCoalescing() override;

  void setSequenceNumberForGroup() override {}
  uint64_t getSequenceNumberForGroup() override { return next_seq_; }

  // Where this rank listens, and how many stray connections were dropped.
  std::string address() const { return transport_->address(); }
  // "shm" (every rank on this host), "shm+tcp" (two-level: shared memory within
  // each host, TCP between hosts) or "tcp".
  std::string transport_name() const { return hierarchical_ ? "shm+tcp" : shm_ ? "shm" : "tcp"; }
  uint64_t rejected_connections() const { return transport_->rejected_connections(); }
  // The group's ranks on this host that share memory with this one (the shared-memory
  // group's size), 1 where there is none (TCP only).
  int host_ranks() const { return shm_ ? shm_->size() : 1; }
  // Ops run on the caller's thread instead of the progress thread (the
  // small synchronous all-reduce over shared memory; see run_or_enqueue()).
  uint64_t caller_thread_ops() const { return caller_thread_ops_.load(std::memory_order_relaxed); }
  const CommOptions& options() const { return options_; }

 private:
  // The constructor proper, on the store already scoped to this attempt.
  DisttrainBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                   std::chrono::milliseconds timeout, CommOptions options, int);
  // Queues fn for the progress thread; the returned Work completes when it
  // has run, and `followers` with it.
  c10::intrusive_ptr<c10d::Work> enqueue(c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs,
                                         Task fn, std::shared_ptr<RecvMatch> match = nullptr,
                                         std::vector<c10::intrusive_ptr<DisttrainWork>> followers = {});
  // A receive from `src`, or from any source with src < 0.
  c10::intrusive_ptr<c10d::Work> receive(std::vector<at::Tensor>& tensors, int src, int tag);
  // One message of a coalescing block: its Work follows the block's.
  struct BatchedMessage {
    bool send;
    int peer;
    OpSignature sig;  // a receive's sequence number is set when the block runs
    at::Tensor user, buf;
    c10::intrusive_ptr<DisttrainWork> work;
    std::shared_ptr<RecvMatch> match;  // receives only
  };
  c10::intrusive_ptr<c10d::Work> add_to_batch(BatchedMessage message);
  // Sparse COO all-reduce (SUM): every rank's indices and values gathered, summed by coalescing.
  c10::intrusive_ptr<c10d::Work> sparse_allreduce(const at::Tensor& user, RedOp op);
  // With `on_caller`, runs body right here on the caller's thread and returns the
  // Work completed, when nothing is queued or running (so issue order holds);
  // otherwise queues it like enqueue(). For an op the caller waits for at once,
  // this saves the two thread hand-offs (four context switches); body is called
  // directly, never wrapped in a Task.
  template <class Body>
  c10::intrusive_ptr<c10d::Work> run_or_enqueue(c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs,
                                                Body&& body, bool on_caller);
  // The bracket of a caller-thread run: claim succeeds only with nothing queued
  // or running and no teardown begun; release wakes the progress thread only if
  // something waits for it.
  bool claim_caller_run();
  void release_caller_run();
  // Runs body(deadline) with run_op's failure handling.
  template <class Body>
  std::exception_ptr run_guarded(Body&& body);
  // The progress thread: takes `state` by value (it outlives the backend if
  // the backend is destroyed on this thread) and touches `self` only to run ops.
  static void progress_loop(DisttrainBackend* self, std::shared_ptr<ProgressState> state);
  // Hands a finished op to a completion thread (st.mu held), starting one if all are busy.
  static void post_completion(const std::shared_ptr<ProgressState>& st, c10::intrusive_ptr<DisttrainWork> work,
                              std::exception_ptr error);
  static void completion_loop(std::shared_ptr<ProgressState> st);
  std::exception_ptr run_op(DisttrainWork& work);
  // Stops the progress thread, fails what is left (on the calling thread),
  // closes the sockets. Idempotent; `why` is said to whoever waits.
  void teardown(const std::string& why);
  OpSignature signature(OpKind op, const at::Tensor& t, RedOp redop, uint64_t count, int64_t aux = 0);

  // The same-host path when there is one, else TCP.
  void run_allreduce(const OpSignature& sig, void* data, size_t count, c10::ScalarType dtype, Deadline dl);
  void run_broadcast(const OpSignature& sig, void* data, size_t bytes, int root, Deadline dl);
  void run_allgather(const OpSignature& sig, const void* in, void* out, size_t bytes_per_rank, Deadline dl);
  void run_reduce_scatter(const OpSignature& sig, const void* in, void* out, size_t count, c10::ScalarType dtype,
                          Deadline dl);

  void check_settings_agree(const c10::intrusive_ptr<c10d::Store>& store);
  void setup_shared_memory(const c10::intrusive_ptr<c10d::Store>& store, std::chrono::milliseconds timeout);

  CommOptions options_;
  std::unique_ptr<TcpTransport> transport_;  // every rank: the full mesh
  // Shared memory among this host's ranks; for a job spanning hosts, over a
  // mesh of its own (local_) with one TCP mesh between the hosts' first ranks (leaders_).
  std::unique_ptr<TcpTransport> local_;
  std::unique_ptr<TcpTransport> leaders_;
  std::unique_ptr<ShmGroup> shm_;
  bool hierarchical_ = false;
  std::chrono::milliseconds timeout_;
  uint64_t next_seq_ = 0;
  // Point-to-point sequence numbers per peer: sends counted when issued,
  // receives by the progress thread when they run (a receive from any source
  // learns its sender only then).
  std::vector<uint64_t> sent_to_, received_from_;
  std::atomic<uint64_t> caller_thread_ops_{0};
  bool coalescing_ = false;
  std::vector<BatchedMessage> batch_;

  std::shared_ptr<ProgressState> state_ = std::make_shared<ProgressState>();
  std::mutex teardown_mu_;
  bool torn_down_ = false;
  std::thread worker_;
};

}  // namespace disttrain::comm
