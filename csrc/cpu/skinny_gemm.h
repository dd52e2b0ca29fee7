// The products of a fused linear + loss with only a few rows, for cpu/linear_loss.cpp
// (W is C x D):
//   S  = X W^T (+ b)      scores, n x C         skinny_scores
//   dX = dS W             input gradient, n x D  skinny_backward (optional)
//   dW = dS^T X           weight gradient, C x D  skinny_backward (optional)
// With so few rows every product is a stream over W (and dW): nothing is reused but
// the rows of X, which stay in L1.  The BLAS runs these shapes as general GEMMs, at a
// fraction of memory speed on the development VM (MKL on an AMD EPYC: 8 rows of a
// 128256 x 1024 head read W at 8 GB/s); here W goes by once per product.  A small W
// takes them too: the BLAS path's fixed costs (three products through the dispatcher,
// the BLAS's threads woken for each) exceed these loops' whole time there.  Every
// output element is summed by one thread in a fixed order (scores over D, dX over the
// classes in order), so results do not depend on the thread count.
#pragma once

#include "../buffer_cache.h"
#include "../parallel.h"
#include "../tensor_ops.h"
#include "row_driver.h"
#include "vec_util.h"

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace linclass::cpu {

// Rows per step of skinny_backward (two groups of 8 rows in registers).
constexpr int64_t kSkinnyRows = 16;

// The fewest multiply-adds a thread takes in skinny_backward: waking a thread costs
// more than a smaller share.
constexpr int64_t kSkinnyTaskWork = int64_t(1) << 16;

// The scores take score_lanes (below) up to this many features, and from this many rows
// whatever the features: with fewer rows and more features transposing the weight's
// tiles costs more than the horizontal sums it saves (bench/results/linear-gemm-floor.md).
constexpr int64_t kLaneScoresMaxD = 64;
constexpr int64_t kLaneScoresMinRows = 8;

// A row stride for n x D work arrays: D rounded up to whole vectors plus one, so that
// rows are never a multiple of 4 KiB apart (such rows fall in the same L1 sets, and a
// store to one stalls loads from the others).
template <typename T>
inline int64_t skinny_stride(int64_t D) {
  constexpr int64_t V = Vec<T>::size();
  return (D + V - 1) / V * V + V;
}

namespace skinny {

// S[i, c] (+ b[c]) for the M rows X + i * ldx, against the row w (D long).
template <int M, typename T>
inline void score_rows(const T* X, int64_t ldx, const T* w, int64_t D, T bias, T* S,
                       int64_t ldS) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc[M];
  for (int i = 0; i < M; ++i) acc[i] = Vec<T>(T(0));
  int64_t j = 0;
  for (; j + V <= D; j += V) {
    const Vec<T> wv = Vec<T>::loadu(w + j);
    for (int i = 0; i < M; ++i) acc[i] = fmadd(Vec<T>::loadu(X + i * ldx + j), wv, acc[i]);
  }
  if (j < D) {  // masked loads zero the lanes past D
    const Vec<T> wv = Vec<T>::loadu(w + j, D - j);
    for (int i = 0; i < M; ++i) acc[i] = fmadd(Vec<T>::loadu(X + i * ldx + j, D - j), wv, acc[i]);
  }
  for (int i = 0; i < M; ++i) S[i * ldS] = hsum(acc[i]) + bias;
}

template <typename T>
inline void score_group(int64_t m, const T* X, int64_t ldx, const T* w, int64_t D, T bias, T* S,
                        int64_t ldS) {
  switch (m) {
#define LINCLASS_SKINNY_CASE(M) \
  case M: return score_rows<M>(X, ldx, w, D, bias, S, ldS);
    LINCLASS_SKINNY_CASE(1) LINCLASS_SKINNY_CASE(2) LINCLASS_SKINNY_CASE(3) LINCLASS_SKINNY_CASE(4)
    LINCLASS_SKINNY_CASE(5) LINCLASS_SKINNY_CASE(6) LINCLASS_SKINNY_CASE(7) LINCLASS_SKINNY_CASE(8)
#undef LINCLASS_SKINNY_CASE
  }
}

// S[c0, c0 + m) (+ b) of the row x, for m <= V (a vector's width) classes from c0: V dot
// products at once, reduced together (sum_rows: lane q is bitwise the hsum of its
// accumulator, as score_rows's).
template <typename T>
inline void score_tile(const T* x, const T* W, int64_t ldw, int64_t D, int64_t c0, int64_t m,
                       const T* b, T* s) {
  constexpr int64_t V = Vec<T>::size();
  const T* w[V];
  for (int64_t q = 0; q < V; ++q) w[q] = W + (c0 + std::min(q, m - 1)) * ldw;
  Vec<T> acc[V];
  for (int64_t q = 0; q < V; ++q) acc[q] = Vec<T>(T(0));
  int64_t j = 0;
  for (; j + V <= D; j += V) {
    const Vec<T> xv = Vec<T>::loadu(x + j);
    for (int64_t q = 0; q < V; ++q) acc[q] = fmadd(xv, Vec<T>::loadu(w[q] + j), acc[q]);
  }
  if (j < D) {  // masked loads zero the lanes past D
    const Vec<T> xv = Vec<T>::loadu(x + j, D - j);
    for (int64_t q = 0; q < V; ++q) acc[q] = fmadd(xv, Vec<T>::loadu(w[q] + j, D - j), acc[q]);
  }
  const Vec<T> bias = b ? Vec<T>::loadu(b + c0, m) : Vec<T>(T(0));
  (sum_rows(acc) + bias).store(s + c0, m);
}

// Features per partial sum of score_lanes: each score adds its D products in runs of
// this many, each run from zero, so its rounding grows with 16 + D / 16 terms rather
// than D, close to a dot product's D / W + log2 W (a single chain failed the float32
// accuracy tests at D = 1024).
constexpr int64_t kLaneScoresRun = 16;

// S[i, c0 .. c0 + m_p) of P tiles of V classes (tile p from c0 = p V) for the M rows
// X + i * ldx, from each tile's weights transposed: Wt[(p D + k) V + q] = W[c0 + q, k].
// Each score is a chain of multiply-adds in its own lane, x's features broadcast: no
// horizontal sums, which cost a small D more than its multiply-adds (score_tile's
// sum_rows).  P tiles at once give a row or two enough independent chains; a score's
// additions are the same whatever M and P.
template <int M, int P, typename T>
inline void score_lanes(const T* X, int64_t ldx, const T* Wt, int64_t D, const Vec<T>* bias, T* S,
                        int64_t ldS, const int64_t* m) {
  constexpr int64_t V = Vec<T>::size();
  Vec<T> acc[M][P];
  for (int i = 0; i < M; ++i)
    for (int p = 0; p < P; ++p) acc[i][p] = Vec<T>(T(0));
  for (int64_t k0 = 0; k0 < D; k0 += kLaneScoresRun) {
    Vec<T> run[M][P];
    for (int i = 0; i < M; ++i)
      for (int p = 0; p < P; ++p) run[i][p] = Vec<T>(T(0));
    for (int64_t k = k0; k < std::min(D, k0 + kLaneScoresRun); ++k) {
      Vec<T> wk[P];
      for (int p = 0; p < P; ++p) wk[p] = Vec<T>::loadu(Wt + (p * D + k) * V);
      for (int i = 0; i < M; ++i) {
        const Vec<T> xk(X[i * ldx + k]);
        for (int p = 0; p < P; ++p) run[i][p] = fmadd(xk, wk[p], run[i][p]);
      }
    }
    for (int i = 0; i < M; ++i)
      for (int p = 0; p < P; ++p) acc[i][p] = acc[i][p] + run[i][p];
  }
  for (int i = 0; i < M; ++i)
    for (int p = 0; p < P; ++p)
      if (m[p] > 0) (acc[i][p] + bias[p]).store(S + i * ldS + p * V, m[p]);
}

template <int P, typename T>
inline void score_lanes_group(int64_t rows, const T* X, int64_t ldx, const T* Wt, int64_t D,
                              const Vec<T>* bias, T* S, int64_t ldS, const int64_t* m) {
  switch (rows) {
#define LINCLASS_SKINNY_CASE(M) \
  case M: return score_lanes<M, P>(X, ldx, Wt, D, bias, S, ldS, m);
    LINCLASS_SKINNY_CASE(1) LINCLASS_SKINNY_CASE(2) LINCLASS_SKINNY_CASE(3) LINCLASS_SKINNY_CASE(4)
    LINCLASS_SKINNY_CASE(5) LINCLASS_SKINNY_CASE(6) LINCLASS_SKINNY_CASE(7) LINCLASS_SKINNY_CASE(8)
#undef LINCLASS_SKINNY_CASE
  }
}

// score_lanes over every row for P tiles from tile t0 (tiles past C store nothing),
// their weights packed into wt (room for P D V).
template <int P, typename T>
inline void score_lanes_tiles(const T* X, int64_t ldx, int64_t n, const T* W, const RowGeometry& w_rows,
                              const T* b, int64_t C, int64_t t0, T* wt, T* S) {
  constexpr int64_t V = Vec<T>::size();
  const int64_t D = w_rows.classes;
  int64_t m[P];
  Vec<T> bias[P];
  for (int p = 0; p < P; ++p) {
    const int64_t c0 = (t0 + p) * V;
    m[p] = std::clamp<int64_t>(C - c0, 0, V);
    if (m[p] > 0) pack_tile(W, w_rows, c0, m[p], wt + p * D * V);
    else std::fill(wt + p * D * V, wt + (p + 1) * D * V, T(0));
    bias[p] = b && m[p] > 0 ? Vec<T>::loadu(b + c0, m[p]) : Vec<T>(T(0));
  }
  for (int64_t i0 = 0; i0 < n; i0 += 8)
    score_lanes_group<P>(std::min<int64_t>(8, n - i0), X + i0 * ldx, ldx, wt, D, bias,
                         S + i0 * C + t0 * V, C, m);
}

}  // namespace skinny

