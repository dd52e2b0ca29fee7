// linclass::linear_sgd_step: one minibatch SGD step of the classic linear classifier, on
// CPU float32, in one call:
//
//   Xb = X[index], yb = y[index]                       (read in place by small_gemm.h's products)
//   L  = mean data loss of Xb W against yb + reg * sum(W * W)
//   W -= learning_rate * (dL/dW)                        (dL/dW includes 2 * reg * W)
//
// with the multiclass SVM (loss = 1: margin 1, summed over the wrong classes) or the
// softmax loss (loss = 0).  The weight is stored transposed, (C, D) contiguous, the
// layout the kernels stream; it is updated in place and the loss (before the update) is
// returned.  linclass.sgd.linear_sgd_step calls it once per iteration of the workflow's
// LinearSVM / Softmax .train: the Python loop only draws the indices (torch.randint, so
// the minibatches are those of the classic loop), and the scores, the fused loss
// kernel, dW and the update cost no Python; for few classes the kernels read the
// minibatch rows of X in place (no gathered copy).
#include "cpu/ops.h"

#include "buffer_cache.h"
#include "common.h"
#include "parallel.h"
#include "cross_entropy.h"
#include "multi_margin.h"
#include "small_gemm.h"


#include <optional>
#include <vector>

namespace linclass {
namespace {

// `index` as a contiguous tensor, once every entry is a row of the N examples (an
// IndexError naming the first one that is not).
Tensor checked_index(const char* op, const Tensor& index, int64_t N) {
  const Tensor idx = as_contiguous(index);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < idx.numel(); ++r)
    LINCLASS_CHECK_INDEX(ip[r] >= 0 && ip[r] < N, op, ": index[", r, "] = ", ip[r],
                         " is out of range for ", N, " examples");
  return idx;
}

// The arguments both steps share: the data X (N, D), labels y (N), minibatch index, loss.
void check_step_args(const char* op, const Tensor& X, const Tensor& y, const Tensor& index,
                     int64_t loss_kind) {
  LINCLASS_CHECK(X.is_cpu() && X.scalar_type() == ScalarType::Float && X.dim() == 2 && X.is_contiguous(),
              op, ": input must be a contiguous float32 CPU matrix (N, D)");
  LINCLASS_CHECK(y.scalar_type() == ScalarType::Long && y.dim() == 1 && y.size(0) == X.size(0) && y.is_contiguous(),
              op, ": target must be a contiguous int64 vector of ", X.size(0), " labels");
  LINCLASS_CHECK(index.scalar_type() == ScalarType::Long && index.dim() == 1, op, ": index must be an int64 vector");
  LINCLASS_CHECK(loss_kind == 0 || loss_kind == 1, op, ": loss must be 0 (softmax) or 1 (svm)");
}

}  // namespace

double linear_sgd_step(const Tensor& X, const Tensor& Wt, const Tensor& y,
                       const Tensor& index, int64_t loss_kind, double lr, double reg) {
  check_step_args("linear_sgd_step", X, y, index, loss_kind);
  const int64_t N = X.size(0), D = X.size(1);
  LINCLASS_CHECK(Wt.is_cpu() && Wt.scalar_type() == ScalarType::Float && Wt.dim() == 2 &&
                  Wt.is_contiguous() && Wt.size(1) == D,
              "linear_sgd_step: weight must be a contiguous float32 (C, D) matrix with D = ", D);
  const int64_t B = index.size(0), C = Wt.size(0);
  const Tensor idx = checked_index("linear_sgd_step", index, N);
  const int64_t* ip = idx.const_data_ptr<int64_t>();

  // The minibatch labels; for few classes the kernels read the rows of X in place
  // through the index, the BLAS path gathers them.
  const bool small = C <= cpu::small_gemm_max_classes();
  Tensor yb = empty({B}, y);
  int64_t* ybp = yb.mutable_data_ptr<int64_t>();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < B; ++r) ybp[r] = yp[ip[r]];

  // Scores, the fused loss kernel turning them into d(mean loss)/d scores in place, and
  // dW^T = dS^T Xb (as partial sums: `parts` of them, C x D each).  The SVM sums its
  // hinges where torch's divides them by C.
  Tensor S = empty({B, C}, X);
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
  Tensor dWt;
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
    const Tensor Xb = gather_rows(X, 0, idx);
    mm_out(S, Xb, transposed(Wt));
    data_loss = loss_rows(S.mutable_data_ptr<float>(), 0, B);
    dWt = mm(transposed(S), Xb);
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
  linclass::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
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

