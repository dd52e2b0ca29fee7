// linclass's vector type: Vec<T> for T in {float, double, int32_t}, one implementation per
// vector ISA the CPU kernel modules are compiled for (cpu/ops.h):
//   AVX512   __m512 / __m512d / __m512i      (16 floats)
//   AVX2     __m256 / __m256d / __m256i      (8 floats, with FMA and F16C)
//   DEFAULT  32 bytes as two SSE2 halves (x86-64's baseline); elsewhere an array
// It has the part of at::vec::Vectorized's interface the kernels use (same names, same
// semantics: comparisons give all-ones / all-zeros lanes, loadu(p, n) zero-fills, set and
// blendv pick the second argument), so the kernels read as before; it exists because the
// LibTorch stable ABI has no vector library and at::vec is ATen (its headers need c10,
// its float64 exp/log import Sleef from libtorch).
//
// Float64 exp and log are our own (below, within 1 ulp of glibc); float exp/log are
// vec_util.h's kernels-specific ones.  The array fallback calls the C library per lane.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace linclass::cpu {

template <typename T>
struct Vec;

// ---- exp / log of float64 lanes, written once over Vec<double> --------------------------

// exp(x) for every double x: n = round(x / ln2), r = x - n ln2 (two-part ln2, |r| <= ln2/2),
// exp(r) by its Taylor polynomial to r^13 (truncation < 1e-18 relative) in Horner form
// with fused multiply-adds, then 2^n in two steps so results down to the smallest
// subnormal come out right.  x > 709.78 gives inf, x < -745.2 gives 0, NaN gives NaN.
template <typename V>
inline V exp_f64(const V& x) {
  const V clamped = clamp_max(clamp_min(x, V(-746.0)), V(710.0));  // a NaN stays NaN
  const V n = (clamped * V(1.4426950408889634) + V(6755399441055744.0)) - V(6755399441055744.0);
  V r = fmadd(n, V(-6.93147180369123816490e-01), clamped);
  r = fmadd(n, V(-1.90821492927058770002e-10), r);
  V p(1.0 / 6227020800.0);  // 1/13!
  p = fmadd(p, r, V(1.0 / 479001600.0));
  p = fmadd(p, r, V(1.0 / 39916800.0));
  p = fmadd(p, r, V(1.0 / 3628800.0));
  p = fmadd(p, r, V(1.0 / 362880.0));
  p = fmadd(p, r, V(1.0 / 40320.0));
  p = fmadd(p, r, V(1.0 / 5040.0));
  p = fmadd(p, r, V(1.0 / 720.0));
  p = fmadd(p, r, V(1.0 / 120.0));
  p = fmadd(p, r, V(1.0 / 24.0));
  p = fmadd(p, r, V(1.0 / 6.0));
  p = fmadd(p, r, V(0.5));
  p = fmadd(p, r * r, r);  // exp(r) - 1
  const V y = p + V(1.0);
  // 2^n = 2^h * 2^(n - h), h = trunc(n / 2): each factor is a normal double for n in
  // [-1076, 1025], so y * 2^h * 2^(n-h) rounds once, where a subnormal result does.
  const V h = trunc(n * V(0.5));
  return y * pow2i(h) * pow2i(n - h);  // NaN in: y, and so the result, is NaN
}

// log(x) for every double x (fdlibm's method): x = 2^k m, m in [sqrt(1/2), sqrt(2)),
// f = m - 1, s = f / (2 + f), log(1 + f) = f - s (f - R(s^2)) ... with fdlibm's degree-7
// polynomial R; k ln2 added in two parts.  Subnormals are scaled by 2^54 first; x = 0
// gives -inf, x < 0 NaN, +inf inf, NaN NaN.
template <typename V>
inline V log_f64(const V& x_in) {
  const V tiny = x_in < V(2.2250738585072014e-308);
  const V x = V::blendv(x_in, x_in * V(18014398509481984.0), tiny);  // 2^54
  V k = exponent_of(x) - V::blendv(V(1023.0), V(1023.0 + 54.0), tiny);
  V m = mantissa_of(x);  // in [1, 2)
  const V big = m > V(1.4142135623730951);
  m = V::blendv(m, m * V(0.5), big);
  k = V::blendv(k, k + V(1.0), big);
  const V f = m - V(1.0);
  const V s = f / (f + V(2.0));
  const V z = s * s, w = z * z;
  const V t1 = w * fmadd(w, fmadd(w, V(1.531383769920937332e-01), V(2.222219843214978396e-01)),
                         V(3.999999999940941908e-01));
  const V t2 = z * fmadd(w, fmadd(w, fmadd(w, V(1.479819860511658591e-01),
                                           V(1.818357216161805012e-01)),
                                  V(2.857142874366239149e-01)),
                         V(6.666666666666735130e-01));
  const V R = t1 + t2;
  const V hfsq = V(0.5) * f * f;
  V r = k * V(6.93147180369123816490e-01) -
        ((hfsq - (s * (hfsq + R) + k * V(1.90821492927058770002e-10))) - f);
  const V inf(std::numeric_limits<double>::infinity());
  r = V::blendv(r, -inf, x_in == V(0.0));
  r = V::blendv(r, inf, x_in == inf);
  const V nan(std::numeric_limits<double>::quiet_NaN());
  return V::blendv(r, nan, (x_in < V(0.0)) | (x_in != x_in));
}

template <typename To, typename From>
inline To bits_as(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// The largest lane (NaN when a lane is NaN), halving the vector each step.
inline __m128 nan_max(__m128 a, __m128 b) { return _mm_blendv_ps(_mm_max_ps(a, b), a, _mm_cmpunord_ps(a, a)); }
inline __m128d nan_max(__m128d a, __m128d b) { return _mm_blendv_pd(_mm_max_pd(a, b), a, _mm_cmpunord_pd(a, a)); }
inline float hmax(__m128 q) {
  q = nan_max(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(nan_max(q, _mm_movehdup_ps(q)));
}
inline double hmax(__m128d q) { return _mm_cvtsd_f64(nan_max(q, _mm_unpackhi_pd(q, q))); }
inline __m128 nan_max_halves(__m256 h) { return nan_max(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)); }
inline __m128d nan_max_halves(__m256d h) { return nan_max(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1)); }
#endif

