// ShardWriter and merge_shards (format in shard_format.h, docs/data_format.md).
#include "shard_writer.h"

#include <algorithm>
#include <stdexcept>

#include "crc32.h"

namespace megasail {

namespace {

std::string sample_error(uint64_t sample, const std::string& what) {
  return "sample " + std::to_string(sample) + ": " + what;
}

void validate_sample(const SampleView& s, uint64_t sample) {
  if (s.num_segments == 0) throw std::invalid_argument(sample_error(sample, "has no segments"));
  if (s.images.size() != s.num_image_fields)
    throw std::invalid_argument(sample_error(sample, std::to_string(s.images.size()) + " images but " +
                                                         std::to_string(s.num_image_fields) +
                                                         " widths/heights/formats"));
  uint64_t covered = 0;
  int32_t next_ordinal = 0;
  for (size_t g = 0; g < s.num_segments; ++g) {
    const int32_t length = s.segment_lengths[g];
    const int8_t mode = s.segment_modes[g];
    if (length < 0) throw std::invalid_argument(sample_error(sample, "segment " + std::to_string(g) + " has negative length"));
    if (mode == kImage) {
      if (length != 1)
        throw std::invalid_argument(sample_error(sample, "image segment " + std::to_string(g) + " must hold exactly one token"));
      if (covered >= s.num_tokens || s.tokens[covered] != next_ordinal)
        throw std::invalid_argument(sample_error(
            sample, "image segment " + std::to_string(g) + " must hold image ordinal " + std::to_string(next_ordinal)));
      ++next_ordinal;
    } else if (mode != kPrompt && mode != kTarget) {
      throw std::invalid_argument(sample_error(sample, "segment " + std::to_string(g) + " has unknown mode " +
                                                           std::to_string(int{mode})));
    }
    covered += static_cast<uint64_t>(length);
  }
  if (covered != s.num_tokens)
    throw std::invalid_argument(sample_error(sample, "segment lengths sum to " + std::to_string(covered) + ", tokens hold " +
                                                         std::to_string(s.num_tokens)));
  if (static_cast<size_t>(next_ordinal) != s.images.size())
    throw std::invalid_argument(sample_error(sample, std::to_string(next_ordinal) + " image segments but " +
                                                         std::to_string(s.images.size()) + " images"));
  for (size_t m = 0; m < s.images.size(); ++m) {
    if (s.widths[m] == 0 || s.heights[m] == 0)
      throw std::invalid_argument(sample_error(sample, "image " + std::to_string(m) + " has zero width or height"));
    if (s.formats[m] < kJpeg || s.formats[m] > kOtherFormat)
      throw std::invalid_argument(sample_error(sample, "image " + std::to_string(m) + " has unknown format code " +
                                                           std::to_string(int{s.formats[m]})));
  }
}

template <typename T>
void append_rebased(std::vector<T>& dst, const std::vector<T>& src, size_t skip, T base) {
  for (size_t i = skip; i < src.size(); ++i) dst.push_back(src[i] + base);
}

template <typename T>
void append_all(std::vector<T>& dst, const std::vector<T>& src) {
  dst.insert(dst.end(), src.begin(), src.end());
}

}  // namespace

ShardWriter::ShardWriter(std::string prefix, bool sync) : prefix_(std::move(prefix)), sync_(sync) {
  try {
    tokens_ = OutputFile(tmp_path(token_bin_path(prefix_)));
    images_ = OutputFile(tmp_path(image_bin_path(prefix_)));
  } catch (...) {
    tokens_.close_quietly();
    images_.close_quietly();
    remove_tmp_files(prefix_);
    throw;
  }
}

ShardWriter::~ShardWriter() {
  abort_locked();
}

void ShardWriter::require_open() const {
  if (state_ != State::kOpen)
    throw std::logic_error("ShardWriter(" + prefix_ + ") is " +
                           (state_ == State::kFinalized ? "already finalized" : "aborted"));
}

void ShardWriter::add_sample(const SampleView& s) {
  std::lock_guard<std::mutex> lock(mutex_);
  require_open();
  validate_sample(s, index_.num_samples());
  try {
    tokens_.write(s.tokens, s.num_tokens * sizeof(int32_t));
    for (size_t m = 0; m < s.images.size(); ++m) {
      const ImageBytes& image = s.images[m];
      const uint32_t checksum = crc32(image.data, image.size);  // reads the bytes into cache for the write
      images_.write(image.data, image.size);
      index_.image_offsets.push_back(index_.image_bytes);
      index_.image_sizes.push_back(image.size);
      index_.image_widths.push_back(s.widths[m]);
      index_.image_heights.push_back(s.heights[m]);
      index_.image_crc32.push_back(checksum);
      index_.image_formats.push_back(s.formats[m]);
      index_.image_bytes += image.size;
    }
    // inside the try: an allocation failure here must not leave the index behind the data
    index_.segment_lengths.insert(index_.segment_lengths.end(), s.segment_lengths,
                                  s.segment_lengths + s.num_segments);
    index_.segment_modes.insert(index_.segment_modes.end(), s.segment_modes, s.segment_modes + s.num_segments);
    index_.doc_index.push_back(static_cast<int64_t>(index_.segment_lengths.size()));
    index_.doc_image_start.push_back(index_.num_images());
    index_.doc_source.push_back(s.source_id);
    index_.num_tokens += s.num_tokens;
  } catch (...) {
    abort_locked();  // a partial write cannot be undone; the shard is unusable
    throw;
  }
}

void ShardWriter::finalize() {
  std::lock_guard<std::mutex> lock(mutex_);
  require_open();
  try {
    tokens_.close(sync_);
    images_.close(sync_);
    write_token_index(tmp_path(token_idx_path(prefix_)), index_, sync_);
    write_image_index(tmp_path(image_idx_path(prefix_)), index_, sync_);
    publish_prefix(prefix_, sync_);
  } catch (...) {
    abort_locked();
    throw;
  }
  state_ = State::kFinalized;
}

void ShardWriter::abort() {
  std::lock_guard<std::mutex> lock(mutex_);
  abort_locked();
}

void ShardWriter::abort_locked() noexcept {
  if (state_ != State::kOpen) return;
  tokens_.close_quietly();
  images_.close_quietly();
  remove_tmp_files(prefix_);
  state_ = State::kAborted;
}

ShardMerger::ShardMerger(std::string out_prefix) : out_prefix_(std::move(out_prefix)) {
  try {
    tokens_ = OutputFile(tmp_path(token_bin_path(out_prefix_)));
    images_ = OutputFile(tmp_path(image_bin_path(out_prefix_)));
  } catch (...) {
    tokens_.close_quietly();
    images_.close_quietly();
    remove_tmp_files(out_prefix_);
    throw;
  }
}

ShardMerger::~ShardMerger() { abort_locked(); }

void ShardMerger::require_open() const {
  if (state_ != State::kOpen)
    throw std::logic_error("ShardMerger(" + out_prefix_ + ") is " +
                           (state_ == State::kFinalized ? "already finalized" : "aborted"));
}

void ShardMerger::append(const std::string& shard_prefix) {
  if (shard_prefix == out_prefix_)
    throw std::invalid_argument("merge output " + out_prefix_ + " is also one of its inputs");
  append(shard_prefix, read_shard_index(shard_prefix));
}

void ShardMerger::append(const std::string& shard_prefix, const ShardIndex& shard) {
  std::lock_guard<std::mutex> lock(mutex_);
  require_open();
  if (shard_prefix == out_prefix_)
    throw std::invalid_argument("merge output " + out_prefix_ + " is also one of its inputs");
  try {
    tokens_.append_file(token_bin_path(shard_prefix), shard.num_tokens * 4);
    images_.append_file(image_bin_path(shard_prefix), shard.image_bytes);
    images_.start_writeback();  // the disk works while later shards are copied
  } catch (...) {
    abort_locked();  // a partial copy cannot be undone
    throw;
  }
  // rebase: document and image ranges move by what earlier shards hold
  ShardIndex& merged = merged_;
  const auto segment_base = static_cast<int64_t>(merged.segment_lengths.size());
  append_rebased(merged.doc_index, shard.doc_index, 1, segment_base);
  append_rebased(merged.doc_image_start, shard.doc_image_start, 1, merged.num_images());
  append_rebased(merged.image_offsets, shard.image_offsets, 0, merged.image_bytes);
  append_all(merged.segment_lengths, shard.segment_lengths);
  append_all(merged.segment_modes, shard.segment_modes);
  append_all(merged.image_sizes, shard.image_sizes);
  append_all(merged.image_widths, shard.image_widths);
  append_all(merged.image_heights, shard.image_heights);
  append_all(merged.image_crc32, shard.image_crc32);
  append_all(merged.image_formats, shard.image_formats);
  append_all(merged.doc_source, shard.doc_source);
  merged.num_tokens += shard.num_tokens;
  merged.image_bytes += shard.image_bytes;
  ++num_shards_;
}

uint64_t ShardMerger::finalize() {
  std::lock_guard<std::mutex> lock(mutex_);
  require_open();
  try {
    tokens_.close_synced();
    images_.close_synced();
    write_token_index(tmp_path(token_idx_path(out_prefix_)), merged_);
    write_image_index(tmp_path(image_idx_path(out_prefix_)), merged_);
    publish_prefix(out_prefix_, /*sync=*/true);
  } catch (...) {
    abort_locked();
    throw;
  }
  state_ = State::kFinalized;
  return merged_.num_samples();
}

void ShardMerger::abort() {
  std::lock_guard<std::mutex> lock(mutex_);
  abort_locked();
}

void ShardMerger::abort_locked() noexcept {
  if (state_ != State::kOpen) return;
  tokens_.close_quietly();
  images_.close_quietly();
  remove_tmp_files(out_prefix_);
  state_ = State::kAborted;
}

uint64_t merge_shards(const std::vector<std::string>& shard_prefixes, const std::string& out_prefix) {
  if (std::find(shard_prefixes.begin(), shard_prefixes.end(), out_prefix) != shard_prefixes.end())
    throw std::invalid_argument("merge output " + out_prefix + " is also one of its inputs");
  std::vector<ShardIndex> shards;  // every index is checked before any output file is created
  shards.reserve(shard_prefixes.size());
  for (const std::string& prefix : shard_prefixes) shards.push_back(read_shard_index(prefix));
  ShardMerger merger(out_prefix);
  for (size_t k = 0; k < shards.size(); ++k) {
    merger.append(shard_prefixes[k], shards[k]);
    shards[k] = ShardIndex();  // free as we go
  }
  return merger.finalize();
}

}  // namespace megasail
