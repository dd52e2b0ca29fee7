// The loop shared by every fused CPU loss: split the rows into fixed blocks, run the
// blocks in parallel, and inside a block hand each row (large C), each group of
// Vec::size() row-major rows (medium C) or each tile of Vec::size() rows transposed to
// one row per lane (small C) to the loss's math in the accumulation type.
//
// A `Math` type supplies
//   acc_t row<kGrad>(const RowIO<acc_t>& io, int64_t y, const Params& p)
//       one contiguous row io.x; writes the row's gradient to io.g and returns the row's
//       loss (see RowIO);
//   void lanes<acc_t, kGrad, U>(acc_t* tile, const Vec<acc_t>* y, Vec<acc_t>* loss, const Params& p)
//       U tiles of W = Vec::size() rows (U = 1 or Math::kLaneTiles), tile u stored
//       class-major at tile + u * C * W (element [j * W + lane]), one row per SIMD lane,
//       with their targets (as acc_t) in y[u]; a target < 0 marks a row that
//       contributes nothing (ignored or padding: its loss and gradient are exact
//       zeros); overwrites the tiles with the gradient when kGrad and writes the rows'
//       losses to loss[u];
//   static constexpr int64_t kGroupMinClasses (at most kLaneMaxClasses + 1), kGroupMaxClasses,
//       kGroupMaxClassesConverted and kGroupMaxClassesForwardOnly (with a gradient, with
//       one on rows converted into scratch (16-bit or strided scores), without; at most
//       the driver's kGroupMaxClasses), and
//   void group<acc_t, kGrad>(const GroupIO<acc_t>& io, Vec<acc_t>& loss, const Params& p,
//                            Vec<acc_t>* log_arg)
//       Vec::size() rows of at least Vec::size() classes each, row-major (GroupIO); the
//       rows' losses to `loss`, one per lane, their gradients to io.g (log_arg: as for
//       lanes());
//   bool ignored(int64_t y, const Params& p);
//   a type PendingGradient<acc_t> (a std::optional<StoreSpan<acc_t, ...>>) and
//   acc_t row<kGrad>(io, y, p, PendingGradient<acc_t>* pending)
//       for streamed rows: the row writes the pending gradient of the row before it
//       (interleaved with its own first pass) and leaves its own there, reading io.x or
//       io.work until then; the driver alternates two scratch rows and writes the last;
//   static constexpr bool kDeferredLog, and when it is true
//   bool defers_log(const Params& p), acc_t log_weight(const Params& p)
//       the loss of a row is log_weight * log(a) + (what lanes() returns) for a per-row
//       argument a >= 1; with `log_arg` non-null, lanes() leaves the log out and writes a
//       to log_arg[u] (1 for rows that contribute nothing).  Then the driver sums the
//       logs of a block as the log of their product (DeferredLogs): one log per
//       lane and block instead of one per tile.  Only for summed losses ('mean'/'sum').
//
// Determinism: block boundaries depend only on (rows, C), each block sums its rows'
// losses in a fixed order into its own slot of `partials`, and the caller adds the
// slots in order, so results are bitwise identical whatever the thread count.
#pragma once

#include "../buffer_cache.h"
#include "../common.h"
#include "../parallel.h"
#include "convert.h"
#include "lane_targets.h"
#include "transpose.h"
#include "vec_util.h"


#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace linclass::cpu {

// The lane path's capacity: rows of up to this many classes fit its tiles.  Each loss
// takes the lanes below its group_min_classes (at most kLaneMaxClasses + 1): on rows
// this short a row-major pass wastes most of its last vector, while the lanes'
// transposes cost the same per score at any C.
constexpr int64_t kLaneMaxClasses = 47;
// Elements per block (and per parallel task at least): below this, threads cost more
// than they save.
constexpr int64_t kBlockElements = 16384;
// Gradients at least kStreamBytes large are written with non-temporal stores: they
// cannot stay in the caches anyway, and streaming saves reading every line before
// writing it (RowTask::stream_grad).
constexpr int64_t kStreamBytes = int64_t(8) << 20;
inline bool stream_gradient(int64_t grad_bytes) { return grad_bytes >= kStreamBytes; }
// Rows that start on a vector boundary stream where they lie: every store is a whole
// aligned vector.  Rows that do not, but follow each other in memory, stream through
// one LineStream (vec_util.h), which joins each row's last partial vector to the next
// row's first, from kJoinMinRowBytes a row: on shorter rows the join's work per row
// costs more than the streaming saves (bench/results/class-count-ab.md).  Streamed
// where they lie, such rows' first and last vectors would be ordinary stores into
// lines that their neighbours stream into (with AVX2, half lines), which costs several
// times the time at short rows (bench/results/cpu-sweep.md); rows of
// kStreamMinRowBytes or more have few such lines and stream where they lie too.  The lane path stages each tile's
// W rows in a cache-resident buffer and streams their contiguous span (from
// kMinStagedTileBytes a tile).
constexpr int64_t kJoinMinRowBytes = 256;
constexpr int64_t kStreamMinRowBytes = 4096;
// Whether rows r, r + 1, ... of `g` follow each other in memory (tiles ahead can be
// prefetched as one span; a streamed gradient's rows join at their edges).
inline bool contiguous_rows(const RowGeometry& g) {
  return g.inner == 1 && g.stride_c == 1 && g.stride_n == g.classes;
}
// Whether the row and group paths stream a large gradient laid out as `g`.
inline bool streams_rows(const RowGeometry& g, int64_t elem_bytes) {
  const int64_t row_bytes = g.classes * elem_bytes;
  constexpr int64_t vec_bytes = int64_t(Vec<float>::size() * sizeof(float));
  return row_bytes % vec_bytes == 0 || row_bytes >= kStreamMinRowBytes ||
         (row_bytes >= kJoinMinRowBytes && contiguous_rows(g));
}
// The lane path prefetches this many tiles ahead, into L1 up to this many bytes a tile.
constexpr int64_t kPrefetchTiles = 8;
constexpr int64_t kL1PrefetchTileBytes = 512;
// The lane path stages and streams a large gradient from tiles of this many bytes (8
// float classes): below, the staging copy costs more than the reads it saves
// (bench/results/class-count-ab.md).
constexpr int64_t kMinStagedTileBytes = 512;

