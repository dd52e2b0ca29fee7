// A linear layer with few outputs (C <= kSmallGemmC classes) and its fused loss, for a
// block of n rows of X (N x D, row-major, optionally gathered through an index):
//   S  = X W^T (+ b)                    scores, n x C
//   S -> dS                             the caller's fused loss kernel, in place
//   dX = dS W                           input gradient,  n x D (optional)
//   dW (+)= dS^T X                      weight gradient, C x D (optional)
// For C = 10 (CIFAR-10 and digits) the BLAS takes its slow, general path for these
// skinny shapes (measured here: ~30 GFLOP/s for a 341 x 3073 x 10 block).  Here the
// rows are cut into sub-blocks small enough for one core's L2; each sub-block runs all
// four steps on one thread, so X is read from memory once and the dW product finds it
// in that core's cache.  Sub-block s of every block adds its dW product to partial s
// (blocks in order); the partials are added in order once, at the end.  Sub-blocks
// depend only on D, never on the thread count, so every result is the same whatever
// the number of threads.
#pragma once

#include "../parallel.h"
#include "../shared_state.h"
#include "../tensor_ops.h"
#include "vec_util.h"


#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

namespace linclass::cpu {

// The score tile keeps 3 rows x 4 classes of accumulators in registers, the dW product
// one per class (past 14 classes, for groups of at most 10: weight_rows).  The path
// beats a slow BLAS (MKL on an AMD EPYC) up to 64 classes with AVX-512's 32 registers
// and to 32 with the AVX2 kernels (bench/results/linear-gemm-floor.md); the x86-64
// baseline build keeps 12.  On Intel CPUs MKL is faster from 12 classes:
// small_gemm_max_classes().
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kSmallGemmC = 64;
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kSmallGemmC = 32;
#else
constexpr int64_t kSmallGemmC = 12;
#endif
// The limit in force: kSmallGemmC, or fewer classes on a CPU whose BLAS is fast at these
// shapes (linclass_small_gemm_classes, shared_state.h).
inline int64_t small_gemm_max_classes() {
  const int64_t limit = linclass_small_gemm_classes();
  return limit < 0 ? kSmallGemmC : std::min(limit, kSmallGemmC);
}
// W is walked in column chunks of this many floats: the chunk of all C rows (12 x 2 KiB)
// and of the 3 rows of X stays in L1 across the class passes of a tile.
constexpr int64_t kSmallGemmChunk = 512;
// Sub-blocks per block of the caller (and dW partials, C x D each): the most threads a
// block keeps busy, fixed so that no result depends on the thread count: 16 lets a
// 16-core host use every core, at no cost on fewer (bench/results/linear-gemm-floor.md).
constexpr int64_t kSubBlocks = 16;
constexpr int64_t kMinSubBlocks = 4, kMinSubRows = 24;

// Rows per sub-block: ~448 KiB of X (one core's L2 here), a multiple of the 3-row tile.
inline int64_t small_sub_rows(int64_t D) {
  const int64_t rows = (int64_t(448) << 10) / (std::max<int64_t>(D, 1) * int64_t(sizeof(float)));
  return std::clamp<int64_t>(rows, 3, 96) / 3 * 3;
}

// Operands of one block.  Rows of X, W and dX have unit stride along D.
struct SmallLinear {
  const float* X = nullptr;
  int64_t ldx = 0;
  const int64_t* index = nullptr;       // row r is X[index[r]] (the SGD minibatch), or null
  const float* W = nullptr;             // C x D
  int64_t ldw = 0;
  const float* b = nullptr;             // C, or null
  int64_t n = 0, D = 0, C = 0;
  float* S = nullptr;                   // n x C, contiguous: scores, then dS
  float* dX = nullptr;                  // n x D (row stride lddx), or null
  int64_t lddx = 0;
  bool weight_grad = false;             // add dS^T X to the partials
};

// The dW partials of a sequence of blocks: partial s sums sub-block s of each block.
// The buffer is not zeroed: each partial's first sub-block stores rather than adds.
struct SmallWeightGrad {
  std::unique_ptr<float[]> partials;
  int64_t size = 0;  // floats in `partials`
  int64_t used = 0;  // partials written so far

  float* reserve(int64_t n) {
    if (n > size) {
      std::unique_ptr<float[]> grown(new float[size_t(n)]);
      std::copy_n(partials.get(), size, grown.get());
      partials = std::move(grown);
      size = n;
    }
    return partials.get();
  }

