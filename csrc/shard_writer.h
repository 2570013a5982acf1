// ShardWriter appends samples to one dataset prefix; merge_shards concatenates finished prefixes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "shard_format.h"

namespace megasail {

struct ImageBytes {
  const uint8_t* data;
  size_t size;
};

// One sample as borrowed pointers (the caller keeps the memory alive during add_sample).
struct SampleView {
  const int32_t* tokens;
  size_t num_tokens;
  const int32_t* segment_lengths;
  const int8_t* segment_modes;
  size_t num_segments;
  std::vector<ImageBytes> images;
  const uint32_t* widths;
  const uint32_t* heights;
  const uint8_t* formats;
  size_t num_image_fields;  // length of widths / heights / formats (must equal images.size())
  uint32_t source_id;
};

class ShardWriter {
 public:
  // Creates PREFIX.{bin,img.bin}.tmp; finalize() writes the index .tmp files and renames all four
  // to their final names. With sync (the default) finalize() fsyncs the four files before the
  // renames, so a published prefix survives a power loss; without it the files are complete once
  // published as far as every process is concerned (the page cache outlives a killed process),
  // but not necessarily on disk: for temporary shards that a later merge fsyncs in its output.
  explicit ShardWriter(std::string prefix, bool sync = true);
  ~ShardWriter();  // aborts when neither finalize() nor abort() ran
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Validates the whole sample first (std::invalid_argument, writer unchanged), then appends it.
  void add_sample(const SampleView& sample);
  void finalize();
  void abort();  // removes the tmp files; a no-op after finalize() or abort()

  const std::string& prefix() const { return prefix_; }
  // Counters lock: add_sample may be running on another thread with the GIL released.
  uint64_t num_samples() const { std::lock_guard<std::mutex> lock(mutex_); return index_.num_samples(); }
  uint64_t num_segments() const { std::lock_guard<std::mutex> lock(mutex_); return index_.segment_lengths.size(); }
  uint64_t num_tokens() const { std::lock_guard<std::mutex> lock(mutex_); return index_.num_tokens; }
  uint64_t num_images() const { std::lock_guard<std::mutex> lock(mutex_); return index_.num_images(); }
  uint64_t image_bytes() const { std::lock_guard<std::mutex> lock(mutex_); return index_.image_bytes; }
  bool sync() const { return sync_; }
  bool is_open() const { std::lock_guard<std::mutex> lock(mutex_); return state_ == State::kOpen; }

 private:
  enum class State { kOpen, kFinalized, kAborted };
  void require_open() const;
  void abort_locked() noexcept;

  std::string prefix_;
  bool sync_;
  mutable std::mutex mutex_;  // add_sample runs without the GIL; this keeps concurrent callers ordered
  OutputFile tokens_;
  OutputFile images_;
  ShardIndex index_;
  State state_ = State::kOpen;
};

// Concatenates finished shards, appended one at a time in their final order, into out_prefix
// (tmp files, fsync, rename at finalize()). Appending while later shards are still being written
// lets a merge run alongside the work that produces them; the bytes are those of merge_shards.
// Memory stays flat whatever the number of samples: each rebased index array goes to its own
// unlinked spill file beside the output as shards are appended, and finalize() joins the spill
// files behind the index headers (in the kernel where it can). Only one shard's index is in
// memory at a time.
class ShardMerger {
 public:
  explicit ShardMerger(std::string out_prefix);
  ~ShardMerger();  // aborts when neither finalize() nor abort() ran
  ShardMerger(const ShardMerger&) = delete;
  ShardMerger& operator=(const ShardMerger&) = delete;

  // Copy the data of the finished shard at `shard_prefix` (checked first) after what is there.
  void append(const std::string& shard_prefix);
  void append(const std::string& shard_prefix, const ShardIndex& shard);  // index already read
  // fsync the data files, write both indexes (fsynced), rename; returns the number of samples.
  uint64_t finalize();
  void abort();  // removes the tmp files; a no-op after finalize() or abort()

  const std::string& prefix() const { return out_prefix_; }
  // Counters lock: append may be running on a helper thread with the GIL released.
  uint64_t num_shards() const { std::lock_guard<std::mutex> lock(mutex_); return num_shards_; }
  uint64_t num_samples() const { std::lock_guard<std::mutex> lock(mutex_); return num_samples_; }
  bool is_open() const { std::lock_guard<std::mutex> lock(mutex_); return state_ == State::kOpen; }

 private:
  enum class State { kOpen, kFinalized, kAborted };
  // The arrays of both index files in file order, each streamed to its own spill file.
  struct Spills {
    explicit Spills(const std::string& out_prefix);
    OutputFile segment_lengths, pointers, doc_index, segment_modes;  // PREFIX.idx
    OutputFile image_offsets, image_sizes, doc_image_start, image_widths, image_heights, image_crc32,
        doc_source, image_formats;  // PREFIX.img.idx
  };
  void require_open() const;
  void abort_locked() noexcept;
  void write_indexes();

  std::string out_prefix_;
  mutable std::mutex mutex_;  // append runs without the GIL, possibly on a helper thread
  OutputFile tokens_;
  OutputFile images_;
  std::unique_ptr<Spills> spills_;
  uint64_t num_shards_ = 0;
  uint64_t num_samples_ = 0;
  uint64_t num_segments_ = 0;
  uint64_t num_images_ = 0;
  uint64_t num_tokens_ = 0;
  uint64_t image_bytes_ = 0;
  State state_ = State::kOpen;
};

// Concatenate finished shards, in the given order, into out_prefix (tmp files, fsync, rename).
// Data files are copied inside the kernel (copy_file_range) where possible.
// Returns the number of samples written.
uint64_t merge_shards(const std::vector<std::string>& shard_prefixes, const std::string& out_prefix);

}  // namespace megasail