// One row for Math::row: scores x, gradient g, a C-element scratch row `work` that may
// alias x or g; with `stream` set, g is written through it with non-temporal stores
// (store_map; g then aliases nothing); `next`, when set, is the next row, to prefetch
// during the first pass.
template <typename acc_t>
struct RowIO {
  const acc_t* x;
  acc_t* work;
  acc_t* g;
  const acc_t* next;
  LineStream<acc_t>* stream;
};

// Vec<acc_t>::size() rows for Math::group: row r's scores x[r], its gradient g[r] and a
// C-element scratch row work[r] that may alias x[r] or g[r] (as in RowIO), its target
// y[r], -1 when the row contributes nothing (ignored, or padding past the block's end).
template <typename acc_t>
struct GroupIO {
  static constexpr int kMaxRows = 16;
  const acc_t* x[kMaxRows];
  acc_t* work[kMaxRows];
  acc_t* g[kMaxRows];
  int64_t y[kMaxRows];
  const acc_t* next[kMaxRows];  // the next group's rows, to prefetch (nullptr: none)
  LineStream<acc_t>* stream;
};

// Lane k holds k: the column of each lane in a row's first vector.
template <typename acc_t>
inline Vec<acc_t> first_columns() {
  alignas(64) acc_t ids[Vec<acc_t>::size()];
  for (int k = 0; k < Vec<acc_t>::size(); ++k) ids[k] = acc_t(k);
  return Vec<acc_t>::loadu(ids);
}

// A group's pass over one row of C classes in vectors: f(j, n, columns) for the columns
// [j, j + n) (n < Vec::size() only at the row's end; `columns` holds their indices),
// prefetching `next` (the next group's row, or nullptr) at the same offsets.
template <typename acc_t, typename F>
__attribute__((always_inline)) inline void row_chunks(int64_t C, const acc_t* next,
                                                      const Vec<acc_t>& first, F&& f) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  V columns = first;
  for (int64_t j = 0; j < C; j += W, columns = columns + V(acc_t(W))) {
    if (next) __builtin_prefetch(next + j, 0, 3);
    f(j, std::min<int64_t>(W, C - j), columns);
  }
  if (next) __builtin_prefetch(next + C - 1, 0, 3);  // the last line, if the row straddles it
}

template <typename scalar_t>
struct RowTask {
  const scalar_t* input = nullptr;
  RowGeometry in;
  scalar_t* grad = nullptr;  // nullptr: forward only
  RowGeometry gout;
  const int64_t* target = nullptr;  // one per row, contiguous
  // Lane path only: the targets as acc_t, -1 where the row contributes nothing; or, when
  // null, `rule`: the kernel reads `target` itself, checks it against the rule and
  // counts into `tallies` (one per block; see lane_targets.h).
  const acc_type<scalar_t>* lane_targets = nullptr;
  const TargetRule* rule = nullptr;
  TargetTally* tallies = nullptr;
  bool stream_grad = false;         // write the gradient around the caches (stream_gradient)
  acc_type<scalar_t>* loss_rows = nullptr;  // per-row losses ('none'), else nullptr
  double* partials = nullptr;       // one sum per block ('mean'/'sum'), else nullptr
};

// Rows of Math::kGroupMinClasses to Math::kGroupMaxClasses classes take the group path:
// the row path's passes, with the per-row work between them (horizontal reductions,
// logs, divisions) done for Vec::size() rows at once.  On rows this short that per-row
// work is most of the row path's time; on longer ones it is not, and the group's
// Vec::size() rows outgrow L1 between its passes.  No loss's groups go past this:
constexpr int64_t kGroupMaxClasses = 512;

inline int64_t block_rows(int64_t classes, bool whole_tiles) {
  const int64_t r = std::max<int64_t>(1, kBlockElements / std::max<int64_t>(classes, 1));
  if (!whole_tiles) return r;
  const int64_t w = Vec<float>::size();  // whole tiles or groups (Vec::size() rows) per block
  return (r + w - 1) / w * w;
}

