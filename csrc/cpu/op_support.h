// Host-side support shared by the CPU op entry points: class weights in the
// accumulation type, the target scan, and the RowTask / reduction plumbing.
//
// The target scan runs over the (small) target tensor before a single score is read,
// so a bad class index becomes a Python exception that names the position and the
// value instead of an out-of-bounds access.
#pragma once

#include "row_driver.h"

#include <ATen/core/Tensor.h>

#include <c10/util/Exception.h>

#include <sstream>
#include <string>
#include <vector>

namespace linclass::cpu {

// "[2, 3]" for flat index 11 of a (4, 4) target ("" for a 0-d target).
inline std::string index_string(int64_t flat, at::IntArrayRef shape) {
  if (shape.empty()) return "";
  std::vector<int64_t> idx(shape.size());
  for (int64_t d = int64_t(shape.size()) - 1; d >= 0; --d) {
    idx[d] = shape[d] ? flat % shape[d] : 0;
    flat = shape[d] ? flat / shape[d] : 0;
  }
  std::ostringstream os;
  os << "[";
  for (size_t d = 0; d < idx.size(); ++d) os << (d ? ", " : "") << idx[d];
  os << "]";
  return os.str();
}

struct TargetSummary {
  double weight_sum = 0;  // sum of w_y over the rows that are not ignored
  int64_t first_bad = -1; // flat index of the first invalid target, or -1
};

// Scans `target` (contiguous, `rows` entries) in fixed blocks, so the weight sum, like
// the loss, is the same whatever the thread count.  `weight` may be null (every class
// weighs 1); `ignore_index` is honoured when `has_ignore`.  When `lane_targets` is
// given it receives the targets as acc_t, -1 for ignored rows (the lane path's input).
template <typename acc_t>
TargetSummary scan_targets(const int64_t* target, int64_t rows, int64_t classes,
                           bool has_ignore, int64_t ignore_index, const acc_t* weight,
                           acc_t* lane_targets = nullptr) {
  TargetSummary out;
  if (rows == 0) return out;
  const int64_t per_block = 16384;
  const int64_t blocks = (rows + per_block - 1) / per_block;
  std::vector<double> sums(blocks, 0.0);
  std::vector<int64_t> bad(blocks, -1);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    acc_t* const lane = lane_targets;  // locals: the stores below cannot alias them
    const int64_t* const tgt = target;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r1 = std::min(rows, (b + 1) * per_block);
      double s = 0;
      int64_t kept = 0;
      for (int64_t r = b * per_block; r < r1; ++r) {
        const int64_t y = tgt[r];
        const bool ignored = has_ignore && y == ignore_index;
        if (!ignored && uint64_t(y) >= uint64_t(classes)) {
          bad[b] = r;
          break;
        }
        if (lane) lane[r] = ignored ? acc_t(-1) : acc_t(y);
        if (!ignored) {
          if (weight)
            s += double(weight[y]);
          else
            ++kept;
        }
      }
      sums[b] = weight ? s : double(kept);
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    if (bad[b] >= 0) {
      out.first_bad = bad[b];
      return out;
    }
    out.weight_sum += sums[b];
  }
  return out;
}

// Class weights as a contiguous acc_t vector (all ones without `weight`).
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
std::vector<acc_t> class_weights(const std::optional<at::Tensor>& weight, int64_t classes) {
  std::vector<acc_t> w(classes, acc_t(1));
  if (weight.has_value()) {
    const at::Tensor wc = weight->contiguous();
    const scalar_t* wp = wc.const_data_ptr<scalar_t>();
    for (int64_t j = 0; j < classes; ++j) w[j] = acc_t(wp[j]);
  }
  return w;
}

// Runs Math over every row of `input` and fills `loss` (and `grad` when compute_grad)
// for the given reduction; `denom` divides the 'mean'.  `lane_targets` comes from
// scan_targets and is needed when use_lanes(C).
template <typename scalar_t, typename Math, typename Params>
void run_loss(const at::Tensor& input, const RowGeometry& geom, const at::Tensor& target,
              const at::opmath_type<scalar_t>* lane_targets, int64_t reduction, double denom,
              bool compute_grad, at::Tensor& loss, at::Tensor& grad, const Params& p) {
  std::vector<double> partials(reduction == kNone ? 0 : num_blocks(geom.rows(), geom.classes));
  RowTask<scalar_t> task;
  task.input = input.const_data_ptr<scalar_t>();
  task.in = geom;
  if (compute_grad) {
    task.grad = grad.mutable_data_ptr<scalar_t>();
    task.gout = *row_geometry(grad);
    task.stream_grad = int64_t(grad.nbytes()) >= kStreamBytes;
  }
  task.target = target.const_data_ptr<int64_t>();
  task.lane_targets = lane_targets;
  task.loss_rows = reduction == kNone ? loss.mutable_data_ptr<scalar_t>() : nullptr;
  task.partials = partials.empty() ? nullptr : partials.data();
  run_rows<scalar_t, Math>(task, p);
  if (reduction != kNone) {
    double total = 0;
    for (double v : partials) total += v;  // in block order: deterministic
    *loss.mutable_data_ptr<scalar_t>() = scalar_t(reduction == kMean ? total / denom : total);
  }
}

}  // namespace linclass::cpu