#if defined(CPU_CAPABILITY_AVX512)
// ---- AVX-512 --------------------------------------------------------------------------

template <>
struct Vec<float> {
  using value_type = float;
  __m512 v;
  static constexpr int size() { return 16; }
  Vec() = default;
  Vec(__m512 x) : v(x) {}
  Vec(float s) : v(_mm512_set1_ps(s)) {}
  operator __m512() const { return v; }
  static __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
  static Vec loadu(const void* p) { return _mm512_loadu_ps(p); }
  static Vec loadu(const void* p, int64_t n) { return n >= size() ? loadu(p) : Vec(_mm512_maskz_loadu_ps(first(n), p)); }
  void store(void* p) const { _mm512_storeu_ps(p, v); }
  void store(void* p, int64_t n) const { n >= size() ? store(p) : _mm512_mask_storeu_ps(p, first(n), v); }
  static Vec blendv(const Vec& a, const Vec& b, const Vec& mask) {
    return _mm512_mask_blend_ps(_mm512_movepi32_mask(_mm512_castps_si512(mask)), a, b);
  }
  static Vec set(const Vec& a, const Vec& b, int64_t n = size()) {
    return n >= size() ? b : Vec(_mm512_mask_blend_ps(first(n), a, b));
  }
  // Bit i set when lane i is 0 (a comparison's false lane).
  int zero_mask() const { return _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_EQ_OQ); }
  Vec abs() const { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7FFFFFFF))); }
};

template <>
struct Vec<double> {
  using value_type = double;
  __m512d v;
  static constexpr int size() { return 8; }
  Vec() = default;
  Vec(__m512d x) : v(x) {}
  Vec(double s) : v(_mm512_set1_pd(s)) {}
  operator __m512d() const { return v; }
  static __mmask8 first(int64_t n) { return n >= 8 ? __mmask8(0xFF) : __mmask8((1u << n) - 1); }
  static Vec loadu(const void* p) { return _mm512_loadu_pd(p); }
  static Vec loadu(const void* p, int64_t n) { return n >= size() ? loadu(p) : Vec(_mm512_maskz_loadu_pd(first(n), p)); }
  void store(void* p) const { _mm512_storeu_pd(p, v); }
  void store(void* p, int64_t n) const { n >= size() ? store(p) : _mm512_mask_storeu_pd(p, first(n), v); }
  static Vec blendv(const Vec& a, const Vec& b, const Vec& mask) {
    return _mm512_mask_blend_pd(_mm512_movepi64_mask(_mm512_castpd_si512(mask)), a, b);
  }
  static Vec set(const Vec& a, const Vec& b, int64_t n = size()) {
    return n >= size() ? b : Vec(_mm512_mask_blend_pd(first(n), a, b));
  }
  int zero_mask() const { return _mm512_cmp_pd_mask(v, _mm512_setzero_pd(), _CMP_EQ_OQ); }
  Vec abs() const {
    return _mm512_castsi512_pd(_mm512_and_si512(_mm512_castpd_si512(v), _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFLL)));
  }
  Vec exp() const { return exp_f64(*this); }
  Vec log() const { return log_f64(*this); }
};

template <>
struct Vec<int32_t> {
  using value_type = int32_t;
  __m512i v;
  static constexpr int size() { return 16; }
  Vec() = default;
  Vec(__m512i x) : v(x) {}
  Vec(int32_t s) : v(_mm512_set1_epi32(s)) {}
  operator __m512i() const { return v; }
  static Vec loadu(const void* p) { return _mm512_loadu_si512(p); }
  void store(void* p) const { _mm512_storeu_si512(p, v); }
};

// The all-ones lanes of a comparison, from its mask register.
inline Vec<float> mask_lanes(__mmask16 m) { return _mm512_castsi512_ps(_mm512_movm_epi32(m)); }
inline Vec<double> mask_lanes(__mmask8 m) { return _mm512_castsi512_pd(_mm512_movm_epi64(m)); }