// Where a loss's groups begin: Math::kGroupMinClasses, or for a loss whose
// Math::kLaneClassesByCpu is set the CPU's own count (linclass_cross_entropy_lane_classes,
// shared_state.h: how fast a CPU runs the group path's partial last vectors and
// horizontal reductions against the lanes' transposes differs between vendors), within
// [Vec<float>::size(), kLaneMaxClasses + 1].
template <typename Math>
inline int64_t group_min_classes() {
  static_assert(Math::kGroupMinClasses <= kLaneMaxClasses + 1);
  if constexpr (Math::kLaneClassesByCpu)
    return std::clamp<int64_t>(linclass_cross_entropy_lane_classes() + 1, Vec<float>::size(),
                               kLaneMaxClasses + 1);
  return Math::kGroupMinClasses;
}
// Which path a loss's rows take: groups from group_min_classes to Math::kGroupMaxClasses
// classes (kGroupMaxClassesConverted where the rows are converted into scratch,
// kGroupMaxClassesForwardOnly without gradient), lanes below, rows above.
template <typename Math>
inline bool use_groups(int64_t classes, bool grad, bool converted) {
  static_assert(Math::kGroupMaxClasses <= kGroupMaxClasses);
  static_assert(Math::kGroupMaxClassesConverted <= Math::kGroupMaxClasses);
  static_assert(Math::kGroupMaxClassesForwardOnly <= kGroupMaxClasses);
  const int64_t max_classes = !grad ? Math::kGroupMaxClassesForwardOnly
                              : converted ? Math::kGroupMaxClassesConverted
                                          : Math::kGroupMaxClasses;
  return classes >= group_min_classes<Math>() && classes <= max_classes;
}
template <typename Math>
inline bool use_lanes(int64_t classes) {
  return classes < group_min_classes<Math>();
}
// Rows whose classes are strided and whose neighbouring rows are adjacent: K-dim inputs
// (N, C, d1, ...) with contiguous d's (a segmentation's scores) and column-major
// matrices (canonical_rows).  There W rows of one class are one vector, so the lane path
// packs a tile with C vector copies, where the row and group paths would gather every
// score from a different line: even tiles that outgrow L2 and are read from L3 in the
// math's passes are several times faster than that (bench/results/cpu-layouts.md).
// Up to this many classes, which bounds each thread's tile buffer (Math::kLaneTiles
// tiles of W rows, from the buffer cache) at 32 MiB and covers the largest vocabularies
// (256k); past it rows are gathered one by one, each rereading every class's line.
constexpr int64_t kStridedLaneMaxClasses = 262144;
// A lane adds its row's terms one class after another; the lane math adds them in blocks
// of this many classes, then the blocks' sums, so that the rounding error of a sum grows
// with kLaneSumBlock + C / kLaneSumBlock instead of C: at tens of thousands of classes a
// float32 sum taken class after class misses the tests' tolerance, which the row path's
// vector sums meet (bench/results/layouts-ab.md).
constexpr int64_t kLaneSumBlock = 64;
inline bool strided_class_lanes(const RowGeometry& g) {
  return g.inner >= Vec<float>::size() && g.stride_k == 1 && g.stride_c != 1 &&
         g.classes <= kStridedLaneMaxClasses;
}
// The geometry the paths below are chosen by, for two layouts that another description
// serves better:
// - a 2-D input in column-major order (x.t() of a (C, N) tensor: rows adjacent, classes
//   N apart) is the K-dim layout of one image of N positions; described so, it takes
//   the strided-class lanes;
// - K-dim scores whose classes are contiguous and whose positions follow each other
//   (channels-last (N, C, H, W); (B, V, T) = logits.transpose(1, 2) of (B, T, V)
//   logits) are plain rows of C scores, one after another; described so, they take the
//   lane, group and row paths of a row-major matrix, with its prefetching and
//   streaming.
inline RowGeometry canonical_rows(RowGeometry g) {
  if (g.inner == 1 && g.outer > 1 && g.stride_n == 1 && g.stride_c != 1) {
    g.inner = g.outer;
    g.outer = 1;
    g.stride_k = 1;
    g.stride_n = 0;
  } else if (g.inner > 1 && g.stride_c == 1 && g.stride_k == g.classes &&
             (g.outer == 1 || g.stride_n == g.inner * g.classes)) {
    g.outer *= g.inner;
    g.inner = 1;
    g.stride_n = g.classes;
    g.stride_k = 0;
  }
  return g;
}
// The lane path's choice for rows laid out as `g`: the setups (CrossEntropySetup,
// MultiMarginSetup) prepare the lane path's targets by the same test.
template <typename Math>
inline bool use_lanes(const RowGeometry& g) {
  return use_lanes<Math>(g.classes) || strided_class_lanes(g);
}

// The rows of one block for scores laid out as `g`: whole tiles or groups wherever the
// lane or group path may take them.  Depends only on the layout, so the blocks (and the
// order the losses are added in) are the same whatever the thread count.
inline int64_t block_rows(const RowGeometry& g) {
  return block_rows(g.classes, g.classes <= kGroupMaxClasses || strided_class_lanes(g));
}
inline int64_t num_blocks(const RowGeometry& g) {
  const int64_t b = block_rows(g);
  return (g.rows() + b - 1) / b;
}

// How the row and group paths reach a row: in place where the scores (and the gradient)
// are contiguous acc_t (`direct`), else converted into a scratch row, the math run
// there, and the gradient written back; a streamed gradient (`stream`) leaves the
// exponentials in a scratch row too, which stays in cache.
struct RowAccess {
  bool direct, stream;
  bool uses_scratch() const { return !direct || stream; }
};
template <typename scalar_t>
RowAccess row_access(const RowTask<scalar_t>& t, bool grad) {
  using acc_t = acc_type<scalar_t>;
  const bool direct = std::is_same_v<scalar_t, acc_t> && t.in.stride_c == 1 &&
                      (!grad || t.gout.stride_c == 1);
  return {direct, grad && direct && t.stream_grad && streams_rows(t.gout, sizeof(acc_t))};
}

// ---- the row path ----------------------------------------------------------------

// Streamed rows of at least this many bytes hand their gradient to the next row
// (Math::row with `pending`): below, the per-row cost of handing it on exceeds the
// overlap it buys (bench/results/class-count-ab.md).
constexpr int64_t kDeferredGradientRowBytes = 8 << 10;

