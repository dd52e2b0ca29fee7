// Small vectorized building blocks for the CPU loss kernels, on top of simd.h's Vec<T>.
//
// Each kernel module is compiled for one vector ISA (cpu/ops.h), so Vec<T> here is the
// widest type that ISA has.  Every function is deterministic: the order of the
// floating-point operations depends only on the lengths it is given.
#pragma once

#include "simd.h"

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>

namespace linclass::cpu {

// exp(d) for d <= 0 (softmax's shifted scores), float: Cody-Waite range reduction and
// a degree-4 polynomial q in exp(r) = 1 + r + r^2 q(r), |r| <= ln2 / 2 (minimax for the
// relative error, 3e-9 before rounding, so about 1 ulp in all: Cephes' degree-5 q is no
// more accurate once evaluated in float), 15 vector ops (13 on AVX-512).  d is clamped
// where the result is exactly 0 (-88, where 2^n underflows; on AVX-512, whose scaling
// underflows gradually, -105, below the smallest subnormal), so exp(-inf) = 0 with no
// extra select; a NaN stays NaN (the clamp keeps it, and so does the polynomial).
// Larger d are outside its domain.
inline Vec<float> vexp_nonpos(const Vec<float>& d) {
  using VF = Vec<float>;
#if defined(CPU_CAPABILITY_AVX512)
  const VF x = clamp_min(d, VF(-105.0f));  // NaN-preserving
#else
  const VF x = clamp_min(d, VF(-88.0f));
#endif
  const VF magic(12582912.0f);                       // 1.5 * 2^23: t rounds x log2(e) to an integer
  const VF t = fmadd(x, VF(1.44269504088896341f), magic);
  const VF n = t - magic;
  VF r = fmadd(n, VF(-0.693359375f), x);  // x - n ln2, ln2 in two parts
  r = fmadd(n, VF(2.12194440e-4f), r);
  VF p(1.381461275741458e-3f);
  p = fmadd(p, r, VF(8.368710055947304e-3f));
  p = fmadd(p, r, VF(4.166838899254799e-2f));
  p = fmadd(p, r, VF(1.666652113199234e-1f));
  p = fmadd(p, r, VF(4.999999403953552e-1f));
  const VF y = fmadd(p, r * r, r + VF(1.0f));
#if defined(CPU_CAPABILITY_AVX512)
  // y 2^n in one instruction where building 2^n takes three; the softmax kernels are
  // compute-bound on 2 threads here, and their exp is most of it.
  return _mm512_scalef_ps(y, n);
#else
  // 2^n from the integer sitting in t's mantissa; n >= -127, and n = -127 gives 0.0.
  using VI = Vec<int32_t>;
  const VI biased = cast<int32_t>(t) + VI(127 - 0x4B400000);
#if defined(CPU_CAPABILITY_AVX2)
  const VI pow2n = _mm256_slli_epi32(biased, 23);  // an immediate shift: no count vector
#else
  const VI pow2n = biased << VI(23);
#endif
  return y * cast<float>(pow2n);
#endif
}

// exp in the kernels goes through these (arguments are always <= 0 or NaN), so the accuracy/speed trade is made in one place.
template <typename T>
inline Vec<T> vexp(const Vec<T>& v) {
  if constexpr (std::is_same_v<T, float>)
    return vexp_nonpos(v);
  else
    return v.exp();
}
inline float sexp(float v) { return std::exp(v); }
inline double sexp(double v) { return std::exp(v); }

// Natural log of finite x >= FLT_MIN (the kernels take it of softmax normalizers, which
// are >= 1), within about 1 ulp, and NaN for NaN: Cephes' logf, written with Vec so
// it is one implementation for every ISA.  About 3x cheaper than Sleef's u10 log.
inline Vec<float> vlog_pos(const Vec<float>& x) {
  using VF = Vec<float>;
  using VI = Vec<int32_t>;
  const VI bits = cast<int32_t>(x);
  VF m = cast<float>((bits & VI(0x007FFFFF)) | VI(0x3F800000));  // mantissa in [1, 2)
  // Exponent as a float without an int->float conversion: 2^23 + k has k in its mantissa.
  VF e = cast<float>((bits >> VI(23)) | VI(0x4B000000)) - VF(8388608.0f + 127.0f);
  const VF big = m > VF(1.41421356f);  // move m into [sqrt(1/2), sqrt(2))
  m = VF::blendv(m, m * VF(0.5f), big);
  e = VF::blendv(e, e + VF(1.0f), big);
  const VF f = m - VF(1.0f);
  const VF z = f * f;
  VF y(7.0376836292E-2f);
  y = fmadd(y, f, VF(-1.1514610310E-1f));
  y = fmadd(y, f, VF(1.1676998740E-1f));
  y = fmadd(y, f, VF(-1.2420140846E-1f));
  y = fmadd(y, f, VF(1.4249322787E-1f));
  y = fmadd(y, f, VF(-1.6668057665E-1f));
  y = fmadd(y, f, VF(2.0000714765E-1f));
  y = fmadd(y, f, VF(-2.4999993993E-1f));
  y = fmadd(y, f, VF(3.3333331174E-1f));
  y = y * f * z;
  y = fmadd(e, VF(-2.12194440E-4f), y);
  y = fmadd(z, VF(-0.5f), y);
  const VF r = fmadd(e, VF(0.693359375f), f + y);
  return VF::blendv(r, x, x != x);  // the bit tricks above would turn NaN into a number
}
template <typename T>
inline Vec<T> vlog(const Vec<T>& v) {
  if constexpr (std::is_same_v<T, float>)
    return vlog_pos(v);
  else
    return v.log();
}

// Lane mask helpers: comparison results are all-ones / all-zeros bit patterns.
template <typename T>
inline Vec<T> select(const Vec<T>& mask, const Vec<T>& if_true, const Vec<T>& if_false) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__) && \
    !defined(__clang__)
  if constexpr (std::is_same_v<T, float>) {
    // GCC (12) rewrites a blendv whose mask feeds more than one blend into a sign test of
    // the mask, an extra vpcmpgtd per mask: ~3 per class step of the small-C cross-entropy.
    // The masks here are comparison results, so the blend can take them as they are.
    __m256 r;
    asm("vblendvps %3, %2, %1, %0"
        : "=x"(r)
        : "x"(static_cast<__m256>(if_false)), "x"(static_cast<__m256>(if_true)),
          "x"(static_cast<__m256>(mask)));
    return r;
  }
