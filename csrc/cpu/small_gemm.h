// The three products of a linear layer with few outputs (C <= kSmallGemmC classes):
//   S  = X W^T (+ b)   scores,          n x C
//   dW = dS^T X        weight gradient, C x D (accumulated over blocks of rows)
//   dX = dS W          input gradient,  n x D
// For C = 10 (CIFAR-10 and digits) the BLAS takes its slow, general path for these
// skinny shapes (measured here: ~30 GFLOP/s, 5 GB/s of X, for a 341 x 3073 x 10 block);
// these loops keep all C accumulators in registers so that every product reads X or
// writes dX once, at memory speed.  Each output element is a sum in a fixed order,
// whatever the thread count.
#pragma once

#include "vec_util.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace linclass::cpu {

// 12 accumulators + 2 temporaries fit AVX2's 16 vector registers.
constexpr int64_t kSmallGemmC = 12;
// W is walked in column chunks of this many floats, so that the chunk of all C rows
// (12 x 2 KiB) stays in L1 while the rows of X stream past it; otherwise every row of X
// would pull all of W through from L2, which is what limits the unchunked loop.
constexpr int64_t kSmallGemmChunk = 512;
// Rows of X prefetched ahead within a chunk.
constexpr int64_t kPrefetchRows = 4;
// Rows of X read together by the weight gradient.
constexpr int64_t kGroupRows = 8;

namespace detail {

using VF = Vec<float>;

// Row r of X, or row index[r] when the rows are gathered by an index.
inline int64_t row(const int64_t* index, int64_t r) { return index ? index[r] : r; }

// Row pointers of the NC rows of a row-major matrix (kept in registers by the loops).
template <int NC>
struct Rows {
  const float* p[NC];
  Rows(const float* base, int64_t ld) {
    for (int c = 0; c < NC; ++c) p[c] = base + c * ld;
  }
};

template <int NC>
void scores(const float* X, int64_t ldx, const int64_t* index, const int64_t* next_index,
            const float* W, int64_t ldw, const float* b, float* S, int64_t lds, int64_t n,
            int64_t D) {
  constexpr int64_t L = VF::size();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [=](int64_t r0, int64_t r1) {
    // Per-row vector partial sums, carried from one column chunk to the next.
    std::vector<VF> part(size_t((r1 - r0) * NC), VF(0.f));
    for (int64_t j0 = 0; j0 < D; j0 += kSmallGemmChunk) {
      const int64_t j1 = std::min(D, j0 + kSmallGemmChunk);
      const int64_t full = j0 + (j1 - j0) / L * L;
      const Rows<NC> w(W, ldw);
      for (int64_t r = r0; r < r1; ++r) {
        const float* x = X + row(index, r) * ldx;
        if (r + kPrefetchRows < r1) {  // strided or gathered segments: prefetchers miss them
          const float* ahead = X + row(index, r + kPrefetchRows) * ldx;
          for (int64_t j = j0; j < j1; j += 16) __builtin_prefetch(ahead + j, 0, 1);
        }
        if (next_index) {  // the next SGD minibatch's row, while this one computes
          const float* next = X + next_index[r] * ldx;
          for (int64_t j = j0; j < j1; j += 16) __builtin_prefetch(next + j, 0, 1);
        }
        VF* p = part.data() + (r - r0) * NC;
        VF acc[NC];
        for (int c = 0; c < NC; ++c) acc[c] = p[c];
        for (int64_t j = j0; j < full; j += L) {
          const VF xv = VF::loadu(x + j);
          for (int c = 0; c < NC; ++c) acc[c] = at::vec::fmadd(xv, VF::loadu(w.p[c] + j), acc[c]);
        }
        if (full < j1) {  // zero-filled tails
          const int64_t m = j1 - full;
          const VF xv = VF::loadu(x + full, m);
          for (int c = 0; c < NC; ++c) acc[c] = at::vec::fmadd(xv, VF::loadu(w.p[c] + full, m), acc[c]);
        }
        for (int c = 0; c < NC; ++c) p[c] = acc[c];
      }
    }
    for (int64_t r = r0; r < r1; ++r)
      for (int c = 0; c < NC; ++c)
        S[r * lds + c] = hsum(part[(r - r0) * NC + c]) + (b ? b[c] : 0.f);
  });
}

