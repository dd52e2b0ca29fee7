// linclass::parallel_for: torch's parallel_for with subnormal floats flushed to zero in
// every task (the x86 MXCSR's FTZ and DAZ bits, restored when the task ends).
//
// Why: a softmax over well-separated scores (differences beyond ~87 in float32) has
// probabilities below FLT_MIN, and on Intel cores every vector operation that makes
// or reads a subnormal takes a microcode assist.  A cross-entropy whose rows are mostly
// such probabilities then runs many times slower, and so do the products of a fused
// linear loss that read them (bench/results/subnormals.md; torch pays the same).
// Flushed, those gradient entries are 0 instead of subnormals: a change of the order of
// the smallest normal number (float32 1.2e-38, float64 2.2e-308).  The bits are per
// thread, so each task sets them and puts back what it found.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <cstdint>
#include <utility>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#define LINCLASS_HAS_MXCSR 1
#endif

namespace linclass {

class FlushSubnormals {
 public:
#if defined(LINCLASS_HAS_MXCSR)
  static constexpr unsigned kFlushToZero = 1u << 15, kDenormalsAreZero = 1u << 6;
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
 public:
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  torch::stable::parallel_for(begin, end, grain, [&f](int64_t b, int64_t e) {
    FlushSubnormals flush;
    f(b, e);
  });
}

}  // namespace linclass
