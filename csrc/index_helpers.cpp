// Index helpers; see index_helpers.h for the contracts.
#if defined(__GNUC__) && !defined(__clang__)
// blend_indices must round exactly like Python floats: no fused multiply-add across statements
#pragma GCC optimize("fp-contract=off")
#endif

#include "index_helpers.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace megasail {

void shuffle_indices(int64_t n, uint64_t seed, int64_t* out) {
  std::iota(out, out + n, int64_t{0});
  SplitMix64 rng(seed);
  for (int64_t i = n - 1; i >= 1; --i) {
    const auto j = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(i + 1));
    std::swap(out[i], out[j]);
  }
}

void permute_indices(const int64_t* positions, int64_t m, int64_t n, uint64_t seed, int rounds, int64_t* out) {
  if (n < 0) throw std::invalid_argument("n must be >= 0, got " + std::to_string(n));
  if (rounds < 1) throw std::invalid_argument("rounds must be >= 1, got " + std::to_string(rounds));
  for (int64_t i = 0; i < m; ++i)
    if (positions[i] < 0 || positions[i] >= n)
      throw std::invalid_argument("position " + std::to_string(positions[i]) + " (entry " + std::to_string(i) +
                                  ") is out of range [0, " + std::to_string(n) + ")");
  std::vector<uint64_t> keys(static_cast<size_t>(rounds));
  SplitMix64 rng(seed ^ mix64(static_cast<uint64_t>(n)));
  for (auto& key : keys) key = rng.next();
  int bits = 0;  // bit length of n - 1
  while (bits < 63 && (uint64_t{1} << bits) < static_cast<uint64_t>(n)) ++bits;
  const int half = std::max(1, (bits + 1) / 2);
  const uint64_t mask = (uint64_t{1} << half) - 1;
  for (int64_t i = 0; i < m; ++i) {
    uint64_t x = static_cast<uint64_t>(positions[i]);
    do {  // cycle-walking: the block is up to 4x larger than [0, n)
      uint64_t left = x >> half, right = x & mask;
      for (const uint64_t key : keys) {
        const uint64_t next = left ^ (mix64(right ^ key) & mask);
        left = right;
        right = next;
      }
      x = (left << half) | right;
    } while (x >= static_cast<uint64_t>(n));
    out[i] = static_cast<int64_t>(x);
  }
}

namespace {

// Open packs grouped by remaining capacity (1..seq_length) with a bitmap of non-empty groups,
// so "the smallest capacity >= length" is a scan over seq_length / 64 words at most.
class OpenPacks {
 public:
  explicit OpenPacks(int64_t seq_length)
      : by_capacity_(static_cast<size_t>(seq_length) + 1), nonempty_((static_cast<size_t>(seq_length) >> 6) + 1, 0) {}

  // Smallest capacity >= length holding an open pack, or -1.
  int64_t best_fit(int64_t length) const {
    size_t word = static_cast<size_t>(length) >> 6;
    uint64_t bits = nonempty_[word] & (~uint64_t{0} << (length & 63));
    while (bits == 0) {
      if (++word == nonempty_.size()) return -1;
      bits = nonempty_[word];
    }
    return static_cast<int64_t>(word * 64 + static_cast<size_t>(__builtin_ctzll(bits)));
  }
  // Most recently added pack with this capacity (last in, first out).
  int64_t take(int64_t capacity) {
    auto& group = by_capacity_[static_cast<size_t>(capacity)];
    const int64_t pack = group.back();
    group.pop_back();
    if (group.empty()) nonempty_[static_cast<size_t>(capacity) >> 6] &= ~(uint64_t{1} << (capacity & 63));
    return pack;
  }
  void put(int64_t pack, int64_t capacity) {
    by_capacity_[static_cast<size_t>(capacity)].push_back(pack);
    nonempty_[static_cast<size_t>(capacity) >> 6] |= uint64_t{1} << (capacity & 63);
  }

 private:
  std::vector<std::vector<int64_t>> by_capacity_;
  std::vector<uint64_t> nonempty_;
};

}  // namespace