#define LINCLASS_VEC_FLOAT_OPS(T, suffix)                                                                      \
  inline Vec<T> operator+(const Vec<T>& a, const Vec<T>& b) { return _mm512_add_##suffix(a, b); }             \
  inline Vec<T> operator-(const Vec<T>& a, const Vec<T>& b) { return _mm512_sub_##suffix(a, b); }             \
  inline Vec<T> operator*(const Vec<T>& a, const Vec<T>& b) { return _mm512_mul_##suffix(a, b); }             \
  inline Vec<T> operator/(const Vec<T>& a, const Vec<T>& b) { return _mm512_div_##suffix(a, b); }             \
  inline Vec<T> operator-(const Vec<T>& a) { return _mm512_sub_##suffix(_mm512_setzero_##suffix(), a); }      \
  inline Vec<T> operator&(const Vec<T>& a, const Vec<T>& b) { return _mm512_and_##suffix(a, b); }             \
  inline Vec<T> operator|(const Vec<T>& a, const Vec<T>& b) { return _mm512_or_##suffix(a, b); }              \
  inline Vec<T> operator^(const Vec<T>& a, const Vec<T>& b) { return _mm512_xor_##suffix(a, b); }             \
  inline Vec<T> operator==(const Vec<T>& a, const Vec<T>& b) { return mask_lanes(_mm512_cmp_##suffix##_mask(a, b, _CMP_EQ_OQ)); }  \
  inline Vec<T> operator!=(const Vec<T>& a, const Vec<T>& b) { return mask_lanes(_mm512_cmp_##suffix##_mask(a, b, _CMP_NEQ_UQ)); } \
  inline Vec<T> operator<(const Vec<T>& a, const Vec<T>& b) { return mask_lanes(_mm512_cmp_##suffix##_mask(a, b, _CMP_LT_OQ)); }   \
  inline Vec<T> operator<=(const Vec<T>& a, const Vec<T>& b) { return mask_lanes(_mm512_cmp_##suffix##_mask(a, b, _CMP_LE_OQ)); }  \
  inline Vec<T> operator>(const Vec<T>& a, const Vec<T>& b) { return mask_lanes(_mm512_cmp_##suffix##_mask(a, b, _CMP_GT_OQ)); }   \
  inline Vec<T> operator>=(const Vec<T>& a, const Vec<T>& b) { return mask_lanes(_mm512_cmp_##suffix##_mask(a, b, _CMP_GE_OQ)); }
LINCLASS_VEC_FLOAT_OPS(float, ps)
LINCLASS_VEC_FLOAT_OPS(double, pd)
#undef LINCLASS_VEC_FLOAT_OPS

inline Vec<float> fmadd(const Vec<float>& a, const Vec<float>& b, const Vec<float>& c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec<double> fmadd(const Vec<double>& a, const Vec<double>& b, const Vec<double>& c) { return _mm512_fmadd_pd(a, b, c); }
// max(min, a); a NaN a stays (maxps returns its second operand when either is NaN).
inline Vec<float> clamp_min(const Vec<float>& a, const Vec<float>& min) { return _mm512_max_ps(min, a); }
inline Vec<double> clamp_min(const Vec<double>& a, const Vec<double>& min) { return _mm512_max_pd(min, a); }
inline Vec<double> clamp_max(const Vec<double>& a, const Vec<double>& max) { return _mm512_min_pd(max, a); }
inline Vec<double> trunc(const Vec<double>& a) { return _mm512_roundscale_pd(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
// 2^n for integral n in [-1022, 1023] held as doubles.
inline Vec<double> pow2i(const Vec<double>& n) {
  return _mm512_castsi512_pd(_mm512_slli_epi64(_mm512_cvtpd_epi64(n + Vec<double>(1023.0)), 52));
}
inline Vec<double> exponent_of(const Vec<double>& x) {  // the biased exponent, as a double
  return _mm512_cvtepi64_pd(_mm512_srli_epi64(_mm512_castpd_si512(x), 52));
}
inline Vec<double> mantissa_of(const Vec<double>& x) {  // with the exponent of 1.0
  const __m512i bits = _mm512_castpd_si512(x);
  return _mm512_castsi512_pd(_mm512_or_si512(_mm512_and_si512(bits, _mm512_set1_epi64(0x000FFFFFFFFFFFFFLL)),
                                             _mm512_set1_epi64(0x3FF0000000000000LL)));
}

inline Vec<int32_t> operator+(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm512_add_epi32(a, b); }
inline Vec<int32_t> operator-(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm512_sub_epi32(a, b); }
inline Vec<int32_t> operator&(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm512_and_si512(a, b); }
inline Vec<int32_t> operator|(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm512_or_si512(a, b); }
inline Vec<int32_t> operator>>(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm512_srav_epi32(a, b); }
inline Vec<int32_t> operator<<(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm512_sllv_epi32(a, b); }

template <typename To, typename From>
inline Vec<To> cast(const Vec<From>& v) {  // the same bits
  return bits_as<Vec<To>>(v);
}

inline float hmax(const Vec<float>& v) {
  const __m256 lo = _mm512_castps512_ps256(v), hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return hmax(nan_max_halves(_mm256_blendv_ps(_mm256_max_ps(lo, hi), lo, _mm256_cmp_ps(lo, lo, _CMP_UNORD_Q))));
}
inline double hmax(const Vec<double>& v) {
  const __m256d lo = _mm512_castpd512_pd256(v), hi = _mm512_extractf64x4_pd(v, 1);
  return hmax(nan_max_halves(_mm256_blendv_pd(_mm256_max_pd(lo, hi), lo, _mm256_cmp_pd(lo, lo, _CMP_UNORD_Q))));
}

inline float hsum(const Vec<float>& v) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
inline double hsum(const Vec<double>& v) {
  const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
  __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  q = _mm_add_sd(q, _mm_unpackhi_pd(q, q));
  return _mm_cvtsd_f64(q);
}

// v with lane k replaced by value, in registers (a store and a reload of the vector would
// stall on store forwarding).
inline Vec<float> with_lane(const Vec<float>& v, int64_t k, float value) {
  return _mm512_mask_blend_ps(__mmask16(1u << k), v, _mm512_set1_ps(value));
}
inline Vec<double> with_lane(const Vec<double>& v, int64_t k, double value) {
  return _mm512_mask_blend_pd(__mmask8(1u << k), v, _mm512_set1_pd(value));
}

// v's lane k moved to lane k + m (0 <= m < size()), in registers; the lanes below m
// hold v's top lanes.
inline Vec<float> lanes_up(const Vec<float>& v, int64_t m) {
  const __m512i from = _mm512_and_si512(
      _mm512_sub_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       _mm512_set1_epi32(int32_t(m))),
      _mm512_set1_epi32(15));
  return _mm512_permutexvar_ps(from, v);
}
inline Vec<double> lanes_up(const Vec<double>& v, int64_t m) {
  const __m512i from = _mm512_and_si512(
      _mm512_sub_epi64(_mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7), _mm512_set1_epi64(m)),
      _mm512_set1_epi64(7));
  return _mm512_permutexvar_pd(from, v);
}

#elif defined(CPU_CAPABILITY_AVX2)
// ---- AVX2 (with FMA) ------------------------------------------------------------------

template <>
struct Vec<float> {
  using value_type = float;
  __m256 v;
  static constexpr int size() { return 8; }
  Vec() = default;
  Vec(__m256 x) : v(x) {}
  Vec(float s) : v(_mm256_set1_ps(s)) {}
  operator __m256() const { return v; }
  static Vec loadu(const void* p) { return _mm256_loadu_ps(static_cast<const float*>(p)); }
  // Lanes [0, n) as a mask: masked loads and stores touch no byte past the row's end.
  static __m256i first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static Vec loadu(const void* p, int64_t n) {
    if (n >= size()) return loadu(p);
    return _mm256_maskload_ps(static_cast<const float*>(p), first(n));
  }
  void store(void* p) const { _mm256_storeu_ps(static_cast<float*>(p), v); }
  void store(void* p, int64_t n) const {
    if (n >= size()) return store(p);
    _mm256_maskstore_ps(static_cast<float*>(p), first(n), v);
  }
  static Vec blendv(const Vec& a, const Vec& b, const Vec& mask) { return _mm256_blendv_ps(a, b, mask); }
  static Vec set(const Vec& a, const Vec& b, int64_t n = size()) {
    return n >= size() ? b : Vec(_mm256_blendv_ps(a, b, _mm256_castsi256_ps(first(n))));
  }
  int zero_mask() const { return _mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ)); }
  Vec abs() const { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }
};

template <>
struct Vec<double> {
  using value_type = double;
  __m256d v;
  static constexpr int size() { return 4; }
  Vec() = default;
  Vec(__m256d x) : v(x) {}
  Vec(double s) : v(_mm256_set1_pd(s)) {}
  operator __m256d() const { return v; }
  static Vec loadu(const void* p) { return _mm256_loadu_pd(static_cast<const double*>(p)); }
  static __m256i first(int64_t n) { return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)); }
  static Vec loadu(const void* p, int64_t n) {
    if (n >= size()) return loadu(p);
    return _mm256_maskload_pd(static_cast<const double*>(p), first(n));
  }
  void store(void* p) const { _mm256_storeu_pd(static_cast<double*>(p), v); }
  void store(void* p, int64_t n) const {
    if (n >= size()) return store(p);
    _mm256_maskstore_pd(static_cast<double*>(p), first(n), v);
  }
  static Vec blendv(const Vec& a, const Vec& b, const Vec& mask) { return _mm256_blendv_pd(a, b, mask); }
  static Vec set(const Vec& a, const Vec& b, int64_t n = size()) {
    return n >= size() ? b : Vec(_mm256_blendv_pd(a, b, _mm256_castsi256_pd(first(n))));
  }
  int zero_mask() const { return _mm256_movemask_pd(_mm256_cmp_pd(v, _mm256_setzero_pd(), _CMP_EQ_OQ)); }
  Vec abs() const { return _mm256_and_pd(v, _mm256_castsi256_pd(_mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFLL))); }
  Vec exp() const { return exp_f64(*this); }
  Vec log() const { return log_f64(*this); }
};

template <>
struct Vec<int32_t> {
  using value_type = int32_t;
  __m256i v;
  static constexpr int size() { return 8; }
  Vec() = default;
  Vec(__m256i x) : v(x) {}
  Vec(int32_t s) : v(_mm256_set1_epi32(s)) {}
  operator __m256i() const { return v; }
  static Vec loadu(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  void store(void* p) const { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
};

#define LINCLASS_VEC_FLOAT_OPS(T, suffix)                                                                 \
  inline Vec<T> operator+(const Vec<T>& a, const Vec<T>& b) { return _mm256_add_##suffix(a, b); }        \
  inline Vec<T> operator-(const Vec<T>& a, const Vec<T>& b) { return _mm256_sub_##suffix(a, b); }        \
  inline Vec<T> operator*(const Vec<T>& a, const Vec<T>& b) { return _mm256_mul_##suffix(a, b); }        \
  inline Vec<T> operator/(const Vec<T>& a, const Vec<T>& b) { return _mm256_div_##suffix(a, b); }        \
  inline Vec<T> operator-(const Vec<T>& a) { return _mm256_sub_##suffix(_mm256_setzero_##suffix(), a); } \
  inline Vec<T> operator&(const Vec<T>& a, const Vec<T>& b) { return _mm256_and_##suffix(a, b); }        \
  inline Vec<T> operator|(const Vec<T>& a, const Vec<T>& b) { return _mm256_or_##suffix(a, b); }         \
  inline Vec<T> operator^(const Vec<T>& a, const Vec<T>& b) { return _mm256_xor_##suffix(a, b); }        \
  inline Vec<T> operator==(const Vec<T>& a, const Vec<T>& b) { return _mm256_cmp_##suffix(a, b, _CMP_EQ_OQ); }  \
  inline Vec<T> operator!=(const Vec<T>& a, const Vec<T>& b) { return _mm256_cmp_##suffix(a, b, _CMP_NEQ_UQ); } \
  inline Vec<T> operator<(const Vec<T>& a, const Vec<T>& b) { return _mm256_cmp_##suffix(a, b, _CMP_LT_OQ); }   \
  inline Vec<T> operator<=(const Vec<T>& a, const Vec<T>& b) { return _mm256_cmp_##suffix(a, b, _CMP_LE_OQ); }  \
  inline Vec<T> operator>(const Vec<T>& a, const Vec<T>& b) { return _mm256_cmp_##suffix(a, b, _CMP_GT_OQ); }   \
  inline Vec<T> operator>=(const Vec<T>& a, const Vec<T>& b) { return _mm256_cmp_##suffix(a, b, _CMP_GE_OQ); }  \
  inline Vec<T> fmadd(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) { return _mm256_fmadd_##suffix(a, b, c); } \
  inline Vec<T> clamp_min(const Vec<T>& a, const Vec<T>& min) { return _mm256_max_##suffix(min, a); }    \
  inline Vec<T> clamp_max(const Vec<T>& a, const Vec<T>& max) { return _mm256_min_##suffix(max, a); }
LINCLASS_VEC_FLOAT_OPS(float, ps)
LINCLASS_VEC_FLOAT_OPS(double, pd)
#undef LINCLASS_VEC_FLOAT_OPS

inline Vec<double> trunc(const Vec<double>& a) { return _mm256_round_pd(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
// 2^n for integral n in [-1022, 1023] held as doubles (AVX2 has no double -> int64
// conversion: n + 1023 + 2^52 puts the biased exponent in the low mantissa bits).
inline Vec<double> pow2i(const Vec<double>& n) {
  const __m256i biased = _mm256_castpd_si256(_mm256_add_pd(n, _mm256_set1_pd(1023.0 + 4503599627370496.0)));
  return _mm256_castsi256_pd(_mm256_slli_epi64(biased, 52));
}
inline Vec<double> exponent_of(const Vec<double>& x) {  // the biased exponent, as a double
  const __m256i e = _mm256_srli_epi64(_mm256_castpd_si256(x), 52);
  const __m256d magic = _mm256_set1_pd(4503599627370496.0);  // 2^52: e in its mantissa
  return _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(e, _mm256_castpd_si256(magic))), magic);
}
inline Vec<double> mantissa_of(const Vec<double>& x) {  // with the exponent of 1.0
  const __m256i bits = _mm256_castpd_si256(x);
  return _mm256_castsi256_pd(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi64x(0x000FFFFFFFFFFFFFLL)),
                                             _mm256_set1_epi64x(0x3FF0000000000000LL)));
}

inline Vec<int32_t> operator+(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm256_add_epi32(a, b); }
inline Vec<int32_t> operator-(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm256_sub_epi32(a, b); }
inline Vec<int32_t> operator&(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm256_and_si256(a, b); }
inline Vec<int32_t> operator|(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm256_or_si256(a, b); }
inline Vec<int32_t> operator>>(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm256_srav_epi32(a, b); }
inline Vec<int32_t> operator<<(const Vec<int32_t>& a, const Vec<int32_t>& b) { return _mm256_sllv_epi32(a, b); }

template <typename To, typename From>
inline Vec<To> cast(const Vec<From>& v) {  // the same bits
  return bits_as<Vec<To>>(v);
}


inline float hmax(const Vec<float>& v) { return hmax(nan_max_halves(v.v)); }
inline double hmax(const Vec<double>& v) { return hmax(nan_max_halves(v.v)); }

inline float hsum(const Vec<float>& v) {
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
inline double hsum(const Vec<double>& v) {
  __m128d q = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  q = _mm_add_sd(q, _mm_unpackhi_pd(q, q));
  return _mm_cvtsd_f64(q);
}

inline Vec<float> with_lane(const Vec<float>& v, int64_t k, float value) {
  const __m256i at = _mm256_cmpeq_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int32_t(k)));
  return _mm256_blendv_ps(v, _mm256_set1_ps(value), _mm256_castsi256_ps(at));
}
inline Vec<double> with_lane(const Vec<double>& v, int64_t k, double value) {
  const __m256i at = _mm256_cmpeq_epi64(_mm256_setr_epi64x(0, 1, 2, 3), _mm256_set1_epi64x(k));
  return _mm256_blendv_pd(v, _mm256_set1_pd(value), _mm256_castsi256_pd(at));
}

inline Vec<float> lanes_up(const Vec<float>& v, int64_t m) {
  const __m256i from = _mm256_and_si256(
      _mm256_sub_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(int32_t(m))),
      _mm256_set1_epi32(7));
  return _mm256_permutevar8x32_ps(v, from);
}
inline Vec<double> lanes_up(const Vec<double>& v, int64_t m) {  // as pairs of 32-bit lanes
  const __m256i pair = _mm256_and_si256(
      _mm256_sub_epi32(_mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), _mm256_set1_epi32(int32_t(m))),
      _mm256_set1_epi32(3));
  const __m256i from = _mm256_add_epi32(_mm256_add_epi32(pair, pair), _mm256_setr_epi32(0, 1, 0, 1, 0, 1, 0, 1));
  return _mm256_castps_pd(_mm256_permutevar8x32_ps(_mm256_castpd_ps(v), from));
}

#elif defined(__SSE2__)
// ---- DEFAULT on x86-64: SSE2, the baseline every x86-64 CPU has -------------------------
// 32 bytes as two 128-bit halves (the kernels' tiles are written for 8 floats / 4 doubles).
// SSE2 has no blend, FMA or per-lane shift: selects are and/andnot/or on the all-ones
// masks comparisons give, fmadd rounds twice, and shifts take one count for all lanes.

inline __m128 sse_select(__m128 mask, __m128 a, __m128 b) {  // b where mask, else a
  return _mm_or_ps(_mm_and_ps(mask, b), _mm_andnot_ps(mask, a));
}
inline __m128d sse_select(__m128d mask, __m128d a, __m128d b) {
  return _mm_or_pd(_mm_and_pd(mask, b), _mm_andnot_pd(mask, a));
}

template <>
struct Vec<float> {
  using value_type = float;
  __m128 lo, hi;
  static constexpr int size() { return 8; }
  Vec() = default;
  Vec(__m128 l, __m128 h) : lo(l), hi(h) {}
  Vec(float s) : lo(_mm_set1_ps(s)), hi(lo) {}
  static Vec loadu(const void* p) {
    const float* f = static_cast<const float*>(p);
    return {_mm_loadu_ps(f), _mm_loadu_ps(f + 4)};
  }
  static Vec loadu(const void* p, int64_t n) {
    if (n >= size()) return loadu(p);
    alignas(16) float tmp[8] = {};
    std::memcpy(tmp, p, n * sizeof(float));
    return {_mm_load_ps(tmp), _mm_load_ps(tmp + 4)};
  }
  void store(void* p) const {
    float* f = static_cast<float*>(p);
    _mm_storeu_ps(f, lo);
    _mm_storeu_ps(f + 4, hi);
  }
  void store(void* p, int64_t n) const {
    if (n >= size()) return store(p);
    alignas(16) float tmp[8];
    _mm_store_ps(tmp, lo);
    _mm_store_ps(tmp + 4, hi);
    std::memcpy(p, tmp, n * sizeof(float));
  }
  // Lanes [0, n) as all-ones.
  static Vec first(int64_t n) {
    const __m128i count = _mm_set1_epi32(int32_t(std::min<int64_t>(n, size())));
    return {_mm_castsi128_ps(_mm_cmpgt_epi32(count, _mm_setr_epi32(0, 1, 2, 3))),
            _mm_castsi128_ps(_mm_cmpgt_epi32(count, _mm_setr_epi32(4, 5, 6, 7)))};
  }
  static Vec blendv(const Vec& a, const Vec& b, const Vec& mask) {
    // A comparison's lanes are all-ones or zero; a sign-bit mask is widened first.
    const __m128 ml = _mm_castsi128_ps(_mm_srai_epi32(_mm_castps_si128(mask.lo), 31));
    const __m128 mh = _mm_castsi128_ps(_mm_srai_epi32(_mm_castps_si128(mask.hi), 31));
    return {sse_select(ml, a.lo, b.lo), sse_select(mh, a.hi, b.hi)};
  }
  static Vec set(const Vec& a, const Vec& b, int64_t n = size()) {
    if (n >= size()) return b;
    const Vec m = first(n);
    return {sse_select(m.lo, a.lo, b.lo), sse_select(m.hi, a.hi, b.hi)};
  }
  int zero_mask() const {
    const __m128 z = _mm_setzero_ps();
    return _mm_movemask_ps(_mm_cmpeq_ps(lo, z)) | (_mm_movemask_ps(_mm_cmpeq_ps(hi, z)) << 4);
  }
  Vec abs() const {
    const __m128 m = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
    return {_mm_and_ps(lo, m), _mm_and_ps(hi, m)};
  }
};

template <>
struct Vec<double> {
  using value_type = double;
  __m128d lo, hi;
  static constexpr int size() { return 4; }
  Vec() = default;
  Vec(__m128d l, __m128d h) : lo(l), hi(h) {}
  Vec(double s) : lo(_mm_set1_pd(s)), hi(lo) {}
  static Vec loadu(const void* p) {
    const double* d = static_cast<const double*>(p);
    return {_mm_loadu_pd(d), _mm_loadu_pd(d + 2)};
  }
  static Vec loadu(const void* p, int64_t n) {
    if (n >= size()) return loadu(p);
    alignas(16) double tmp[4] = {};
    std::memcpy(tmp, p, n * sizeof(double));
    return {_mm_load_pd(tmp), _mm_load_pd(tmp + 2)};
  }
  void store(void* p) const {
    double* d = static_cast<double*>(p);
    _mm_storeu_pd(d, lo);
    _mm_storeu_pd(d + 2, hi);
  }
  void store(void* p, int64_t n) const {
    if (n >= size()) return store(p);
    alignas(16) double tmp[4];
    _mm_store_pd(tmp, lo);
    _mm_store_pd(tmp + 2, hi);
    std::memcpy(p, tmp, n * sizeof(double));
  }
  static Vec first(int64_t n) {  // 32-bit compares of doubled lane indices: 64-bit masks
    const __m128i count = _mm_set1_epi32(int32_t(std::min<int64_t>(n, size())));
    return {_mm_castsi128_pd(_mm_cmpgt_epi32(count, _mm_setr_epi32(0, 0, 1, 1))),
            _mm_castsi128_pd(_mm_cmpgt_epi32(count, _mm_setr_epi32(2, 2, 3, 3)))};
  }
  static __m128d widen_sign(__m128d m) {  // each lane's sign bit to all 64 bits
    return _mm_castsi128_pd(_mm_shuffle_epi32(_mm_srai_epi32(_mm_castpd_si128(m), 31), _MM_SHUFFLE(3, 3, 1, 1)));
  }
  static Vec blendv(const Vec& a, const Vec& b, const Vec& mask) {
    return {sse_select(widen_sign(mask.lo), a.lo, b.lo), sse_select(widen_sign(mask.hi), a.hi, b.hi)};
  }
  static Vec set(const Vec& a, const Vec& b, int64_t n = size()) {
    if (n >= size()) return b;
    const Vec m = first(n);
    return {sse_select(m.lo, a.lo, b.lo), sse_select(m.hi, a.hi, b.hi)};
  }
  int zero_mask() const {
    const __m128d z = _mm_setzero_pd();
    return _mm_movemask_pd(_mm_cmpeq_pd(lo, z)) | (_mm_movemask_pd(_mm_cmpeq_pd(hi, z)) << 2);
  }
  Vec abs() const {
    const __m128d m = _mm_castsi128_pd(_mm_set1_epi64x(0x7FFFFFFFFFFFFFFFLL));
    return {_mm_and_pd(lo, m), _mm_and_pd(hi, m)};
  }
  Vec exp() const { return exp_f64(*this); }
  Vec log() const { return log_f64(*this); }
};

template <>
struct Vec<int32_t> {
  using value_type = int32_t;
  __m128i lo, hi;
  static constexpr int size() { return 8; }
  Vec() = default;
  Vec(__m128i l, __m128i h) : lo(l), hi(h) {}
  Vec(int32_t s) : lo(_mm_set1_epi32(s)), hi(lo) {}
  static Vec loadu(const void* p) {
    const __m128i* q = static_cast<const __m128i*>(p);
    return {_mm_loadu_si128(q), _mm_loadu_si128(q + 1)};
  }
  void store(void* p) const {
    __m128i* q = static_cast<__m128i*>(p);
    _mm_storeu_si128(q, lo);
    _mm_storeu_si128(q + 1, hi);
  }
};

#define LINCLASS_SSE_BINARY(T, op, fn) \
  inline Vec<T> operator op(const Vec<T>& a, const Vec<T>& b) { return {fn(a.lo, b.lo), fn(a.hi, b.hi)}; }
#define LINCLASS_SSE_FLOAT_OPS(T, s)                                                      \
  LINCLASS_SSE_BINARY(T, +, _mm_add_##s)                                                  \
  LINCLASS_SSE_BINARY(T, -, _mm_sub_##s)                                                  \
  LINCLASS_SSE_BINARY(T, *, _mm_mul_##s)                                                  \
  LINCLASS_SSE_BINARY(T, /, _mm_div_##s)                                                  \
  LINCLASS_SSE_BINARY(T, &, _mm_and_##s)                                                  \
  LINCLASS_SSE_BINARY(T, |, _mm_or_##s)                                                   \
  LINCLASS_SSE_BINARY(T, ^, _mm_xor_##s)                                                  \
  LINCLASS_SSE_BINARY(T, ==, _mm_cmpeq_##s)                                               \
  LINCLASS_SSE_BINARY(T, !=, _mm_cmpneq_##s)                                              \
  LINCLASS_SSE_BINARY(T, <, _mm_cmplt_##s)                                                \
  LINCLASS_SSE_BINARY(T, <=, _mm_cmple_##s)                                               \
  LINCLASS_SSE_BINARY(T, >, _mm_cmpgt_##s)                                                \
  LINCLASS_SSE_BINARY(T, >=, _mm_cmpge_##s)                                               \
  inline Vec<T> operator-(const Vec<T>& a) { return Vec<T>(T(0)) - a; }                   \
  /* a * b + c rounded twice: SSE2 has no fused multiply-add. */                          \
  inline Vec<T> fmadd(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) { return a * b + c; } \
  /* max(min, a) keeping a NaN a: maxps returns its second operand on NaN. */             \
  inline Vec<T> clamp_min(const Vec<T>& a, const Vec<T>& min) {                           \
    return {_mm_max_##s(min.lo, a.lo), _mm_max_##s(min.hi, a.hi)};                        \
  }                                                                                       \
  inline Vec<T> clamp_max(const Vec<T>& a, const Vec<T>& max) {                           \
    return {_mm_min_##s(max.lo, a.lo), _mm_min_##s(max.hi, a.hi)};                        \
  }
LINCLASS_SSE_FLOAT_OPS(float, ps)
LINCLASS_SSE_FLOAT_OPS(double, pd)
#undef LINCLASS_SSE_FLOAT_OPS
LINCLASS_SSE_BINARY(int32_t, +, _mm_add_epi32)
LINCLASS_SSE_BINARY(int32_t, -, _mm_sub_epi32)
LINCLASS_SSE_BINARY(int32_t, &, _mm_and_si128)
LINCLASS_SSE_BINARY(int32_t, |, _mm_or_si128)
#undef LINCLASS_SSE_BINARY

// Shifts by a count vector whose lanes are all equal (what the kernels pass: constants);
// SSE2 shifts every lane by one count.
inline Vec<double> trunc(const Vec<double>& a) {  // |a| < 2^31 (exp's n / 2)
  return {_mm_cvtepi32_pd(_mm_cvttpd_epi32(a.lo)), _mm_cvtepi32_pd(_mm_cvttpd_epi32(a.hi))};
}
// 2^n for integral n in [-1022, 1023] held as doubles: n + 1023 + 2^52 puts the biased
// exponent in the low mantissa bits.
inline Vec<double> pow2i(const Vec<double>& n) {
  const __m128d magic = _mm_set1_pd(1023.0 + 4503599627370496.0);
  auto half = [&](__m128d h) { return _mm_castsi128_pd(_mm_slli_epi64(_mm_castpd_si128(_mm_add_pd(h, magic)), 52)); };
  return {half(n.lo), half(n.hi)};
}
inline Vec<double> exponent_of(const Vec<double>& x) {  // the biased exponent, as a double
  const __m128d magic = _mm_set1_pd(4503599627370496.0);  // 2^52: e in its mantissa
  auto half = [&](__m128d h) {
    const __m128i e = _mm_srli_epi64(_mm_castpd_si128(h), 52);
    return _mm_sub_pd(_mm_castsi128_pd(_mm_or_si128(e, _mm_castpd_si128(magic))), magic);
  };
  return {half(x.lo), half(x.hi)};
}
inline Vec<double> mantissa_of(const Vec<double>& x) {  // with the exponent of 1.0
  const __m128i keep = _mm_set1_epi64x(0x000FFFFFFFFFFFFFLL), one = _mm_set1_epi64x(0x3FF0000000000000LL);
  auto half = [&](__m128d h) { return _mm_castsi128_pd(_mm_or_si128(_mm_and_si128(_mm_castpd_si128(h), keep), one)); };
  return {half(x.lo), half(x.hi)};
}

inline Vec<int32_t> operator>>(const Vec<int32_t>& a, const Vec<int32_t>& count) {
  const __m128i c = _mm_cvtsi32_si128(_mm_cvtsi128_si32(count.lo));
  return {_mm_sra_epi32(a.lo, c), _mm_sra_epi32(a.hi, c)};
}
inline Vec<int32_t> operator<<(const Vec<int32_t>& a, const Vec<int32_t>& count) {
  const __m128i c = _mm_cvtsi32_si128(_mm_cvtsi128_si32(count.lo));
  return {_mm_sll_epi32(a.lo, c), _mm_sll_epi32(a.hi, c)};
}

template <typename To, typename From>
inline Vec<To> cast(const Vec<From>& v) {  // the same bits
  return bits_as<Vec<To>>(v);
}

inline __m128 sse_nan_max(__m128 a, __m128 b) { return sse_select(_mm_cmpunord_ps(a, a), _mm_max_ps(a, b), a); }
inline __m128d sse_nan_max(__m128d a, __m128d b) { return sse_select(_mm_cmpunord_pd(a, a), _mm_max_pd(a, b), a); }
inline float hmax(const Vec<float>& v) {  // NaN when a lane is NaN
  __m128 q = sse_nan_max(v.lo, v.hi);
  q = sse_nan_max(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(sse_nan_max(q, _mm_shuffle_ps(q, q, 1)));
}
inline double hmax(const Vec<double>& v) {
  const __m128d q = sse_nan_max(v.lo, v.hi);
  return _mm_cvtsd_f64(sse_nan_max(q, _mm_unpackhi_pd(q, q)));
}
inline float hsum(const Vec<float>& v) {
  __m128 q = _mm_add_ps(v.lo, v.hi);
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
}
inline double hsum(const Vec<double>& v) {
  const __m128d q = _mm_add_pd(v.lo, v.hi);
  return _mm_cvtsd_f64(_mm_add_sd(q, _mm_unpackhi_pd(q, q)));
}

inline Vec<float> with_lane(const Vec<float>& v, int64_t k, float value) {
  const __m128i at = _mm_set1_epi32(int32_t(k));
  const __m128 lo = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_setr_epi32(0, 1, 2, 3), at));
  const __m128 hi = _mm_castsi128_ps(_mm_cmpeq_epi32(_mm_setr_epi32(4, 5, 6, 7), at));
  const __m128 x = _mm_set1_ps(value);
  return {sse_select(lo, v.lo, x), sse_select(hi, v.hi, x)};
}
inline Vec<double> with_lane(const Vec<double>& v, int64_t k, double value) {
  const __m128i at = _mm_set1_epi32(int32_t(k));  // doubled indices: 64-bit lane masks
  const __m128d lo = _mm_castsi128_pd(_mm_cmpeq_epi32(_mm_setr_epi32(0, 0, 1, 1), at));
  const __m128d hi = _mm_castsi128_pd(_mm_cmpeq_epi32(_mm_setr_epi32(2, 2, 3, 3), at));
  const __m128d x = _mm_set1_pd(value);
  return {sse_select(lo, v.lo, x), sse_select(hi, v.hi, x)};
}

#else
// ---- DEFAULT elsewhere (no x86): 32 bytes of lanes in an array --------------------------

template <typename T>
struct Vec {
  using value_type = T;
  static constexpr int kLanes = 32 / sizeof(T);
  using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  alignas(32) T lane[kLanes];
  static constexpr int size() { return kLanes; }
  Vec() = default;
  Vec(T s) {
    for (int i = 0; i < kLanes; ++i) lane[i] = s;
  }
  static Vec loadu(const void* p) {
    Vec r;
    std::memcpy(r.lane, p, sizeof(r.lane));
    return r;
  }
  static Vec loadu(const void* p, int64_t n) {
    Vec r(T(0));
    std::memcpy(r.lane, p, std::min<int64_t>(n, kLanes) * sizeof(T));
    return r;
  }
  void store(void* p) const { std::memcpy(p, lane, sizeof(lane)); }
  void store(void* p, int64_t n) const { std::memcpy(p, lane, std::min<int64_t>(n, kLanes) * sizeof(T)); }
  static bool on(const Vec& mask, int i) { return bits_as<Bits>(mask.lane[i]) >> (8 * sizeof(T) - 1); }
  static Vec blendv(const Vec& a, const Vec& b, const Vec& mask) {
    Vec r;
    for (int i = 0; i < kLanes; ++i) r.lane[i] = on(mask, i) ? b.lane[i] : a.lane[i];
    return r;
  }
  static Vec set(const Vec& a, const Vec& b, int64_t n = size()) {
    Vec r;
    for (int i = 0; i < kLanes; ++i) r.lane[i] = i < n ? b.lane[i] : a.lane[i];
    return r;
  }
  int zero_mask() const {
    int bits = 0;
    for (int i = 0; i < kLanes; ++i) bits |= int(lane[i] == T(0)) << i;
    return bits;
  }
  template <typename F>
  Vec map(F f) const {
    Vec r;
    for (int i = 0; i < kLanes; ++i) r.lane[i] = f(lane[i]);
    return r;
  }
  Vec abs() const { return map([](T x) { return std::abs(x); }); }
  Vec exp() const { return map([](T x) { return std::exp(x); }); }
  Vec log() const { return map([](T x) { return std::log(x); }); }
};

template <typename T, typename F>
inline Vec<T> zip(const Vec<T>& a, const Vec<T>& b, F f) {
  Vec<T> r;
  for (int i = 0; i < Vec<T>::size(); ++i) r.lane[i] = f(a.lane[i], b.lane[i]);
  return r;
}
template <typename T>
inline T all_ones_if(bool c) {  // a comparison's lane: every bit set, or none
  using Bits = typename Vec<T>::Bits;
  return bits_as<T>(c ? ~Bits(0) : Bits(0));
}
template <typename T, typename F>
inline Vec<T> zip_bits(const Vec<T>& a, const Vec<T>& b, F f) {
  using Bits = typename Vec<T>::Bits;
  return zip(a, b, [&](T x, T y) { return bits_as<T>(Bits(f(bits_as<Bits>(x), bits_as<Bits>(y)))); });
}

template <typename T> inline Vec<T> operator+(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return T(x + y); }); }
template <typename T> inline Vec<T> operator-(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return T(x - y); }); }
template <typename T> inline Vec<T> operator*(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return T(x * y); }); }
template <typename T> inline Vec<T> operator/(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return T(x / y); }); }
template <typename T> inline Vec<T> operator-(const Vec<T>& a) { return a.map([](T x) { return T(-x); }); }
template <typename T> inline Vec<T> operator&(const Vec<T>& a, const Vec<T>& b) { return zip_bits(a, b, [](auto x, auto y) { return x & y; }); }
template <typename T> inline Vec<T> operator|(const Vec<T>& a, const Vec<T>& b) { return zip_bits(a, b, [](auto x, auto y) { return x | y; }); }
template <typename T> inline Vec<T> operator^(const Vec<T>& a, const Vec<T>& b) { return zip_bits(a, b, [](auto x, auto y) { return x ^ y; }); }
template <typename T> inline Vec<T> operator==(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return all_ones_if<T>(x == y); }); }
template <typename T> inline Vec<T> operator!=(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return all_ones_if<T>(x != y); }); }
template <typename T> inline Vec<T> operator<(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return all_ones_if<T>(x < y); }); }
template <typename T> inline Vec<T> operator<=(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return all_ones_if<T>(x <= y); }); }
template <typename T> inline Vec<T> operator>(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return all_ones_if<T>(x > y); }); }
template <typename T> inline Vec<T> operator>=(const Vec<T>& a, const Vec<T>& b) { return zip(a, b, [](T x, T y) { return all_ones_if<T>(x >= y); }); }
inline Vec<int32_t> operator>>(const Vec<int32_t>& a, const Vec<int32_t>& b) { return zip(a, b, [](int32_t x, int32_t y) { return int32_t(x >> y); }); }
inline Vec<int32_t> operator<<(const Vec<int32_t>& a, const Vec<int32_t>& b) {
  return zip(a, b, [](int32_t x, int32_t y) { return int32_t(uint32_t(x) << y); });
}
// a * b + c rounded twice, as the vector ISAs without FMA would.
template <typename T> inline Vec<T> fmadd(const Vec<T>& a, const Vec<T>& b, const Vec<T>& c) { return a * b + c; }
// max(min, a) that keeps a NaN a, as maxps(min, a) does.
template <typename T> inline Vec<T> clamp_min(const Vec<T>& a, const Vec<T>& min) {
  return zip(a, min, [](T x, T m) { return (x != x || m != m) ? x : (m > x ? m : x); });
}

template <typename To, typename From>
inline Vec<To> cast(const Vec<From>& v) {  // the same bits
  return bits_as<Vec<To>>(v);
}

template <typename T>
inline T hmax(const Vec<T>& v) {  // NaN when a lane is NaN
  T m = v.lane[0];
  for (int i = 1; i < Vec<T>::size(); ++i) m = (v.lane[i] > m || v.lane[i] != v.lane[i]) && m == m ? v.lane[i] : m;
  return m;
}

template <typename T>
inline T hsum(const Vec<T>& v) {  // pairwise, as the vector ISAs add
  Vec<T> a = v;
  for (int width = Vec<T>::size() / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) a.lane[i] = a.lane[i] + a.lane[i + width];
  return a.lane[0];
}
template <typename T>
inline Vec<T> with_lane(const Vec<T>& v, int64_t k, T value) {
  Vec<T> r = v;
  r.lane[k] = value;
  return r;
}
#endif

#if !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// lanes_up (see the AVX-512 one) through memory: the baseline builds only.
template <typename T>
inline Vec<T> lanes_up(const Vec<T>& v, int64_t m) {
  constexpr int64_t W = Vec<T>::size();
  alignas(64) T lanes[2 * W];
  v.store(lanes);
  v.store(lanes + W);
  return Vec<T>::loadu(lanes + W - m);
}
#endif

}  // namespace linclass::cpu
