"""The fused linear cross-entropy's own products against the BLAS blocks at the same
shapes, in one process, with a testing knob:

* the register-blocked products for few classes (csrc/cpu/small_gemm.h; the default):
  torch.ops.linclass._small_gemm_classes(0) sends every class count to the BLAS blocks,
  -1 restores the CPU's own limit;
* `--few-rows`: the products for a few rows (csrc/cpu/skinny_gemm.h; up to 16 rows, and
  up to 64 with a weight of at most 1 MiB and rows of at most 2 KiB):
  torch.ops.linclass._linear_block_rows(N) runs the N rows as one BLAS block, 0 restores;
* `--onednn`: the BLAS blocks' float32 products through oneDNN (csrc/linear_blocks.h,
  block_product): torch.ops.linclass._linear_onednn(1) forces them there, 0 to the BLAS,
  -1 restores the choice by the CPU's vendor.

Forward + backward, float32, 2 threads, medians of 25 steps, --alternations rounds (ms,
each round's: own products / BLAS blocks / torch's F.linear + F.cross_entropy step; then
the median of the rounds' ratios own / BLAS and own / torch); a shape ending in
':grad' also takes the input's gradient (bench/results/linear-gemm-floor.md):

    python bench/small_gemm_ab.py 10000x3073x20 4096x512x37:grad
    python bench/small_gemm_ab.py --few-rows 4x100x1000:grad 16x512x500:grad
    python bench/small_gemm_ab.py --onednn 10000x3073x100 4096x1024x1000:grad
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

import linclass
from gemm_floor import median_ms, parse_shape, training_step  # bench/ is the script's directory

REPS = 25


def compare(shape: str, few_rows: bool, onednn: bool, alternations: int = 2) -> str:
    n, d, c, input_grad = parse_shape(shape)
    x = torch.randn(n, d).requires_grad_(input_grad)
    w = (torch.randn(c, d) * 0.01).requires_grad_()
    b = torch.zeros(c, requires_grad=True)
    t = torch.randint(0, c, (n,))
    ours = training_step(lambda: linclass.linear_cross_entropy(x, w, t, b), (x, w, b))
    theirs = training_step(lambda: F.cross_entropy(F.linear(x, w, b), t), (x, w, b))
    knob, blas, own = ((torch.ops.linclass._linear_block_rows, n, 0) if few_rows
                       else (torch.ops.linclass._linear_onednn, 0, -1) if onednn
                       else (torch.ops.linclass._small_gemm_classes, 0, -1))
    label = "oneDNN products" if onednn else "own products"
    times = {label: [], "BLAS blocks": [], "torch": []}
    with linclass.backends.use("cpp"):
        for _ in range(alternations):
            if onednn:
                knob(1)
            try:
                times[label].append(median_ms(ours, REPS))
                knob(blas)
                times["BLAS blocks"].append(median_ms(ours, REPS))
            finally:
                knob(own)
            times["torch"].append(median_ms(theirs, REPS))
    own_ms, blas_ms, torch_ms = times.values()

    def median_ratio(a, b):
        return statistics.median(x / y for x, y in zip(a, b))

    ratios = (f"  median ratio to BLAS blocks {median_ratio(own_ms, blas_ms):.2f}, "
              f"to torch {median_ratio(own_ms, torch_ms):.2f}")
    listed = "  ".join(f"{k} {'/'.join(f'{v:.3f}' for v in vs)}" for k, vs in times.items())
    return f"{shape}  {listed}{ratios}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", help="N x D x C, e.g. 10000x3073x20 or 4096x512x37:grad")
    parser.add_argument("--few-rows", action="store_true",
                        help="A/B the products for a few rows (skinny_gemm.h)")
    parser.add_argument("--onednn", action="store_true",
                        help="A/B the BLAS blocks' float32 products through oneDNN")
    parser.add_argument("--alternations", type=int, default=2,
                        help="rounds of the three timings (a noisy machine wants more)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for shape in args.shapes:
        print(compare(shape, args.few_rows, args.onednn, args.alternations), flush=True)


if __name__ == "__main__":
    main()
