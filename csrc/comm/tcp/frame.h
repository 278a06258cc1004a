// Wire format of the TCP transport: every message is a sequence of frames,
// each a fixed header followed by `len` payload bytes. The header repeats the
// whole operation signature so that any disagreement between two ranks is
// caught on the first frame, before a byte of payload is interpreted.
#pragma once
#include <cstdint>

namespace disttrain::comm {

constexpr uint32_t kFrameMagic = 0x31465444;      // "DTF1"
constexpr uint32_t kHelloMagic = 0x4c454844;      // "DHEL"
constexpr uint32_t kMaxFramePayload = 1u << 20;   // frames above this are rejected
constexpr uint32_t kDefaultChunkBytes = 1u << 20;  // measured: fewer wake-ups beat finer overlap

enum class FrameKind : uint8_t { kCollective = 1, kPointToPoint = 2 };

#pragma pack(push, 1)
struct FrameHeader {
  uint32_t magic;
  uint8_t kind;
  uint8_t op;
  uint8_t dtype;
  uint8_t redop;
  uint64_t seq;
  uint64_t count;
  int64_t aux;
  uint32_t step;
  uint32_t len;
};

// First bytes a connecting rank sends; the job secret proves it belongs here.
struct HelloMessage {
  uint32_t magic;
  uint32_t rank;
  uint32_t world_size;
  uint8_t secret[16];
};
#pragma pack(pop)

static_assert(sizeof(FrameHeader) == 40, "frame header layout");

}  // namespace disttrain::comm
