// Reading and writing the two index files of a dataset prefix (layout in shard_format.h).
#include "shard_format.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace megasail {

namespace {

constexpr size_t kDirectWriteBytes = 64u << 10;  // writes this large bypass the buffer
constexpr size_t kCopyChunkBytes = 8u << 20;     // read/write fallback of append_file
constexpr size_t kPointerChunk = 1u << 16;  // pointers are computed and written in chunks, not stored

std::string errno_text() { return std::strerror(errno); }

template <typename T>
void write_array(OutputFile& out, const std::vector<T>& values, bool pad_to_8) {
  out.write(values.data(), values.size() * sizeof(T));
  if (pad_to_8) out.write_zeros(padding_to_8(values.size() * sizeof(T)));
}

std::vector<char> read_whole_file(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) throw IoError("cannot open " + path + ": " + errno_text());
  std::vector<char> bytes;
  char chunk[1 << 16];
  size_t got;
  while ((got = std::fread(chunk, 1, sizeof(chunk), f)) > 0) bytes.insert(bytes.end(), chunk, chunk + got);
  const bool failed = std::ferror(f);
  std::fclose(f);
  if (failed) throw IoError("cannot read " + path);
  return bytes;
}

uint64_t file_size(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw IoError("cannot stat " + path + ": " + errno_text());
  return static_cast<uint64_t>(st.st_size);
}

// Sequential reader over a byte buffer that names the file when it runs short.
class ByteReader {
 public:
  ByteReader(const std::vector<char>& bytes, const std::string& path) : bytes_(bytes), path_(path) {}

  template <typename T>
  T scalar() {
    T value;
    take(&value, sizeof(T));
    return value;
  }
  template <typename T>
  void array(std::vector<T>& out, uint64_t count, bool padded) {
    if (count > (bytes_.size() - pos_) / sizeof(T)) fail("truncated");
    out.resize(count);
    take(out.data(), count * sizeof(T));
    if (padded) skip(padding_to_8(count * sizeof(T)));
  }
  void skip(size_t n) {
    if (n > bytes_.size() - pos_) fail("truncated");
    pos_ += n;
  }
  void take(void* dst, size_t n) {
    if (n > bytes_.size() - pos_) fail("truncated");
    std::memcpy(dst, bytes_.data() + pos_, n);
    pos_ += n;
  }
  bool at_end() const { return pos_ == bytes_.size(); }
  [[noreturn]] void fail(const std::string& what) const { throw std::invalid_argument(path_ + ": " + what); }

 private:
  const std::vector<char>& bytes_;
  const std::string& path_;
  size_t pos_ = 0;
};

}  // namespace

size_t padding_to_8(size_t bytes) { return (8 - bytes % 8) % 8; }

std::string token_bin_path(const std::string& prefix) { return prefix + ".bin"; }
std::string token_idx_path(const std::string& prefix) { return prefix + ".idx"; }
std::string image_bin_path(const std::string& prefix) { return prefix + ".img.bin"; }
std::string image_idx_path(const std::string& prefix) { return prefix + ".img.idx"; }
std::string tmp_path(const std::string& path) { return path + ".tmp"; }

OutputFile::OutputFile(const std::string& path, Kind kind, size_t buffer_bytes)
    : path_(path), buffer_(std::max<size_t>(buffer_bytes, 4096)) {
  const int access = kind == Kind::kSpill ? O_RDWR : O_WRONLY;  // a spill file is read back
  fd_ = ::open(path.c_str(), access | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  if (fd_ < 0) throw IoError("cannot create " + path + ": " + errno_text());
  if (kind == Kind::kSpill && ::unlink(path.c_str()) != 0) {
    const std::string what = "cannot unlink scratch file " + path + ": " + errno_text();
    close_quietly();
    throw IoError(what);
  }
}

OutputFile::~OutputFile() { close_quietly(); }

// Write head then data (either may be empty) with as few system calls as the kernel allows.
void OutputFile::write_fd(const void* head, size_t head_size, const void* data, size_t size) {
  iovec iov[2] = {{const_cast<void*>(head), head_size}, {const_cast<void*>(data), size}};
  iovec* next = iov;
  int count = 2;
  while (count > 0) {
    if (next->iov_len == 0) {
      ++next;
      --count;
      continue;
    }
    const ssize_t n = ::writev(fd_, next, count);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw IoError("cannot write " + path_ + ": " + errno_text());
    }
    size_t done = static_cast<size_t>(n);
    while (count > 0 && done >= next->iov_len) {
      done -= next->iov_len;
      ++next;
      --count;
    }
    if (count > 0) {
      next->iov_base = static_cast<char*>(next->iov_base) + done;
      next->iov_len -= done;
    }
  }
}