#endif
  return Vec<T>::blendv(if_false, if_true, mask);
}

// select(a == b, if_true, if_false), and the same for != and >: one compare and one
// blend.  On AVX-512 a comparison held as a vector (what Vec's operators return)
// costs two more instructions per select, a mask-to-vector and a vector-to-mask; these
// keep it in a mask register.  Same predicates as Vec's ==, != and >.
#if defined(CPU_CAPABILITY_AVX512)
#define LINCLASS_SELECT_CMP(name, pred, generic)                                                  \
  template <typename T>                                                                          \
  inline Vec<T> name(const Vec<T>& a, const Vec<T>& b, const Vec<T>& if_true,                    \
                     const Vec<T>& if_false) {                                                   \
    if constexpr (std::is_same_v<T, float>)                                                      \
      return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, pred), if_false, if_true);            \
    else if constexpr (std::is_same_v<T, double>)                                                \
      return _mm512_mask_blend_pd(_mm512_cmp_pd_mask(a, b, pred), if_false, if_true);            \
    else                                                                                         \
      return select(generic, if_true, if_false);                                                 \
  }
#else
#define LINCLASS_SELECT_CMP(name, pred, generic)                                                  \
  template <typename T>                                                                          \
  inline Vec<T> name(const Vec<T>& a, const Vec<T>& b, const Vec<T>& if_true,                    \
                     const Vec<T>& if_false) {                                                   \
    return select(generic, if_true, if_false);                                                   \
  }
#endif
LINCLASS_SELECT_CMP(select_eq, _CMP_EQ_OQ, a == b)
LINCLASS_SELECT_CMP(select_ne, _CMP_NEQ_UQ, a != b)
LINCLASS_SELECT_CMP(select_gt, _CMP_GT_OQ, a > b)
#undef LINCLASS_SELECT_CMP

