#include "comm/backend.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>

#include <algorithm>
#include <cctype>
#include <map>

#include "comm/host_identity.h"
#include "comm/thread_util.h"
#include "trace/timeline.h"

namespace disttrain::comm {
namespace {

RedOp to_redop(const c10d::ReduceOp& op) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return RedOp::kSum;
    case c10d::ReduceOp::AVG: return RedOp::kAvg;
    case c10d::ReduceOp::PRODUCT: return RedOp::kProduct;
    case c10d::ReduceOp::MIN: return RedOp::kMin;
    case c10d::ReduceOp::MAX: return RedOp::kMax;
    case c10d::ReduceOp::BAND: return RedOp::kBand;
    case c10d::ReduceOp::BOR: return RedOp::kBor;
    case c10d::ReduceOp::BXOR: return RedOp::kBxor;
    default: break;
  }
  TORCH_CHECK_VALUE(false, "disttrain: reduce op ", static_cast<int>(op.op_),
                    " (PREMUL_SUM) is not supported; use SUM and scale the tensor");
}

const at::Tensor& single(const std::vector<at::Tensor>& tensors, const char* op) {
  TORCH_CHECK_VALUE(tensors.size() == 1, "disttrain: ", op, " takes exactly one tensor per rank, got ",
                    tensors.size());
  return tensors[0];
}

void check_cpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK_VALUE(t.defined(), "disttrain: ", op, " got an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "disttrain: ", op, " got a tensor on ", t.device(),
                    "; the disttrain backend handles CPU tensors (use NCCL for CUDA)");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "disttrain: ", op, " needs a dense tensor, got ", t.layout());
}

// A tensor that receives a result must not have elements that share memory (an
// expand()ed or as_strided view): copying the result into it failed after the
// transfer, on the progress thread, and that failed the whole group.
void check_writable(const at::Tensor& t, const char* op, const char* what) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "disttrain: ", op, ": ", what,
                    " has elements that share memory (an expand()ed view?) and cannot receive a result; ",
                    "pass a tensor of its own (.clone())");
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* what) {
  check_cpu(t, op);
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type() && t.numel() == ref.numel(), "disttrain: ", op, ": ",
                    what, " has dtype ", t.scalar_type(), " and ", t.numel(), " elements, expected ",
                    ref.scalar_type(), " and ", ref.numel());
}

// Whether the shared-memory all-reduce divides an AVG itself, block by block
// while the block is in cache (float32 and float64 only).
bool fused_avg(RedOp op, c10::ScalarType dtype) {
  return op == RedOp::kAvg && (dtype == at::kFloat || dtype == at::kDouble);
}

// Finishes an AVG reduction: the wire carried the sum.
void divide_by(at::Tensor& t, int world) {
  if (at::isFloatingType(t.scalar_type())) {
    t.div_(world);
  } else {
    TORCH_CHECK_VALUE(t.scalar_type() != at::kBool, "disttrain: AVG is not defined for bool tensors");
    t.div_(world, "trunc");
  }
}

// A complex tensor under SUM or AVG is reduced as its real and imaginary parts
// (what torch's all_reduce does in Python, and gloo for reduce and
// reduce_scatter): the float view of the same memory, twice the elements.
// Other ops on complex tensors stay unsupported (the kernel lookup says so).
// (A conjugate view never gets here: torch's dispatcher hands the backend a
// resolved copy; resolve_conj is a no-op otherwise.)
at::Tensor real_view(const at::Tensor& t, RedOp op) {
  if (!t.defined() || !t.is_complex() || (op != RedOp::kSum && op != RedOp::kAvg)) return t;
  return at::view_as_real(t.resolve_conj());
}

void copy_back(at::Tensor& user, const at::Tensor& buffer) {
  if (!user.is_same(buffer)) user.copy_(buffer.view(user.sizes()));
}

at::Tensor flat_cat(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> flat;
  flat.reserve(ts.size());
  for (const auto& t : ts) flat.push_back(t.reshape(-1));
  return at::cat(flat);
}

void split_into(const at::Tensor& flat, std::vector<at::Tensor>& outs) {
  int64_t off = 0;
  for (auto& o : outs) {
    o.copy_(flat.narrow(0, off, o.numel()).view(o.sizes()));
    off += o.numel();
  }
}

}  // namespace

namespace {
c10::intrusive_ptr<c10::ivalue::Future> make_future() {
  static const c10::TypePtr type = c10::ListType::create(c10::TensorType::get());
  return c10::make_intrusive<c10::ivalue::Future>(type);
}
}  // namespace

DisttrainWork::DisttrainWork(int rank, c10d::OpType type, uint64_t seq, std::vector<at::Tensor> outputs, Task task,
                             bool eager_future, std::shared_ptr<RecvMatch> match)
    : c10d::Work(rank, type),
      seq_(seq),
      match_(std::move(match)),
      outputs_(std::move(outputs)),
      eager_future_(eager_future),
      future_(eager_future ? make_future() : nullptr),
      task_(std::move(task)) {}

c10::intrusive_ptr<c10::ivalue::Future> DisttrainWork::getFuture() {
  if (eager_future_) return future_;
  std::lock_guard<std::mutex> lock(future_mu_);
  if (!future_) {
    TORCH_INTERNAL_ASSERT(completed_.load(), "disttrain: a lazy future on a Work that has not completed");
    future_ = make_future();
    if (error_) {
      future_->setError(error_);
    } else {
      future_->markCompleted(c10::IValue(outputs_));
    }
  }
  return future_;
}

bool DisttrainWork::wait(std::chrono::milliseconds timeout) {
  TORCH_CHECK(!awaiting_batch_.load(), "disttrain: wait() on a send or receive of a coalescing block ",
              "(batch_isend_irecv) before the block ended: the block's ops start only when it ends");
  bool done = false;
  try {
    done = c10d::Work::wait(timeout);
  } catch (...) {
    release_task();
    throw;
  }
  if (done) release_task();
  return done;
}

void DisttrainWork::release_task() {
  Task task;
  std::lock_guard<std::mutex> lock(task_mu_);
  task.swap(task_);  // destroyed here, on this (the caller's) thread
}

void DisttrainWork::complete(std::exception_ptr error) {
  if (completed_.exchange(true)) return;  // teardown may reach an op the progress thread was completing
  if (!eager_future_) {
    error_ = error;  // before anyone else holds this Work: getFuture() reads it later
  } else if (error) {
    future_->setError(error);
  } else {
    future_->markCompleted(c10::IValue(outputs_));
  }
  finish(error);
  // Kept until this Work is destroyed (on a caller's thread): they may hold
  // the last references to tensors Python owns.
  for (auto& member : followers_) member->complete(error);
}

int DisttrainWork::sourceRank() const {
  if (!match_) return c10d::Work::sourceRank();  // torch's error: not a receive
  const int source = match_->source.load();
  TORCH_CHECK(source >= 0, "disttrain: the sender of a receive from any source is known once it has matched; "
              "call wait() first");
  return source;
}

std::string DisttrainWork::describe() const {
  std::string op = c10d::opTypeToString(retrieveOpType());
  for (auto& c : op) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (match_) {
    const int source = match_->source.load();
    if (source < 0) return op + " (not matched to a sender yet)";
    std::string from = op + " from rank " + std::to_string(source);
    if (!match_->numbered.load()) return from + " (not begun)";
    return from + " (sequence number " + std::to_string(match_->seq.load()) + ")";
  }
  return op + " (sequence number " + std::to_string(seq_) + ")";
}

namespace {
// Every key of ours is scoped to one group: the store outlives it.
// - Under torchrun the store outlives a failed attempt: the keys carry the
//   attempt number, so a restarted group never reads the dead one's.
// - Within one attempt, a group destroyed and made again under the same name
//   (init_process_group after destroy_process_group: torch names the default
//   group anew from 0) found the old group's keys: a peer's segment tag of a
//   segment long unlinked ("cannot open rank 0's segment"), or a count of
//   mapped segments already complete. Each rank counts the groups it has made
//   on this store (its own key); the ranks of a group make them in the same
//   order, so they agree on the count without a word.
c10::intrusive_ptr<c10d::Store> per_group(const c10::intrusive_ptr<c10d::Store>& store, int attempt, int rank) {
  auto attempt_store = c10::make_intrusive<c10d::PrefixStore>("attempt" + std::to_string(attempt), store);
  const int64_t made = attempt_store->add("disttrain/groups_made/" + std::to_string(rank), 1);
  return c10::make_intrusive<c10d::PrefixStore>("group" + std::to_string(made), attempt_store);
}
}  // namespace

