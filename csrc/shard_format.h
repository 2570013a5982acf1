// On-disk layout of one dataset prefix (docs/data_format.md is the full description).
//
//   PREFIX.bin      int32 tokens of every segment, back to back
//   PREFIX.idx      megatron-core MMIDIDX v1 index, multimodal (one int8 mode per segment)
//   PREFIX.img.bin  encoded image bytes, back to back
//   PREFIX.img.idx  MSIMGIDX v1 image index
//
// ShardIndex holds both indexes of one shard in memory; the writer fills it sample by sample and
// write_* turn it into the two index files. The merger never holds a merged ShardIndex: it streams
// each index array to its own unlinked file and joins them after the write_*_header functions.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace megasail {

constexpr char kTokenIndexMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kTokenIndexVersion = 1;
constexpr uint8_t kTokenDtypeCodeInt32 = 4;  // megatron-core DType.int32
constexpr char kImageIndexMagic[8] = {'M', 'S', 'I', 'M', 'G', 'I', 'D', 'X'};
constexpr uint64_t kImageIndexVersion = 1;

enum SegmentMode : int8_t { kPrompt = 0, kTarget = 1, kImage = 2 };
enum ImageFormat : uint8_t { kJpeg = 1, kPng = 2, kOtherFormat = 3 };

// A file-system failure; the bindings raise it as Python's OSError.
struct IoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct ShardIndex {
  // token index (PREFIX.idx): one entry per segment, document d = segments doc_index[d]..doc_index[d+1]
  std::vector<int32_t> segment_lengths;
  std::vector<int8_t> segment_modes;
  std::vector<int64_t> doc_index{0};
  // image index (PREFIX.img.idx): one entry per image; sample d owns doc_image_start[d]..[d+1]
  std::vector<uint64_t> image_offsets;
  std::vector<uint64_t> image_sizes;
  std::vector<uint64_t> doc_image_start{0};
  std::vector<uint32_t> image_widths;
  std::vector<uint32_t> image_heights;
  std::vector<uint32_t> image_crc32;
  std::vector<uint32_t> doc_source;
  std::vector<uint8_t> image_formats;
  uint64_t num_tokens = 0;   // sum of segment_lengths
  uint64_t image_bytes = 0;  // sum of image_sizes

  uint64_t num_samples() const { return doc_index.size() - 1; }
  uint64_t num_images() const { return image_sizes.size(); }
};

std::string token_bin_path(const std::string& prefix);  // PREFIX.bin
std::string token_idx_path(const std::string& prefix);  // PREFIX.idx
std::string image_bin_path(const std::string& prefix);  // PREFIX.img.bin
std::string image_idx_path(const std::string& prefix);  // PREFIX.img.idx
std::string tmp_path(const std::string& path);          // PATH.tmp

// Write PREFIX.idx / PREFIX.img.idx contents of `index` to `path` (no rename); fsync when `sync`.
void write_token_index(const std::string& path, const ShardIndex& index, bool sync = true);
void write_image_index(const std::string& path, const ShardIndex& index, bool sync = true);

class OutputFile;
// The bytes in front of the arrays of PREFIX.idx (S segments, D + 1 document index entries) and of
// PREFIX.img.idx (M images, D samples).
void write_token_index_header(OutputFile& out, uint64_t num_segments, uint64_t doc_index_length);
void write_image_index_header(OutputFile& out, uint64_t num_images, uint64_t num_samples);
// Zero bytes that pad an array of `bytes` bytes to a multiple of 8 (the image index aligns its arrays).
size_t padding_to_8(size_t bytes);

// Read both index files of a finished prefix; checks magic, version, dtype and sizes.
ShardIndex read_shard_index(const std::string& prefix);

// Rename PATH.tmp -> PATH for the four files of `prefix`, data files first, indexes last.
void publish_prefix(const std::string& prefix, bool sync);  // sync: fsync the directory after the renames
// Remove whatever PATH.tmp files of `prefix` exist; never throws.
void remove_tmp_files(const std::string& prefix) noexcept;

// Output file descriptor with its own write buffer; every failure throws IoError naming the path.
// Small writes (tokens, index arrays) gather in the buffer; large ones (images) go to the kernel
// straight from the caller's memory together with what is buffered (one writev, no extra copy).
class OutputFile {
 public:
  static constexpr size_t kDefaultBufferBytes = 1u << 20;
  // Spill files are scratch space that no other process should ever see: the name is unlinked
  // as soon as the file is open, so the bytes vanish with the descriptor (also when killed).
  enum class Kind { kNamed, kSpill };

  OutputFile() = default;
  explicit OutputFile(const std::string& path, Kind kind = Kind::kNamed,
                      size_t buffer_bytes = kDefaultBufferBytes);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  OutputFile(OutputFile&& other) noexcept { swap(other); }
  OutputFile& operator=(OutputFile&& other) noexcept {
    close_quietly();
    swap(other);
    return *this;
  }

  void write(const void* data, size_t size);
  void write_zeros(size_t size);
  // Append the whole file at `path`, which must hold exactly `expected_size` bytes. Copies inside
  // the kernel with copy_file_range where the file systems allow it, else with a large buffer.
  void append_file(const std::string& path, uint64_t expected_size);
  // Append everything written so far to the spill file `spill` (which stays open and unchanged).
  void append_spill(OutputFile& spill);
  // Bytes written so far (buffered or not).
  uint64_t size() const { return size_; }
  // Ask the kernel to start writing what is written so far to disk, without waiting (Linux; a
  // no-op elsewhere), so that a later close(true) has less left to wait for.
  void start_writeback();
  // Flush and close; with sync, fsync first: the data is on disk before a later rename publishes it.
  void close(bool sync);
  void close_synced() { close(true); }
  void close_quietly() noexcept;
  const std::string& path() const { return path_; }

 private:
  void flush();
  void write_fd(const void* head, size_t head_size, const void* data, size_t size);
  // Append `size` bytes of descriptor `in` from offset 0 (`in_path` names it in errors).
  void copy_from(int in, const std::string& in_path, uint64_t size);
  void swap(OutputFile& other) noexcept {
    path_.swap(other.path_);
    std::swap(fd_, other.fd_);
    buffer_.swap(other.buffer_);
    std::swap(used_, other.used_);
    std::swap(size_, other.size_);
  }

  std::string path_;
  int fd_ = -1;
  std::vector<char> buffer_;
  size_t used_ = 0;
  uint64_t size_ = 0;
};

}  // namespace megasail