// What a thread's streamed rows carry from one row (and block) to the next: the
// LineStream, and the gradient not yet written.
template <typename Math, typename acc_t>
struct RowStreamState {
  LineStream<acc_t> lines;
  typename Math::template PendingGradient<acc_t> pending;
  int64_t deferred_rows = 0;  // rows written through `pending`: their work rows alternate
  void finish_pending() {
    if (pending) pending->rest();
    pending.reset();
  }
  void finish() {
    finish_pending();
    lines.finish();
  }
};

// Rows [r0, r1); rows up to `ahead_end` belong to this thread too and may be prefetched.
// `buf`: room for one row (C acc_t) where row_access(t, kGrad).uses_scratch(), two for
// a streamed gradient.  `state`: the thread's, finished by the
// caller after its last block.
template <typename scalar_t, typename Math, bool kGrad, typename Params>
void run_row_block(const RowTask<scalar_t>& t, const Params& p, int64_t r0, int64_t r1,
                   int64_t ahead_end, double* partial, acc_type<scalar_t>* buf,
                   RowStreamState<Math, acc_type<scalar_t>>& state) {
  using acc_t = acc_type<scalar_t>;
  const int64_t C = t.in.classes;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const auto [direct, stream] = row_access(t, kGrad);
  LineStream<acc_t>& line_stream = state.lines;
  const bool defers = stream && C * int64_t(sizeof(acc_t)) >= kDeferredGradientRowBytes;
  // The hardware prefetchers stop at 4 KiB page boundaries, so the first pass over a
  // row would wait on memory; instead the math prefetches the next row during its
  // compute-bound pass over this one (RowIO::next).
  double sum = 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t y = t.target[r];
    const scalar_t* x = t.input + t.in.offset(r);
    scalar_t* g = kGrad ? t.grad + t.gout.offset(r) : nullptr;
    acc_t loss = 0;
    if (Math::ignored(y, p)) {
      if constexpr (kGrad) {
        state.finish_pending();  // rows go out in order: the LineStream joins them
        if (stream)
          store_map(reinterpret_cast<acc_t*>(g), 0, C, &line_stream, [](int64_t, int64_t) { return Vec<acc_t>(acc_t(0)); });
        else
          for (int64_t j = 0; j < C; ++j) g[j * t.gout.stride_c] = scalar_t(0);
      }
    } else if (direct) {
      const acc_t* xr = reinterpret_cast<const acc_t*>(x);
      acc_t* gr = reinterpret_cast<acc_t*>(g);
      const acc_t* next = r + 1 < ahead_end
                              ? reinterpret_cast<const acc_t*>(t.input + t.in.offset(r + 1))
                              : nullptr;
      if (defers) {
        acc_t* work = buf + (state.deferred_rows++ % 2) * C;  // not the pending row's
        loss = Math::template row<acc_t, kGrad>({xr, work, gr, next, &line_stream}, y, p,
                                                &state.pending);
      } else {
        loss = Math::template row<acc_t, kGrad>(
            {xr, stream ? buf : gr, gr, next, stream ? &line_stream : nullptr}, y, p);
      }
    } else {
      const int64_t sc = t.in.stride_c;
      if (sc == 1 && !same_type)
        cpu::convert(x, buf, C);
      else
        for (int64_t j = 0; j < C; ++j) buf[j] = acc_t(x[j * sc]);
      loss = Math::template row<acc_t, kGrad>({buf, buf, buf, nullptr, nullptr},
                                              y, p);
      if constexpr (kGrad) {
        const int64_t gc = t.gout.stride_c;
        if (gc == 1)
          cpu::convert(buf, g, C);
        else
          for (int64_t j = 0; j < C; ++j) g[j * gc] = scalar_t(buf[j]);
      }
    }
    if (t.loss_rows) t.loss_rows[r] = loss;
    sum += double(loss);
  }
  if (partial) *partial = sum;
}

// Deferred logs (float only; Math::kDeferredLog): per lane, the running product of the
// rows' log arguments, kept in [1, 2) by moving its exponent into `exponent` after every
// tile, so that sum_r log(a_r) = log(product) + exponent * ln 2 costs one log per lane
// and block.  The product is exact to ~sqrt(tiles) ulp, as accurate as summing per-row
// logs.
template <typename acc_t>
struct DeferredLogs {
  using V = Vec<acc_t>;
  V product = V(acc_t(1));
  Vec<int32_t> exponent = Vec<int32_t>(0);
  int64_t renorms = 0;

  template <typename Math, typename Params>
  static bool applies(const Params& p) {
    if constexpr (Math::kDeferredLog && std::is_same_v<acc_t, float>) return Math::defers_log(p);
    return false;
  }
  void add(const V* args, int n) {
    if constexpr (std::is_same_v<acc_t, float>) {
      for (int u = 0; u < n; ++u) {
        const Vec<int32_t> bits = cpu::cast<int32_t>(product * args[u]);
        exponent = exponent + (bits >> Vec<int32_t>(23));  // biased exponent (127 each)
        product = cpu::cast<float>((bits & Vec<int32_t>(0x007FFFFF)) | Vec<int32_t>(0x3F800000));
      }
      renorms += n;
    }
  }
  // Math::log_weight * the sum of the logs, over every lane.
  template <typename Math, typename Params>
  double total(const Params& p) const {
    if constexpr (Math::kDeferredLog) return double(Math::log_weight(p)) * log_sum();
    return 0;
  }
  double log_sum() const {
    constexpr int64_t W = V::size();
    alignas(64) acc_t prod[W];
    alignas(64) int32_t exps[W];
    product.store(prod);
    exponent.store(exps);
    double sum = 0;
    for (int64_t l = 0; l < W; ++l)
      sum += std::log(double(prod[l])) + double(exps[l] - 127 * renorms) * 0.69314718055994530942;
    return sum;
  }
};