// S (n x C, row stride C) = X W^T + b: X (n x D, row stride ldx), W (C x D, row stride
// ldw), b (C) or null.  Classes in parallel.
template <typename T>
void skinny_scores(const T* X, int64_t ldx, const T* W, int64_t ldw, const T* b, int64_t n,
                   int64_t D, int64_t C, T* S) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(D, 1));
  constexpr int64_t V = Vec<T>::size();
  const int64_t tiles = (C + V - 1) / V;
  if (D <= kLaneScoresMaxD || n >= kLaneScoresMinRows) {
    // A vector's width of classes at a time, their weights transposed (the lane path's
    // pack_tile) once for all n rows (score_lanes); one or two rows take 4 tiles at
    // once, 3-7 rows 2 tiles, for enough independent chains.
    RowGeometry w_rows;
    w_rows.outer = C;
    w_rows.classes = D;
    w_rows.stride_n = ldw;
    const int P = n >= 8 ? 1 : n >= 3 ? 2 : 4;
    const int64_t groups = (tiles + P - 1) / P;
    linclass::parallel_for(0, groups, std::max<int64_t>(1, grain / (V * P)), [&](int64_t g0, int64_t g1) {
      // The packed tiles on the stack up to 4 x 64 features (16 KiB), else on the heap.
      alignas(64) T local[4 * kLaneScoresMaxD * Vec<T>::size()];
      const bool on_stack = P * D <= 4 * kLaneScoresMaxD;
      ThreadScratch<T> heap(on_stack ? 0 : P * D * Vec<T>::size());
      T* wt = on_stack ? local : heap.data;
      for (int64_t g = g0; g < g1; ++g) {
        if (P == 1) skinny::score_lanes_tiles<1>(X, ldx, n, W, w_rows, b, C, g, wt, S);
        else if (P == 2) skinny::score_lanes_tiles<2>(X, ldx, n, W, w_rows, b, C, 2 * g, wt, S);
        else skinny::score_lanes_tiles<4>(X, ldx, n, W, w_rows, b, C, 4 * g, wt, S);
      }
    });
    return;
  }
  // Fewer rows of more features, a weight within the L2 cache with rows of at most 4 KiB:
  // a vector's width of classes of one row at a time (score_tile), their dot products
  // reduced together; a larger W streams by once for 8 rows at a
  // time, class after class, which the hardware prefetches better than many rows of W
  // at once (bench/results/linear-gemm-floor.md).  Both sum in the same order.
  const int64_t row_bytes = D * int64_t(sizeof(T));
  if (row_bytes <= 4096 && C * row_bytes <= (int64_t(1) << 20)) {
    linclass::parallel_for(0, tiles, std::max<int64_t>(1, grain / V), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t i = 0; i < n; ++i)
          skinny::score_tile(X + i * ldx, W, ldw, D, t * V, std::min(V, C - t * V), b, S + i * C);
    });
    return;
  }
  linclass::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t i0 = 0; i0 < n; i0 += 8)
        skinny::score_group(std::min<int64_t>(8, n - i0), X + i0 * ldx, ldx, W + c * ldw, D,
                            b ? b[c] : T(0), S + i0 * C + c, C);
  });
}

