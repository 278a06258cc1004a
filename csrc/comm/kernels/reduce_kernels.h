// Element-wise reduction kernels: dst[i] = op(a[i], b[i]) for n elements.
// dst may alias a. Half and BFloat16 are combined in float and rounded once.
#pragma once
#include <c10/core/ScalarType.h>
#include <cstddef>

#include "comm/op_signature.h"

// Plain loops that GCC vectorises; target_clones gives one copy per ISA and a
// runtime dispatcher, so a shipped build never assumes more than SSE2.
#define DISTTRAIN_KERNEL_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))

namespace disttrain::comm {

using ReduceFn = void (*)(void* dst, const void* a, const void* b, size_t n);

// Returns the kernel for (dtype, op); throws a c10::Error naming both when the
// combination is not supported (e.g. BAND on float32). AVG reduces as SUM: the
// caller divides once at the end.
ReduceFn reduce_kernel(c10::ScalarType dtype, RedOp op);

// Which instruction set the kernels dispatch to on this CPU ("avx512f", "avx2", "sse2").
const char* reduce_kernel_isa();

}  // namespace disttrain::comm
