// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320): the checksum zlib.crc32 and PNG use.
//
// Table-driven, portable C++ (no CPU-specific instructions). Inputs of at least
// kCrc32InterleaveMin bytes are cut into three equal stretches whose slicing-by-8 chains run
// interleaved in one loop (independent dependency chains keep the CPU's load ports busy instead
// of waiting on one chain), then joined with zlib's crc32_combine arithmetic (multiplication by
// x^(8n) modulo the polynomial). Equal to zlib.crc32(data) for every input (tested against it).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace megasail {

namespace detail {

constexpr uint32_t kCrc32Poly = 0xEDB88320u;

struct Crc32Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  std::array<uint32_t, 32> x2n{};  // x^(2^n) modulo the polynomial, for crc32_combine
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? (kCrc32Poly ^ (c >> 1)) : (c >> 1);
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFFu];
    uint32_t p = 1u << 30;  // x^1
    x2n[0] = p;
    for (int n = 1; n < 32; ++n) x2n[n] = p = multmodp(p, p);
  }

  // a(x) * b(x) modulo the polynomial (bit-reflected, as zlib's multmodp).
  static uint32_t multmodp(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
      if (a & m) {
        p ^= b;
        if ((a & (m - 1)) == 0) break;
      }
      m >>= 1;
      b = (b & 1u) ? (b >> 1) ^ kCrc32Poly : b >> 1;
    }
    return p;
  }

  // x^(n * 2^k) modulo the polynomial (zlib's x2nmodp).
  uint32_t x2nmodp(uint64_t n, unsigned k) const {
    uint32_t p = 1u << 31;  // x^0
    while (n) {
      if (n & 1) p = multmodp(x2n[k & 31], p);
      n >>= 1;
      ++k;
    }
    return p;
  }
};

inline const Crc32Tables& crc32_tables() {
  static const Crc32Tables tables;  // built once, thread-safe since C++11
  return tables;
}

// One slicing-by-8 step over 8 bytes at p; `state` is the inverted (running) CRC register.
// Little-endian hosts only (x86-64, aarch64); the formats are little-endian too.
inline uint32_t crc32_step8(const std::array<std::array<uint32_t, 256>, 8>& t, uint32_t state, const uint8_t* p) {
  uint32_t lo, hi;
  std::memcpy(&lo, p, 4);  // memcpy: unaligned-safe load
  std::memcpy(&hi, p + 4, 4);
  lo ^= state;
  return t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][hi & 0xFF] ^
         t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
}

// Register update over `size` bytes (no pre/post inversion).
inline uint32_t crc32_state(uint32_t state, const uint8_t* p, size_t size) {
  const auto& t = crc32_tables().t;
  for (; size >= 8; p += 8, size -= 8) state = crc32_step8(t, state, p);
  while (size--) state = t[0][(state ^ *p++) & 0xFFu] ^ (state >> 8);
  return state;
}

}  // namespace detail

// Inputs at least this long take the interleaved path.
constexpr size_t kCrc32InterleaveMin = 3 * 1024;

// crc32(A || B) from crc32(A), crc32(B) and len(B): zlib's crc32_combine.
inline uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t len_b) {
  return detail::Crc32Tables::multmodp(detail::crc32_tables().x2nmodp(len_b, 3), crc_a) ^ crc_b;
}

// crc32(data) continuing from `crc` (pass 0 to start), same convention as zlib.crc32(data, crc).
inline uint32_t crc32(const void* data, size_t size, uint32_t crc = 0) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (size < kCrc32InterleaveMin) return ~detail::crc32_state(~crc, p, size);
  // Three stretches of `stretch` bytes (a multiple of 8) run interleaved; the tail follows.
  const auto& t = detail::crc32_tables().t;
  const size_t stretch = (size / 3) & ~size_t{7};
  const uint8_t* p1 = p + stretch;
  const uint8_t* p2 = p1 + stretch;
  uint32_t s0 = ~crc, s1 = 0xFFFFFFFFu, s2 = 0xFFFFFFFFu;  // stretches 1 and 2 start as crc32(.., 0)
  for (size_t i = 0; i < stretch; i += 8) {
    s0 = detail::crc32_step8(t, s0, p + i);
    s1 = detail::crc32_step8(t, s1, p1 + i);
    s2 = detail::crc32_step8(t, s2, p2 + i);
  }
  const uint32_t shift = detail::crc32_tables().x2nmodp(stretch, 3);  // x^(8 * stretch)
  uint32_t joined = detail::Crc32Tables::multmodp(shift, ~s0) ^ ~s1;
  joined = detail::Crc32Tables::multmodp(shift, joined) ^ ~s2;
  return ~detail::crc32_state(~joined, p2 + stretch, size - 3 * stretch);
}

}  // namespace megasail