// s + v over v's first n lanes except the one whose column (in `columns`) is the
// target's (`target_lanes`, broadcast): a row's sum that leaves out its target's term.
// On AVX-512 the comparison's mask register is the add's write mask: two instructions
// per vector instead of a compare, a blend and an add (and no zeroing of the lanes past
// a row's end).  Fewer instructions per vector also keep more of a streamed row's
// loads in flight.
template <typename T>
inline Vec<T> add_except_target(const Vec<T>& s, const Vec<T>& v, int64_t n,
                                const Vec<T>& columns, const Vec<T>& target_lanes) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    __mmask16 keep = _mm512_cmp_ps_mask(columns, target_lanes, _CMP_NEQ_UQ);
    if (n < Vec<T>::size()) keep &= Vec<T>::first(n);
    return _mm512_mask_add_ps(s, keep, s, v);
  } else if constexpr (std::is_same_v<T, double>) {
    __mmask8 keep = _mm512_cmp_pd_mask(columns, target_lanes, _CMP_NEQ_UQ);
    if (n < Vec<T>::size()) keep &= Vec<T>::first(n);
    return _mm512_mask_add_pd(s, keep, s, v);
  }
#endif
  const Vec<T> in_row = n < Vec<T>::size() ? Vec<T>::set(Vec<T>(T(0)), v, n) : v;
  return s + select_eq(target_lanes, columns, Vec<T>(T(0)), in_row);
}

// max(a, b) in one instruction.  A NaN in b may be dropped: the kernels do not need
// the max to carry NaN, because vexp carries it from the scores themselves into the
// normalizer (and from there into the loss and every gradient entry of the row).
template <typename T>
inline Vec<T> fast_max(const Vec<T>& a, const Vec<T>& b) {
  return clamp_min(b, a);  // max_ps(a, b): b when either is NaN
}

// max_j x[j] over [0, n), n >= 1 (see fast_max for NaN).
template <typename T>
inline T max_of(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> lowest(-std::numeric_limits<T>::infinity());
  Vec<T> m0 = lowest, m1 = lowest;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    m0 = fast_max(m0, Vec<T>::loadu(x + j));
    m1 = fast_max(m1, Vec<T>::loadu(x + j + W));
  }
  for (; j + W <= n; j += W) m0 = fast_max(m0, Vec<T>::loadu(x + j));
  if (j < n) m1 = fast_max(m1, Vec<T>::set(lowest, Vec<T>::loadu(x + j, n - j), n - j));
  return hmax(fast_max(m0, m1));
}

// Prefetch the lines holding p[0 .. 2W) (two vectors) into L1 (kLocality 3) or L2 (1).
template <int kLocality = 3, typename T>
inline void prefetch_pair(const T* p, int64_t W) {
  __builtin_prefetch(p, 0, kLocality);
  __builtin_prefetch(p + W, 0, kLocality);
}
// Rows at least this long, whose pass also writes their exponentials, prefetch the next
// row into L2 only: into L1 it evicted the exponentials and scores that this pass and
// the gradient pass use (bench/results/class-count-ab.md).
constexpr int64_t kL2PrefetchRowBytes = 16 << 10;

template <typename T>
struct Same {  // keeps T deduced from x alone (nullptr args then convert)
  using type = T;
};

