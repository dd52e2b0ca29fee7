"""The fused linear cross-entropy's register-blocked products (csrc/cpu/small_gemm.h)
against the BLAS blocks at the same shapes, in one process: the testing knob
torch.ops.linclass._small_gemm_classes(0) sends every class count to the BLAS blocks,
-1 restores the CPU's own limit.  Forward + backward, float32, 2 threads, medians of 25
steps, two alternations (ms: register-blocked / BLAS blocks / torch's F.linear +
F.cross_entropy step); a shape ending in ':grad' also takes the input's gradient
(bench/results/linear-gemm-floor.md):

    python bench/small_gemm_ab.py 10000x3073x20 4096x512x37:grad
"""

import argparse

import torch
import torch.nn.functional as F

import linclass
from gemm_floor import median_ms, parse_shape, training_step  # bench/ is the script's directory

REPS = 25


def compare(shape: str, alternations: int = 2) -> str:
    n, d, c, input_grad = parse_shape(shape)
    x = torch.randn(n, d).requires_grad_(input_grad)
    w = (torch.randn(c, d) * 0.01).requires_grad_()
    b = torch.zeros(c, requires_grad=True)
    t = torch.randint(0, c, (n,))
    ours = training_step(lambda: linclass.linear_cross_entropy(x, w, t, b), (x, w, b))
    theirs = training_step(lambda: F.cross_entropy(F.linear(x, w, b), t), (x, w, b))
    times = {"register-blocked": [], "BLAS blocks": [], "torch": []}
    with linclass.backends.use("cpp"):
        for _ in range(alternations):
            times["register-blocked"].append(median_ms(ours, REPS))
            torch.ops.linclass._small_gemm_classes(0)
            try:
                times["BLAS blocks"].append(median_ms(ours, REPS))
            finally:
                torch.ops.linclass._small_gemm_classes(-1)
            times["torch"].append(median_ms(theirs, REPS))
    return f"{shape}  " + "  ".join(f"{k} {'/'.join(f'{v:.3f}' for v in vs)}" for k, vs in times.items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", help="N x D x C, e.g. 10000x3073x20 or 4096x512x37:grad")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for shape in args.shapes:
        print(compare(shape), flush=True)


if __name__ == "__main__":
    main()
