// What every CPU loss entry point does around the row driver (row_driver.h): the
// target scan, class weights in the accumulation type, and run_loss, which runs a
// loss's math over every row and reduces.
//
// The target scan runs over the (small) target tensor before a single score is read,
// so a bad class index becomes a Python exception that names the position and the
// value instead of an out-of-bounds access.
#pragma once

#include "buffer_cache.h"
#include "lane_targets.h"
#include "row_driver.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace linclass::cpu {

// "[2, 3]" for flat index 11 of a (4, 4) target ("" for a 0-d target).
inline std::string index_string(int64_t flat, IntList shape) {
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

// std::vector whose resize leaves new entries uninitialized: for scratch arrays that are
// written in full before they are read (the lane targets: zero-filling them cost ~1%
// of a 65536 x 10 cross-entropy).
template <typename T>
struct UninitializedAllocator : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  template <typename U>
  void construct(U*) noexcept {}
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using ScratchVector = std::vector<T, UninitializedAllocator<T>>;

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
  linclass::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
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

// The op's error for the bad target at flat index `first_bad` (torch raises IndexError
// for cross_entropy, RuntimeError for multi_margin_loss).
[[noreturn]] inline void throw_bad_target(const char* op, bool index_error, const Tensor& target,
                                          int64_t first_bad, const TargetRule& rule) {
  std::ostringstream msg;
  msg << op << ": target" << index_string(first_bad, target.sizes()) << " = "
      << target.const_data_ptr<int64_t>()[first_bad] << " is out of bounds for " << rule.classes
      << " classes (expected 0 <= target < " << rule.classes;
  if (rule.has_ignore) msg << " or target == ignore_index, which is " << rule.ignore_index;
  msg << ")";
  if (index_error) LINCLASS_CHECK_INDEX(false, msg.str());
  LINCLASS_CHECK(false, msg.str());
}

// Scans `target` with scan_targets and throws the op's error naming the first bad
// target; with `lanes` (the lane path will run) fills lane_targets.  Returns the weight
// sum of the rows that count.
template <typename acc_t>
double checked_targets(const char* op, bool index_error, const Tensor& target, int64_t C,
                       bool lanes, bool has_ignore, int64_t ignore_index, const acc_t* weight,
                       ScratchVector<acc_t>& lane_targets) {
  const int64_t rows = target.numel();
  lane_targets.resize(lanes ? rows : 0);
  const auto scan = scan_targets<acc_t>(target.const_data_ptr<int64_t>(), rows, C, has_ignore,
                                        ignore_index, weight,
                                        lane_targets.empty() ? nullptr : lane_targets.data());
  if (scan.first_bad >= 0)
    throw_bad_target(op, index_error, target, scan.first_bad, {C, has_ignore, ignore_index});
  return scan.weight_sum;
}

// n ones, read-only, shared by every call in this module.  Building a fresh vector of
// ones per call cost ~0.35 ms at C = 128256 (a page-faulted 0.5 MB malloc, its fill
// and its sum), more than the loss of 20 such rows.  The row only grows (doubling), and
// a replaced one stays allocated, since a call on another thread may still read it; a
// call that finds it long enough takes no lock.
template <typename acc_t>
const acc_t* shared_ones(int64_t n) {
  struct Row {
    int64_t size;
    std::unique_ptr<acc_t[]> data;
  };
  static std::atomic<const Row*> current{nullptr};
  const Row* row = current.load(std::memory_order_acquire);
  if (row && row->size >= n) return row->data.get();
  static std::mutex mu;
  static std::vector<std::unique_ptr<Row>> rows;  // every row ever made
  std::lock_guard<std::mutex> lock(mu);
  row = current.load(std::memory_order_relaxed);
  if (!row || row->size < n) {
    const int64_t size = std::max<int64_t>({n, row ? 2 * row->size : 0, 1024});
    rows.push_back(std::make_unique<Row>(Row{size, std::make_unique<acc_t[]>(size_t(size))}));
    std::fill_n(rows.back()->data.get(), size, acc_t(1));
    row = rows.back().get();
    current.store(row, std::memory_order_release);
  }
  return row->data.get();
}

// The class weights as `classes` contiguous acc_t values: the caller's tensor itself
// when it already is that, a converted copy otherwise, and shared ones without `weight`.
template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
class ClassWeights {
 public:
  ClassWeights(const OptTensor& weight, int64_t classes) : classes_(classes) {
    if (!weight.has_value()) {
      data_ = shared_ones<acc_t>(classes);
      return;
    }
    kept_ = as_contiguous(*weight);
    const scalar_t* wp = kept_.const_data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      data_ = wp;
    } else {
      converted_.resize(size_t(classes));
      for (int64_t j = 0; j < classes; ++j) converted_[j] = acc_t(wp[j]);
      data_ = converted_.data();
    }
  }
  ClassWeights(const ClassWeights&) = delete;
  ClassWeights& operator=(const ClassWeights&) = delete;

  const acc_t* data() const { return data_; }
  bool given() const { return kept_.defined(); }
  // sum_j w_j, in double (C itself without weights).
  double sum() const {
    if (!given()) return double(classes_);
    double total = 0;
    for (int64_t j = 0; j < classes_; ++j) total += double(data_[j]);
    return total;
  }

 private:
  int64_t classes_;
  Tensor kept_;  // the caller's weights, held while data_ may point into them
  std::vector<acc_t> converted_;
  const acc_t* data_ = nullptr;
};

