// Small vectorized building blocks for the CPU loss kernels, on top of at::vec.
//
// The extension is compiled for one vector ISA (setup.py picks AVX-512, AVX2 or the
// portable default from the build machine, or LINCLASS_CPU_ISA), so Vectorized<T>
// here is the widest type that ISA has.  Every function is deterministic: the order
// of the floating-point operations depends only on the lengths it is given.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace linclass::cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline T hsum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

template <typename T>
inline T hmax(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); },
                                    v);
}

// exp in the kernels goes through these, so the accuracy/speed trade is made in one place.
template <typename T>
inline Vec<T> vexp(const Vec<T>& v) {
  return v.exp_u20();
}
inline float sexp(float v) { return std::exp(v); }
inline double sexp(double v) { return std::exp(v); }

// Lane mask helpers: compare results in at::vec are all-ones / all-zeros bit patterns.
template <typename T>
inline Vec<T> select(const Vec<T>& mask, const Vec<T>& if_true, const Vec<T>& if_false) {
  return Vec<T>::blendv(if_false, if_true, mask);
}

// max_j x[j] over [0, n), n >= 1.
template <typename T>
inline T max_of(const T* x, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> lowest(-std::numeric_limits<T>::infinity());
  Vec<T> m0 = lowest, m1 = lowest;
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    m0 = at::vec::maximum(m0, Vec<T>::loadu(x + j));
    m1 = at::vec::maximum(m1, Vec<T>::loadu(x + j + W));
  }
  for (; j + W <= n; j += W) m0 = at::vec::maximum(m0, Vec<T>::loadu(x + j));
  if (j < n) m1 = at::vec::maximum(m1, Vec<T>::set(lowest, Vec<T>::loadu(x + j, n - j), n - j));
  T m = hmax(at::vec::maximum(m0, m1));
  // maximum() propagates NaN lane-wise; hmax keeps it, so a NaN row stays NaN.
  return m;
}

// Over [begin, end): returns sum_j exp(x[j] - m), writes out[j] = exp(x[j] - m) when
// out != nullptr (out may alias x), and with kWeighted adds sum_j w[j] * (x[j] - m) to
// wd.  Shifted scores keep every term O(1), so nothing cancels when the scores are large.
template <typename T>
struct Same {  // keeps T deduced from x alone (nullptr args then convert)
  using type = T;
};
template <bool kWeighted = false, typename T>
inline T exp_sum(const T* x, typename Same<T>::type* out, int64_t begin, int64_t end,
                 typename Same<T>::type m, const typename Same<T>::type* w = nullptr,
                 typename Same<T>::type* wd = nullptr) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vm(m), zero(T(0));
  Vec<T> s0 = zero, s1 = zero, a0 = zero, a1 = zero;
  int64_t j = begin;
  for (; j + 2 * W <= end; j += 2 * W) {
    const Vec<T> d0 = Vec<T>::loadu(x + j) - vm, d1 = Vec<T>::loadu(x + j + W) - vm;
    const Vec<T> e0 = vexp(d0), e1 = vexp(d1);
    if (out) {
      e0.store(out + j);
      e1.store(out + j + W);
    }
    s0 = s0 + e0;
    s1 = s1 + e1;
    if constexpr (kWeighted) {
      a0 = at::vec::fmadd(Vec<T>::loadu(w + j), d0, a0);
      a1 = at::vec::fmadd(Vec<T>::loadu(w + j + W), d1, a1);
    }
  }
  for (; j < end; j += W) {
    const int64_t n = std::min<int64_t>(W, end - j);
    const Vec<T> d = Vec<T>::loadu(x + j, n) - vm;
    const Vec<T> e = Vec<T>::set(zero, vexp(d), n);
    if (out) e.store(out + j, n);
    s0 = s0 + e;
    if constexpr (kWeighted) a0 = at::vec::fmadd(Vec<T>::loadu(w + j, n), d, a0);  // w zero-filled
  }
  if constexpr (kWeighted) *wd += hsum(a0 + a1);
  return hsum(s0 + s1);
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

// dst[j] = f(j, n)[j - j0] for j in [begin, end): f(j0, n) returns the vector for
// columns [j0, j0 + n), n < W only at the edges (load inputs with loadu(ptr, n)).
// With `stream`, every full vector goes out with an aligned non-temporal store.
template <typename T, typename F>
inline void store_map(T* dst, int64_t begin, int64_t end, bool stream, F&& f) {
  constexpr int64_t W = Vec<T>::size();
  int64_t j = begin;
  if (stream) {
    const int64_t misaligned = int64_t(reinterpret_cast<uintptr_t>(dst + j) / sizeof(T)) % W;
    const int64_t head = std::min<int64_t>(end - j, misaligned ? W - misaligned : 0);
    if (head > 0) {
      f(j, head).store(dst + j, head);
      j += head;
    }
    for (; j + W <= end; j += W) stream_store(dst + j, f(j, W));
  } else {
    for (; j + W <= end; j += W) f(j, W).store(dst + j);
  }
  if (j < end) f(j, end - j).store(dst + j, end - j);
}

// v with lane `lane` replaced by `value`.
template <typename T>
inline Vec<T> with_lane(const Vec<T>& v, int64_t lane, T value) {
  alignas(64) T tmp[Vec<T>::size()];
  v.store(tmp);
  tmp[lane] = value;
  return Vec<T>::loadu(tmp);
}

}  // namespace linclass::cpu