// The lanes of a lane-wise running sum, added in lane order.
template <typename acc_t>
double lane_total(const Vec<acc_t>& sum) {
  constexpr int64_t W = Vec<acc_t>::size();
  alignas(64) acc_t lanes[W];
  sum.store(lanes);
  double total = 0;
  for (int64_t l = 0; l < W; ++l) total += double(lanes[l]);
  return total;
}

// ---- the lane path ---------------------------------------------------------------

// The layout of W rows of C classes, one after another, in a staging buffer.
inline RowGeometry staged_rows(int64_t classes) {
  RowGeometry g;
  g.outer = Vec<float>::size();
  g.classes = classes;
  g.stride_n = classes;
  return g;
}

// tile[j * W + l] = row (r0 + l), class j, as acc_t; lanes past `n` are zero.
// `permutes`: permutes_to_tile(C) where rows of C <= kPermuteMaxClasses classes may
// follow each other (transpose.h), else nullptr.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void pack_tile(const scalar_t* base, const RowGeometry& g,
                                                     int64_t r0, int64_t n, acc_t* tile,
                                                     const VectorPermutes* permutes = nullptr) {
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t C = g.classes;
  // K-dim inputs with unit inner stride: W consecutive rows of one class are adjacent.
  if (n == W && g.inner > 1 && g.stride_k == 1 && (r0 % g.inner) + W <= g.inner) {
    const scalar_t* p = base + g.offset(r0);
    for (int64_t j = 0; j < C; ++j) cpu::convert(p + j * g.stride_c, tile + j * W, W);
    return;
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t> && std::is_same_v<acc_t, float>) {
    // Row-major 16-bit rows: converted to float rows in a staging buffer (whole vectors
    // at a time, cpu::convert), then transposed as float rows are.
    if (n == W && g.inner == 1 && g.stride_c == 1 && C <= kLaneMaxClasses) {
      alignas(64) float rows[W * kLaneMaxClasses];
      const scalar_t* p = base + g.offset(r0);
      if (g.stride_n == C)
        cpu::convert(p, rows, W * C);
      else
        for (int64_t l = 0; l < W; ++l) cpu::convert(p + l * g.stride_n, rows + l * C, C);
      pack_tile(rows, staged_rows(C), 0, W, tile, permutes);
      return;
    }
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    // Row-major float rows: W x W register transposes, then (AVX-512) groups of 8
    // classes, then pairs of classes, then a last odd class one by one.
    if (n == W && g.inner == 1 && g.stride_c == 1) {
      const float* p = base + g.offset(r0);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if (permutes && g.stride_n == C) return permute_vectors(p, tile, *permutes);
#endif
      int64_t j = 0;
      for (; j + W <= C; j += W) transpose_block(p + j, g.stride_n, tile + j * W, W);
#if defined(CPU_CAPABILITY_AVX512)
      for (; j + 8 <= C; j += 8) gather_octet(p + j, g.stride_n, tile + j * W, W);
#endif
      for (; j + 2 <= C; j += 2) gather_pair(p + j, g.stride_n, tile + j * W, W);
      for (; j < C; ++j)
        for (int64_t l = 0; l < W; ++l) tile[j * W + l] = p[l * g.stride_n + j];
      return;
    }
  }
  for (int64_t l = 0; l < n; ++l) {
    const scalar_t* p = base + g.offset(r0 + l);
    if (g.stride_c == 1)
      for (int64_t j = 0; j < C; ++j) tile[j * W + l] = acc_t(p[j]);
    else
      for (int64_t j = 0; j < C; ++j) tile[j * W + l] = acc_t(p[j * g.stride_c]);
  }
  for (int64_t l = n; l < W; ++l)
    for (int64_t j = 0; j < C; ++j) tile[j * W + l] = acc_t(0);
}

// `permutes`: permutes_to_rows(C) or nullptr, as pack_tile's.
template <typename scalar_t, typename acc_t>
inline void unpack_tile(const acc_t* tile, const RowGeometry& g, int64_t r0, int64_t n,
                        scalar_t* base, const VectorPermutes* permutes = nullptr) {
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t C = g.classes;
  if (n == W && g.inner > 1 && g.stride_k == 1 && (r0 % g.inner) + W <= g.inner) {
    scalar_t* p = base + g.offset(r0);
    for (int64_t j = 0; j < C; ++j) cpu::convert(tile + j * W, p + j * g.stride_c, W);
    return;
  }
  if constexpr (!std::is_same_v<scalar_t, acc_t> && std::is_same_v<acc_t, float>) {
    if (n == W && g.inner == 1 && g.stride_c == 1 && C <= kLaneMaxClasses) {  // as pack_tile
      alignas(64) float rows[W * kLaneMaxClasses];
      unpack_tile(tile, staged_rows(C), 0, W, rows, permutes);
      scalar_t* p = base + g.offset(r0);
      if (g.stride_n == C)
        cpu::convert(rows, p, W * C);
      else
        for (int64_t l = 0; l < W; ++l) cpu::convert(rows + l * C, p + l * g.stride_n, C);
      return;
    }
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == W && g.inner == 1 && g.stride_c == 1) {
      float* p = base + g.offset(r0);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      if (permutes && g.stride_n == C) return permute_vectors(tile, p, *permutes);
#endif
      int64_t j = 0;
      for (; j + W <= C; j += W) transpose_block(tile + j * W, W, p + j, g.stride_n);
#if defined(CPU_CAPABILITY_AVX512)
      for (; j + 8 <= C; j += 8) scatter_octet(tile + j * W, W, p + j, g.stride_n);
#endif
      for (; j + 2 <= C; j += 2) scatter_pair(tile + j * W, W, p + j, g.stride_n);
      for (; j < C; ++j)
        for (int64_t l = 0; l < W; ++l) p[l * g.stride_n + j] = tile[j * W + l];
      return;
    }
  }
  for (int64_t l = 0; l < n; ++l) {
    scalar_t* p = base + g.offset(r0 + l);
    if (g.stride_c == 1)
      for (int64_t j = 0; j < C; ++j) p[j] = scalar_t(tile[j * W + l]);
    else
      for (int64_t j = 0; j < C; ++j) p[j * g.stride_c] = scalar_t(tile[j * W + l]);
  }
}