DisttrainBackend::DisttrainBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                   std::chrono::milliseconds timeout, CommOptions options)
    : DisttrainBackend(per_group(store, options.restart_attempt, rank), rank, size, timeout, std::move(options), 0) {}

DisttrainBackend::DisttrainBackend(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                   std::chrono::milliseconds timeout, CommOptions options, int)
    : c10d::Backend(rank, size),
      options_(std::move(options)),
      transport_(std::make_unique<TcpTransport>(store, rank, size, timeout, options_.tcp)),
      timeout_(timeout),
      sent_to_(size, 0),
      received_from_(size, 0) {
  check_settings_agree(store);
  setup_shared_memory(store, timeout);
  worker_ = std::thread([this, state = state_] {
    run_thread_body("progress", [&] { progress_loop(this, state); });
  });
}

// The settings every rank of a group must share. A difference failed later and
// obscurely: transport=tcp beside shm as a store timeout in new_group on one rank
// and "rank 1 reset its connection" in the first op on the other; shm_slot_bytes
// as "refusing rank 0's segment ... (not made by a rank of this job)";
// allreduce_algorithm as "collective mismatch ... rank 0 is at step 0, rank 1 at step 1".
// Every rank publishes its values, reads every rank's and raises the same error.
void DisttrainBackend::check_settings_agree(const c10::intrusive_ptr<c10d::Store>& store) {
  if (getSize() == 1) return;
  static const char* const kShared[] = {"transport", "allreduce_algorithm", "shm_slot_bytes"};
  std::vector<std::pair<std::string, std::string>> mine;
  for (const auto& d : options_.describe()) {
    // (the slot size matters to shared memory only, the algorithm to TCP only)
    if (d.name == "shm_slot_bytes" && options_.transport == TransportChoice::kTcp) continue;
    if (d.name == "allreduce_algorithm" && options_.transport == TransportChoice::kShm) continue;
    for (const char* k : kShared)
      if (d.name == k) mine.emplace_back(d.name, d.value);
  }
  std::string text;
  for (const auto& [name, value] : mine) text += name + "=" + value + "\n";
  store->set("disttrain/settings/" + std::to_string(getRank()), std::vector<uint8_t>(text.begin(), text.end()));
  std::vector<std::string> each(getSize());
  for (int q = 0; q < getSize(); ++q) {
    auto bytes = store->get("disttrain/settings/" + std::to_string(q));
    each[q] = std::string(bytes.begin(), bytes.end());
  }
  auto value_in = [](const std::string& all, const std::string& name) {
    const std::string key = name + "=";
    size_t at = all.find(key);
    if (at == std::string::npos) return std::string("?");
    at += key.size();
    return all.substr(at, all.find('\n', at) - at);
  };
  for (int q = 1; q < getSize(); ++q) {  // against rank 0: the same message on every rank
    for (const auto& [name, unused] : mine) {
      const std::string first = value_in(each[0], name), theirs = value_in(each[q], name);
      TORCH_CHECK_VALUE(first == theirs, "disttrain: the ranks of a group need the same ", name, ": rank 0 has ",
                        name, "=", first, ", rank ", q, " has ", name, "=", theirs,
                        " (set it alike on every rank: pg_options or the environment)");
    }
  }
}

void DisttrainBackend::setup_shared_memory(const c10::intrusive_ptr<c10d::Store>& store,
                                           std::chrono::milliseconds timeout) {
  const int rank = getRank(), size = getSize();
  const TransportChoice mode = options_.transport;
  if (size == 1 || mode == TransportChoice::kTcp) return;
  // Group the ranks by host, hosts numbered in order of their first rank.
  std::string me = host_identity(options_.host_id);
  store->set("disttrain/host/" + std::to_string(rank), std::vector<uint8_t>(me.begin(), me.end()));
  std::map<std::string, int> host_index;
  std::vector<int> host_of(size);
  for (int q = 0; q < size; ++q) {
    auto bytes = store->get("disttrain/host/" + std::to_string(q));
    auto it = host_index.emplace(std::string(bytes.begin(), bytes.end()), static_cast<int>(host_index.size())).first;
    host_of[q] = it->second;
  }
  const int hosts = static_cast<int>(host_index.size());
  TORCH_CHECK_VALUE(mode != TransportChoice::kShm || hosts == 1, "disttrain: transport=shm needs every rank on one host, ",
                    "but the ranks are on ", hosts, " hosts");
  if (hosts == 1) {
    shm_ = std::make_unique<ShmGroup>(store, *transport_, timeout, options_.shm_slot_bytes,
                                      options_.shm_wait);
    return;
  }
  std::vector<int> local, leaders;
  for (int q = 0; q < size; ++q) {
    if (host_of[q] == host_of[rank]) local.push_back(q);
    if (q == 0 || std::find(host_of.begin(), host_of.begin() + q, host_of[q]) == host_of.begin() + q)
      leaders.push_back(q);
  }
  // Every rank must take the same decision: two levels as soon as any host
  // holds several ranks, also on a host that holds one (it is then its own leader).
  std::vector<int> ranks_on(hosts, 0);
  for (int q = 0; q < size; ++q) ++ranks_on[host_of[q]];
  if (*std::max_element(ranks_on.begin(), ranks_on.end()) == 1) return;  // one rank per host: TCP is all there is
  // Two levels: shared memory within the host, TCP between the hosts' leaders.
  hierarchical_ = true;
  const int h = host_of[rank];
  const int local_rank = static_cast<int>(std::find(local.begin(), local.end(), rank) - local.begin());
  if (local.size() > 1) {
    auto host_store = c10::make_intrusive<c10d::PrefixStore>("disttrain/host" + std::to_string(h) + "/", store);
    local_ = std::make_unique<TcpTransport>(host_store, local_rank, static_cast<int>(local.size()), timeout,
                                            options_.tcp, store);
    local_->set_group_ranks(local);
    shm_ = std::make_unique<ShmGroup>(host_store, *local_, timeout, options_.shm_slot_bytes,
                                      options_.shm_wait);
  }
  if (local_rank == 0) {
    const int leader_rank = static_cast<int>(std::find(leaders.begin(), leaders.end(), rank) - leaders.begin());
    auto leader_store = c10::make_intrusive<c10d::PrefixStore>("disttrain/leaders/", store);
    leaders_ = std::make_unique<TcpTransport>(leader_store, leader_rank, hosts, timeout, options_.tcp, store);
    leaders_->set_group_ranks(leaders);
  }
}

void DisttrainBackend::run_allreduce(const OpSignature& sig, void* data, size_t count, c10::ScalarType dtype,
                                     Deadline dl) {
  if (hierarchical_) {
    // Reduce within the host, across the hosts' leaders, then broadcast within
    // the host (a rank alone on its host has only the middle step).
    if (shm_) shm_allreduce(*shm_, sig, data, count, dtype, dl);
    if (leaders_) comm::allreduce(*leaders_, sig, data, count, dtype, dl, options_.allreduce_algorithm);
    if (shm_) shm_broadcast(*shm_, sig, data, count * c10::elementSize(dtype), 0, dl);
  } else if (shm_) {
    shm_allreduce(*shm_, sig, data, count, dtype, dl);
  } else {
    comm::allreduce(*transport_, sig, data, count, dtype, dl, options_.allreduce_algorithm);
  }
}

void DisttrainBackend::run_broadcast(const OpSignature& sig, void* data, size_t bytes, int root, Deadline dl) {
  if (shm_ && !hierarchical_) {
    shm_broadcast(*shm_, sig, data, bytes, root, dl);
  } else {
    comm::broadcast(*transport_, sig, data, bytes, root, dl);
  }
}

