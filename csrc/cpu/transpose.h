// W x W block (and W x 2 pair) transposes between row-major scores and the class-major tiles of the lane
// path (row_driver.h).  For small C the lane path spends most of its time moving data,
// and on AVX2 a register transpose is several times faster than element copies or
// vgatherdps (which is slow on AMD Zen); the AVX-512 build (W = 16) uses the same 8-row
// AVX2 blocks.
#pragma once

#include "../shared_state.h"
#include "vec_util.h"

#include <array>
#include <cstdint>

namespace linclass::cpu {

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The 8-row building blocks, in AVX2 (which every AVX-512 CPU has): the AVX-512 build
// moves its 16-row tiles as 2 x 2 (or 2) of them instead of element by element.

// dst[j * ld_dst + i] = src[i * ld_src + j] for i, j < 8.
__attribute__((always_inline)) inline void transpose8(const float* src, int64_t ld_src, float* dst,
                                                      int64_t ld_dst) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * ld_src), r1 = _mm256_loadu_ps(src + 1 * ld_src);
  __m256 r2 = _mm256_loadu_ps(src + 2 * ld_src), r3 = _mm256_loadu_ps(src + 3 * ld_src);
  __m256 r4 = _mm256_loadu_ps(src + 4 * ld_src), r5 = _mm256_loadu_ps(src + 5 * ld_src);
  __m256 r6 = _mm256_loadu_ps(src + 6 * ld_src), r7 = _mm256_loadu_ps(src + 7 * ld_src);
  // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ld_dst, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ld_dst, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ld_dst, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ld_dst, _mm256_permute2f128_ps(s3, s7, 0x31));
}

// dst[k * ld_dst + i] = src[i * ld_src + k] for i < 8, k < 2: 8 paired 64-bit loads and
// 4 shuffles instead of 16 scalar copies.
__attribute__((always_inline)) inline void gather_pair8(const float* src, int64_t ld_src, float* dst,
                                                        int64_t ld_dst) {
  auto pairs = [&](int64_t i, int64_t k) {  // [row i: j, j+1 | row k: j, j+1]
    const __m128 lo = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(src + i * ld_src)));
    return _mm_loadh_pi(lo, reinterpret_cast<const __m64*>(src + k * ld_src));
  };
  const __m256 a = _mm256_set_m128(pairs(4, 5), pairs(0, 1));  // rows 0 1 | 4 5
  const __m256 b = _mm256_set_m128(pairs(6, 7), pairs(2, 3));  // rows 2 3 | 6 7
  _mm256_storeu_ps(dst, _mm256_shuffle_ps(a, b, 0x88));           // column j, rows 0..7
  _mm256_storeu_ps(dst + ld_dst, _mm256_shuffle_ps(a, b, 0xDD));  // column j + 1
}