  // dW (C x D, contiguous) = the sum of the partials, in order.  Tasks of at least 64k
  // additions: waking the thread pool costs more than a few partials of a small W.
  void finish(float* dW, int64_t CD) const {
    const int64_t grain = std::max<int64_t>(4096, (int64_t(1) << 16) / std::max<int64_t>(used, 1));
    linclass::parallel_for(0, CD, grain, [&](int64_t e0, int64_t e1) {
      std::fill(dW + e0, dW + e1, 0.f);
      for (int64_t s = 0; s < used; ++s)
        for (int64_t e = e0; e < e1; ++e) dW[e] += partials[s * CD + e];
    });
  }
};

namespace detail {

using VF = Vec<float>;

inline const float* row_ptr(const SmallLinear& a, int64_t r) {
  return a.X + (a.index ? a.index[r] : r) * a.ldx;
}

// acc[q * 4 + c] += x_q . w_c over the full vectors of [j0, j1) and a zero-filled tail
// of `tail` columns at j1: 3 rows x NCB (<= 4) classes, W rows read once for 3 rows.
template <int NCB>
inline void score_tile(const float* x0, const float* x1, const float* x2, const float* w,
                       int64_t ldw, int64_t j0, int64_t j1, int64_t tail, VF* acc) {
  constexpr int64_t L = VF::size();
  VF a[12];
  for (int i = 0; i < 12; ++i) a[i] = acc[i];
  for (int64_t j = j0; j < j1; j += L) {
    const VF u = VF::loadu(x0 + j), v = VF::loadu(x1 + j), t = VF::loadu(x2 + j);
    for (int c = 0; c < NCB; ++c) {
      const VF wv = VF::loadu(w + c * ldw + j);
      a[c] = cpu::fmadd(u, wv, a[c]);
      a[4 + c] = cpu::fmadd(v, wv, a[4 + c]);
      a[8 + c] = cpu::fmadd(t, wv, a[8 + c]);
    }
  }
  if (tail) {
    const VF u = VF::loadu(x0 + j1, tail), v = VF::loadu(x1 + j1, tail), t = VF::loadu(x2 + j1, tail);
    for (int c = 0; c < NCB; ++c) {
      const VF wv = VF::loadu(w + c * ldw + j1, tail);
      a[c] = cpu::fmadd(u, wv, a[c]);
      a[4 + c] = cpu::fmadd(v, wv, a[4 + c]);
      a[8 + c] = cpu::fmadd(t, wv, a[8 + c]);
    }
  }
  for (int i = 0; i < 12; ++i) acc[i] = a[i];
}

// S[r0:r1] = X[r0:r1] W^T + b, three rows at a time (a short last tile repeats its last row).
template <int NC>
void scores_rows(const SmallLinear& a, int64_t r0, int64_t r1) {
  constexpr int64_t L = VF::size();
  constexpr int P = (NC + 3) / 4;  // class passes of 4
  const int64_t D = a.D;
  for (int64_t r = r0; r < r1; r += 3) {
    const int64_t m = std::min<int64_t>(3, r1 - r);
    const float* x0 = row_ptr(a, r);
    const float* x1 = row_ptr(a, r + std::min<int64_t>(1, m - 1));
    const float* x2 = row_ptr(a, r + m - 1);
    VF acc[P][12];
    for (int p = 0; p < P; ++p)
      for (int i = 0; i < 12; ++i) acc[p][i] = VF(0.f);
    for (int64_t j0 = 0; j0 < D; j0 += kSmallGemmChunk) {
      const int64_t j1 = std::min(D, j0 + kSmallGemmChunk);
      const int64_t full = j0 + (j1 - j0) / L * L;
      if (a.index && r + 3 < r1)  // gathered rows: the prefetchers cannot guess the next ones
        for (int64_t q = r + 3; q < std::min(r + 6, r1); ++q)
          for (int64_t j = j0; j < j1; j += 16) __builtin_prefetch(row_ptr(a, q) + j, 0, 1);
      for (int p = 0; p < NC / 4; ++p)
        score_tile<4>(x0, x1, x2, a.W + 4 * p * a.ldw, a.ldw, j0, full, j1 - full, acc[p]);
      if constexpr (NC % 4 != 0)
        score_tile<NC % 4>(x0, x1, x2, a.W + (NC / 4) * 4 * a.ldw, a.ldw, j0, full, j1 - full, acc[P - 1]);
    }
    for (int64_t q = 0; q < m; ++q)
      for (int c = 0; c < NC; ++c)
        a.S[(r + q) * NC + c] = hsum(acc[c / 4][q * 4 + c % 4]) + (a.b ? a.b[c] : 0.f);
  }
}

// Vector registers of the ISA: the dW product's tile below must fit them.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// out (+)= dS[r0:r1]^T X[r0:r1] (C x D), rows added in order; X's rows are in cache.
// The tile is NC classes x K vectors of columns: each row's K vectors of X are loaded
// once for NC * K multiply-adds and each broadcast dS entry serves K of them, so with
// K = 2 a multiply-add takes about half a load instead of one and a tenth (at 10
// classes).  The walk goes down the rows, a row stride apart, so the rows' next columns
// are prefetched into L1 as it goes.  Each element still adds its rows in order: K
// changes no bit of the result.
template <int NC, int K>
inline void weight_columns(const SmallLinear& a, int64_t r0, int64_t r1, int64_t j, float* out,
                           bool accumulate, int64_t c0 = 0) {
  constexpr int64_t L = VF::size();
  VF acc[K][NC];
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < NC; ++c)
      acc[k][c] = accumulate ? VF::loadu(out + (c0 + c) * a.D + j + k * L) : VF(0.f);
  const bool ahead = j + 2 * K * L <= a.D;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = row_ptr(a, r) + j;
    if (ahead)
      for (int k = 0; k < K; ++k) __builtin_prefetch(x + (K + k) * L, 0, 3);
    VF xv[K];
    for (int k = 0; k < K; ++k) xv[k] = VF::loadu(x + k * L);
    const float* s = a.S + r * a.C + c0;
    for (int c = 0; c < NC; ++c) {
      const VF sc(s[c]);
      for (int k = 0; k < K; ++k) acc[k][c] = cpu::fmadd(sc, xv[k], acc[k][c]);
    }
  }
  for (int k = 0; k < K; ++k)
    for (int c = 0; c < NC; ++c) acc[k][c].store(out + (c0 + c) * a.D + j + k * L);
}

