// linclass::linear_sgd_step: one minibatch SGD step of the classic linear classifier, on
// CPU float32, in one call:
//
//   Xb = X[index], yb = y[index]                       (read in place for C <= kSmallGemmC)
//   L  = mean data loss of Xb W against yb + reg * sum(W * W)
//   W -= learning_rate * (dL/dW)                        (dL/dW includes 2 * reg * W)
//
// with the multiclass SVM (loss = 1: margin 1, summed over the wrong classes) or the
// softmax loss (loss = 0).  The weight is stored transposed, (C, D) contiguous, the
// layout the kernels stream; it is updated in place and the loss (before the update) is
// returned.  This is what LinearSVM / Softmax .train run per iteration: the Python loop
// only draws the indices (torch.randint, so the minibatches are those of the classic
// loop), and the scores, the fused loss kernel, dW and the update cost no Python; for
// few classes the kernels read the minibatch rows of X in place (no gathered copy).
#include "common.h"
#include "cpu/op_support.h"
#include "cpu/small_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace linclass {
namespace {

double linear_sgd_step(const at::Tensor& X, at::Tensor& Wt, const at::Tensor& y,
                       const at::Tensor& index, int64_t loss_kind, double lr, double reg) {
  TORCH_CHECK(X.device().is_cpu() && X.scalar_type() == at::kFloat && X.dim() == 2 && X.is_contiguous(),
              "linear_sgd_step: input must be a contiguous float32 CPU matrix (N, D)");
  const int64_t N = X.size(0), D = X.size(1);
  TORCH_CHECK(Wt.device().is_cpu() && Wt.scalar_type() == at::kFloat && Wt.dim() == 2 &&
                  Wt.is_contiguous() && Wt.size(1) == D,
              "linear_sgd_step: weight must be a contiguous float32 (C, D) matrix with D = ", D);
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == N && y.is_contiguous(),
              "linear_sgd_step: target must be a contiguous int64 vector of ", N, " labels");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1,
              "linear_sgd_step: index must be an int64 vector");
  TORCH_CHECK(loss_kind == 0 || loss_kind == 1, "linear_sgd_step: loss must be 0 (softmax) or 1 (svm)");
  const int64_t B = index.size(0), C = Wt.size(0);
  const at::Tensor idx = index.contiguous();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r)
    TORCH_CHECK_INDEX(ip[r] >= 0 && ip[r] < N, "linear_sgd_step: index[", r, "] = ", ip[r],
                      " is out of range for ", N, " examples");

  // The minibatch labels; for few classes the kernels read the rows of X in place
  // through the index, the BLAS path gathers them.
  const bool small = C <= cpu::kSmallGemmC;
  at::Tensor yb = at::empty({B}, y.options());
  int64_t* ybp = yb.mutable_data_ptr<int64_t>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) ybp[r] = yp[ip[r]];

  // Scores, the fused loss kernel turning them into d(mean loss)/d scores in place, and
  // dW^T = dS^T Xb (as partial sums: `parts` of them, C x D each).  The SVM sums its
  // hinges where torch's divides them by C.
  at::Tensor S = at::empty({B, C}, X.options());
  std::optional<cpu::CrossEntropySetup<float>> ce;
  std::optional<cpu::MultiMarginSetup<float>> svm;
  if (loss_kind == 0) {
    ce.emplace(yb, std::nullopt, C, -100, 0.0, kMean);
  } else {
    svm.emplace(yb, std::nullopt, C, 1, 1.0, kMean);
    svm->params.scale *= float(C);
  }
  const auto& lanes = ce ? ce->lane_targets : svm->lane_targets;
  auto loss_rows = [&](float* s, int64_t first, int64_t rows) {
    cpu::RowTask<float> task;
    task.input = s;
    task.in.outer = rows;
    task.in.classes = C;
    task.in.stride_n = C;
    task.grad = s;
    task.gout = task.in;
    task.target = ybp + first;
    task.lane_targets = lanes.empty() ? nullptr : lanes.data() + first;
    return ce ? cpu::run_rows_sum<float, cpu::CrossEntropyMath>(task, ce->params)
              : cpu::run_rows_sum<float, cpu::MultiMarginMath>(task, svm->params);
  };
  double data_loss;
  cpu::SmallWeightGrad wgrad;
  at::Tensor dWt;
  const float* gp;
  int64_t parts = 1;
  if (small) {
    cpu::SmallLinear a;
    a.X = X.const_data_ptr<float>();
    a.ldx = D;
    a.index = ip;
    a.W = Wt.const_data_ptr<float>();
    a.ldw = D;
    a.n = B;
    a.D = D;
    a.C = C;
    a.S = S.mutable_data_ptr<float>();
    a.weight_grad = true;
    data_loss = cpu::small_linear_block(a, loss_rows, wgrad);
    gp = wgrad.partials.get();
    parts = wgrad.used;
  } else {
    const at::Tensor Xb = X.index_select(0, idx);
    at::mm_out(S, Xb, Wt.t());
    data_loss = loss_rows(S.mutable_data_ptr<float>(), 0, B);
    dWt = at::mm(S.t(), Xb);
    gp = dWt.const_data_ptr<float>();
  }
  data_loss = ce ? data_loss / ce->denom : data_loss * C / svm->denom;

  // The update, in fixed blocks that also sum W^2 (before the update) in a fixed order;
  // dW is the sum of its parts, in order.
  float* wp = Wt.mutable_data_ptr<float>();
  const int64_t n = C * D, per = 8192, blocks = (n + per - 1) / per;
  std::vector<double> sq(blocks);
  const float two_reg = float(2 * reg), step = float(lr);
  using VF = cpu::Vec<float>;
  constexpr int64_t L = VF::size();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s2 = 0;
      for (int64_t i = b * per, e = std::min(n, i + per); i < e; i += L) {
        const int64_t m = std::min(L, e - i);
        VF g = parts ? VF::loadu(gp + i, m) : VF(0.f);
        for (int64_t k = 1; k < parts; ++k) g = g + VF::loadu(gp + k * n + i, m);
        const VF w = VF::loadu(wp + i, m);
        s2 += cpu::hsum(w * w);
        (w - VF(step) * (g + VF(two_reg) * w)).store(wp + i, m);
      }
      sq[b] = s2;
    }
  });
  double sum_sq = 0;
  for (double v : sq) sum_sq += v;
  return data_loss + reg * sum_sq;
}

}  // namespace

TORCH_LIBRARY_IMPL(linclass, CPU, m) { m.impl("linear_sgd_step", &linear_sgd_step); }

}  // namespace linclass