// 1. order = shuffle_indices(n, seed).
// 2. Cut it into consecutive windows of `window` samples; sort each window by length, longest
//    first (stable, so ties keep the shuffled order).
// 3. Place each sample into the open pack with the least remaining capacity that still fits it
//    (the most recently filled one among equals); open a new pack when none fits. Packs stay
//    open across windows until full, so later short samples fill the gaps of earlier long ones.
// 4. Output packs in the order they were opened, samples in the order they were placed.
Packing pack_samples(const int64_t* lengths, int64_t n, int64_t seq_length, uint64_t seed, int64_t window) {
  if (seq_length < 1) throw std::invalid_argument("seq_length must be >= 1, got " + std::to_string(seq_length));
  if (window < 1) throw std::invalid_argument("window must be >= 1, got " + std::to_string(window));
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] > seq_length)
      throw std::invalid_argument("sample " + std::to_string(i) + " has " + std::to_string(lengths[i]) +
                                  " tokens, more than seq_length " + std::to_string(seq_length));
    if (lengths[i] < 1)
      throw std::invalid_argument("sample " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
                                  " (must be >= 1)");
  }
  std::vector<int64_t> placed(static_cast<size_t>(n));  // samples in placement order
  shuffle_indices(n, seed, placed.data());
  std::vector<int64_t> pack_at(static_cast<size_t>(n));  // pack of placed[p]; sequential, cache-friendly
  std::vector<int64_t> pack_sizes;  // samples per pack
  OpenPacks open(seq_length);
  // (length, position in window, sample): gathered once, because sorting through lengths[sample]
  // misses the cache on every comparison once lengths outgrows it (10x slower at 10M samples)
  struct Entry {
    int64_t length, position, sample;
  };
  std::vector<Entry> entries;
  entries.reserve(static_cast<size_t>(std::min(n, window)));
  for (int64_t start = 0; start < n; start += window) {
    const int64_t end = std::min(n, start + window);
    entries.clear();
    for (int64_t p = start; p < end; ++p) {
      if (p + 16 < end) __builtin_prefetch(&lengths[placed[p + 16]]);  // the gather is random over all of lengths
      entries.push_back({lengths[placed[p]], p, placed[p]});
    }
    // longest first; ties keep the shuffled order (the same order as a stable sort)
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
      return a.length != b.length ? a.length > b.length : a.position < b.position;
    });
    for (size_t e = 0; e < entries.size(); ++e) {
      placed[start + static_cast<int64_t>(e)] = entries[e].sample;
      const int64_t length = entries[e].length;
      int64_t capacity = open.best_fit(length);
      int64_t pack;
      if (capacity < 0) {
        pack = static_cast<int64_t>(pack_sizes.size());
        pack_sizes.push_back(0);
        capacity = seq_length;
      } else {
        pack = open.take(capacity);
      }
      pack_at[static_cast<size_t>(start) + e] = pack;
      ++pack_sizes[static_cast<size_t>(pack)];
      if (capacity > length) open.put(pack, capacity - length);
    }
  }
  Packing result;
  result.pack_offsets.resize(pack_sizes.size() + 1);
  result.pack_offsets[0] = 0;
  std::partial_sum(pack_sizes.begin(), pack_sizes.end(), result.pack_offsets.begin() + 1);
  // counting sort by pack, stable in placement order
  std::vector<int64_t> cursor(result.pack_offsets.begin(), result.pack_offsets.end() - 1);
  result.order.resize(static_cast<size_t>(n));
  for (size_t p = 0; p < placed.size(); ++p)
    result.order[static_cast<size_t>(cursor[static_cast<size_t>(pack_at[p])]++)] = placed[p];
  return result;
}

void blend_indices(const double* weights, const int64_t* sizes, int64_t num_datasets, int64_t num_samples,
                   int32_t* dataset_index, int64_t* dataset_sample_index) {
  if (num_datasets < 1) throw std::invalid_argument("blend_indices needs at least one dataset");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be >= 0");
  double total = 0.0;
  for (int64_t k = 0; k < num_datasets; ++k) {
    if (!std::isfinite(weights[k]) || weights[k] < 0.0)
      throw std::invalid_argument("weight of dataset " + std::to_string(k) + " must be finite and >= 0");
    if (weights[k] > 0.0 && sizes[k] < 1)
      throw std::invalid_argument("dataset " + std::to_string(k) + " has positive weight but no samples");
    total += weights[k];
  }
  if (!(total > 0.0)) throw std::invalid_argument("blend weights sum to zero");
  std::vector<double> normalised(static_cast<size_t>(num_datasets));
  for (int64_t k = 0; k < num_datasets; ++k) normalised[static_cast<size_t>(k)] = weights[k] / total;
  std::vector<int64_t> counts(static_cast<size_t>(num_datasets), 0);
  for (int64_t i = 0; i < num_samples; ++i) {
    const double step = static_cast<double>(i + 1);
    int32_t best = 0;
    double best_deficit = 0.0;
    for (int64_t k = 0; k < num_datasets; ++k) {
      const double target = normalised[static_cast<size_t>(k)] * step;
      const double deficit = target - static_cast<double>(counts[static_cast<size_t>(k)]);
      if (k == 0 || deficit > best_deficit) {
        best_deficit = deficit;
        best = static_cast<int32_t>(k);
      }
    }
    dataset_index[i] = best;
    dataset_sample_index[i] = counts[static_cast<size_t>(best)] % sizes[best];
    ++counts[static_cast<size_t>(best)];
  }
}

}  // namespace megasail
