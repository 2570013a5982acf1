// ShardWriter appends samples to one dataset prefix; merge_shards concatenates finished prefixes.
#pragma once

#include <cstddef>
#include <cstdint>
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
  // Creates PREFIX.{bin,idx,img.bin,img.idx}.tmp; finalize() renames them to their final names.
  explicit ShardWriter(std::string prefix);
  ~ShardWriter();  // aborts when neither finalize() nor abort() ran
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  // Validates the whole sample first (std::invalid_argument, writer unchanged), then appends it.
  void add_sample(const SampleView& sample);
  void finalize();
  void abort();  // removes the tmp files; a no-op after finalize() or abort()

  const std::string& prefix() const { return prefix_; }
  uint64_t num_samples() const { return index_.num_samples(); }
  uint64_t num_segments() const { return index_.segment_lengths.size(); }
  uint64_t num_tokens() const { return index_.num_tokens; }
  uint64_t num_images() const { return index_.num_images(); }
  uint64_t image_bytes() const { return index_.image_bytes; }
  bool is_open() const { return state_ == State::kOpen; }

 private:
  enum class State { kOpen, kFinalized, kAborted };
  void require_open() const;
  void abort_locked() noexcept;

  std::string prefix_;
  std::mutex mutex_;  // add_sample runs without the GIL; this keeps concurrent callers ordered
  OutputFile tokens_;
  OutputFile images_;
  ShardIndex index_;
  State state_ = State::kOpen;
};

// Concatenate finished shards, in the given order, into out_prefix (tmp files + rename).
// Returns the number of samples written.
uint64_t merge_shards(const std::vector<std::string>& shard_prefixes, const std::string& out_prefix);

}  // namespace megasail