void DisttrainBackend::run_allgather(const OpSignature& sig, const void* in, void* out, size_t bytes_per_rank,
                                     Deadline dl) {
  if (shm_ && !hierarchical_) {
    shm_allgather(*shm_, sig, in, out, bytes_per_rank, dl);
  } else {
    comm::allgather(*transport_, sig, in, out, bytes_per_rank, dl);
  }
}

void DisttrainBackend::run_reduce_scatter(const OpSignature& sig, const void* in, void* out, size_t count,
                                          c10::ScalarType dtype, Deadline dl) {
  if (shm_ && !hierarchical_) {
    shm_reduce_scatter(*shm_, sig, in, out, count, dtype, dl);
  } else {
    comm::reduce_scatter(*transport_, sig, in, out, count, dtype, dl);
  }
}

namespace {
// What teardown tells whoever waits on an op of the group, by how it began.
const char* const kShutdownReason = "the process group was shut down (destroy_process_group)";
const char* const kAbortReason = "the process group was aborted";
const char* const kDestroyReason =
    "the process group was destroyed (its last reference was released, e.g. at interpreter exit)";

std::exception_ptr backend_error(const std::string& message) {
  return std::make_exception_ptr(c10::DistBackendError(message, {}));
}
}  // namespace

DisttrainBackend::~DisttrainBackend() { teardown(kDestroyReason); }

void DisttrainBackend::shutdown() { teardown(kShutdownReason); }

void DisttrainBackend::abort() { teardown(kAbortReason); }

void DisttrainBackend::teardown(const std::string& why) {
  std::lock_guard<std::mutex> once(teardown_mu_);
  if (torn_down_) return;
  torn_down_ = true;
  std::shared_ptr<ProgressState> st = state_;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    st->stop = true;
    st->stop_reason = why;
  }
  st->cv.notify_all();
  // Fail the op in progress now, not at its deadline: a peer that never joins
  // it (or is gone) would otherwise hold this process for the group timeout.
  // Locally only: the store may be gone at exit, and peers see their
  // connections close.
  for (auto* t : {transport_.get(), local_.get(), leaders_.get()})
    if (t) t->shut_down(why + " while an op was in progress");
  // On the progress thread itself (a callback released the last reference)
  // there is nothing to join: the thread finds `stop` when the callback returns.
  const bool joined = join_or_detach(worker_);
  {
    // An op a caller runs on its own thread fails within a sleep slice (its
    // transports are shut down); it is that caller's to complete, and it must
    // be out of the transports before they close.
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return !st->caller_running; });
  }

  // Whatever is left is completed here, on the caller's thread: for Python
  // the thread destroying the group, which may take the GIL even while the
  // interpreter exits (a progress thread may not: Python ends it).
  std::deque<c10::intrusive_ptr<DisttrainWork>> left;
  std::vector<c10::intrusive_ptr<DisttrainWork>> finished;
  c10::intrusive_ptr<DisttrainWork> running;
  std::exception_ptr running_error;
  bool ran = false;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    left.swap(st->queue);
    finished.swap(st->finished);
    if (joined) {
      running = std::move(st->running);
      running_error = st->running_error;
      ran = st->running_ran;
    }
  }
  if (running) {
    // Finished before the teardown reached it: its real outcome. Otherwise
    // (cut short, or the thread ended inside it): the teardown's.
    if (ran && !running_error) {
      running->complete(nullptr);
    } else {
      running->complete(backend_error("disttrain: " + why + " while " + running->describe() +
                                      " was in progress; it did not complete on this rank"));
    }
  }
  for (auto& w : left) {
    w->complete(backend_error("disttrain: " + why + " before " + w->describe() + " ran"));
  }
  // The completion threads finish what the progress thread handed them (a
  // callback waiting for an op that was queued has its error by now), then end.
  std::vector<std::thread> completers;
  {
    std::lock_guard<std::mutex> lock(st->mu);
    st->completers_stop = true;
    completers.swap(st->completers);
  }
  st->completion_cv.notify_all();
  for (auto& t : completers) join_or_detach(t);
  {
    std::lock_guard<std::mutex> lock(st->mu);
    for (auto& w : st->finished) finished.push_back(std::move(w));
    st->finished.clear();
  }
  // Sockets and acceptor threads go now, even if references to the group
  // outlive it (destroy_process_group with the group still held elsewhere).
  for (auto* t : {leaders_.get(), local_.get(), transport_.get()})
    if (t) t->close();
  // `left`, `finished` and `running` (and the tensors their tasks hold) are released here, on this thread.
}

template <class Body>
std::exception_ptr DisttrainBackend::run_guarded(Body&& body) {
  // The op writes into the user's tensors as raw memory does (gloo's way): beneath autograd, so
  // tensors made under torch.inference_mode() (Lightning's sync_dist) can be reduced in place.
  // Through autograd, an in-place ATen op on one (AVG's divide, a copy back) raised "Inplace
  // update to inference tensor outside InferenceMode" and, failing the op, aborted the group.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  try {
    transport_->check_alive();
    body(Clock::now() + timeout_);
    return nullptr;
  } catch (abi::__forced_unwind&) {
    throw;
  } catch (const c10::Error& e) {
    // One failed transport fails the group: siblings shut down too, so that
    // every rank waiting on any of them notices now, not at its timeout.
    // (After a teardown they are shut down already: nothing is recorded.)
    // The reason is recorded without the "disttrain: " that the reports add
    // (an error raised inside the op, a check's ValueError, read "disttrain: disttrain: ...").
    std::string why = e.what_without_backtrace();
    if (why.rfind("disttrain: ", 0) == 0) why.erase(0, std::strlen("disttrain: "));
    for (auto* t : {transport_.get(), local_.get(), leaders_.get()})
      if (t) t->abort_quietly(why);
    return std::current_exception();
  } catch (...) {
    return std::current_exception();
  }
}

namespace {
// An op's busy span in the timeline (trace/timeline.h): its name, sequence
// number and bytes, on the thread that ran it.
void trace_op(c10d::OpType type, uint64_t seq, const std::vector<at::Tensor>& outputs, int64_t start_ns) {
  if (!trace::enabled()) return;
  int64_t bytes = 0;
  for (const auto& t : outputs) bytes += static_cast<int64_t>(t.nbytes());
  trace::record(trace::Event{c10d::opTypeToString(type), "comm", 'X', start_ns, trace::now_ns(), 0,
                             static_cast<int64_t>(seq), bytes});
}
}  // namespace

std::exception_ptr DisttrainBackend::run_op(DisttrainWork& work) {
  const int64_t start = trace::enabled() ? trace::now_ns() : 0;
  std::exception_ptr error = run_guarded([&](Deadline deadline) { work.run(deadline); });
  if (start) trace_op(work.retrieveOpType(), work.getSequencenumber(), work.result(), start);
  return error;
}

void DisttrainBackend::progress_loop(DisttrainBackend* self, std::shared_ptr<ProgressState> st) {
  trace::name_this_thread("disttrain progress");
  std::unique_lock<std::mutex> lock(st->mu);
  while (true) {
    const int64_t idle_from = trace::enabled() ? trace::now_ns() : 0;
    st->cv.wait(lock, [&] { return st->stop || (!st->queue.empty() && !st->caller_running); });
    if (st->stop) return;  // teardown fails what is queued, on its own thread
    st->running = std::move(st->queue.front());
    st->queue.pop_front();
    st->busy = true;
    DisttrainWork* work = st->running.get();
    lock.unlock();
    if (idle_from) trace::span("comm", "idle", idle_from, trace::now_ns());
    std::exception_ptr error = self->run_op(*work);
    lock.lock();
    st->busy = false;
    if (st->stop) {
      // Teardown began meanwhile; it completes this op on its own thread.
      st->running_error = error;
      st->running_ran = true;
      return;
    }
    // Completed (its future's callbacks run) on a completion thread: a
    // callback that issues an op and waits for it (PowerSGD's hook) would
    // otherwise wait for this very thread, a deadlock no timeout ended.
    post_completion(st, std::move(st->running), error);  // this thread keeps no reference
  }
}

