// CRC-32C (Castagnoli), the checksum of the snapshot format. Uses the SSE4.2
// crc32 instruction when the CPU has it (checked once at run time, so the
// binary still runs on any x86-64 or non-x86 machine) and slicing-by-8 tables
// otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace disttrain::snapshot {

// Extends `crc` (the value returned for the bytes before) over `data`.
// crc32c_update(0, p, n) is the CRC-32C of n bytes at p.
uint32_t crc32c_update(uint32_t crc, const void* data, size_t length);

// The CRC of A followed by B, from crc(A), crc(B) and len(B): lets the file
// checksum be assembled from per-tensor checksums without a second pass.
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b);

// "sse4.2" or "software": which implementation crc32c_update uses here.
const char* crc32c_implementation();

}  // namespace disttrain::snapshot
