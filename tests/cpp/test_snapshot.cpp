// C++ unit tests of the snapshot format: CRC-32C, round trip, corruption and
// write errors, the async writer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <fstream>
#include <string>

#include "snapshot/async_snapshot_writer.h"
#include "snapshot/crc32c.h"
#include "snapshot/snapshot_io.h"

using namespace disttrain::snapshot;

namespace {

// A fresh folder under `parent` ($TMPDIR, else /tmp), removed with everything
// in it at the end of the test. When it cannot be created the test fails
// (the constructor throws): it never falls back to an existing folder, which
// the destructor would then delete.
struct TempDir {
  std::string path;
  explicit TempDir(const char* parent = nullptr) {
    if (parent == nullptr) parent = std::getenv("TMPDIR");
    if (parent == nullptr || *parent == '\0') parent = "/tmp";
    std::string tmpl = std::string(parent) + "/disttrain-snapshot-test-XXXXXX";
    if (::mkdtemp(&tmpl[0]) == nullptr)
      throw std::runtime_error("TempDir: mkdtemp('" + tmpl + "') failed: " + std::strerror(errno));
    path = tmpl;
  }
  ~TempDir() {
    if (!path.empty()) std::filesystem::remove_all(path);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

std::vector<NamedTensor> sample_tensors() {
  return {{"w", at::arange(1000, at::kFloat)}, {"b", at::ones({7}, at::kDouble)}, {"n", at::zeros({0, 3}, at::kLong)}};
}

}  // namespace

TEST(TempDirFixture, FailsInsteadOfFallingBackWhenMkdtempFails) {
  // A parent that does not exist: mkdtemp fails; the fixture must throw (a
  // failed test), not hand out an existing folder such as /tmp to delete.
  const std::string parent = "/nonexistent-disttrain-parent";
  ASSERT_NE(::access(parent.c_str(), F_OK), 0);
  EXPECT_THROW(TempDir{parent.c_str()}, std::runtime_error);
  TempDir ok;
  EXPECT_EQ(ok.path.rfind("/disttrain-snapshot-test-"), ok.path.size() - 31);
  EXPECT_TRUE(std::filesystem::is_directory(ok.path));
}

TEST(Snapshot, ErrorsAfterTheRenameDoNotClaimThePreviousFileIsUntouched) {
  TempDir tmp;
  const std::string path = tmp.path + "/s.dts";
  write_snapshot(path, "{\"old\":1}", sample_tensors());
  WriteOptions options;
  options.fail_directory_fsync = true;
  try {
    write_snapshot(path, "{\"new\":1}", sample_tensors(), options);
    FAIL() << "the injected directory fsync failure was not reported";
  } catch (const SnapshotWriteError& e) {
    EXPECT_TRUE(e.replaced_target());
    EXPECT_EQ(e.error_number(), EIO);
    EXPECT_EQ(std::string(e.what()).find("untouched"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_snapshot(path).metadata, "{\"new\":1}");
}

TEST(Snapshot, ReadErrorsAndOtherVersionsAreNotCorruption) {
  TempDir tmp;
  EXPECT_THROW(read_snapshot(tmp.path), SnapshotReadError);  // a folder: read() fails with EISDIR
  const std::string path = tmp.path + "/s.dts";
  write_snapshot(path, "{}", sample_tensors());
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  char header[128];
  f.read(header, sizeof(header));
  uint32_t version = 7, crc = 0;
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &crc, 4);
  crc = crc32c_update(0, header, sizeof(header));
  std::memcpy(header + 12, &crc, 4);
  f.seekp(0);
  f.write(header, sizeof(header));
  f.close();
  try {
    read_snapshot(path);
    FAIL() << "version 7 was read";
  } catch (const UnsupportedSnapshotError& e) {
    EXPECT_EQ(e.version(), 7u);
    EXPECT_EQ(e.path(), path);
  }
}

TEST(Crc32c, CheckValueAndCombine) {
  EXPECT_EQ(crc32c_update(0, "123456789", 9), 0xE3069283u);
  std::string data(100000, '\0');
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<char>(i * 131 + 7);
  const uint32_t whole = crc32c_update(0, data.data(), data.size());
  for (size_t cut : {size_t(0), size_t(1), size_t(4099), size_t(99999), data.size()}) {
    const uint32_t a = crc32c_update(0, data.data(), cut);
    const uint32_t b = crc32c_update(0, data.data() + cut, data.size() - cut);
    EXPECT_EQ(crc32c_combine(a, b, data.size() - cut), whole) << "cut at " << cut;
    EXPECT_EQ(crc32c_update(a, data.data() + cut, data.size() - cut), whole);
  }
}

TEST(Snapshot, RoundTrip) {
  TempDir dir;
  const std::string path = dir.path + "/s.dts";
  write_snapshot(path, "{\"k\":1}", sample_tensors());
  Snapshot s = read_snapshot(path);
  EXPECT_EQ(s.metadata, "{\"k\":1}");
  ASSERT_EQ(s.tensors.size(), 3u);
  auto expected = sample_tensors();
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(s.tensors[i].name, expected[i].name);
    EXPECT_TRUE(at::equal(s.tensors[i].tensor, expected[i].tensor));
  }
}

TEST(Snapshot, BitFlipNamesTensor) {
  TempDir dir;
  const std::string path = dir.path + "/s.dts";
  write_snapshot(path, "{}", {{"first", at::ones({4096}, at::kFloat)}});
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(4096 + 100);  // inside the tensor data, which starts at 4096
  f.put('\x55');
  f.close();
  try {
    read_snapshot(path);
    FAIL() << "corruption not detected";
  } catch (const CorruptSnapshotError& e) {
    EXPECT_EQ(e.tensor(), "first");
    EXPECT_EQ(e.path(), path);
  }
}

TEST(Snapshot, TruncatedAndInjectedEnospc) {
  TempDir tmp;
  const std::string path = tmp.path + "/s.dts";
  write_snapshot(path, "{}", sample_tensors());
  ASSERT_EQ(::truncate(path.c_str(), 4200), 0);
  EXPECT_THROW(read_snapshot(path), CorruptSnapshotError);

  write_snapshot(path, "{\"old\":1}", sample_tensors());
  WriteOptions options;
  options.fail_after_bytes = 100;
  EXPECT_THROW(write_snapshot(path, "{\"new\":1}", sample_tensors(), options), SnapshotWriteError);
  EXPECT_EQ(read_snapshot(path).metadata, "{\"old\":1}");
}

TEST(AsyncSnapshotWriter, ErrorSurfacesOnWaitAndOldFilesGoAfterCommit) {
  TempDir tmp;
  const std::string& dir = tmp.path;
  AsyncSnapshotWriter writer;
  writer.save(dir + "/a.dts", "{}", sample_tensors(), {}, WriteOptions{});
  writer.wait();
  WriteOptions failing;
  failing.fail_after_bytes = 10;
  writer.save(dir + "/b.dts", "{}", sample_tensors(), {dir + "/a.dts"}, failing);
  EXPECT_THROW(writer.wait(), SnapshotWriteError);
  EXPECT_EQ(::access((dir + "/a.dts").c_str(), F_OK), 0);  // kept: the new one never committed
  at::Tensor live = at::ones({1 << 16});
  writer.save(dir + "/c.dts", "{}", {{"live", live}}, {dir + "/a.dts"}, WriteOptions{}, /*copy_in_background=*/true);
  writer.wait_staged();
  live.fill_(5);  // after staging: the file holds the value at save time
  writer.wait();
  EXPECT_NE(::access((dir + "/a.dts").c_str(), F_OK), 0);
  EXPECT_TRUE(at::equal(read_snapshot(dir + "/c.dts").tensors[0].tensor, at::ones({1 << 16})));
}
