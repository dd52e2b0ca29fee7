"""Where the automatic CPU choice should stop sending multi_margin_loss to torch: forward
+ backward per call of torch's hinge and of linclass's C++ kernel (forced), float32, 2
threads, median of 7 loops, alternating, over shapes around the crossover
(bench/results/stable-abi-overhead.md; linclass.backends.CPU_TORCH_HINGE_MAX_SCORES).

    python bench/cpu_hinge_crossover.py
"""

import torch
import torch.nn.functional as F

import linclass
from tiny_loss_overhead import median_us

SHAPES = [(4, 10), (64, 10), (200, 10), (400, 10), (800, 10), (1600, 10), (16, 100),
          (32, 100), (64, 100), (128, 100), (8, 1000), (64, 64)]


def main():
    torch.set_num_threads(2)
    print("| N x C | scores | torch us | linclass cpp us | torch / cpp |")
    print("|---|---|---|---|---|")
    for n, c in SHAPES:
        x = torch.randn(n, c, requires_grad=True)
        t = torch.randint(0, c, (n,))

        def ours():
            x.grad = None
            linclass.multi_margin_loss(x, t).backward()

        def theirs():
            x.grad = None
            F.multi_margin_loss(x, t).backward()

        calls = max(200, 200000 // (n * c))
        with linclass.backends.use("cpp"):
            a = median_us(ours, calls)
        b = median_us(theirs, calls)
        print(f"| {n} x {c} | {n * c} | {b:.1f} | {a:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