namespace skinny {

// Classes per step of the backward: their rows of W are loaded once per column vector
// for all n rows of dX, and the rows of X once for their G rows of dW.
constexpr int64_t kGroup = 4;

// Columns [j, j + m) of the g <= kGroup classes from c: part_i += sum_g ds[i][g] w_g
// (kDX) and dW_g = sum_i ds[i][g] x_i (kDW).  ds[i * kGroup + g].
template <bool kDX, bool kDW, typename T>
inline void group_columns(const T* ds, int64_t n, int64_t g, const T* const* w, const T* X,
                          int64_t ldx, T* part, int64_t ldp, int64_t j, int64_t m,
                          Vec<T>* dw) {
  Vec<T> wv[kGroup];
  for (int64_t q = 0; q < kGroup; ++q) {
    dw[q] = Vec<T>(T(0));
    if (kDX) wv[q] = q < g ? Vec<T>::loadu(w[q] + j, m) : Vec<T>(T(0));
  }
  for (int64_t i = 0; i < n; ++i) {
    const T* d = ds + i * kGroup;
    if (kDX) {
      Vec<T> a = Vec<T>::loadu(part + i * ldp + j, m);
      for (int64_t q = 0; q < kGroup; ++q) a = fmadd(Vec<T>(d[q]), wv[q], a);
      a.store(part + i * ldp + j, m);
    }
    if (kDW) {
      const Vec<T> xv = Vec<T>::loadu(X + i * ldx + j, m);
      for (int64_t q = 0; q < kGroup; ++q) dw[q] = fmadd(Vec<T>(d[q]), xv, dw[q]);
    }
  }
}

template <bool kDX, bool kDW, typename T>
void backward_chunk(const T* dS, int64_t n, int64_t C, int64_t c0, int64_t c1, const T* X,
                    int64_t ldx, const T* W, int64_t ldw, int64_t D, T* part, int64_t ldp, T* dW,
                    bool stream, bool accumulate) {
  constexpr int64_t V = Vec<T>::size();
  T ds[kSkinnyRows * kGroup];
  for (int64_t c = c0; c < c1; c += kGroup) {
    const int64_t g = std::min<int64_t>(kGroup, c1 - c);
    const T* w[kGroup];
    for (int64_t q = 0; q < kGroup; ++q) w[q] = W + (c + std::min(q, g - 1)) * ldw;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t q = 0; q < kGroup; ++q) ds[i * kGroup + q] = q < g ? dS[i * C + c + q] : T(0);
    Vec<T> dw[kGroup];
    if (!kDW) {
      for (int64_t j = 0; j < D; j += V)
        group_columns<kDX, false>(ds, n, g, w, X, ldx, part, ldp, j, std::min<int64_t>(V, D - j), dw);
      continue;
    }
    // dW's rows are written vector by vector, each vector of the g rows from one pass.
    for (int64_t j = 0; j < D; j += V) {
      const int64_t m = std::min<int64_t>(V, D - j);
      group_columns<kDX, true>(ds, n, g, w, X, ldx, part, ldp, j, m, dw);
      for (int64_t q = 0; q < g; ++q) {
        T* out = dW + (c + q) * D + j;
        if (accumulate)
          (Vec<T>::loadu(out, m) + dw[q]).store(out, m);
        else if (stream && m == V && reinterpret_cast<uintptr_t>(out) % sizeof(Vec<T>) == 0)
          stream_store(out, dw[q]);
        else
          dw[q].store(out, m);
      }
    }
  }
}

}  // namespace skinny

