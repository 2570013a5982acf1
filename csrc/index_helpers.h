// Index helpers that run once per dataset or epoch over 10M-100M samples: shuffled order,
// packing into fixed-length sequences, weighted blending. megasail/data/index_helpers.py holds a
// readable Python reference of each, and the tests hold the two bit-for-bit equal.
#pragma once

#include <cstdint>
#include <vector>

namespace megasail {

// splitmix64's output function, a bijection of uint64.
inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// splitmix64 (Steele, Lea, Flood 2014): the k-th output (k = 1, 2, ...) is mix64(seed + k * gamma).
struct SplitMix64 {
  static constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    state += kGamma;
    return mix64(state);
  }
};

// out[0..n) = a permutation of 0..n-1: Fisher-Yates from the back, for i = n-1 .. 1 draw
// j = next() % (i + 1) and swap out[i], out[j]. (Modulo bias is below n / 2^64.)
void shuffle_indices(int64_t n, uint64_t seed, int64_t* out);

// out[i] = value at positions[i] of the seeded permutation of 0..n-1, in O(rounds) memory: a
// balanced Feistel network on 2h-bit blocks (4^h >= n, round keys = splitmix64 draws of
// seed ^ mix64(n), round i: (L, R) -> (R, L ^ (mix64(R ^ key_i) & mask))), applied again while the
// value is >= n (cycle-walking). Positions outside [0, n) throw std::invalid_argument naming the
// first. megasail/data/format/index_helpers.py: permute_indices_ref is the reference.
void permute_indices(const int64_t* positions, int64_t m, int64_t n, uint64_t seed, int rounds, int64_t* out);

struct Packing {
  std::vector<int64_t> pack_offsets;  // P+1 entries: pack p is order[pack_offsets[p] .. pack_offsets[p+1])
  std::vector<int64_t> order;         // every sample index exactly once
};

// Windowed best-fit-decreasing packing (algorithm in index_helpers.cpp). Lengths must lie in
// 1..seq_length; otherwise std::invalid_argument naming the first bad sample index.
Packing pack_samples(const int64_t* lengths, int64_t n, int64_t seq_length, uint64_t seed, int64_t window);

// Greedy weighted interleaving: step i takes the dataset with the largest w_k * (i + 1) - count_k
// (lowest k on ties, weights normalised to sum 1); its sample index is count_k modulo sizes[k].
// No dataset ever gets a whole sample ahead of w_k * (i + 1); see index_helpers.py for the rest.
void blend_indices(const double* weights, const int64_t* sizes, int64_t num_datasets, int64_t num_samples,
                   int32_t* dataset_index, int64_t* dataset_sample_index);

}  // namespace megasail