template <int NC>
void weight_grad(const float* dS, int64_t lds, const float* X, int64_t ldx, const int64_t* index,
                 float* dW, int64_t ldw, int64_t n, int64_t D, bool accumulate) {
  constexpr int64_t L = VF::size();
  const int64_t chunks = (D + L - 1) / L;
  // Rows in groups of kGroupRows: within a group each chunk of dW is loaded once and the
  // group's rows are read as kGroupRows sequential streams (prefetcher-friendly, also
  // when they are gathered); groups and rows are added in order: deterministic.
  at::parallel_for(0, chunks, std::max<int64_t>(1, 64 / std::max<int64_t>(n, 1)), [=](int64_t k0, int64_t k1) {
    for (int64_t g0 = 0; g0 < n; g0 += kGroupRows) {
      const int64_t g1 = std::min(n, g0 + kGroupRows);
      const float* x[kGroupRows];
      for (int64_t r = g0; r < g1; ++r) x[r - g0] = X + row(index, r) * ldx;
      const bool first = !accumulate && g0 == 0;
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t j = k * L, m = std::min<int64_t>(L, D - j);
        VF acc[NC];
        for (int c = 0; c < NC; ++c) acc[c] = first ? VF(0.f) : VF::loadu(dW + c * ldw + j, m);
        for (int64_t r = g0; r < g1; ++r) {
          const VF xv = m == L ? VF::loadu(x[r - g0] + j) : VF::loadu(x[r - g0] + j, m);
          const float* s = dS + r * lds;
          for (int c = 0; c < NC; ++c) acc[c] = at::vec::fmadd(VF(s[c]), xv, acc[c]);
        }
        for (int c = 0; c < NC; ++c) acc[c].store(dW + c * ldw + j, m);
      }
    }
  });
}

template <int NC>
void input_grad(const float* dS, int64_t lds, const float* W, int64_t ldw, float* dX, int64_t ldx,
                int64_t n, int64_t D) {
  constexpr int64_t L = VF::size();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [=](int64_t r0, int64_t r1) {
    for (int64_t j0 = 0; j0 < D; j0 += kSmallGemmChunk) {  // W's chunk stays in L1
      const int64_t j1 = std::min(D, j0 + kSmallGemmChunk);
      const int64_t full = j0 + (j1 - j0) / L * L;
      const Rows<NC> w(W, ldw);
      for (int64_t r = r0; r < r1; ++r) {
        VF s[NC];
        for (int c = 0; c < NC; ++c) s[c] = VF(dS[r * lds + c]);
        float* out = dX + r * ldx;
        for (int64_t j = j0; j < full; j += L) {
          VF acc(0.f);
          for (int c = 0; c < NC; ++c) acc = at::vec::fmadd(s[c], VF::loadu(w.p[c] + j), acc);
          acc.store(out + j);
        }
        if (full < j1) {
          const int64_t m = j1 - full;
          VF acc(0.f);
          for (int c = 0; c < NC; ++c) acc = at::vec::fmadd(s[c], VF::loadu(w.p[c] + full, m), acc);
          acc.store(out + full, m);
        }
      }
    }
  });
}

// Calls F<NC> for the runtime C (1 <= C <= kSmallGemmC).
template <template <int> class F, typename... A>
void with_classes(int64_t C, A&&... a) {
  switch (C) {
#define LINCLASS_SMALL_CASE(k) \
  case k:                      \
    return F<k>::run(std::forward<A>(a)...);
    LINCLASS_SMALL_CASE(1) LINCLASS_SMALL_CASE(2) LINCLASS_SMALL_CASE(3) LINCLASS_SMALL_CASE(4)
    LINCLASS_SMALL_CASE(5) LINCLASS_SMALL_CASE(6) LINCLASS_SMALL_CASE(7) LINCLASS_SMALL_CASE(8)
    LINCLASS_SMALL_CASE(9) LINCLASS_SMALL_CASE(10) LINCLASS_SMALL_CASE(11) LINCLASS_SMALL_CASE(12)
#undef LINCLASS_SMALL_CASE
  }
}
template <int NC>
struct Scores {
  template <typename... A>
  static void run(A... a) { scores<NC>(a...); }
};
template <int NC>
struct WeightGrad {
  template <typename... A>
  static void run(A... a) { weight_grad<NC>(a...); }
};
template <int NC>
struct InputGrad {
  template <typename... A>
  static void run(A... a) { input_grad<NC>(a...); }
};

}  // namespace detail

// Row-major operands with unit stride along D (rows of X, W, dX; ld* are row strides).
// `index` (may be null) gathers the rows of X: row r is X[index[r]] (the SGD minibatch,
// read in place instead of copied).
// `next_index` (may be null, else n entries) names rows to prefetch meanwhile.
inline void small_scores(const float* X, int64_t ldx, const int64_t* index, const float* W,
                         int64_t ldw, const float* b, float* S, int64_t lds, int64_t n, int64_t D,
                         int64_t C, const int64_t* next_index = nullptr) {
  detail::with_classes<detail::Scores>(C, X, ldx, index, next_index, W, ldw, b, S, lds, n, D);
}
inline void small_weight_grad(const float* dS, int64_t lds, const float* X, int64_t ldx,
                              const int64_t* index, float* dW, int64_t ldw, int64_t n, int64_t D,
                              int64_t C, bool accumulate) {
  detail::with_classes<detail::WeightGrad>(C, dS, lds, X, ldx, index, dW, ldw, n, D, accumulate);
}
inline void small_input_grad(const float* dS, int64_t lds, const float* W, int64_t ldw, float* dX,
                             int64_t ldx, int64_t n, int64_t D, int64_t C) {
  detail::with_classes<detail::InputGrad>(C, dS, lds, W, ldw, dX, ldx, n, D);
}

}  // namespace linclass::cpu