// linclass::linear_sgd_sweep_step: one step of K SGD runs side by side, what
// linclass.workflow.sweep runs per iteration on CPU float32 (its Python loop is the
// reference and the path for other devices and dtypes):
//
//   Xb = X[index], yb = y[index]
//   S  = Xb W                  W (D, K * C): run k owns columns [k C, (k + 1) C)
//   S <- d(summed loss)/dS, run k's rows times grad_scale[k C]   (fused kernel, in place)
//   W  = decay * W + Xb^T S    (decay per column)
//
// One call per step instead of ~10 small torch ops: the kernels need no repeated targets
// and no separate column scaling (each run's rows are a strided view of S with its own
// kernel scale), and the gathered rows reuse one cached buffer.
void linear_sgd_sweep_step(const Tensor& X, const Tensor& W, const Tensor& y,
                           const Tensor& index, int64_t loss_kind, int64_t K,
                           const Tensor& decay, const Tensor& grad_scale) {
  check_step_args("linear_sgd_sweep_step", X, y, index, loss_kind);
  const int64_t D = X.size(1), KC = W.dim() == 2 ? W.size(1) : 0;
  LINCLASS_CHECK(W.is_cpu() && W.scalar_type() == ScalarType::Float && W.dim() == 2 && W.size(0) == D &&
                  W.is_contiguous(),
              "linear_sgd_sweep_step: weight must be a contiguous float32 (D, K * C) matrix with D = ", D);
  for (const Tensor* t : {&decay, &grad_scale})
    LINCLASS_CHECK(t->is_cpu() && t->scalar_type() == ScalarType::Float && t->dim() == 1 && t->size(0) == KC,
                "linear_sgd_sweep_step: decay and grad_scale must be float32 vectors of ", KC,
                " entries (one per column of weight)");
  LINCLASS_CHECK(K > 0 && KC % K == 0 && KC > 0, "linear_sgd_sweep_step: the weight's ", KC,
              " columns cannot hold ", K, " runs of the same number of classes");
  const int64_t C = KC / K, B = index.size(0);  // the kernels check the labels against C

  checked_index("linear_sgd_sweep_step", index, X.size(0));
  Tensor xb = empty_cached({B, D}, ScalarType::Float);
  index_select_out(xb, X, 0, index);
  const Tensor yb = gather_rows(y, 0, index);
  Tensor S = mm(xb, W);

  // The kernels: run k's scores are the rows of S's column block k (row stride K C).
  std::optional<cpu::CrossEntropySetup<float>> ce;
  std::optional<cpu::MultiMarginSetup<float>> svm;
  if (loss_kind == 0)
    ce.emplace(yb, std::nullopt, C, -100, 0.0, kSum);
  else
    svm.emplace(yb, std::nullopt, C, 1, 1.0, kSum);
  const auto& lanes = ce ? ce->lane_targets : svm->lane_targets;
  const float* scale = grad_scale.const_data_ptr<float>();
  float* sp = S.mutable_data_ptr<float>();
  linclass::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      cpu::RowTask<float> task;
      task.input = sp + k * C;
      task.in.outer = B;
      task.in.classes = C;
      task.in.stride_n = KC;
      task.grad = sp + k * C;
      task.gout = task.in;
      task.target = yb.const_data_ptr<int64_t>();
      task.lane_targets = lanes.empty() ? nullptr : lanes.data();
      if (ce) {
        auto params = ce->params;
        params.scale *= scale[k * C];
        cpu::run_rows_sum<float, cpu::CrossEntropyMath>(task, params);
      } else {
        auto params = svm->params;
        params.scale *= scale[k * C];
        cpu::run_rows_sum<float, cpu::MultiMarginMath>(task, params);
      }
    }
  });
  mul_(W, decay);
  addmm_(W, transposed(xb), S);
}


}  // namespace linclass