// How a run gets its targets: checked and converted before it (`lane_targets`, from
// checked_targets; null on the row path), or read and checked by the lane kernel itself
// (`rule` set; see lane_targets.h).  In the second case the rows that count are only
// known afterwards, so a 'mean' whose denominator is that count (`mean_of_kept`: cross
// entropy without class weights) runs with denom = all rows, and a run in which some
// rows were ignored gets its loss and gradient corrected after the pass.
template <typename acc_t>
struct TargetPlan {
  const acc_t* lane_targets = nullptr;
  std::optional<TargetRule> rule;
  bool mean_of_kept = false;
  const char* op = "";
  bool index_error = false;
};

// Runs Math over every row of `input` and fills `loss` (and `grad` when compute_grad)
// for the given reduction; `denom` divides the 'mean'.
template <typename scalar_t, typename Math, typename Params>
void run_loss(const Tensor& input, const RowGeometry& geom, const Tensor& target,
              const TargetPlan<acc_type<scalar_t>>& plan, int64_t reduction, double denom,
              bool compute_grad, Tensor& loss, Tensor& grad, const Params& p) {
  RowTask<scalar_t> task;
  task.input = input.const_data_ptr<scalar_t>();
  task.in = geom;
  // A gradient laid out as a dense input whose d-dims do not flatten (empty_cached_like; the
  // input itself was made contiguous) is written contiguous first, then copied over.
  const std::optional<RowGeometry> grad_rows = compute_grad ? row_geometry(grad) : std::nullopt;
  const Tensor written = compute_grad && !grad_rows ? empty_cached(grad.sizes(), grad.scalar_type()) : grad;
  if (compute_grad) {
    task.grad = written.mutable_data_ptr<scalar_t>();
    task.gout = canonical_rows(grad_rows ? *grad_rows : *row_geometry(written));
    task.stream_grad = stream_gradient(int64_t(nbytes(grad)));
  }
  task.target = target.const_data_ptr<int64_t>();
  task.lane_targets = plan.lane_targets;
  std::vector<TargetTally> tallies;
  if (plan.rule) {
    tallies.resize(num_blocks(geom));
    task.rule = &*plan.rule;
    task.tallies = tallies.data();
  }
  double total = 0;
  if (reduction == kNone) {
    task.loss_rows = loss.mutable_data_ptr<acc_type<scalar_t>>();
    run_rows<scalar_t, Math>(task, p);
  } else {
    total = run_rows_sum<scalar_t, Math>(task, p);
  }
  if (plan.rule) {
    int64_t kept = 0;
    for (const TargetTally& t : tallies) {
      if (t.first_bad >= 0) throw_bad_target(plan.op, plan.index_error, target, t.first_bad, *plan.rule);
      kept += t.kept;
    }
    if (plan.mean_of_kept && reduction == kMean && double(kept) != denom) {
      // Some rows were ignored: the pass divided by all rows.  With none kept the
      // gradient is all zeros and stays so; the loss becomes 0 / 0 = NaN like torch's.
      if (compute_grad && kept > 0) mul_(written, denom / double(kept));
      denom = double(kept);
    }
  }
  if (reduction != kNone)
    *loss.mutable_data_ptr<acc_type<scalar_t>>() = acc_type<scalar_t>(reduction == kMean ? total / denom : total);
  if (compute_grad && !grad_rows) copy_into(grad, written);
}

}  // namespace linclass::cpu
