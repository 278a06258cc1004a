// Reuse of large CPU memory blocks inside a training step.
//
// On Linux a tensor of more than 32 MiB is an mmap of fresh pages; writing it
// faults each 4 KiB page in (the kernel zeroes it first), and freeing it
// unmaps the pages again. A step that allocates such tensors every time (the
// weight gradients backward produces, each step) pays that again every step:
// on the 2-core VM of the benchmarks, 17 ms of CPU per 37 MB gradient against
// 2 ms to write memory already mapped (docs/mpi.md).
//
// StepMemory takes the place of torch's default CPU allocator, once per
// process (only if no other allocator took it). Outside a scope it allocates
// as the default one does (c10::alloc_cpu; not reported to torch's memory
// profiler). Inside a scope (a thread-local depth,
// so other threads are not affected) an allocation of at least `min_bytes`
// takes a free block it freed before (the smallest that fits, wasting at most
// an eighth) or a new one; such a block, when its tensor dies (on any thread,
// in a scope or not), goes back to a free list, unless the free list would
// then hold more than `max_cached_bytes`, in which case it is freed. So the
// next step's gradients land in pages already mapped. Only memory management
// changes: the values computed are the same bits.
//
// Not a general caching allocator: the blocks kept are bounded, the scope is
// explicit (disttrain.strategies.mpi.GradientAverager opens it for backward),
// and release() hands every free block back to the system.
#pragma once

#include <cstddef>
#include <cstdint>

namespace disttrain::strategies {

struct StepMemoryStats {
  bool installed = false;      // the CPU allocator is wrapped (false: scopes reuse nothing)
  uint64_t reused = 0;         // scoped allocations served from a free block
  uint64_t fresh = 0;          // scoped allocations that took new memory
  uint64_t cached_bytes = 0;   // bytes in free blocks now
  uint64_t live_bytes = 0;     // bytes of scoped blocks in use now
  uint64_t max_cached_bytes = 0;
  uint64_t min_bytes = 0;
};

// Installs the allocator (once per process; later calls do nothing). Returns
// whether it is the CPU allocator now (false when another one had replaced
// torch's default: then scopes are harmless and reuse nothing).
bool step_memory_install();
// Free blocks kept at most (bytes; the largest value asked for is kept) and
// the smallest allocation handled (bytes).
void step_memory_limits(uint64_t max_cached_bytes, uint64_t min_bytes);
// Opens / closes a scope on the calling thread (they nest).
void step_memory_enter();
void step_memory_exit();
int step_memory_depth();
// Frees every free block; blocks in use are freed when their tensors die.
void step_memory_release();
StepMemoryStats step_memory_stats();

}  // namespace disttrain::strategies