// An uninitialized 64-byte-aligned buffer of `elements` acc_t, or none for 0: one per
// thread for all of its blocks (the lane path's tiles of more than kLaneMaxClasses
// classes; the row and group paths' scratch rows).  Every user writes an entry before
// reading it, so nothing is zero-filled: a zeroed row per block cost a memset and a free
// the size of a row of scores for every row of 16384 classes and more.
template <typename acc_t>
struct ThreadScratch {
  acc_t* data = nullptr;
  size_t bytes = 0;
  bool cached = false;
  // From the buffer cache when large (a tile of 10^5 classes is megabytes, which a fresh
  // allocation page-faults on every call), else from the allocator; 64-byte aligned.
  explicit ThreadScratch(int64_t elements) {
    if (elements == 0) return;
    bytes = size_t(elements) * sizeof(acc_t);
    cached = bytes >= kMinCachedBytes;
    void* block = nullptr;
    if (cached)
      block = linclass_cache_take(bytes);
    else if (posix_memalign(&block, 64, bytes) != 0)
      block = nullptr;
    LINCLASS_CHECK(block != nullptr, "linclass: out of memory allocating ", bytes, " bytes");
    data = static_cast<acc_t*>(block);
  }
  ~ThreadScratch() {
    if (!data) return;
    if (cached)
      linclass_cache_give_back(data, bytes);
    else
      std::free(data);
  }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
};