// Over [begin, end): returns sum_j exp(x[j] - m) over j != skip, writes
// out[j] = exp(x[j] - m) for every j when out != nullptr (out may alias x), and with
// kWeighted adds sum_j w[j] * (x[j] - m) over every j to wd.  Shifted scores keep every
// term O(1), so nothing cancels when the scores are large.  Leaving the target's column
// out of the one pass (rather than summing the two ranges around it) keeps the sum's
// relative precision when that column dominates, with one tail per row, not two.
// `next` (optional) is prefetched at the same offsets: the next row, so that fetching it
// from memory overlaps this compute-bound pass.  With `row_max`, the pass also finds
// max_j x[j] over [begin, end) (as max_of does), so that a caller whose m is only
// provisional needs no separate max pass.  `between(k, n)` runs after columns
// [k, k + n) - begin (two vectors, one in the tail): a caller's other work to
// interleave with this compute-bound pass, such as the previous row's streamed stores.
struct NothingBetween {
  void operator()(int64_t, int64_t) const {}
};
template <bool kWeighted, bool kMax, typename T, typename Between>
inline T exp_sum_impl(const T* x, T* out, int64_t begin, int64_t end, T m, const T* w, T* wd,
                      const T* next, int64_t skip, T* row_max, Between& between) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vm(m), zero(T(0)), lowest(-std::numeric_limits<T>::infinity());
  Vec<T> s0 = zero, s1 = zero, a0 = zero, a1 = zero, m0 = lowest, m1 = lowest;
  const bool next_to_l2 = out && (end - begin) * int64_t(sizeof(T)) >= kL2PrefetchRowBytes;
  int64_t j = begin;
  for (; j + 2 * W <= end; j += 2 * W) {
    if (next && next_to_l2)
      prefetch_pair<1>(next + j, W);
    else if (next)
      prefetch_pair(next + j, W);
    const Vec<T> x0 = Vec<T>::loadu(x + j), x1 = Vec<T>::loadu(x + j + W);
    if constexpr (kMax) {
      m0 = fast_max(m0, x0);
      m1 = fast_max(m1, x1);
    }
    const Vec<T> d0 = x0 - vm, d1 = x1 - vm;
    Vec<T> e0 = vexp(d0), e1 = vexp(d1);
    if (out) {
      e0.store(out + j);
      e1.store(out + j + W);
    }
    if (skip >= j && skip < j + 2 * W) {  // once per call: the column left out of the sum
      if (skip < j + W)
        e0 = with_lane(e0, skip - j, T(0));
      else
        e1 = with_lane(e1, skip - j - W, T(0));
    }
    s0 = s0 + e0;
    s1 = s1 + e1;
    if constexpr (kWeighted) {
      a0 = fmadd(Vec<T>::loadu(w + j), d0, a0);
      a1 = fmadd(Vec<T>::loadu(w + j + W), d1, a1);
    }
    between(j - begin, 2 * W);
  }
  for (; j < end; j += W) {
    const int64_t n = std::min<int64_t>(W, end - j);
    const Vec<T> xj = Vec<T>::loadu(x + j, n);
    if constexpr (kMax) m1 = fast_max(m1, Vec<T>::set(lowest, xj, n));
    const Vec<T> d = xj - vm;
    Vec<T> e = Vec<T>::set(zero, vexp(d), n);
    if (out) e.store(out + j, n);
    if (skip >= j && skip < j + n) e = with_lane(e, skip - j, T(0));
    s0 = s0 + e;
    if constexpr (kWeighted) a0 = fmadd(Vec<T>::loadu(w + j, n), d, a0);  // w zero-filled
    between(j - begin, n);
  }
  if constexpr (kWeighted) *wd += hsum(a0 + a1);
  if constexpr (kMax) *row_max = hmax(fast_max(m0, m1));
  return hsum(s0 + s1);
}

template <bool kWeighted = false, typename T, typename Between = NothingBetween>
inline T exp_sum(const T* x, typename Same<T>::type* out, int64_t begin, int64_t end,
                 typename Same<T>::type m, const typename Same<T>::type* w = nullptr,
                 typename Same<T>::type* wd = nullptr,
                 const typename Same<T>::type* next = nullptr, int64_t skip = -1,
                 typename Same<T>::type* row_max = nullptr, Between&& between = {}) {
  return row_max ? exp_sum_impl<kWeighted, true>(x, out, begin, end, m, w, wd, next, skip, row_max, between)
                 : exp_sum_impl<kWeighted, false>(x, out, begin, end, m, w, wd, next, skip, row_max, between);
}

// Non-temporal store of a full vector to an address aligned to sizeof(Vec<T>): the
// line goes to memory without being read first (saves the read-for-ownership traffic
// of a gradient far larger than the caches).
template <typename T>
inline void stream_store(T* p, const Vec<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, v);
#endif
  v.store(p);
}

