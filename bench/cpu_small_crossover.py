"""Where the automatic CPU choice should stop sending small losses to torch: forward +
backward per call of torch's loss and of linclass's C++ kernel (forced), float32, 2
threads, medians of 7 loops, the two alternating `--rounds` times (the figure: the median
round), over shapes around the crossover (bench/results/stable-abi-overhead.md;
linclass.backends.CPU_TORCH_HINGE_MAX_SCORES, CPU_TORCH_CROSS_ENTROPY_MAX_COST).

    python bench/cpu_small_crossover.py --op multi_margin_loss
    python bench/cpu_small_crossover.py --op cross_entropy
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

import linclass
from tiny_loss_overhead import median_us

SHAPES = {
    "multi_margin_loss": [(4, 10), (64, 10), (200, 10), (400, 10), (800, 10), (1600, 10),
                          (16, 100), (32, 100), (64, 100), (128, 100), (8, 1000), (64, 64)],
    "cross_entropy": [(1, 10), (4, 10), (32, 10), (64, 10), (128, 10), (16, 100), (32, 100),
                      (64, 100), (128, 100), (16, 300), (32, 300), (64, 300), (1, 1000),
                      (4, 1000), (8, 1000), (16, 1000), (32, 1000), (1, 10000), (2, 10000)],
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=sorted(SHAPES), default="multi_margin_loss")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ours_fn, torch_fn = getattr(linclass, args.op), getattr(F, args.op)
    print(f"{args.op}: forward + backward per call, float32, 2 threads")
    print("| N x C | scores | torch us | linclass cpp us | torch / cpp |")
    print("|---|---|---|---|---|")
    for n, c in SHAPES[args.op]:
        x = torch.randn(n, c, requires_grad=True)
        t = torch.randint(0, c, (n,))

        def ours():
            x.grad = None
            ours_fn(x, t).backward()

        def theirs():
            x.grad = None
            torch_fn(x, t).backward()

        calls = max(200, 200000 // (n * c))
        a, b = [], []
        for _ in range(args.rounds):
            with linclass.backends.use("cpp"):
                a.append(median_us(ours, calls))
            b.append(median_us(theirs, calls))
        a, b = statistics.median(a), statistics.median(b)
        print(f"| {n} x {c} | {n * c} | {b:.1f} | {a:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