// large_tile: room for Math::kLaneTiles tiles of C classes when C > kLaneMaxClasses.
template <typename scalar_t, typename Math, bool kGrad, typename Params>
void run_lane_block(const RowTask<scalar_t>& t, const Params& p, int64_t r0, int64_t r1,
                    int64_t ahead_end, double* partial, TargetTally* tally,
                    acc_type<scalar_t>* large_tile) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  constexpr int U = Math::kLaneTiles;  // full tiles handed to the math at once
  const int64_t C = t.in.classes;
  // Tiles of up to kLaneMaxClasses classes on the stack; longer ones (strided classes,
  // strided_class_lanes) in the caller's aligned heap buffer.
  alignas(64) acc_t small_tile[U * kLaneMaxClasses * W];
  acc_t* tile = C > kLaneMaxClasses ? large_tile : small_tile;
  alignas(64) acc_t tail[W];
  V sum(acc_t(0));  // lane-wise running loss; each lane adds its rows in order
  DeferredLogs<acc_t> logs;
  const bool defer = partial && !t.loss_rows && DeferredLogs<acc_t>::template applies<Math>(p);
  V log_arg[U];
  // Target counts in a local, stored once at the end: neighbouring blocks' tallies share
  // a cache line, and updating them per tile made the two threads fight over it.
  TargetTally counts;
  // Contiguous row-major tiles: prefetch a few tiles ahead (rows of a few classes are
  // shorter than the distance the hardware prefetchers need to lock on).
  const bool prefetch = contiguous_rows(t.in) && (!kGrad || contiguous_rows(t.gout));
  const int64_t tile_bytes = W * C * int64_t(sizeof(scalar_t));
  // A streamed gradient: each tile's rows are unpacked into `stage` (in cache) and their
  // contiguous span, whole lines, goes out with non-temporal stores.
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const bool staged = kGrad && same_type && t.stream_grad && contiguous_rows(t.gout) &&
                      tile_bytes >= kMinStagedTileBytes && C <= kLaneMaxClasses;
  alignas(64) scalar_t stage[kGrad && same_type ? kLaneMaxClasses * W : 1];
  // Rows of a few classes move by permutes (transpose.h; pack_tile and unpack_tile take
  // them where the rows follow each other).
  const TilePermutes* permutes = std::is_same_v<acc_t, float> ? tile_permutes(C) : nullptr;
  const VectorPermutes* to_tile = permutes ? &permutes->to_tile : nullptr;
  const VectorPermutes* to_rows = permutes ? &permutes->to_rows : nullptr;
  LineStream<acc_t> line_stream;
  RowGeometry stage_rows = t.gout;
  stage_rows.stride_n = C;
  // Rows [r, r + n) into tile `dst`: their targets (returned), prefetches, the packing.
  auto load = [&](int64_t r, int64_t n, acc_t* dst) {
    V vy;
    if (tally) {
      vy = lane_targets<acc_t>(t.target + r, n, r, *t.rule, counts);
    } else if (n == W) {
      vy = V::loadu(t.lane_targets + r);
    } else {  // padding lanes take target -1: they contribute nothing
      for (int64_t l = 0; l < W; ++l) tail[l] = l < n ? t.lane_targets[r + l] : acc_t(-1);
      vy = V::loadu(tail);
    }
    if (prefetch && r + (kPrefetchTiles + 1) * W <= ahead_end) {  // this thread's rows
      // Rows further ahead: tiles of a few lines into L1; longer ones into L2, since
      // into L1 a whole tile's prefetches held the core's few L1 miss buffers and the
      // tile's own loads waited behind them (bench/results/class-count-ab.md).  And
      // the gradient lines they will be written to, unless the gradient is streamed.
      const char* in = reinterpret_cast<const char*>(t.input + t.in.offset(r + kPrefetchTiles * W));
      if (tile_bytes <= kL1PrefetchTileBytes)
        for (int64_t off = 0; off < tile_bytes; off += 64) __builtin_prefetch(in + off, 0, 3);
      else
        for (int64_t off = 0; off < tile_bytes; off += 64) __builtin_prefetch(in + off, 0, 1);
      if (tally) {  // the tile's W int64 targets: one line per 8 (two with AVX-512)
        const char* ty = reinterpret_cast<const char*>(t.target + r + kPrefetchTiles * W);
        for (int64_t off = 0; off < W * int64_t(sizeof(int64_t)); off += 64)
          __builtin_prefetch(ty + off, 0, 3);
      }
      if (kGrad && !staged) {
        const char* g = reinterpret_cast<const char*>(t.grad + t.gout.offset(r + kPrefetchTiles * W));
        for (int64_t off = 0; off < tile_bytes; off += 64) __builtin_prefetch(g + off, 1, 3);
      }
    }
    pack_tile(t.input, t.in, r, n, dst, to_tile);
    return vy;
  };
  // The gradient and losses of rows [r, r + n) from tile `src`.
  auto store = [&](int64_t r, int64_t n, const acc_t* src, const V& loss) {
    if constexpr (kGrad && same_type) {
      if (staged) {
        unpack_tile(src, stage_rows, 0, n, stage);
        stream_copy(t.grad + t.gout.offset(r), stage, n * C, line_stream);
      } else {
        unpack_tile(src, t.gout, r, n, t.grad, to_rows);
      }
    } else if constexpr (kGrad) {
      unpack_tile(src, t.gout, r, n, t.grad, to_rows);
    }
    if (t.loss_rows) {
      loss.store(tail);
      for (int64_t l = 0; l < n; ++l) t.loss_rows[r + l] = tail[l];
    }
    sum = sum + loss;  // tile by tile, in row order
  };
  int64_t r = r0;
  if constexpr (U > 1) {
    for (; r + U * W <= r1; r += U * W) {
      V vy[U], loss[U];
      for (int u = 0; u < U; ++u) vy[u] = load(r + u * W, W, tile + u * C * W);
      Math::template lanes<acc_t, kGrad, U>(tile, vy, loss, p, defer ? log_arg : nullptr);
      if (defer) logs.add(log_arg, U);
      for (int u = 0; u < U; ++u) store(r + u * W, W, tile + u * C * W, loss[u]);
    }
  }
  for (; r < r1; r += W) {
    const int64_t n = std::min<int64_t>(W, r1 - r);
    V vy = load(r, n, tile), loss;
    Math::template lanes<acc_t, kGrad, 1>(tile, &vy, &loss, p, defer ? log_arg : nullptr);
    if (defer) logs.add(log_arg, 1);
    store(r, n, tile, loss);
  }
  if (staged) line_stream.finish();
  if (tally) *tally = counts;
  if (partial) *partial = lane_total(sum) + (defer ? logs.template total<Math>(p) : 0.0);
}

// ---- the group path --------------------------------------------------------------