// Orders earlier non-temporal stores before anything this thread does next.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// Non-temporal writing of rows that need not start on a vector boundary (store_map).
// Each row's whole aligned vectors stream out; its last partial vector waits here, and
// when the next row starts right where it ends (rows that follow each other in memory)
// the next row's first partial vector completes it and the two go out as one streamed
// vector.  Otherwise the waiting lanes get an ordinary masked store (flush).  So a line
// is written by one kind of store only: mixing them in one line (each short row's
// edges stored normally among its neighbours' streamed lines) costs several times the
// time (bench/results/cpu-sweep.md).
template <typename T>
struct LineStream {
  Vec<T> pending;      // kept whole: a partial store and a wider reload would stall
  T* at = nullptr;     // the aligned vector whose first `filled` lanes wait in `pending`
  int64_t filled = 0;
  void flush() {
    if (at) pending.store(at, filled);
    at = nullptr;
  }
  // After the last row: the waiting lanes out, and the streamed stores ordered before
  // anything this thread does next.
  void finish() {
    flush();
    stream_fence();
  }
};

// A streamed span of store_map (below), stored in parts so that a caller can spread its
// whole vectors through other work: head() the first partial vector (which completes
// the LineStream's waiting one where the span continues it), then the whole aligned
// vectors, and rest() what remains, leaving the last partial vector waiting in the
// LineStream.  A caller that interleaves them names each whole vector by its offset k
// past the head (store_whole(k), every k = 0, W, 2W, ... below end - j, at its own
// pace: offsets in its registers, not this span's), then skip_whole() and rest().
template <typename T, typename F>
struct StoreSpan {
  T* dst;
  int64_t j, end;
  LineStream<T>* stream;
  F f;

  void head() {
    constexpr int64_t W = Vec<T>::size();
    const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(dst + j) / sizeof(T)) % W;
    if (!misaligned || j >= end) return;
    const int64_t n = std::min<int64_t>(end - j, W - misaligned);
    T* const base = dst + j - misaligned;
    if (stream->at == base && stream->filled == misaligned) {  // completes the waiting vector
      stream->pending = Vec<T>::set(lanes_up(f(j, n), misaligned), stream->pending, misaligned);
      stream->filled += n;
      if (stream->filled == W) {
        stream_store(base, stream->pending);
        stream->at = nullptr;
      }
    } else {
      stream->flush();
      f(j, n).store(dst + j, n);
    }
    j += n;
  }
  __attribute__((always_inline)) void store_whole(int64_t k) const {
    if (j + k + Vec<T>::size() <= end) stream_store(dst + j + k, f(j + k, Vec<T>::size()));
  }
  void skip_whole() { j += (end - j) / Vec<T>::size() * Vec<T>::size(); }
  void rest() {
    constexpr int64_t W = Vec<T>::size();
    const F& make = f;  // locals: a stored vector could alias the span's own fields
    T* const out = dst;
    const int64_t stop = end;
    int64_t k = j;
    for (; k + W <= stop; k += W) stream_store(out + k, make(k, W));
    if (k < stop) {  // the last partial vector waits for the next row
      stream->flush();
      stream->pending = make(k, stop - k);
      stream->at = out + k;
      stream->filled = stop - k;
    }
    j = stop;
  }
};

// A row's first pass with the row before's pending gradient interleaved: runs
// pass(between), `between` (exp_sum's hook) storing `before`'s whole vectors at the
// offsets the pass reaches (the rows have as many), then the rest of `before`, which is
// left empty; without a pending gradient, pass(NothingBetween{}).
template <typename Span, typename Pass>
__attribute__((always_inline)) inline void interleaving(std::optional<Span>& before, Pass&& pass) {
  if (!before) return pass(NothingBetween{});
  pass([&before](int64_t k, int64_t n) __attribute__((always_inline)) {
    for (int64_t i = 0; i < n; i += Vec<typename std::remove_pointer_t<decltype(before->dst)>>::size())
      before->store_whole(k + i);
  });
  before->skip_whole();
  before->rest();
  before.reset();
}

// dst[j] = f(j, n)[j - j0] for j in [begin, end): f(j0, n) returns the vector for
// columns [j0, j0 + n), n < W only at the edges (load inputs with loadu(ptr, n)), in
// increasing j0.  With `stream`, the span goes out with aligned non-temporal stores,
// its partial edge vectors through the LineStream (StoreSpan).
template <typename T, typename F>
inline void store_map(T* dst, int64_t begin, int64_t end, LineStream<T>* stream, F&& f) {
  constexpr int64_t W = Vec<T>::size();
  if (!stream) {
    int64_t j = begin;
    for (; j + W <= end; j += W) f(j, W).store(dst + j);
    if (j < end) f(j, end - j).store(dst + j, end - j);
    return;
  }
  StoreSpan<T, F&> span{dst, begin, end, stream, f};
  span.head();
  span.rest();
}

