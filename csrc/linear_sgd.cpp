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

#include <vector>

namespace linclass {
namespace {

double linear_sgd_step(const at::Tensor& X, at::Tensor& Wt, const at::Tensor& y,
                       const at::Tensor& index, const std::optional<at::Tensor>& next_index,
                       int64_t loss_kind, double lr, double reg) {
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
  // The next step's rows are prefetched while this one computes (only their addresses
  // are formed, so they are checked too).
  at::Tensor nidx;
  if (next_index) {
    nidx = next_index->contiguous();
    TORCH_CHECK(nidx.scalar_type() == at::kLong && nidx.dim() == 1 && nidx.size(0) == B,
                "linear_sgd_step: next_index must be an int64 vector like index");
    const int64_t* np = nidx.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < B; ++r)
      TORCH_CHECK_INDEX(np[r] >= 0 && np[r] < N, "linear_sgd_step: next_index[", r, "] = ", np[r],
                        " is out of range for ", N, " examples");
  }

  // The minibatch: for few classes the kernels read the rows of X in place through the
  // index; the BLAS path gathers them.
  const bool small = C <= cpu::kSmallGemmC;
  const float* xp = X.const_data_ptr<float>();
  at::Tensor yb = at::empty({B}, y.options());
  int64_t* ybp = yb.mutable_data_ptr<int64_t>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) ybp[r] = yp[ip[r]];
  const at::Tensor Xb = small ? at::Tensor() : X.index_select(0, idx);

  // Scores, then the fused loss kernel turns them into d(mean loss)/d scores in place.
  at::Tensor S = at::empty({B, C}, X.options());
  if (small)
    cpu::small_scores(xp, D, ip, Wt.const_data_ptr<float>(), D, nullptr, S.mutable_data_ptr<float>(),
                      C, B, D, C, nidx.defined() ? nidx.const_data_ptr<int64_t>() : nullptr);
  else
    at::mm_out(S, Xb, Wt.t());
  cpu::RowTask<float> task;
  task.input = S.const_data_ptr<float>();
  task.in = *row_geometry(S);
  task.grad = S.mutable_data_ptr<float>();
  task.gout = task.in;
  task.target = ybp;
  double data_loss;
  if (loss_kind == 0) {
    const cpu::CrossEntropySetup<float> setup(yb, std::nullopt, C, -100, 0.0, kMean);
    task.lane_targets = setup.lane_targets.data();
    data_loss = cpu::run_rows_sum<float, cpu::CrossEntropyMath>(task, setup.params) / setup.denom;
  } else {
    cpu::MultiMarginSetup<float> setup(yb, std::nullopt, C, 1, 1.0, kMean);
    setup.params.scale *= float(C);  // torch's hinge divides by C; the classic loss sums
    task.lane_targets = setup.lane_targets.data();
    data_loss = cpu::run_rows_sum<float, cpu::MultiMarginMath>(task, setup.params) * C / setup.denom;
  }

  // dW^T = dS^T Xb, then W -= lr * (dW + 2 reg W), with the loss's reg term taken first.
  at::Tensor dWt = at::empty({C, D}, X.options());
  if (small)
    cpu::small_weight_grad(S.const_data_ptr<float>(), C, xp, D, ip, dWt.mutable_data_ptr<float>(), D, B, D, C, false);
  else
    at::mm_out(dWt, S.t(), Xb);
  // The update, in fixed blocks that also sum W^2 (before the update) in a fixed order.
  float* wp = Wt.mutable_data_ptr<float>();
  const float* gp = dWt.const_data_ptr<float>();
  const int64_t n = C * D, per = 8192, blocks = (n + per - 1) / per;
  std::vector<double> sq(blocks);
  const float two_reg = float(2 * reg), step = float(lr);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      double s2 = 0;
      for (int64_t i = b * per, e = std::min(n, i + per); i < e; ++i) {
        s2 += double(wp[i]) * wp[i];
        wp[i] -= step * (gp[i] + two_reg * wp[i]);
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