// Rows [r0, r1) in groups of W = Vec::size() rows (Math::group); a last partial group is
// padded with rows that contribute nothing, so every row takes the same path.
// `buf`: room for W rows (W * C acc_t) where row_access(t, kGrad).uses_scratch().
template <typename scalar_t, typename Math, bool kGrad, typename Params>
void run_group_block(const RowTask<scalar_t>& t, const Params& p, int64_t r0, int64_t r1,
                     int64_t ahead_end, double* partial, acc_type<scalar_t>* buf) {
  using acc_t = acc_type<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int W = V::size();
  static_assert(W <= GroupIO<acc_t>::kMaxRows);
  const int64_t C = t.in.classes;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const auto [direct, stream] = row_access(t, kGrad);  // `buf`: room for W rows if needed
  LineStream<acc_t> line_stream;
  std::vector<acc_t> padding;  // a row of zeros to read, one to write: 2 C
  DeferredLogs<acc_t> logs;
  const bool defer = partial && !t.loss_rows && DeferredLogs<acc_t>::template applies<Math>(p);
  V sum(acc_t(0)), log_arg;
  alignas(64) acc_t losses[W];
  for (int64_t r = r0; r < r1; r += W) {
    const int64_t n = std::min<int64_t>(W, r1 - r);
    GroupIO<acc_t> io;
    io.stream = stream ? &line_stream : nullptr;
    for (int64_t l = 0; l < W; ++l) {
      if (l >= n) {
        if (padding.empty()) padding.assign(2 * C, acc_t(0));
        io.x[l] = padding.data();
        io.work[l] = io.g[l] = padding.data() + C;
        io.y[l] = -1;
        io.next[l] = nullptr;
        continue;
      }
      const int64_t row = r + l, y = t.target[row];
      io.y[l] = Math::ignored(y, p) ? -1 : y;
      const scalar_t* x = t.input + t.in.offset(row);
      if (direct) {
        acc_t* g = kGrad ? reinterpret_cast<acc_t*>(t.grad + t.gout.offset(row)) : nullptr;
        io.x[l] = reinterpret_cast<const acc_t*>(x);
        io.g[l] = g;
        io.work[l] = stream ? buf + l * C : g;
        // As in the row path, the next rows are fetched during this group's
        // compute-bound pass (the hardware prefetchers stop at page boundaries).
        io.next[l] = row + W < ahead_end
                         ? reinterpret_cast<const acc_t*>(t.input + t.in.offset(row + W))
                         : nullptr;
      } else {
        io.next[l] = nullptr;
        acc_t* row_buf = buf + l * C;
        const int64_t sc = t.in.stride_c;
        if (sc == 1 && !same_type)
          cpu::convert(x, row_buf, C);
        else
          for (int64_t j = 0; j < C; ++j) row_buf[j] = acc_t(x[j * sc]);
        io.x[l] = io.work[l] = io.g[l] = row_buf;
      }
    }
    V loss;
    Math::template group<acc_t, kGrad>(io, loss, p, defer ? &log_arg : nullptr);
    if (defer) logs.add(&log_arg, 1);
    if constexpr (kGrad) {
      if (!direct) {
        const int64_t gc = t.gout.stride_c;
        for (int64_t l = 0; l < n; ++l) {
          scalar_t* g = t.grad + t.gout.offset(r + l);
          const acc_t* row_buf = buf + l * C;
          if (gc == 1)
            cpu::convert(row_buf, g, C);
          else
            for (int64_t j = 0; j < C; ++j) g[j * gc] = scalar_t(row_buf[j]);
        }
      }
    }
    if (t.loss_rows) {
      loss.store(losses);
      for (int64_t l = 0; l < n; ++l) t.loss_rows[r + l] = losses[l];
    }
    sum = sum + loss;  // group by group, in row order; padding lanes add exact zeros
  }
  if (stream) line_stream.finish();
  if (partial) *partial = lane_total(sum) + (defer ? logs.template total<Math>(p) : 0.0);
}

// ---- entry -----------------------------------------------------------------------

template <typename scalar_t, typename Math, typename Params>
void run_rows(const RowTask<scalar_t>& t, const Params& p) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = t.in.rows(), C = t.in.classes;
  if (rows == 0) return;
  const int64_t per_block = block_rows(t.in);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  // Each thread takes one contiguous range of blocks, so that every path can prefetch
  // the rows ahead across block boundaries (a block is a single row when C >= 16384).
  // Each block already holds ~kBlockElements of work, so one block per task keeps tiny
  // inputs on the calling thread.  Each block writes only its own rows, partial sum
  // and tally, so the result does not depend on the thread count.
  // Strided classes take the lanes only where the setup prepared the lane path's targets.
  const bool lanes = use_lanes<Math>(C) || (strided_class_lanes(t.in) && (t.rule || t.lane_targets));
  const RowAccess access = row_access(t, t.grad != nullptr);
  const bool groups = use_groups<Math>(C, t.grad != nullptr, !access.direct);
  constexpr int64_t W = Vec<acc_t>::size();
  linclass::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const int64_t ahead_end = std::min(rows, b1 * per_block);  // this thread's last row
    // One scratch buffer for this thread's blocks: the lane path's tiles beyond
    // kLaneMaxClasses classes, or the row or group path's scratch rows.
    ThreadScratch<acc_t> scratch(
        lanes ? (C > kLaneMaxClasses ? Math::kLaneTiles * C * W : 0)
        : access.uses_scratch() ? (groups ? W : access.stream ? 2 : 1) * C
                                : 0);
    RowStreamState<Math, acc_t> row_state;  // the row path's, across this thread's blocks
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * per_block, r1 = std::min(rows, r0 + per_block);
      double* partial = t.partials ? t.partials + b : nullptr;
      TargetTally* tally = t.rule ? t.tallies + b : nullptr;
      if (lanes && t.grad)
        run_lane_block<scalar_t, Math, true>(t, p, r0, r1, ahead_end, partial, tally, scratch.data);
      else if (lanes)
        run_lane_block<scalar_t, Math, false>(t, p, r0, r1, ahead_end, partial, tally, scratch.data);
      else if (groups && t.grad)
        run_group_block<scalar_t, Math, true>(t, p, r0, r1, ahead_end, partial, scratch.data);
      else if (groups)
        run_group_block<scalar_t, Math, false>(t, p, r0, r1, ahead_end, partial, scratch.data);
      else if (t.grad)
        run_row_block<scalar_t, Math, true>(t, p, r0, r1, ahead_end, partial, scratch.data, row_state);
      else
        run_row_block<scalar_t, Math, false>(t, p, r0, r1, ahead_end, partial, scratch.data, row_state);
    }
    row_state.finish();
  });
}

// run_rows with the losses summed: returns the sum over all rows, added in block order
// (deterministic).  `t.partials` is provided here.
template <typename scalar_t, typename Math, typename Params>
double run_rows_sum(RowTask<scalar_t> t, const Params& p) {
  std::vector<double> partials(num_blocks(t.in));
  t.partials = partials.data();
  run_rows<scalar_t, Math>(t, p);
  double total = 0;
  for (double v : partials) total += v;
  return total;
}

}  // namespace linclass::cpu