template <int NC>
void weight_rows(const SmallLinear& a, int64_t r0, int64_t r1, float* out, bool accumulate) {
  constexpr int64_t L = VF::size();
  // Two vectors of columns where their 2 NC accumulators, the two loads and a broadcast
  // fit the registers; past 14 classes, groups of at most 10 classes (a group of 12 had
  // GCC spill its accumulators to the stack), each walking the same rows, whose columns
  // j stay in L1 between the groups.
  constexpr int kMaxGroup = 10;
  constexpr int kGroups = NC <= 14 ? 1 : (NC + kMaxGroup - 1) / kMaxGroup, G = (NC + kGroups - 1) / kGroups;
  constexpr int K = 2 * G + 3 <= kVectorRegisters ? 2 : 1;
  int64_t j = 0;
  for (; j + K * L <= a.D; j += K * L) {
    if constexpr (kGroups == 1) {
      weight_columns<NC, K>(a, r0, r1, j, out, accumulate);
    } else {
      for (int g = 0; g + 1 < kGroups; ++g) weight_columns<G, K>(a, r0, r1, j, out, accumulate, g * G);
      weight_columns<NC - (kGroups - 1) * G, K>(a, r0, r1, j, out, accumulate, (kGroups - 1) * G);
    }
  }
  for (; j < a.D; j += L) {  // the last columns, one (partial) vector at a time
    const int64_t m = std::min<int64_t>(L, a.D - j);
    VF acc[NC];
    for (int c = 0; c < NC; ++c) acc[c] = accumulate ? VF::loadu(out + c * a.D + j, m) : VF(0.f);
    for (int64_t r = r0; r < r1; ++r) {
      const VF xv = VF::loadu(row_ptr(a, r) + j, m);
      const float* s = a.S + r * NC;
      for (int c = 0; c < NC; ++c) acc[c] = cpu::fmadd(VF(s[c]), xv, acc[c]);
    }
    for (int c = 0; c < NC; ++c) acc[c].store(out + c * a.D + j, m);
  }
}

// Rows q < 3 of a dX tile (pointers to their dS rows and dX rows; a short tile repeats
// its last row, stored once): K vectors of columns from j, the last one `last` columns
// wide.  Each class's K vectors of W serve the 3 rows and each broadcast dS entry K
// vectors: 3 K independent sums, where one sum per vector was a chain of NC dependent
// multiply-adds.  Every element still adds its classes in order from zero.
template <int NC, int K>
inline void input_tile(const SmallLinear& a, const float* const* s, float* const* out, int64_t rows,
                       int64_t j, int64_t last) {
  constexpr int64_t L = VF::size();
  VF acc[3][K];
  for (int q = 0; q < 3; ++q)
    for (int k = 0; k < K; ++k) acc[q][k] = VF(0.f);
  for (int c = 0; c < NC; ++c) {
    const float* w = a.W + c * a.ldw + j;
    VF wv[K];
    for (int k = 0; k < K; ++k) wv[k] = k + 1 < K || last == L ? VF::loadu(w + k * L) : VF::loadu(w + k * L, last);
    for (int q = 0; q < 3; ++q) {
      const VF sc(s[q][c]);
      for (int k = 0; k < K; ++k) acc[q][k] = cpu::fmadd(sc, wv[k], acc[q][k]);
    }
  }
  for (int64_t q = 0; q < rows; ++q)
    for (int k = 0; k < K; ++k) acc[q][k].store(out[q] + j + k * L, k + 1 < K ? L : last);
}