void OutputFile::flush() {
  if (used_) write_fd(buffer_.data(), used_, nullptr, 0);
  used_ = 0;
}

void OutputFile::write(const void* data, size_t size) {
  if (fd_ < 0) throw IoError("write to closed file " + path_);
  if (size == 0) return;
  size_ += size;
  if (size >= kDirectWriteBytes) {  // straight from the caller's memory, after what is buffered
    const size_t buffered = used_;
    used_ = 0;
    write_fd(buffer_.data(), buffered, data, size);
    return;
  }
  if (size > buffer_.size() - used_) flush();
  std::memcpy(buffer_.data() + used_, data, size);
  used_ += size;
}

void OutputFile::write_zeros(size_t size) {
  static const char zeros[8] = {};
  while (size) {
    const size_t n = std::min(size, sizeof(zeros));
    write(zeros, n);
    size -= n;
  }
}

void OutputFile::append_file(const std::string& path, uint64_t expected_size) {
  if (fd_ < 0) throw IoError("write to closed file " + path_);
  const int in = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) throw IoError("cannot open " + path + ": " + errno_text());
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{in};
  struct stat st;
  if (::fstat(in, &st) != 0) throw IoError("cannot stat " + path + ": " + errno_text());
  if (static_cast<uint64_t>(st.st_size) != expected_size)
    throw IoError("cannot read " + path + " (or it changed during the merge)");
  copy_from(in, path, expected_size);
}

void OutputFile::append_spill(OutputFile& spill) {
  if (fd_ < 0) throw IoError("write to closed file " + path_);
  if (spill.fd_ < 0) throw IoError("read of closed scratch file " + spill.path_);
  spill.flush();
  copy_from(spill.fd_, spill.path_, spill.size_);
}

void OutputFile::copy_from(int in, const std::string& in_path, uint64_t size) {
  flush();
  size_ += size;
  uint64_t done = 0;  // explicit offsets: the source's own file position is neither used nor moved
#ifdef __linux__
  // In-kernel copy: no round trip of the bytes through user memory. Falls back to pread/write
  // where the file systems (or an old kernel) refuse it; a refused call has copied nothing.
  while (done < size) {
    auto offset = static_cast<off_t>(done);
    const ssize_t n = ::copy_file_range(in, &offset, fd_, nullptr, std::min<uint64_t>(size - done, 1u << 30), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP || errno == EBADF ||
                  errno == EPERM))
      break;  // the pread/write loop below copies the rest
    if (n < 0) throw IoError("cannot copy " + in_path + " to " + path_ + ": " + errno_text());
    if (n == 0) throw IoError("cannot read " + in_path + " (or it changed during the merge)");
    done += static_cast<uint64_t>(n);
  }
#endif
  if (done == size) return;
  std::vector<char> chunk(std::min<uint64_t>(size - done, kCopyChunkBytes));
  while (done < size) {
    const ssize_t n = ::pread(in, chunk.data(), std::min<uint64_t>(size - done, chunk.size()), static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw IoError("cannot read " + in_path + " (or it changed during the merge)");
    write_fd(chunk.data(), static_cast<size_t>(n), nullptr, 0);
    done += static_cast<uint64_t>(n);
  }
}