void DisttrainBackend::post_completion(const std::shared_ptr<ProgressState>& st,
                                       c10::intrusive_ptr<DisttrainWork> work, std::exception_ptr error) {
  // Called with st->mu held.
  st->to_complete.emplace_back(std::move(work), error);
  if (st->to_complete.size() > st->idle_completers) {
    st->completers.emplace_back([st] { run_thread_body("completion", [&] { completion_loop(st); }); });
  } else {
    st->completion_cv.notify_one();
  }
}

void DisttrainBackend::completion_loop(std::shared_ptr<ProgressState> st) {
  trace::name_this_thread("disttrain completion");
  std::unique_lock<std::mutex> lock(st->mu);
  while (true) {
    ++st->idle_completers;
    st->completion_cv.wait(lock, [&] { return st->completers_stop || !st->to_complete.empty(); });
    --st->idle_completers;
    if (st->to_complete.empty()) return;  // stopping, nothing left
    auto [work, error] = std::move(st->to_complete.front());
    st->to_complete.pop_front();
    lock.unlock();
    // Runs the future's callbacks. One of them may release the backend's
    // last reference, destroying it here: from then on only `st` (ours) is
    // touched.
    work->complete(error);
    lock.lock();
    // The finished op may hold the last references to tensors Python owns;
    // releasing them here would need the GIL, which this thread must never
    // take (it is fatal during interpreter shutdown). A caller's wait(), the
    // next caller of enqueue(), or the teardown releases them.
    st->finished.push_back(std::move(work));
  }
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::enqueue(c10d::OpType type, uint64_t seq,
                                                         std::vector<at::Tensor> outputs, Task fn,
                                                         std::shared_ptr<RecvMatch> match,
                                                         std::vector<c10::intrusive_ptr<DisttrainWork>> followers) {
  auto work = c10::make_intrusive<DisttrainWork>(getRank(), type, seq, std::move(outputs), std::move(fn),
                                                 /*eager_future=*/true, std::move(match));
  for (auto& f : followers) work->follow(std::move(f));
  std::vector<c10::intrusive_ptr<DisttrainWork>> finished;  // no allocation when empty
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (state_->stop) {
      C10_THROW_ERROR(DistBackendError, "disttrain: " + state_->stop_reason + "; " + work->describe() +
                                            " cannot run on it (create a new process group)");
    }
    state_->queue.push_back(work);
    finished.swap(state_->finished);
  }
  state_->cv.notify_one();
  return work;
}

bool DisttrainBackend::claim_caller_run() {
  std::vector<c10::intrusive_ptr<DisttrainWork>> finished;  // released here, on the caller's thread
  std::lock_guard<std::mutex> lock(state_->mu);
  // Only with nothing queued and nothing running: an earlier async op still
  // in flight keeps this one behind it, on the progress thread, in issue order.
  // After a teardown began, enqueue() raises the usual error.
  if (!state_->queue.empty() || state_->busy || state_->caller_running || state_->stop) return false;
  state_->caller_running = true;
  finished.swap(state_->finished);
  return true;
}

void DisttrainBackend::release_caller_run() {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->caller_running = false;
    // Wake the progress thread only if there is something for it (an op queued
    // meanwhile by another thread) or a teardown waiting for this op: a wake-up
    // for nothing costs the very context switches this path avoids.
    wake = state_->stop || !state_->queue.empty();
  }
  if (wake) state_->cv.notify_all();
}

template <class Body>
c10::intrusive_ptr<c10d::Work> DisttrainBackend::run_or_enqueue(c10d::OpType type, uint64_t seq,
                                                                std::vector<at::Tensor> outputs, Body&& body,
                                                                bool on_caller) {
  if (!on_caller || !claim_caller_run()) return enqueue(type, seq, std::move(outputs), Task(std::forward<Body>(body)));
  c10::intrusive_ptr<DisttrainWork> work;
  std::exception_ptr error;
  const int64_t start = trace::enabled() ? trace::now_ns() : 0;
  try {
    // Completed before anyone else sees it: its future is made lazily, if asked for.
    work = c10::make_intrusive<DisttrainWork>(getRank(), type, seq, std::move(outputs), Task(), /*eager_future=*/false);
    // The same failure handling (and deadline) as on the progress thread, so
    // the result and any error are what the queued path gives.
    error = run_guarded(body);
  } catch (...) {
    release_caller_run();
    throw;
  }
  caller_thread_ops_.fetch_add(1, std::memory_order_relaxed);
  release_caller_run();
  if (start) trace_op(type, seq, work->result(), start);
  work->complete(error);  // no callbacks can be attached yet: records the outcome, marks the Work done
  return work;
}