// dst[i * ld_dst + k] = src[k * ld_src + i] for i < 8, k < 2.
__attribute__((always_inline)) inline void scatter_pair8(const float* src, int64_t ld_src, float* dst,
                                                         int64_t ld_dst) {
  const __m256 c0 = _mm256_loadu_ps(src), c1 = _mm256_loadu_ps(src + ld_src);
  const __m256 lo = _mm256_unpacklo_ps(c0, c1);  // rows 0 1 | 4 5, as (j, j+1) pairs
  const __m256 hi = _mm256_unpackhi_ps(c0, c1);  // rows 2 3 | 6 7
  auto put = [&](__m128 v, int64_t i, int64_t k) {
    _mm_storel_pi(reinterpret_cast<__m64*>(dst + i * ld_dst), v);
    _mm_storeh_pi(reinterpret_cast<__m64*>(dst + k * ld_dst), v);
  };
  put(_mm256_castps256_ps128(lo), 0, 1);
  put(_mm256_castps256_ps128(hi), 2, 3);
  put(_mm256_extractf128_ps(lo, 1), 4, 5);
  put(_mm256_extractf128_ps(hi, 1), 6, 7);
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// Eight classes of a 16-row tile, in and out (the AVX-512 lane path's step between a
// whole 16-class block and a pair): tile[k * ld_dst + i] = rows[i * ld_src + k] for
// i < 16, k < 8, as two 8 x 8 transposes, half the instructions per class of two pairs.
__attribute__((always_inline)) inline void gather_octet(const float* src, int64_t ld_src, float* dst,
                                                        int64_t ld_dst) {
  transpose8(src, ld_src, dst, ld_dst);
  transpose8(src + 8 * ld_src, ld_src, dst + 8, ld_dst);
}
// rows[i * ld_dst + k] = tile[k * ld_src + i] for i < 16, k < 8.
__attribute__((always_inline)) inline void scatter_octet(const float* src, int64_t ld_src, float* dst,
                                                         int64_t ld_dst) {
  transpose8(src, ld_src, dst, ld_dst);
  transpose8(src + 8, ld_src, dst + 8 * ld_dst, ld_dst);
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i, j < W, with W = Vec<float>::size().
// Always inlined: as a call it cost ~10% of the small-C kernels (GCC kept it out of line).
__attribute__((always_inline)) inline void transpose_block(const float* src, int64_t ld_src,
                                                           float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(Vec<float>::size() == 16);
  gather_octet(src, ld_src, dst, ld_dst);                   // classes 0..7 of the 16 rows
  gather_octet(src + 8, ld_src, dst + 8 * ld_dst, ld_dst);  // classes 8..15
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(Vec<float>::size() == 8);
  transpose8(src, ld_src, dst, ld_dst);
#else
  constexpr int64_t W = Vec<float>::size();
  for (int64_t i = 0; i < W; ++i)
    for (int64_t j = 0; j < W; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
#endif
}

// Two classes (columns j, j + 1 of W rows) <-> two class rows of a tile:
// dst[k * ld_dst + i] = src[i * ld_src + k] for i < W, k < 2, and back.  The leftover
// classes of C = 10 (CIFAR-10, digits) take one of these instead of 2 W scalar copies
// each way.
__attribute__((always_inline)) inline void gather_pair(const float* src, int64_t ld_src, float* dst,
                                                       int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  gather_pair8(src, ld_src, dst, ld_dst);
  gather_pair8(src + 8 * ld_src, ld_src, dst + 8, ld_dst);
#elif defined(CPU_CAPABILITY_AVX2)
  gather_pair8(src, ld_src, dst, ld_dst);
#else
  constexpr int64_t W = Vec<float>::size();
  for (int64_t i = 0; i < W; ++i)
    for (int64_t k = 0; k < 2; ++k) dst[k * ld_dst + i] = src[i * ld_src + k];
#endif
}

__attribute__((always_inline)) inline void scatter_pair(const float* src, int64_t ld_src, float* dst,
                                                        int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX512)
  scatter_pair8(src, ld_src, dst, ld_dst);
  scatter_pair8(src + 8, ld_src, dst + 8 * ld_dst, ld_dst);
#elif defined(CPU_CAPABILITY_AVX2)
  scatter_pair8(src, ld_src, dst, ld_dst);
#else
  constexpr int64_t W = Vec<float>::size();
  for (int64_t i = 0; i < W; ++i)
    for (int64_t k = 0; k < 2; ++k) dst[i * ld_dst + k] = src[k * ld_src + i];
#endif
}

#if defined(CPU_CAPABILITY_AVX512)
// Rows of up to kPermuteMaxClasses classes that follow each other in memory: a tile's
// W = 16 rows are C whole vectors, and each class row of the tile is picked out of them
// by two-source permutes (vpermt2ps, 16 lanes from any two vectors per instruction),
// where the pair transposes move 64 bits per load and a leftover class one element at
// a time.  Back to rows it is the same operation with other tables.  The rows go out
// with ordinary stores: streaming a large gradient from these whole vectors was slower
// here (bench/results/class-count-ab.md).
constexpr int64_t kPermuteMaxClasses = 7;
struct VectorPermutes {
  static constexpr int kPairs = (kPermuteMaxClasses + 1) / 2;
  int64_t classes = 0;  // C vectors in, C out
  // Output vector o's lanes from source vectors 2k and 2k + 1: index[o][k] (0-15 the
  // first, 16-31 the second), for the lanes in lanes[o][k].
  __m512i index[kPermuteMaxClasses][kPairs];
  __mmask16 lanes[kPermuteMaxClasses][kPairs];

  VectorPermutes() = default;
  // source(o, l) = 16 * (source vector) + (its lane) for output vector o's lane l.
  template <typename F>
  VectorPermutes(int64_t C, F&& source) : classes(C) {
    for (int64_t o = 0; o < C; ++o) {
      alignas(64) int32_t idx[kPairs][16] = {};
      unsigned mask[kPairs] = {};
      for (int l = 0; l < 16; ++l) {
        const int64_t s = source(o, l), k = s / 32;
        idx[k][l] = int32_t(s % 32);
        mask[k] |= 1u << l;
      }
      for (int k = 0; k < kPairs; ++k) {
        index[o][k] = _mm512_load_si512(idx[k]);
        lanes[o][k] = __mmask16(mask[k]);
      }
    }
  }
};

// dst's C vectors from src's by the tables `t` (C = kC).
template <int kC>
__attribute__((always_inline)) inline void permute_vectors_c(const float* src, float* dst,
                                                             const VectorPermutes& t) {
  __m512 v[kC + 1];
  for (int s = 0; s < kC; ++s) v[s] = _mm512_loadu_ps(src + 16 * s);
  v[kC] = v[kC - 1];  // an odd count's last pair: its second vector is never picked
  for (int o = 0; o < kC; ++o) {
    __m512 r = _mm512_permutex2var_ps(v[0], t.index[o][0], v[1]);
    for (int k = 1; 2 * k < kC; ++k)
      r = _mm512_mask_blend_ps(t.lanes[o][k], r, _mm512_permutex2var_ps(v[2 * k], t.index[o][k], v[2 * k + 1]));
    _mm512_storeu_ps(dst + 16 * o, r);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// The same for the AVX2 build's 8-row tiles.  AVX2 has no two-source permute: each output
// vector takes a lane-crossing permute of every source vector and a blend, C^2 permutes
// a tile, which beats the pair transposes and element copies up to 3 classes.
constexpr int64_t kPermuteMaxClasses = 3;
struct VectorPermutes {
  int64_t classes = 0;
  __m256i index[kPermuteMaxClasses];                     // output o's lanes: lane in their source
  __m256 from[kPermuteMaxClasses][kPermuteMaxClasses];  // output o's lanes from source s: all ones

  VectorPermutes() = default;
  // source(o, l) = 8 * (source vector) + (its lane) for output vector o's lane l.
  template <typename F>
  VectorPermutes(int64_t C, F&& source) : classes(C) {
    for (int64_t o = 0; o < C; ++o) {
      alignas(32) int32_t idx[8];
      alignas(32) int32_t mask[kPermuteMaxClasses][8] = {};
      for (int l = 0; l < 8; ++l) {
        const int64_t s = source(o, l);
        idx[l] = int32_t(s % 8);
        mask[s / 8][l] = -1;
      }
      index[o] = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
      for (int64_t v = 0; v < C; ++v)
        from[o][v] = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(mask[v])));
    }
  }
};

template <int kC>
__attribute__((always_inline)) inline void permute_vectors_c(const float* src, float* dst,
                                                             const VectorPermutes& t) {
  __m256 v[kC];
  for (int s = 0; s < kC; ++s) v[s] = _mm256_loadu_ps(src + 8 * s);
  for (int o = 0; o < kC; ++o) {
    __m256 r = _mm256_permutevar8x32_ps(v[0], t.index[o]);
    for (int s = 1; s < kC; ++s)
      r = _mm256_blendv_ps(r, _mm256_permutevar8x32_ps(v[s], t.index[o]), t.from[o][s]);
    _mm256_storeu_ps(dst + 8 * o, r);
  }
}
#else
constexpr int64_t kPermuteMaxClasses = 0;  // this ISA takes the element copies
struct VectorPermutes {
  VectorPermutes() = default;
  template <typename F>
  VectorPermutes(int64_t, F&&) {}
};
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// dst's C vectors from src's by the tables `t`, C = t.classes <= kPermuteMaxClasses.
template <int kC = 1>
__attribute__((always_inline)) inline void permute_vectors(const float* src, float* dst,
                                                           const VectorPermutes& t) {
  if constexpr (kC < kPermuteMaxClasses) {
    if (t.classes != kC) return permute_vectors<kC + 1>(src, dst, t);
  }
  permute_vectors_c<kC>(src, dst, t);
}
#endif

// The tables both ways for a tile of W = Vec<float>::size() rows of C classes.
// Rows -> tile: class j's lane l is row l's column j, element l * C + j of the rows.
inline VectorPermutes permutes_to_tile(int64_t C) {
  return VectorPermutes(C, [C](int64_t j, int64_t l) { return l * C + j; });
}
// Tile -> rows: element q = W o + l of the rows is row q / C's class q % C, that is lane
// q / C of the tile's class row q % C.
inline VectorPermutes permutes_to_rows(int64_t C) {
  constexpr int64_t W = Vec<float>::size();
  return VectorPermutes(C, [C](int64_t o, int64_t l) {
    const int64_t q = W * o + l;
    return W * (q % C) + q / C;
  });
}

// Both tables for C classes, built once per process for every C up to
// kPermuteMaxClasses (a block of rows would otherwise rebuild them); nullptr beyond, and
// beyond the CPU's own limit (linclass_lane_permute_classes, shared_state.h: the
// permutes cost more than the pair transposes from 5 classes on an AMD EPYC).
struct TilePermutes {
  VectorPermutes to_tile, to_rows;
};
inline const TilePermutes* tile_permutes(int64_t C) {
  if (C < 1 || C > kPermuteMaxClasses || C > linclass_lane_permute_classes()) return nullptr;
  static const auto tables = [] {
    std::array<TilePermutes, kPermuteMaxClasses + 1> t{};
    for (int64_t c = 1; c <= kPermuteMaxClasses; ++c) t[c] = {permutes_to_tile(c), permutes_to_rows(c)};
    return t;
  }();
  return &tables[C];
}

}  // namespace linclass::cpu
