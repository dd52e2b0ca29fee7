"""The GEMM floor of a fused linear + loss step: how long torch's matrix products alone
take at a shape, against the whole step (F.linear + loss + backward, and linclass's
fused op).  A step needs the products S = X W^T, dW = G^T X and, when the input takes a
gradient, dX = G W; no fusion removes them, so when they are most of torch's step
the fused op cannot be much faster (issue 17's D = 3073 shapes between 20 and 200
classes).  The same three products through torch's oneDNN inner product (the fused op's
choice off Intel, csrc/linear_blocks.h) are its floor there.  Medians of --reps calls,
2 threads by default:

    python bench/gemm_floor.py 10000x3073x20 10000x3073x100 4096x1024x1000:grad
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import linclass


def median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def training_step(loss, params):
    """A no-argument step: clears params' gradients, then loss().backward()."""
    def run():
        for p in params:
            p.grad = None
        loss().backward()
    return run


def parse_shape(spec: str):
    """'NxDxC' or 'NxDxC:grad' (the input takes a gradient) -> (n, d, c, input_grad)."""
    dims, _, flag = spec.partition(":")
    n, d, c = (int(v) for v in dims.split("x"))
    return n, d, c, flag == "grad"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="+", help="NxDxC, with :grad when the input takes a gradient")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.reps} calls (ms)")
    onednn = torch.ops.mkldnn._linear_pointwise if linclass._extension.HAS_ONEDNN else None
    print("| N x D x C | input grad | products alone (BLAS) | products alone (oneDNN) | torch step | "
          "linclass fused | torch / fused | BLAS products / fused |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for spec in args.shapes:
        n, d, c, input_grad = parse_shape(spec)
        torch.manual_seed(0)
        x = torch.randn(n, d).requires_grad_(input_grad)
        w = (torch.randn(c, d) * 0.01).requires_grad_()
        t = torch.randint(0, c, (n,))
        g = torch.randn(n, c)

        def products():
            torch.mm(x.detach(), w.detach().t())
            torch.mm(g.t(), x.detach())
            if input_grad:
                torch.mm(g, w.detach())

        def onednn_products():  # linear(a, w) = a @ w^T
            onednn(x.detach(), w.detach(), None, "none", [], "")
            onednn(g.t(), x.detach().t(), None, "none", [], "")
            if input_grad:
                onednn(g, w.detach().t(), None, "none", [], "")

        floor = median_ms(products, args.reps)
        onednn_floor = f"{median_ms(onednn_products, args.reps):.1f}" if onednn else "-"
        theirs = median_ms(training_step(lambda: F.cross_entropy(F.linear(x, w), t), (x, w)), args.reps)
        ours = median_ms(training_step(lambda: linclass.linear_cross_entropy(x, w, t), (x, w)), args.reps)
        print(f"| {n} x {d} x {c} | {'yes' if input_grad else 'no'} | {floor:.1f} | {onednn_floor} | {theirs:.1f} | "
              f"{ours:.1f} | {theirs / ours:.2f}x | {floor / ours:.0%} |")


if __name__ == "__main__":
    main()