// dst[0, n) = src[0, n), streamed (store_map): a staged span of rows going out to memory.
template <typename T>
inline void stream_copy(T* dst, const T* src, int64_t n, LineStream<T>& stream) {
  store_map(dst, 0, n, &stream, [src](int64_t j, int64_t m) { return Vec<T>::loadu(src + j, m); });
}

// The group path's horizontal reductions, W = Vec<T>::size() rows at once: lane r of
// the result is hsum(v[r]) (sum_rows) or the max of v[r]'s lanes (max_rows).  A shuffle
// tree takes ~3 W vector ops where W separate reductions take ~8 W with a long
// dependency chain each.  sum_rows adds in hsum's order (lanes k + W/2, then k + W/4,
// ...), so each lane is bitwise hsum(v[r]).  max_rows may drop a NaN (as fast_max does):
// its callers let NaN scores reach the row through the exponentials instead.
#if defined(CPU_CAPABILITY_AVX512)
template <typename Op>
inline Vec<float> reduce_rows(const Vec<float>* v, Op op) {
  __m512 u[8], w[4], z[2];
  for (int i = 0; i < 8; ++i)  // lanes k and k + 8: rows i (low half) and i + 8
    u[i] = op(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // k and k + 4: quarters hold rows i, i + 8, i + 4, i + 12
    w[i] = op(_mm512_shuffle_f32x4(u[i], u[i + 4], 0x88), _mm512_shuffle_f32x4(u[i], u[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // k and k + 2, inside each quarter
    z[i] = op(_mm512_shuffle_ps(w[i], w[i + 2], 0x44), _mm512_shuffle_ps(w[i], w[i + 2], 0xEE));
  const __m512 r = op(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
  // r holds rows 0 2 1 3 | 8 10 9 11 | 4 6 5 7 | 12 14 13 15.
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), r);
}
inline Vec<float> sum_rows(const Vec<float>* v) {
  return reduce_rows(v, [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
}
inline Vec<float> max_rows(const Vec<float>* v) {
  return reduce_rows(v, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
}
#elif defined(CPU_CAPABILITY_AVX2)
template <typename Op>
inline Vec<float> reduce_rows(const Vec<float>* v, Op op) {
  __m256 u[4], w[2];
  for (int i = 0; i < 4; ++i)  // lanes k and k + 4: halves hold rows i and i + 4
    u[i] = op(_mm256_permute2f128_ps(v[i], v[i + 4], 0x20), _mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
  for (int i = 0; i < 2; ++i)  // k and k + 2, inside each half
    w[i] = op(_mm256_shuffle_ps(u[i], u[i + 2], 0x44), _mm256_shuffle_ps(u[i], u[i + 2], 0xEE));
  const __m256 r = op(_mm256_shuffle_ps(w[0], w[1], 0x88), _mm256_shuffle_ps(w[0], w[1], 0xDD));
  return _mm256_permute_ps(r, 0xD8);  // rows 0 2 1 3 | 4 6 5 7 -> in order
}
inline Vec<float> sum_rows(const Vec<float>* v) {
  return reduce_rows(v, [](__m256 a, __m256 b) { return _mm256_add_ps(a, b); });
}
inline Vec<float> max_rows(const Vec<float>* v) {
  return reduce_rows(v, [](__m256 a, __m256 b) { return _mm256_max_ps(a, b); });
}
#endif
// Every other type and ISA: one reduction per row.
template <typename T, typename F>
inline Vec<T> each_row(const Vec<T>* v, F reduce) {
  constexpr int W = Vec<T>::size();
  alignas(64) T out[W];
  for (int r = 0; r < W; ++r) out[r] = reduce(v[r]);
  return Vec<T>::loadu(out);
}
template <typename T>
inline Vec<T> sum_rows(const Vec<T>* v) {
  return each_row(v, [](const Vec<T>& row) { return hsum(row); });
}
template <typename T>
inline Vec<T> max_rows(const Vec<T>* v) {
  return each_row(v, [](const Vec<T>& row) { return hmax(row); });
}

}  // namespace linclass::cpu