OpSignature DisttrainBackend::signature(OpKind op, const at::Tensor& t, RedOp redop, uint64_t count, int64_t aux) {
  return OpSignature{next_seq_++, op, static_cast<uint8_t>(t.scalar_type()), redop, count, aux};
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                           const c10d::AllreduceOptions& opts) {
  at::Tensor given = single(tensors, "all_reduce");
  if (given.layout() == at::kSparse) return sparse_allreduce(given, to_redop(opts.reduceOp));
  check_cpu(given, "all_reduce");
  check_writable(given, "all_reduce", "the tensor");
  RedOp op = to_redop(opts.reduceOp);
  at::Tensor user = real_view(given, op);
  reduce_kernel(user.scalar_type(), op);  // unsupported (dtype, op) fails here, in the caller
  if (op == RedOp::kAvg) {
    TORCH_CHECK_VALUE(user.scalar_type() != at::kBool, "disttrain: AVG is not defined for bool tensors");
  }
  OpSignature sig = signature(OpKind::kAllreduce, user, op, user.numel());
  at::Tensor buf = user.contiguous();
  int world = getSize();
  // Same host: AVG divides each reduced block while it is in cache, as the
  // coalesced path does (a separate divide pass cost 6 ms of a 14 ms AVG of
  // 75 MB at 2 ranks).
  const bool fuse_avg = shm_ && !hierarchical_ && fused_avg(op, buf.scalar_type());
  // A synchronous all-reduce (the caller waits at once: dist.all_reduce without
  // async_op) that fits one shared-memory epoch runs on the caller's thread:
  // the hand-off to the progress thread and back was most of its latency.
  // Same task, so the same bits. Asynchronous ones (DDP's buckets, async_op=True)
  // stay on the progress thread, overlapping the caller's work.
  const bool on_caller = !opts.asyncOp && shm_ && !hierarchical_ && buf.nbytes() <= shm_->slot_bytes();
  return run_or_enqueue(c10d::OpType::ALLREDUCE, sig.seq, {given}, [=, this](Deadline dl) mutable {
    if (fuse_avg) {
      const MemoryPiece whole{static_cast<uint8_t*>(buf.data_ptr()), buf.nbytes()};
      shm_allreduce(*shm_, sig, c10::ArrayRef<MemoryPiece>(whole), buf.numel(), buf.scalar_type(), true, dl);
    } else {
      run_allreduce(sig, buf.data_ptr(), buf.numel(), buf.scalar_type(), dl);
      if (op == RedOp::kAvg) divide_by(buf, world);
    }
    copy_back(user, buf);
  }, on_caller);
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                                  const c10d::AllreduceOptions& opts) {
  return sparse_allreduce(single(tensors, "all_reduce"), to_redop(opts.reduceOp));
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::sparse_allreduce(const at::Tensor& user, RedOp op) {
  TORCH_CHECK_VALUE(user.layout() == at::kSparse, "disttrain: sparse all_reduce takes a sparse COO tensor, got ",
                    user.layout());
  TORCH_CHECK_VALUE(user.device().is_cpu(), "disttrain: all_reduce takes CPU tensors, got one on ", user.device());
  TORCH_CHECK_VALUE(op == RedOp::kSum, "disttrain: all_reduce of a sparse tensor supports SUM only, got ",
                    redop_name(op));
  // Each rank's nonzeros, gathered by every rank and summed by coalescing
  // them: three all-gathers (the counts, then the indices and the values,
  // padded to the largest count), numbered now so that every rank agrees.
  const at::Tensor in = user.coalesce();
  const at::Tensor indices = in._indices().contiguous();  // [sparse_dim, nnz]
  const at::Tensor values = in._values().contiguous();    // [nnz, dense sizes...]
  const uint64_t first = next_seq_;
  next_seq_ += 3;
  const auto lng = static_cast<uint8_t>(at::kLong);
  return enqueue(c10d::OpType::_ALLREDUCE_SPARSE, first, {user}, [=, this](Deadline dl) mutable {
    const int64_t world = getSize(), sparse_dim = indices.size(0), nnz = indices.size(1);
    // The counts carry each rank's shape as well: ranks whose tensors differ in size
    // summed into tensors of their own sizes, silently (an index past another
    // rank's size made an invalid sparse tensor there). A different number of
    // dimensions is the usual size mismatch of this first all-gather.
    const std::vector<int64_t> shape = user.sizes().vec();
    const int64_t meta = 1 + static_cast<int64_t>(shape.size());
    at::Tensor count = at::empty({meta}, at::kLong);
    count[0] = nnz;
    for (size_t d = 0; d < shape.size(); ++d) count[static_cast<int64_t>(d) + 1] = shape[d];
    at::Tensor gathered = at::empty({world, meta}, at::kLong);
    run_allgather(OpSignature{first, OpKind::kAllgather, lng, RedOp::kNone, static_cast<uint64_t>(meta), 0},
                  count.data_ptr(), gathered.data_ptr(), meta * sizeof(int64_t), dl);
    auto size_of = [&](int64_t r) {
      const int64_t* row = gathered.data_ptr<int64_t>() + r * meta;
      return std::vector<int64_t>(row + 1, row + meta);
    };
    for (int64_t r = 1; r < world; ++r) {  // the same message on every rank
      TORCH_CHECK_VALUE(size_of(r) == size_of(0), "disttrain: sparse all_reduce (sequence number ", first,
                        "): rank 0 has a tensor of size ", c10::IntArrayRef(size_of(0)), ", rank ", r, " of size ",
                        c10::IntArrayRef(size_of(r)), "; every rank needs the same size");
    }
    const at::Tensor counts = gathered.select(1, 0).contiguous();
    const int64_t most = std::max<int64_t>(1, counts.max().item<int64_t>());  // never an empty message
    std::vector<int64_t> value_shape = values.sizes().vec();
    value_shape[0] = most;
    at::Tensor my_indices = at::zeros({sparse_dim, most}, at::kLong);
    my_indices.narrow(1, 0, nnz).copy_(indices);
    at::Tensor my_values = at::zeros(value_shape, values.options());
    my_values.narrow(0, 0, nnz).copy_(values);
    at::Tensor all_indices = at::empty({world, sparse_dim, most}, at::kLong);
    value_shape.insert(value_shape.begin(), world);
    at::Tensor all_values = at::empty(value_shape, values.options());
    run_allgather(OpSignature{first + 1, OpKind::kAllgather, lng, RedOp::kNone,
                              static_cast<uint64_t>(my_indices.numel()), 0},
                  my_indices.data_ptr(), all_indices.data_ptr(), my_indices.nbytes(), dl);
    run_allgather(OpSignature{first + 2, OpKind::kAllgather, static_cast<uint8_t>(values.scalar_type()), RedOp::kNone,
                              static_cast<uint64_t>(my_values.numel()), 0},
                  my_values.data_ptr(), all_values.data_ptr(), my_values.nbytes(), dl);
    std::vector<at::Tensor> each_indices, each_values;
    for (int64_t r = 0; r < world; ++r) {
      const int64_t n = counts[r].item<int64_t>();
      each_indices.push_back(all_indices[r].narrow(1, 0, n));
      each_values.push_back(all_values[r].narrow(0, 0, n));
    }
    user.copy_(at::sparse_coo_tensor(at::cat(each_indices, 1), at::cat(each_values, 0), user.sizes()).coalesce());
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::allreduce_coalesced(std::vector<at::Tensor>& tensors,
                                                                     const c10d::AllreduceCoalescedOptions& opts) {
  TORCH_CHECK_VALUE(!tensors.empty(), "disttrain: all_reduce_coalesced got no tensors");
  for (auto& t : tensors) check_like(t, t, "all_reduce_coalesced", "tensor");
  for (auto& t : tensors) check_writable(t, "all_reduce_coalesced", "a tensor");
  for (auto& t : tensors) {
    TORCH_CHECK_VALUE(t.scalar_type() == tensors[0].scalar_type(),
                      "disttrain: all_reduce_coalesced needs one dtype, got ", tensors[0].scalar_type(), " and ",
                      t.scalar_type());
  }
  RedOp op = to_redop(opts.reduceOp);
  reduce_kernel(tensors[0].scalar_type(), op);
  std::vector<at::Tensor> users = tensors;
  int world = getSize();
  if (shm_ && !hierarchical_) {
    // Shared memory reads and writes the tensors where they are: no
    // flattened copy in, no copy out (DDP's gradients, for one). Every rank
    // of a same-host group takes this path, so a fused AVG is the same on all.
    int64_t count = 0;
    std::vector<at::Tensor> buffers;
    for (const auto& t : tensors) {
      count += t.numel();
      buffers.push_back(t.contiguous());
    }
    OpSignature sig = signature(OpKind::kAllreduce, tensors[0], op, count);
    const c10::ScalarType dtype = tensors[0].scalar_type();
    const bool fuse_avg = fused_avg(op, dtype);
    // Synchronous (asyncOp false: the caller waits at once; DDP's buckets when
    // the cores are saturated): on the caller's thread, any size, when nothing
    // is queued or running, so no hand-off to the progress thread and back.
    return run_or_enqueue(c10d::OpType::ALLREDUCE_COALESCED, sig.seq, users, [=, this](Deadline dl) mutable {
      std::vector<MemoryPiece> pieces;
      for (auto& b : buffers) pieces.push_back({static_cast<uint8_t*>(b.data_ptr()), b.nbytes()});
      shm_allreduce(*shm_, sig, pieces, count, dtype, fuse_avg, dl);
      for (size_t i = 0; i < users.size(); ++i) {
        if (op == RedOp::kAvg && !fuse_avg) divide_by(buffers[i], world);
        copy_back(users[i], buffers[i]);
      }
    }, /*on_caller=*/!opts.asyncOp);
  }
  at::Tensor flat = flat_cat(tensors);
  OpSignature sig = signature(OpKind::kAllreduce, flat, op, flat.numel());
  return enqueue(c10d::OpType::ALLREDUCE_COALESCED, sig.seq, users, [=, this](Deadline dl) mutable {
    run_allreduce(sig, flat.data_ptr(), flat.numel(), flat.scalar_type(), dl);
    if (op == RedOp::kAvg) divide_by(flat, world);
    split_into(flat, users);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::allreduce_avg_consumed(std::vector<at::Tensor>& tensors,
                                                                        BlockConsumer consume, bool async_op) {
  TORCH_CHECK_VALUE(!tensors.empty(), "disttrain: all_reduce (consumed) got no tensors");
  for (auto& t : tensors) {
    check_cpu(t, "all_reduce (consumed)");
    TORCH_CHECK_VALUE(t.is_contiguous() && t.scalar_type() == tensors[0].scalar_type() &&
                          fused_avg(RedOp::kAvg, t.scalar_type()),
                      "disttrain: all_reduce (consumed) needs contiguous float32 or float64 tensors of one dtype");
  }
  TORCH_CHECK_VALUE(consume, "disttrain: all_reduce (consumed) got no consumer");
  std::vector<at::Tensor> users = tensors;
  if (shm_ && !hierarchical_) {
    int64_t count = 0;
    for (const auto& t : tensors) count += t.numel();
    OpSignature sig = signature(OpKind::kAllreduce, tensors[0], RedOp::kAvg, count);
    const c10::ScalarType dtype = tensors[0].scalar_type();
    return run_or_enqueue(c10d::OpType::ALLREDUCE_COALESCED, sig.seq, users, [=, this](Deadline dl) mutable {
      std::vector<MemoryPiece> pieces;
      for (auto& t : users) pieces.push_back({static_cast<uint8_t*>(t.data_ptr()), t.nbytes()});
      shm_allreduce(*shm_, sig, pieces, count, dtype, /*divide=*/true, dl, consume);
    }, /*on_caller=*/!async_op);
  }
  at::Tensor flat = flat_cat(tensors);
  OpSignature sig = signature(OpKind::kAllreduce, flat, RedOp::kAvg, flat.numel());
  const int world = getSize();
  return enqueue(c10d::OpType::ALLREDUCE_COALESCED, sig.seq, users, [=, this](Deadline dl) mutable {
    run_allreduce(sig, flat.data_ptr(), flat.numel(), flat.scalar_type(), dl);
    divide_by(flat, world);
    consume(0, static_cast<const uint8_t*>(flat.data_ptr()), flat.nbytes());
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::reduce(std::vector<at::Tensor>& tensors,
                                                        const c10d::ReduceOptions& opts) {
  at::Tensor given = single(tensors, "reduce");
  check_cpu(given, "reduce");
  RedOp op = to_redop(opts.reduceOp);
  int root = static_cast<int>(opts.rootRank);
  TORCH_CHECK_VALUE(root >= 0 && root < getSize(), "disttrain: reduce root ", root, " outside [0, ", getSize(), ")");
  at::Tensor user = real_view(given, op);
  reduce_kernel(user.scalar_type(), op);
  OpSignature sig = signature(OpKind::kReduce, user, op, user.numel(), root);
  bool is_root = getRank() == root;
  // Only the root's tensor receives the result; the others work on a copy.
  if (is_root) check_writable(user, "reduce", "the root's tensor");
  at::Tensor buf = is_root ? user.contiguous() : user.clone(at::MemoryFormat::Contiguous);
  int world = getSize();
  return enqueue(c10d::OpType::REDUCE, sig.seq, {given}, [=, this](Deadline dl) mutable {
    run_allreduce(sig, buf.data_ptr(), buf.numel(), buf.scalar_type(), dl);
    if (is_root) {
      if (op == RedOp::kAvg) divide_by(buf, world);
      copy_back(user, buf);
    }
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                           const c10d::BroadcastOptions& opts) {
  at::Tensor user = single(tensors, "broadcast");
  check_cpu(user, "broadcast");
  int root = static_cast<int>(opts.rootRank);
  TORCH_CHECK_VALUE(root >= 0 && root < getSize(), "disttrain: broadcast root ", root, " outside [0, ", getSize(),
                    ")");
  const bool is_root = getRank() == root;
  if (!is_root) check_writable(user, "broadcast", "the tensor");
  OpSignature sig = signature(OpKind::kBroadcast, user, RedOp::kNone, user.numel(), root);
  at::Tensor buf = user.contiguous();
  return enqueue(c10d::OpType::BROADCAST, sig.seq, {user}, [=, this](Deadline dl) mutable {
    run_broadcast(sig, buf.data_ptr(), buf.nbytes(), root, dl);
    if (!is_root) copy_back(user, buf);  // the root's tensor is read only
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                                 const c10d::AllgatherOptions&) {
  check_cpu(input, "all_gather_into_tensor");
  check_cpu(output, "all_gather_into_tensor");
  check_writable(output, "all_gather_into_tensor", "the output");
  TORCH_CHECK_VALUE(output.scalar_type() == input.scalar_type() && output.numel() == input.numel() * getSize(),
                    "disttrain: all_gather_into_tensor: output must have ", getSize(), " x ", input.numel(),
                    " elements of ", input.scalar_type(), ", got ", output.numel(), " of ", output.scalar_type());
  OpSignature sig = signature(OpKind::kAllgather, input, RedOp::kNone, input.numel());
  at::Tensor in = input.contiguous();
  at::Tensor out_user = output;
  at::Tensor out = output.contiguous();
  return enqueue(c10d::OpType::_ALLGATHER_BASE, sig.seq, {out_user}, [=, this](Deadline dl) mutable {
    run_allgather(sig, in.data_ptr(), out.data_ptr(), in.nbytes(), dl);
    copy_back(out_user, out);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                           std::vector<at::Tensor>& inputs,
                                                           const c10d::AllgatherOptions&) {
  at::Tensor input = single(inputs, "all_gather");
  check_cpu(input, "all_gather");
  TORCH_CHECK_VALUE(outputs.size() == 1 && outputs[0].size() == static_cast<size_t>(getSize()),
                    "disttrain: all_gather needs a list of ", getSize(), " output tensors");
  for (auto& o : outputs[0]) check_like(o, input, "all_gather", "an output tensor");
  for (auto& o : outputs[0]) check_writable(o, "all_gather", "an output tensor");
  OpSignature sig = signature(OpKind::kAllgather, input, RedOp::kNone, input.numel());
  at::Tensor in = input.contiguous();
  std::vector<at::Tensor> outs = outputs[0];
  int world = getSize();
  return enqueue(c10d::OpType::ALLGATHER, sig.seq, outs, [=, this](Deadline dl) mutable {
    at::Tensor flat = at::empty({in.numel() * world}, in.options());
    run_allgather(sig, in.data_ptr(), flat.data_ptr(), in.nbytes(), dl);
    split_into(flat, outs);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                                     std::vector<at::Tensor>& inputs,
                                                                     const c10d::AllgatherOptions& opts) {
  // PyTorch's convention (torch.distributed.all_gather_coalesced, gloo): outputs[r][i] receives rank r's inputs[i].
  TORCH_CHECK_VALUE(outputs.size() == static_cast<size_t>(getSize()), "disttrain: allgather_coalesced needs one "
                    "output list per rank (", getSize(), "), got ", outputs.size());
  for (const auto& per_rank : outputs)
    TORCH_CHECK_VALUE(per_rank.size() == inputs.size(), "disttrain: allgather_coalesced needs, for every rank, one "
                      "output tensor per input (", inputs.size(), "), got ", per_rank.size());
  TORCH_CHECK_VALUE(!inputs.empty(), "disttrain: allgather_coalesced needs at least one input");
  // Ops run in issue order, so the last one's completion implies the others'.
  c10::intrusive_ptr<c10d::Work> last;
  for (size_t i = 0; i < inputs.size(); ++i) {
    std::vector<std::vector<at::Tensor>> o(1);
    for (auto& per_rank : outputs) o[0].push_back(per_rank[i]);
    std::vector<at::Tensor> in{inputs[i]};
    last = allgather(o, in, opts);
  }
  return last;
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::allgather_into_tensor_coalesced(std::vector<at::Tensor>& outputs,
                                                                                 std::vector<at::Tensor>& inputs,
                                                                                 const c10d::AllgatherOptions& opts) {
  TORCH_CHECK_VALUE(outputs.size() == inputs.size() && !inputs.empty(),
                    "disttrain: allgather_into_tensor_coalesced needs one output per input");
  // Ops run in issue order, so the last one's completion implies the others'.
  c10::intrusive_ptr<c10d::Work> last;
  for (size_t i = 0; i < inputs.size(); ++i) last = _allgather_base(outputs[i], inputs[i], opts);
  return last;
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                        std::vector<at::Tensor>& inputs,
                                                        const c10d::GatherOptions& opts) {
  at::Tensor input = single(inputs, "gather");
  check_cpu(input, "gather");
  int root = static_cast<int>(opts.rootRank);
  TORCH_CHECK_VALUE(root >= 0 && root < getSize(), "disttrain: gather root ", root, " outside [0, ", getSize(), ")");
  bool is_root = getRank() == root;
  std::vector<at::Tensor> outs;
  if (is_root) {
    TORCH_CHECK_VALUE(outputs.size() == 1 && outputs[0].size() == static_cast<size_t>(getSize()),
                      "disttrain: gather needs a list of ", getSize(), " output tensors on the root");
    for (auto& o : outputs[0]) check_like(o, input, "gather", "an output tensor");
    for (auto& o : outputs[0]) check_writable(o, "gather", "an output tensor");
    outs = outputs[0];
  } else {
    TORCH_CHECK_VALUE(outputs.empty() || outputs[0].empty(), "disttrain: gather takes output tensors on the root only");
  }
  OpSignature sig = signature(OpKind::kGather, input, RedOp::kNone, input.numel(), root);
  at::Tensor in = input.contiguous();
  int world = getSize();
  return enqueue(c10d::OpType::GATHER, sig.seq, outs, [=, this](Deadline dl) mutable {
    at::Tensor flat = is_root ? at::empty({in.numel() * world}, in.options()) : at::Tensor();
    comm::gather(*transport_, sig, in.data_ptr(), is_root ? flat.data_ptr() : nullptr, in.nbytes(), root, dl);
    if (is_root) split_into(flat, outs);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::scatter(std::vector<at::Tensor>& outputs,
                                                         std::vector<std::vector<at::Tensor>>& inputs,
                                                         const c10d::ScatterOptions& opts) {
  at::Tensor output = single(outputs, "scatter");
  check_cpu(output, "scatter");
  check_writable(output, "scatter", "the output");
  int root = static_cast<int>(opts.rootRank);
  TORCH_CHECK_VALUE(root >= 0 && root < getSize(), "disttrain: scatter root ", root, " outside [0, ", getSize(), ")");
  bool is_root = getRank() == root;
  at::Tensor flat;
  if (is_root) {
    TORCH_CHECK_VALUE(inputs.size() == 1 && inputs[0].size() == static_cast<size_t>(getSize()),
                      "disttrain: scatter needs a list of ", getSize(), " input tensors on the root");
    for (auto& i : inputs[0]) check_like(i, output, "scatter", "an input tensor");
    flat = flat_cat(inputs[0]);
  }
  OpSignature sig = signature(OpKind::kScatter, output, RedOp::kNone, output.numel(), root);
  at::Tensor user = output;
  at::Tensor out = output.contiguous();
  return enqueue(c10d::OpType::SCATTER, sig.seq, {user}, [=, this](Deadline dl) mutable {
    comm::scatter(*transport_, sig, is_root ? flat.data_ptr() : nullptr, out.data_ptr(), out.nbytes(), root, dl);
    copy_back(user, out);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                      const c10d::ReduceScatterOptions& opts) {
  check_cpu(input, "reduce_scatter_tensor");
  check_cpu(output, "reduce_scatter_tensor");
  check_writable(output, "reduce_scatter", "the output");
  TORCH_CHECK_VALUE(input.scalar_type() == output.scalar_type() && input.numel() == output.numel() * getSize(),
                    "disttrain: reduce_scatter_tensor: input must have ", getSize(), " x ", output.numel(),
                    " elements of ", output.scalar_type(), ", got ", input.numel(), " of ", input.scalar_type());
  RedOp op = to_redop(opts.reduceOp);
  at::Tensor user = real_view(output, op);
  reduce_kernel(user.scalar_type(), op);
  OpSignature sig = signature(OpKind::kReduceScatter, user, op, user.numel());
  // An output overlapping the input anywhere but in its own chunk (the in-place form,
  // reduce_scatter_tensor(inp[r*n:(r+1)*n], inp)) is written while the input is still
  // being sent: reduce from a copy then (the result was silently wrong).
  const bool own_chunk = input.is_contiguous() && output.is_contiguous() &&
                         output.data_ptr() == static_cast<const char*>(input.data_ptr()) + getRank() * output.nbytes();
  at::Tensor in = at::get_overlap_status(input, output) == at::MemOverlapStatus::No || own_chunk
                      ? real_view(input, op).contiguous()
                      : real_view(input, op).clone(at::MemoryFormat::Contiguous);
  at::Tensor out = user.contiguous();
  int world = getSize();
  return enqueue(c10d::OpType::_REDUCE_SCATTER_BASE, sig.seq, {output}, [=, this](Deadline dl) mutable {
    run_reduce_scatter(sig, in.data_ptr(), out.data_ptr(), out.numel(), out.scalar_type(), dl);
    if (op == RedOp::kAvg) divide_by(out, world);
    copy_back(user, out);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                                const c10d::ReduceScatterOptions& opts) {
  at::Tensor output = single(outputs, "reduce_scatter");
  TORCH_CHECK_VALUE(inputs.size() == 1 && inputs[0].size() == static_cast<size_t>(getSize()),
                    "disttrain: reduce_scatter needs a list of ", getSize(), " input tensors");
  for (auto& i : inputs[0]) check_like(i, output, "reduce_scatter", "an input tensor");
  at::Tensor flat = flat_cat(inputs[0]);
  return _reduce_scatter_base(output, flat, opts);
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK_VALUE(outputs.size() == inputs.size() && !inputs.empty(),
                    "disttrain: reduce_scatter_tensor_coalesced needs one output per input");
  c10::intrusive_ptr<c10d::Work> last;
  for (size_t i = 0; i < inputs.size(); ++i) last = _reduce_scatter_base(outputs[i], inputs[i], opts);
  return last;
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                               std::vector<int64_t>& output_split_sizes,
                                                               std::vector<int64_t>& input_split_sizes,
                                                               const c10d::AllToAllOptions&) {
  check_cpu(input, "all_to_all_single");
  check_cpu(output, "all_to_all_single");
  check_writable(output, "all_to_all_single", "the output");
  TORCH_CHECK_VALUE(input.scalar_type() == output.scalar_type(), "disttrain: all_to_all_single: input is ",
                    input.scalar_type(), " but output is ", output.scalar_type());
  const int world = getSize();
  auto plan = [&](const at::Tensor& t, const std::vector<int64_t>& splits, const char* which) {
    std::vector<size_t> offsets(world), bytes(world);
    int64_t rows = t.dim() == 0 ? 1 : t.size(0);
    size_t row_bytes = rows == 0 ? 0 : t.nbytes() / rows;
    if (splits.empty()) {
      TORCH_CHECK_VALUE(rows % world == 0, "disttrain: all_to_all_single: ", which, " has ", rows,
                        " rows, not divisible by the world size ", world, "; pass split sizes");
    } else {
      TORCH_CHECK_VALUE(splits.size() == static_cast<size_t>(world), "disttrain: all_to_all_single: ", which,
                        " split sizes need ", world, " entries, got ", splits.size());
    }
    size_t off = 0;
    int64_t total = 0;
    for (int i = 0; i < world; ++i) {
      int64_t r = splits.empty() ? rows / world : splits[i];
      TORCH_CHECK_VALUE(r >= 0, "disttrain: all_to_all_single: negative split size ", r);
      offsets[i] = off;
      bytes[i] = static_cast<size_t>(r) * row_bytes;
      off += bytes[i];
      total += r;
    }
    TORCH_CHECK_VALUE(total == rows, "disttrain: all_to_all_single: ", which, " split sizes add up to ", total,
                      " but the tensor has ", rows, " rows");
    return std::make_pair(offsets, bytes);
  };
  auto [send_off, send_bytes] = plan(input, input_split_sizes, "input");
  auto [recv_off, recv_bytes] = plan(output, output_split_sizes, "output");
  OpSignature sig = signature(OpKind::kAlltoall, input, RedOp::kNone, 0);
  // In place (all_to_all_single(t, t), or an output overlapping the input): send from a
  // copy, since the blocks received overwrite blocks not yet sent (the result was silently wrong).
  at::Tensor in = at::get_overlap_status(input, output) == at::MemOverlapStatus::No
                      ? input.contiguous()
                      : input.clone(at::MemoryFormat::Contiguous);
  at::Tensor user = output;
  at::Tensor out = output.contiguous();
  size_t elem = input.element_size();
  return enqueue(c10d::OpType::ALLTOALL_BASE, sig.seq, {user}, [=, this](Deadline dl) mutable {
    comm::alltoall(*transport_, sig, in.data_ptr(), send_off, send_bytes, out.data_ptr(), recv_off, recv_bytes, elem,
                   dl);
    copy_back(user, out);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::alltoall(std::vector<at::Tensor>& outputs,
                                                          std::vector<at::Tensor>& inputs,
                                                          const c10d::AllToAllOptions&) {
  const int world = getSize();
  TORCH_CHECK_VALUE(inputs.size() == static_cast<size_t>(world) && outputs.size() == static_cast<size_t>(world),
                    "disttrain: all_to_all needs ", world, " input and ", world, " output tensors");
  for (auto& t : inputs) check_like(t, t, "all_to_all", "an input tensor");
  for (auto& t : outputs) {
    check_cpu(t, "all_to_all");
    check_writable(t, "all_to_all", "an output tensor");
    TORCH_CHECK_VALUE(t.scalar_type() == inputs[0].scalar_type(), "disttrain: all_to_all: mixed dtypes ",
                      t.scalar_type(), " and ", inputs[0].scalar_type());
  }
  std::vector<size_t> send_off(world), send_bytes(world), recv_off(world), recv_bytes(world);
  size_t so = 0, ro = 0;
  for (int i = 0; i < world; ++i) {
    send_off[i] = so;
    send_bytes[i] = inputs[i].nbytes();
    so += send_bytes[i];
    recv_off[i] = ro;
    recv_bytes[i] = outputs[i].nbytes();
    ro += recv_bytes[i];
  }
  at::Tensor in = flat_cat(inputs);
  OpSignature sig = signature(OpKind::kAlltoall, in, RedOp::kNone, 0);
  std::vector<at::Tensor> outs = outputs;
  size_t elem = inputs[0].element_size();
  return enqueue(c10d::OpType::ALLTOALL, sig.seq, outs, [=, this](Deadline dl) mutable {
    int64_t total = 0;
    for (auto& o : outs) total += o.numel();
    at::Tensor flat = at::empty({total}, in.options());
    comm::alltoall(*transport_, sig, in.data_ptr(), send_off, send_bytes, flat.data_ptr(), recv_off, recv_bytes, elem,
                   dl);
    split_into(flat, outs);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::send(std::vector<at::Tensor>& tensors, int dst_rank, int tag) {
  at::Tensor user = single(tensors, "send");
  check_cpu(user, "send");
  TORCH_CHECK_VALUE(dst_rank >= 0 && dst_rank < getSize() && dst_rank != getRank(), "disttrain: send to rank ",
                    dst_rank, " is invalid for rank ", getRank(), " of ", getSize());
  OpSignature sig{sent_to_[dst_rank]++, OpKind::kSend, static_cast<uint8_t>(user.scalar_type()), RedOp::kNone,
                  static_cast<uint64_t>(user.numel()), tag};
  at::Tensor buf = user.contiguous();
  if (coalescing_) return add_to_batch({true, dst_rank, sig, user, buf, nullptr, nullptr});
  return enqueue(c10d::OpType::SEND, sig.seq, {user}, [=, this](Deadline dl) {
    comm::send(*transport_, sig, buf.data_ptr(), buf.nbytes(), dst_rank, dl);
  });
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::recv(std::vector<at::Tensor>& tensors, int src_rank, int tag) {
  TORCH_CHECK_VALUE(src_rank >= 0 && src_rank < getSize() && src_rank != getRank(), "disttrain: recv from rank ",
                    src_rank, " is invalid for rank ", getRank(), " of ", getSize());
  return receive(tensors, src_rank, tag);
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  TORCH_CHECK_VALUE(getSize() > 1, "disttrain: recv from any source on a group of one rank: nobody can send it");
  return receive(tensors, -1, tag);
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::receive(std::vector<at::Tensor>& tensors, int src, int tag) {
  at::Tensor user = single(tensors, "recv");
  check_cpu(user, "recv");
  check_writable(user, "recv", "the tensor");
  // The sequence number is the pair's, counted on the progress thread when
  // the receive runs: every receive runs there, in issue order, so a receive
  // from any source posted before receives from a given rank takes its number
  // first when it matches that rank, and theirs follow.
  OpSignature sig{0, OpKind::kSend, static_cast<uint8_t>(user.scalar_type()), RedOp::kNone,
                  static_cast<uint64_t>(user.numel()), tag};
  auto match = std::make_shared<RecvMatch>();
  if (src >= 0) match->source = src;
  at::Tensor buf = user.contiguous();
  if (coalescing_) {
    TORCH_CHECK_VALUE(src >= 0, "disttrain: a receive from any source cannot be part of a coalescing block ",
                      "(batch_isend_irecv): name the sender");
    return add_to_batch({false, src, sig, user, buf, nullptr, match});
  }
  const c10d::OpType type = src >= 0 ? c10d::OpType::RECV : c10d::OpType::RECVANYSOURCE;
  return enqueue(type, 0, {user}, [=, this](Deadline dl) mutable {
    const int from = src >= 0 ? src : transport_->first_sender(sig, dl);
    sig.seq = received_from_[from]++;
    match->seq = sig.seq;
    match->numbered = true;
    match->source = from;
    comm::recv(*transport_, sig, buf.data_ptr(), buf.nbytes(), from, dl);
    copy_back(user, buf);
  }, match);
}

void DisttrainBackend::startCoalescing() {
  TORCH_CHECK(!coalescing_, "disttrain: a coalescing block (batch_isend_irecv) began inside another one");
  coalescing_ = true;
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::add_to_batch(BatchedMessage m) {
  m.work = c10::make_intrusive<DisttrainWork>(getRank(), m.send ? c10d::OpType::SEND : c10d::OpType::RECV,
                                              m.sig.seq, std::vector<at::Tensor>{m.user}, Task(),
                                              /*eager_future=*/true, m.match);
  m.work->set_batched(true);
  batch_.push_back(m);
  return m.work;
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::endCoalescing() {
  TORCH_CHECK(coalescing_, "disttrain: endCoalescing without startCoalescing");
  coalescing_ = false;
  auto batch = std::make_shared<std::vector<BatchedMessage>>(std::move(batch_));
  batch_.clear();
  std::vector<at::Tensor> received;
  std::vector<c10::intrusive_ptr<DisttrainWork>> members;
  for (auto& m : *batch) {
    if (!m.send) received.push_back(m.user);
    m.work->set_batched(false);
    members.push_back(m.work);
  }
  auto task = [=, this](Deadline dl) {
    if (batch->empty()) return;
    std::vector<SendSpec> sends;
    std::vector<RecvSpec> recvs;
    for (auto& m : *batch) {
      if (m.send) {
        sends.push_back({m.peer, m.buf.data_ptr(), m.buf.nbytes(), m.sig.count, nullptr, &m.sig});
      } else {
        // Numbered here, in issue order, as a lone receive is when it runs.
        m.sig.seq = received_from_[m.peer]++;
        m.match->seq = m.sig.seq;
        m.match->numbered = true;
        RecvSpec r{m.peer, m.buf.data_ptr(), m.buf.nbytes(), m.sig.count};
        r.sig = &m.sig;
        recvs.push_back(r);
      }
    }
    transport_->exchange(FrameKind::kPointToPoint, batch->front().sig, 0, sends, recvs, dl);
    for (auto& m : *batch)
      if (!m.send) copy_back(m.user, m.buf);
  };
  try {
    return enqueue(c10d::OpType::COALESCED, next_seq_, received, task, nullptr, members);
  } catch (...) {
    for (auto& m : members) m->complete(std::current_exception());  // never queued: fail them as well
    throw;
  }
}

c10::intrusive_ptr<c10d::Work> DisttrainBackend::barrier(const c10d::BarrierOptions&) {
  OpSignature sig{next_seq_++, OpKind::kBarrier, static_cast<uint8_t>(at::kByte), RedOp::kSum, 0, 0};
  return enqueue(c10d::OpType::BARRIER, sig.seq, {}, [=, this](Deadline dl) {
    // Over TCP: an empty all-reduce.
    auto tcp_barrier = [&](TcpTransport& t) {
      recursive_doubling_allreduce(t, sig, nullptr, 0, 1, reduce_kernel(at::kByte, RedOp::kSum), dl);
    };
    if (hierarchical_) {
      // Within the host, across the leaders, then released within the host:
      // the same path as all-reduce, so a rank in a barrier meets a peer in an
      // all-reduce (or the reverse) with a mismatch error, not a timeout.
      if (shm_) shm_barrier(*shm_, sig, dl);
      if (leaders_) tcp_barrier(*leaders_);
      if (shm_) shm_barrier(*shm_, sig, dl);
    } else if (shm_) {
      shm_barrier(*shm_, sig, dl);
    } else if (getSize() > 1) {
      tcp_barrier(*transport_);
    }
  });
}

}  // namespace disttrain::comm