// dX[r0:r1] = dS[r0:r1] W, W's column chunk in L1 while the rows pass, 3 rows at a time.
template <int NC>
void input_rows(const SmallLinear& a, int64_t r0, int64_t r1) {
  constexpr int64_t L = VF::size();
  // Vectors of columns a tile: its 3 K sums, K loads of W and a broadcast fit the registers.
  constexpr int K = 4 * 3 + 4 + 1 <= kVectorRegisters ? 4 : 2;
  for (int64_t j0 = 0; j0 < a.D; j0 += kSmallGemmChunk) {
    const int64_t j1 = std::min(a.D, j0 + kSmallGemmChunk);
    for (int64_t r = r0; r < r1; r += 3) {
      const int64_t m = std::min<int64_t>(3, r1 - r);
      const float* s[3];
      float* out[3];
      for (int64_t q = 0; q < 3; ++q) {
        const int64_t row = r + std::min(q, m - 1);
        s[q] = a.S + row * NC;
        out[q] = a.dX + row * a.lddx;
      }
      int64_t j = j0;
      for (; j + K * L <= j1; j += K * L) input_tile<NC, K>(a, s, out, m, j, L);
      for (; j + L <= j1; j += L) input_tile<NC, 1>(a, s, out, m, j, L);
      if (j < j1) input_tile<NC, 1>(a, s, out, m, j, j1 - j);
    }
  }
}

template <int NC, typename Loss>
double run_block(const SmallLinear& a, Loss& loss, SmallWeightGrad& g) {
  // A block of fewer rows than kMinSubBlocks full sub-blocks (a small batch) is cut
  // into kMinSubBlocks shorter ones, of at least kMinSubRows rows, so that its rows
  // spread over the threads: 200 rows in sub-blocks of 96 gave one thread 192 of them.
  const int64_t quarter = (a.n + kMinSubBlocks - 1) / kMinSubBlocks;
  const int64_t sub = std::min(small_sub_rows(a.D), std::max(kMinSubRows, (quarter + 2) / 3 * 3));
  const int64_t subs = (a.n + sub - 1) / sub, CD = NC * a.D;
  std::vector<double> sums(size_t(std::max<int64_t>(subs, 0)));
  float* partials = a.weight_grad ? g.reserve(subs * CD) : nullptr;
  linclass::parallel_for(0, subs, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t r0 = s * sub, r1 = std::min(a.n, r0 + sub);
      scores_rows<NC>(a, r0, r1);
      sums[s] = loss(a.S + r0 * NC, r0, r1 - r0);  // scores -> dS, in place
      if (a.dX) input_rows<NC>(a, r0, r1);
      if (a.weight_grad) weight_rows<NC>(a, r0, r1, partials + s * CD, s < g.used);
    }
  });
  if (a.weight_grad) g.used = std::max(g.used, subs);
  double total = 0;
  for (double v : sums) total += v;
  return total;
}

// run_block<C> for the run-time a.C, one instantiation per class count up to kSmallGemmC.
template <typename Loss, int... Ks>
double run_block_of(const SmallLinear& a, Loss& loss, SmallWeightGrad& grad,
                    std::integer_sequence<int, Ks...>) {
  double total = 0;
  const bool ran = ((a.C == Ks + 1 && (total = run_block<Ks + 1>(a, loss, grad), true)) || ...);
  LINCLASS_CHECK(ran, "small_linear_block: C = ", a.C, " is not in [1, ", kSmallGemmC, "]");
  return total;
}

}  // namespace detail

// Runs the block: scores, `loss(S_rows, first_row, rows) -> summed loss` (turns the
// scores of its rows into their gradient in place; called once per sub-block, possibly
// from several threads at once), then dX and the dW partials where asked for.  Returns
// the summed loss, added in sub-block order; `grad.finish` gives dW after the last block.
// Blocks of kSubBlocks * small_sub_rows(D) rows keep the threads busy and the partials
// few; any n works.
template <typename Loss>
double small_linear_block(const SmallLinear& a, Loss&& loss, SmallWeightGrad& grad) {
  return detail::run_block_of(a, loss, grad, std::make_integer_sequence<int, int(kSmallGemmC)>());
}

}  // namespace linclass::cpu