void OutputFile::start_writeback() {
#ifdef __linux__
  if (fd_ < 0) return;
  flush();
  ::sync_file_range(fd_, 0, 0, SYNC_FILE_RANGE_WRITE);  // a hint: its failure changes nothing
#endif
}

void OutputFile::close(bool sync) {
  if (fd_ < 0) return;
  bool ok = true;
  std::string what;
  try {
    flush();
  } catch (const IoError& e) {
    ok = false;
    what = e.what();
  }
  if (ok && sync && ::fsync(fd_) != 0) {
    ok = false;
    what = "cannot fsync " + path_ + ": " + errno_text();
  }
  if (::close(fd_) != 0 && ok) {
    ok = false;
    what = "cannot close " + path_ + ": " + errno_text();
  }
  fd_ = -1;
  if (!ok) throw IoError(what);
}

void OutputFile::close_quietly() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  used_ = 0;
}

void write_token_index_header(OutputFile& out, uint64_t num_segments, uint64_t doc_index_length) {
  out.write(kTokenIndexMagic, sizeof(kTokenIndexMagic));
  out.write(&kTokenIndexVersion, 8);
  out.write(&kTokenDtypeCodeInt32, 1);
  out.write(&num_segments, 8);
  out.write(&doc_index_length, 8);  // megatron-core stores D+1 here
}

void write_image_index_header(OutputFile& out, uint64_t num_images, uint64_t num_samples) {
  out.write(kImageIndexMagic, sizeof(kImageIndexMagic));
  const uint64_t header[3] = {kImageIndexVersion, num_images, num_samples};
  out.write(header, sizeof(header));
}

void write_token_index(const std::string& path, const ShardIndex& index, bool sync) {
  OutputFile out(path);
  write_token_index_header(out, index.segment_lengths.size(), index.doc_index.size());
  write_array(out, index.segment_lengths, false);
  std::vector<int64_t> pointers;
  pointers.reserve(std::min<size_t>(kPointerChunk, index.segment_lengths.size()));
  int64_t pointer = 0;
  for (size_t start = 0; start < index.segment_lengths.size(); start += kPointerChunk) {
    const size_t end = std::min(index.segment_lengths.size(), start + kPointerChunk);
    pointers.clear();
    for (size_t s = start; s < end; ++s) {
      pointers.push_back(pointer);
      pointer += int64_t{index.segment_lengths[s]} * int64_t{sizeof(int32_t)};
    }
    write_array(out, pointers, false);
  }
  write_array(out, index.doc_index, false);
  write_array(out, index.segment_modes, false);
  out.close(sync);
}

void write_image_index(const std::string& path, const ShardIndex& index, bool sync) {
  OutputFile out(path);
  write_image_index_header(out, index.num_images(), index.num_samples());
  write_array(out, index.image_offsets, true);
  write_array(out, index.image_sizes, true);
  write_array(out, index.doc_image_start, true);
  write_array(out, index.image_widths, true);
  write_array(out, index.image_heights, true);
  write_array(out, index.image_crc32, true);
  write_array(out, index.doc_source, true);
  write_array(out, index.image_formats, true);
  out.close(sync);
}