// dX (n x D, contiguous) = dS W and dW (C x D, contiguous) = dS^T X, either null when
// not wanted; dS is n x C (row stride C); X's rows at stride ldx (best not a multiple of
// 4 KiB: rows that far apart share L1 sets).  Classes in chunks whose number depends on
// the shape only: each chunk streams its rows of W and of dW whole (dW with streaming
// stores when larger than the caches and written once), kGroup classes at a time, for
// kSkinnyRows rows at a time (their register groups and dX partials are sized for
// that many), dW adding the row blocks in row order; each chunk sums its classes' part of
// dX into its own n x D partial in class order, and the partials are then added in chunk
// order.  One parallel region for all n rows: a region per 16 rows cost more than the
// products of a few hundred rows of a small weight.  (Cutting the columns instead read
// every row of W in pieces, one column block per pass: ~3x slower here.)
template <typename T>
void skinny_backward(const T* dS, int64_t n, int64_t C, const T* X, int64_t ldx, const T* W,
                     int64_t ldw, int64_t D, T* dX, T* dW) {
  const int64_t ldp = skinny_stride<T>(D);
  // Up to 64 chunks of at least 64 classes, and at most 8 MiB of dX partials (a wide D
  // gets fewer, longer chunks): a function of the shape only.
  const int64_t partial_bytes = n * ldp * int64_t(sizeof(T));
  const int64_t most = std::clamp<int64_t>((int64_t(8) << 20) / partial_bytes, 1, 64);
  const int64_t chunk = std::max<int64_t>(64, (C + most - 1) / most);
  const int64_t chunks = (C + chunk - 1) / chunk;
  const bool stream = dW && n <= kSkinnyRows && C * D * int64_t(sizeof(T)) > (int64_t(8) << 20);
  // From the buffer cache (up to 8 MiB: a fresh allocation would page-fault every
  // call); each chunk zeroes its own partial.
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>);
  const Tensor scratch =
      dX ? empty_cached({chunks * n * ldp}, std::is_same_v<T, float> ? ScalarType::Float
                                                                     : ScalarType::Double)
         : Tensor();
  T* const partials = dX ? scratch.mutable_data_ptr<T>() : nullptr;
  const int64_t per_chunk = n * chunk * D * ((dX ? 1 : 0) + (dW ? 1 : 0));
  const int64_t grain = std::max<int64_t>(1, kSkinnyTaskWork / std::max<int64_t>(1, per_chunk));
  linclass::parallel_for(0, chunks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t c0 = k * chunk, c1 = std::min(C, c0 + chunk);
      T* part = dX ? partials + k * n * ldp : nullptr;
      if (part) std::fill(part, part + n * ldp, T(0));
      for (int64_t r0 = 0; r0 < n; r0 += kSkinnyRows) {
        const int64_t rows = std::min(kSkinnyRows, n - r0);
        const T* ds = dS + r0 * C;
        const T* x = X + r0 * ldx;
        T* p = part ? part + r0 * ldp : nullptr;
        const bool accumulate = r0 > 0;
        if (dX && dW)
          skinny::backward_chunk<true, true>(ds, rows, C, c0, c1, x, ldx, W, ldw, D, p, ldp, dW,
                                             stream, accumulate);
        else if (dX)
          skinny::backward_chunk<true, false>(ds, rows, C, c0, c1, x, ldx, W, ldw, D, p, ldp, dW,
                                              stream, accumulate);
        else
          skinny::backward_chunk<false, true>(ds, rows, C, c0, c1, x, ldx, W, ldw, D, p, ldp, dW,
                                              stream, accumulate);
      }
    }
    if (stream) stream_fence();
  });
  if (dX) {
    for (int64_t i = 0; i < n; ++i) {
      std::copy(partials + i * ldp, partials + i * ldp + D, dX + i * D);
      for (int64_t k = 1; k < chunks; ++k) {
        const T* part = partials + (k * n + i) * ldp;
        for (int64_t j = 0; j < D; ++j) dX[i * D + j] += part[j];
      }
    }
  }
}

}  // namespace linclass::cpu
