// ShardWriter, ShardMerger and merge_shards (format in shard_format.h, docs/data_format.md).
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
void write_rebased(OutputFile& out, const std::vector<T>& src, size_t skip, T base) {
  constexpr size_t kChunk = 4096;  // rebased in small pieces on the stack: no copy of the whole array
  T chunk[kChunk];
  for (size_t start = skip; start < src.size(); start += kChunk) {
    const size_t end = std::min(src.size(), start + kChunk);
    for (size_t i = start; i < end; ++i) chunk[i - start] = src[i] + base;
    out.write(chunk, (end - start) * sizeof(T));
  }
}

template <typename T>
void write_all(OutputFile& out, const std::vector<T>& src) {
  out.write(src.data(), src.size() * sizeof(T));
}

// Byte offsets of the segments into PREFIX.bin, continuing from `pointer`; returns the next one.
int64_t write_pointers(OutputFile& out, const std::vector<int32_t>& lengths, int64_t pointer) {
  constexpr size_t kChunk = 4096;
  int64_t chunk[kChunk];
  for (size_t start = 0; start < lengths.size(); start += kChunk) {
    const size_t end = std::min(lengths.size(), start + kChunk);
    for (size_t s = start; s < end; ++s) {
      chunk[s - start] = pointer;
      pointer += int64_t{lengths[s]} * int64_t{sizeof(int32_t)};
    }
    out.write(chunk, (end - start) * sizeof(int64_t));
  }
  return pointer;
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

namespace {

constexpr size_t kSpillBufferBytes = 256u << 10;  // 12 spill files: 3 MiB of buffers in all

OutputFile spill_file(const std::string& out_prefix, const char* array) {
  return OutputFile(tmp_path(token_idx_path(out_prefix)) + "." + array, OutputFile::Kind::kSpill, kSpillBufferBytes);
}

}  // namespace

ShardMerger::Spills::Spills(const std::string& out_prefix)
    : segment_lengths(spill_file(out_prefix, "lengths")),
      pointers(spill_file(out_prefix, "pointers")),
      doc_index(spill_file(out_prefix, "doc_index")),
      segment_modes(spill_file(out_prefix, "modes")),
      image_offsets(spill_file(out_prefix, "image_offsets")),
      image_sizes(spill_file(out_prefix, "image_sizes")),
      doc_image_start(spill_file(out_prefix, "doc_image_start")),
      image_widths(spill_file(out_prefix, "image_widths")),
      image_heights(spill_file(out_prefix, "image_heights")),
      image_crc32(spill_file(out_prefix, "image_crc32")),
      doc_source(spill_file(out_prefix, "doc_source")),
      image_formats(spill_file(out_prefix, "image_formats")) {}

ShardMerger::ShardMerger(std::string out_prefix) : out_prefix_(std::move(out_prefix)) {
  try {
    tokens_ = OutputFile(tmp_path(token_bin_path(out_prefix_)));
    images_ = OutputFile(tmp_path(image_bin_path(out_prefix_)));
    spills_ = std::make_unique<Spills>(out_prefix_);
    const int64_t first_document = 0;  // both per-sample ranges start at 0
    const uint64_t first_image = 0;
    spills_->doc_index.write(&first_document, sizeof(first_document));
    spills_->doc_image_start.write(&first_image, sizeof(first_image));
  } catch (...) {
    tokens_.close_quietly();
    images_.close_quietly();
    spills_.reset();
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
    // rebase: document and image ranges move by what earlier shards hold
    Spills& out = *spills_;
    write_all(out.segment_lengths, shard.segment_lengths);
    write_pointers(out.pointers, shard.segment_lengths, static_cast<int64_t>(num_tokens_ * sizeof(int32_t)));
    write_rebased(out.doc_index, shard.doc_index, 1, static_cast<int64_t>(num_segments_));
    write_all(out.segment_modes, shard.segment_modes);
    write_rebased(out.image_offsets, shard.image_offsets, 0, image_bytes_);
    write_all(out.image_sizes, shard.image_sizes);
    write_rebased(out.doc_image_start, shard.doc_image_start, 1, num_images_);
    write_all(out.image_widths, shard.image_widths);
    write_all(out.image_heights, shard.image_heights);
    write_all(out.image_crc32, shard.image_crc32);
    write_all(out.doc_source, shard.doc_source);
    write_all(out.image_formats, shard.image_formats);
  } catch (...) {
    abort_locked();  // a partial copy cannot be undone
    throw;
  }
  num_samples_ += shard.num_samples();
  num_segments_ += shard.segment_lengths.size();
  num_images_ += shard.num_images();
  num_tokens_ += shard.num_tokens;
  image_bytes_ += shard.image_bytes;
  ++num_shards_;
}

// Headers, then each spill file in the order of the format (docs/data_format.md); fsynced.
void ShardMerger::write_indexes() {
  Spills& in = *spills_;
  {
    OutputFile out(tmp_path(token_idx_path(out_prefix_)));
    write_token_index_header(out, num_segments_, num_samples_ + 1);
    for (OutputFile* array : {&in.segment_lengths, &in.pointers, &in.doc_index, &in.segment_modes})
      out.append_spill(*array);
    out.close_synced();
  }
  OutputFile out(tmp_path(image_idx_path(out_prefix_)));
  write_image_index_header(out, num_images_, num_samples_);
  for (OutputFile* array : {&in.image_offsets, &in.image_sizes, &in.doc_image_start, &in.image_widths,
                            &in.image_heights, &in.image_crc32, &in.doc_source, &in.image_formats}) {
    out.append_spill(*array);
    out.write_zeros(padding_to_8(array->size()));
  }
  out.close_synced();
}

uint64_t ShardMerger::finalize() {
  std::lock_guard<std::mutex> lock(mutex_);
  require_open();
  try {
    tokens_.close_synced();
    images_.close_synced();
    write_indexes();
    spills_.reset();  // closing the descriptors frees the spill files' disk space
    publish_prefix(out_prefix_, /*sync=*/true);
  } catch (...) {
    abort_locked();
    throw;
  }
  state_ = State::kFinalized;
  return num_samples_;
}

void ShardMerger::abort() {
  std::lock_guard<std::mutex> lock(mutex_);
  abort_locked();
}

void ShardMerger::abort_locked() noexcept {
  if (state_ != State::kOpen) return;
  tokens_.close_quietly();
  images_.close_quietly();
  spills_.reset();
  remove_tmp_files(out_prefix_);
  state_ = State::kAborted;
}

uint64_t merge_shards(const std::vector<std::string>& shard_prefixes, const std::string& out_prefix) {
  if (std::find(shard_prefixes.begin(), shard_prefixes.end(), out_prefix) != shard_prefixes.end())
    throw std::invalid_argument("merge output " + out_prefix + " is also one of its inputs");
  // every index is checked before any output file is created, and read again when its turn
  // comes: holding them all would make memory grow with the dataset
  for (const std::string& prefix : shard_prefixes) read_shard_index(prefix);
  ShardMerger merger(out_prefix);
  for (const std::string& prefix : shard_prefixes) merger.append(prefix);
  return merger.finalize();
}

}  // namespace megasail