ShardIndex read_shard_index(const std::string& prefix) {
  ShardIndex index;
  {
    const std::string path = token_idx_path(prefix);
    const std::vector<char> bytes = read_whole_file(path);
    ByteReader in(bytes, path);
    char magic[sizeof(kTokenIndexMagic)];
    in.take(magic, sizeof(magic));
    if (std::memcmp(magic, kTokenIndexMagic, sizeof(magic)) != 0) in.fail("not an MMIDIDX index");
    if (in.scalar<uint64_t>() != kTokenIndexVersion) in.fail("unsupported MMIDIDX version");
    if (in.scalar<uint8_t>() != kTokenDtypeCodeInt32) in.fail("token dtype is not int32");
    const uint64_t sequence_count = in.scalar<uint64_t>();
    const uint64_t doc_index_length = in.scalar<uint64_t>();
    if (doc_index_length < 1) in.fail("empty document index");
    in.array(index.segment_lengths, sequence_count, false);
    std::vector<int64_t> pointers;
    in.array(pointers, sequence_count, false);
    in.array(index.doc_index, doc_index_length, false);
    in.array(index.segment_modes, sequence_count, false);
    if (!in.at_end()) in.fail("unexpected bytes after the modes (not a multimodal index?)");
    int64_t expected_pointer = 0;
    for (uint64_t s = 0; s < sequence_count; ++s) {
      if (pointers[s] != expected_pointer || index.segment_lengths[s] < 0) in.fail("segments are not contiguous");
      expected_pointer += int64_t{index.segment_lengths[s]} * 4;
    }
    index.num_tokens = static_cast<uint64_t>(expected_pointer) / 4;
    if (index.doc_index.front() != 0 || index.doc_index.back() != static_cast<int64_t>(sequence_count) ||
        !std::is_sorted(index.doc_index.begin(), index.doc_index.end()))
      in.fail("document index is not a monotone 0..S range");
  }
  {
    const std::string path = image_idx_path(prefix);
    const std::vector<char> bytes = read_whole_file(path);
    ByteReader in(bytes, path);
    char magic[sizeof(kImageIndexMagic)];
    in.take(magic, sizeof(magic));
    if (std::memcmp(magic, kImageIndexMagic, sizeof(magic)) != 0) in.fail("not an MSIMGIDX index");
    if (in.scalar<uint64_t>() != kImageIndexVersion) in.fail("unsupported MSIMGIDX version");
    const uint64_t num_images = in.scalar<uint64_t>();
    const uint64_t num_docs = in.scalar<uint64_t>();
    if (num_docs != index.num_samples()) in.fail("sample count disagrees with " + token_idx_path(prefix));
    in.array(index.image_offsets, num_images, true);
    in.array(index.image_sizes, num_images, true);
    in.array(index.doc_image_start, num_docs + 1, true);
    in.array(index.image_widths, num_images, true);
    in.array(index.image_heights, num_images, true);
    in.array(index.image_crc32, num_images, true);
    in.array(index.doc_source, num_docs, true);
    in.array(index.image_formats, num_images, true);
    if (!in.at_end()) in.fail("unexpected trailing bytes");
    for (uint64_t m = 0; m < num_images; ++m) {
      if (index.image_offsets[m] != index.image_bytes) in.fail("images are not contiguous");
      index.image_bytes += index.image_sizes[m];
    }
    if (index.doc_image_start.front() != 0 || index.doc_image_start.back() != num_images ||
        !std::is_sorted(index.doc_image_start.begin(), index.doc_image_start.end()))
      in.fail("per-sample image ranges are not a monotone 0..M range");
  }
  if (file_size(token_bin_path(prefix)) != index.num_tokens * 4)
    throw std::invalid_argument(token_bin_path(prefix) + ": size disagrees with its index");
  if (file_size(image_bin_path(prefix)) != index.image_bytes)
    throw std::invalid_argument(image_bin_path(prefix) + ": size disagrees with its index");
  return index;
}

void publish_prefix(const std::string& prefix, bool sync) {
  // Indexes last: a reader that finds both indexes finds the data files they describe.
  for (const std::string& path :
       {token_bin_path(prefix), image_bin_path(prefix), image_idx_path(prefix), token_idx_path(prefix)}) {
    if (std::rename(tmp_path(path).c_str(), path.c_str()) != 0)
      throw IoError("cannot rename " + tmp_path(path) + " to " + path + ": " + errno_text());
  }
  if (!sync) return;
  // renames are durable only once the directory entry is on disk
  const size_t slash = prefix.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : prefix.substr(0, slash));
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) throw IoError("cannot open directory " + dir + " to fsync it: " + errno_text());
  const int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) throw IoError("cannot fsync directory " + dir + ": " + errno_text());
}

void remove_tmp_files(const std::string& prefix) noexcept {
  for (const std::string& path :
       {token_bin_path(prefix), image_bin_path(prefix), image_idx_path(prefix), token_idx_path(prefix)})
    std::remove(tmp_path(path).c_str());
}

}  // namespace megasail
