// Checks csrc/cpu/simd.h for the ISA it is compiled for (tests/test_simd.py builds it
// once per ISA this CPU runs): float64 exp and log against the C library over the whole
// double range (random bit patterns, subnormals, the overflow and underflow edges,
// inf, NaN), the lane semantics the kernels rely on, and the group path's reductions of
// W rows at once (vec_util.h) against one reduction per row.  Prints one line per failure
// and "simd ok <lanes> <worst exp ulp> <worst log ulp>" at the end.
#include "cpu/simd.h"
#include "cpu/vec_util.h"

#include <cfloat>
#include <cstdio>
#include <cstring>
#include <random>

using namespace linclass::cpu;

namespace {

int failures = 0;

void fail(const char* what, double x, double got, double want) {
  if (++failures <= 20) std::printf("FAIL %s x=%.17g got=%.17g want=%.17g\n", what, x, got, want);
}

// |got - want| in units of want's last place; 0 when both are the same NaN/inf/zero.
double ulps(double got, double want) {
  if (std::isnan(want)) return std::isnan(got) ? 0 : 1e300;
  if (std::isinf(want) || want == 0) return got == want ? 0 : 1e300;
  const double a = std::fabs(want);
  return std::fabs(got - want) / (std::nextafter(a, INFINITY) - a);
}

template <typename T>
Vec<T> lanes(T first, T step) {
  alignas(64) T v[Vec<T>::size()];
  for (int i = 0; i < Vec<T>::size(); ++i) v[i] = first + T(i) * step;
  return Vec<T>::loadu(v);
}

template <typename T>
T lane(const Vec<T>& v, int i) {
  alignas(64) T out[Vec<T>::size()];
  v.store(out);
  return out[i];
}

template <typename T>
void check_lanes() {
  constexpr int W = Vec<T>::size();
  const Vec<T> a = lanes<T>(0, 1), b = lanes<T>(100, 1);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int n = 0; n <= W; ++n) {
    const Vec<T> s = Vec<T>::set(a, b, n);
    for (int i = 0; i < W; ++i)
      if (lane(s, i) != (i < n ? lane(b, i) : lane(a, i))) fail("set", n, lane(s, i), i);
    // loadu(p, n) reads n values and zero-fills; store(p, n) writes n values only.
    T src[W + 1], dst[W + 1];
    for (int i = 0; i <= W; ++i) src[i] = T(i + 1), dst[i] = T(-7);
    const Vec<T> l = Vec<T>::loadu(src, n);
    for (int i = 0; i < W; ++i)
      if (lane(l, i) != (i < n ? src[i] : T(0))) fail("loadu count", n, lane(l, i), i);
    l.store(dst, n);
    for (int i = 0; i <= W; ++i)
      if (dst[i] != (i < n ? src[i] : T(-7))) fail("store count", n, dst[i], i);
  }
  for (int k = 0; k < W; ++k) {
    const Vec<T> r = with_lane(a, k, T(-1));
    for (int i = 0; i < W; ++i)
      if (lane(r, i) != (i == k ? T(-1) : lane(a, i))) fail("with_lane", k, lane(r, i), i);
  }
  for (int m = 0; m < W; ++m) {  // lane i to lane i + m; the top lanes wrap to the bottom
    const Vec<T> r = lanes_up(a, m);
    for (int i = 0; i < W; ++i)
      if (lane(r, (i + m) % W) != lane(a, i)) fail("lanes_up", m, lane(r, (i + m) % W), i);
  }
  // Comparisons are all-ones / all-zeros lanes; != is true for NaN, the others false.
  const Vec<T> x = Vec<T>::set(Vec<T>(T(2)), Vec<T>(nan), 1);  // lane 0 NaN, others 2
  const Vec<T> ne = x != x, eq = x == x, gt = x > Vec<T>(T(1));
  if (ne.zero_mask() != ((1 << W) - 1) - 1) fail("!= with NaN", 0, ne.zero_mask(), 0);
  if (eq.zero_mask() != 1 || gt.zero_mask() != 1) fail("== / > with NaN", 0, eq.zero_mask(), 1);
  const Vec<T> pick = Vec<T>::blendv(Vec<T>(T(5)), Vec<T>(T(9)), gt);
  if (lane(pick, 0) != T(5) || lane(pick, W - 1) != T(9)) fail("blendv", 0, lane(pick, 0), 5);
  if (hsum(a) != T(W * (W - 1) / 2)) fail("hsum", 0, hsum(a), W * (W - 1) / 2);
  if (hmax(a) != T(W - 1)) fail("hmax", 0, hmax(a), W - 1);
  if (!std::isnan(hmax(Vec<T>::set(a, Vec<T>(nan), 1)))) fail("hmax keeps NaN", 0, 0, nan);
  if (!std::isnan(lane(clamp_min(Vec<T>(nan), Vec<T>(T(0))), 0))) fail("clamp_min keeps NaN", 0, 0, nan);
  if (lane(fmadd(a, b, Vec<T>(T(1))), 1) != T(1 * 101 + 1)) fail("fmadd", 0, 0, 0);
  if (lane((-a).abs(), W - 1) != T(W - 1)) fail("abs", 0, 0, 0);
  // sum_rows / max_rows: lane r is row r's hsum (bitwise: the same order of additions)
  // and max, on values whose sums round differently in other orders.
  std::mt19937 rng(7);
  std::uniform_real_distribution<T> value(T(-1e3), T(1e3));
  for (int trial = 0; trial < 100; ++trial) {
    Vec<T> rows[W];
    for (int r = 0; r < W; ++r) {
      alignas(64) T v[W];
      for (int i = 0; i < W; ++i) v[i] = value(rng) * std::pow(T(10), T(int(rng() % 7) - 3));
      rows[r] = Vec<T>::loadu(v);
    }
    const Vec<T> sums = sum_rows(rows), maxes = max_rows(rows);
    for (int r = 0; r < W; ++r) {
      if (lane(sums, r) != hsum(rows[r])) fail("sum_rows", r, lane(sums, r), hsum(rows[r]));
      if (lane(maxes, r) != hmax(rows[r])) fail("max_rows", r, lane(maxes, r), hmax(rows[r]));
    }
  }
}

}  // namespace

