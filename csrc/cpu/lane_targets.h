// The lane path's targets read straight from the int64 target tensor, W rows at a time,
// and checked on the way (row_driver.h, when RowTask::rule is set).
//
// Why not a separate scan: the scan that converts the targets to acc_t and checks them
// before the kernel runs is its own parallel pass over N int64 values plus an N-entry
// buffer; at 65536 x 10 it cost ~5% of a forward + backward.  Here the check costs a few
// vector instructions per tile of W rows.  It is safe because the lane path never uses a
// target as an address: a row's target only selects lanes by comparison, so a bad
// target is recorded (and the op throws after the pass) without any out-of-bounds access.
#pragma once

#include "vec_util.h"

#include <cstdint>

namespace linclass::cpu {

// Which targets are valid: 0 <= y < classes, or y == ignore_index when has_ignore.
struct TargetRule {
  int64_t classes;
  bool has_ignore;
  int64_t ignore_index;
};

// Per block: rows that count (valid and not ignored), and the first bad row.
struct TargetTally {
  int64_t kept = 0;
  int64_t first_bad = -1;
};

// Targets y[0 .. n) of rows r, r + 1, ... as lanes of acc_t; -1 for ignored rows, bad
// rows and padding lanes (l >= n), which then contribute nothing.
// Always inlined: out of line (GCC's choice) it cost twice the separate scan it replaces.
template <typename acc_t>
__attribute__((always_inline)) inline Vec<acc_t> lane_targets(const int64_t* y, int64_t n, int64_t r, const TargetRule& rule,
                               TargetTally& tally) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n == W) {  // 16 targets: two 8 x int64 vectors, checked in mask registers
      const __m512i a = _mm512_loadu_si512(y), b = _mm512_loadu_si512(y + 8);
      const __m512i classes = _mm512_set1_epi64(rule.classes);
      // 0 <= v < classes as one unsigned comparison (a negative v is a huge unsigned one)
      const unsigned ok = unsigned(_mm512_cmplt_epu64_mask(a, classes)) |
                          (unsigned(_mm512_cmplt_epu64_mask(b, classes)) << 8);
      unsigned ign = 0;
      if (rule.has_ignore) {
        const __m512i ignore = _mm512_set1_epi64(rule.ignore_index);
        ign = unsigned(_mm512_cmpeq_epi64_mask(a, ignore)) |
              (unsigned(_mm512_cmpeq_epi64_mask(b, ignore)) << 8);
      }
      const unsigned use = ok & ~ign;
      const unsigned bad = ~(ok | ign) & 0xFFFFu;
      if (bad && tally.first_bad < 0) tally.first_bad = r + __builtin_ctz(bad);
      tally.kept += __builtin_popcount(use);
      const __m512i y32 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(a)),
                                             _mm512_cvtepi64_epi32(b), 1);  // valid ones fit
      return _mm512_mask_blend_ps(__mmask16(use), _mm512_set1_ps(-1.0f), _mm512_cvtepi32_ps(y32));
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (n == W) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + 4));
      const __m256i classes = _mm256_set1_epi64x(rule.classes), minus1 = _mm256_set1_epi64x(-1);
      const __m256i ignore = _mm256_set1_epi64x(rule.ignore_index);
      auto in_range = [&](__m256i v) {
        return _mm256_and_si256(_mm256_cmpgt_epi64(classes, v), _mm256_cmpgt_epi64(v, minus1));
      };
      auto ignored = [&](__m256i v) {
        return rule.has_ignore ? _mm256_cmpeq_epi64(v, ignore) : _mm256_setzero_si256();
      };
      // The low 32 bits of a's and b's 64-bit lanes, in row order.
      const __m256i low_first = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
      auto low32 = [&](__m256i u, __m256i v) {
        return _mm256_permute2x128_si256(_mm256_permutevar8x32_epi32(u, low_first),
                                         _mm256_permutevar8x32_epi32(v, low_first), 0x20);
      };
      const __m256i ok = low32(in_range(a), in_range(b));
      const __m256i ign = low32(ignored(a), ignored(b));
      const __m256 use = _mm256_castsi256_ps(_mm256_andnot_si256(ign, ok));
      const int bad = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_or_si256(ok, ign))) & 0xFF;
      if (bad && tally.first_bad < 0) tally.first_bad = r + __builtin_ctz(bad);
      tally.kept += __builtin_popcount(_mm256_movemask_ps(use));
      return _mm256_blendv_ps(_mm256_set1_ps(-1.0f), _mm256_cvtepi32_ps(low32(a, b)), use);
    }
  }
#endif
  alignas(64) acc_t lanes[W];
  for (int64_t l = 0; l < W; ++l) {
    lanes[l] = acc_t(-1);
    if (l >= n) continue;
    const int64_t v = y[l];
    if (rule.has_ignore && v == rule.ignore_index) continue;
    if (uint64_t(v) >= uint64_t(rule.classes)) {
      if (tally.first_bad < 0) tally.first_bad = r + l;
      continue;
    }
    ++tally.kept;
    lanes[l] = acc_t(v);
  }
  return V::loadu(lanes);
}

}  // namespace linclass::cpu