int main() {
  check_lanes<float>();
  check_lanes<double>();
  constexpr int W = Vec<double>::size();
  double worst_exp = 0, worst_log = 0;
  auto check = [&](double x) {
    alignas(64) double in[W], e[W], l[W];
    for (int i = 0; i < W; ++i) in[i] = x;
    Vec<double>::loadu(in).exp().store(e);
    Vec<double>::loadu(in).log().store(l);
    const double ue = ulps(e[0], std::exp(x)), ul = ulps(l[0], std::log(x));
    worst_exp = std::max(worst_exp, ue);
    worst_log = std::max(worst_log, ul);
    if (ue > 1.0) fail("exp", x, e[0], std::exp(x));
    if (ul > 1.0) fail("log", x, l[0], std::log(x));
  };
  std::mt19937_64 rng(12345);
  std::uniform_real_distribution<double> exp_range(-750.0, 712.0), unit(-1.0, 1.0);
  for (int i = 0; i < 300000; ++i) check(exp_range(rng));
  for (int i = 0; i < 100000; ++i) check(unit(rng));
  for (int i = 0; i < 300000; ++i) {  // every positive double, uniformly over exponents
    const uint64_t bits = rng() & 0x7FFFFFFFFFFFFFFFull;
    double x;
    std::memcpy(&x, &bits, sizeof x);
    check(x);
  }
  // The float exp of the softmax kernels (vec_util.h), over its domain d <= 0: within
  // 2 ulp where exp(d) is a normal float, below FLT_MIN where it is not, 0 at -inf and
  // far below, NaN for NaN.
  constexpr int WF = Vec<float>::size();
  double worst_fexp = 0;
  auto check_float = [&](float d) {
    alignas(64) float in[WF], e[WF];
    for (int i = 0; i < WF; ++i) in[i] = d;
    vexp_nonpos(Vec<float>::loadu(in)).store(e);
    const double want = std::exp(double(d));
    if (std::isnan(d)) {
      if (!std::isnan(e[0])) fail("float exp of NaN", d, e[0], want);
    } else if (want >= double(FLT_MIN)) {
      const double a = float(want), u = double(std::nextafter(float(a), INFINITY)) - a;
      const double err = std::fabs(double(e[0]) - want) / u;
      worst_fexp = std::max(worst_fexp, err);
      if (err > 2.0) fail("float exp", d, e[0], want);
    } else if (!(e[0] >= 0.0f && e[0] < FLT_MIN)) {
      fail("float exp below FLT_MIN", d, e[0], want);
    }
  };
  std::uniform_real_distribution<float> float_domain(-104.0f, 0.0f);
  for (int i = 0; i < 300000; ++i) check_float(float_domain(rng));
  for (float d : {0.0f, -0.0f, -1e-30f, -0.34657359f, -0.6931472f, -87.33654f, -87.4f, -88.0f,
                  -88.7f, -103.97f, -1e30f, -INFINITY, float(NAN)})
    check_float(d);
  {
    alignas(64) float in[WF], e[WF];
    for (int i = 0; i < WF; ++i) in[i] = -INFINITY;
    vexp_nonpos(Vec<float>::loadu(in)).store(e);
    if (e[0] != 0.0f) fail("float exp(-inf)", -INFINITY, e[0], 0.0);
  }
  const double inf = INFINITY;
  for (double x : {0.0, -0.0, 1.0, -1.0, inf, -inf, double(NAN), 4.9406564584124654e-324,
                   2.2250738585072014e-308, 1.7976931348623157e308, -745.13321910194111, -745.2,
                   -708.39641853226408, -708.4, 709.782712893384, 709.79, 1e-300, -1e-300})
    check(x);
  std::printf("float exp worst %.3f ulp\n", worst_fexp);
  std::printf("simd ok %d %.3f %.3f\n", W, worst_exp, worst_log);
  return failures ? 1 : 0;
}
