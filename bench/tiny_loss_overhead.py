"""Per-call host cost of the C++ backend on tiny losses: eager forward + backward, and a
forward without gradient, of linclass.cross_entropy / multi_margin_loss at 4 x 10 and
200 x 10 (median of 7 loops of 3000 calls, 2 threads, microseconds).  Run it against
two builds, alternating, to compare them (bench/results/stable-abi-overhead.md):

    PYTHONPATH=/path/to/other/checkout python bench/tiny_loss_overhead.py
"""

import time

import torch

import linclass


def median_us(fn, calls=3000, loops=7):
    """Median over `loops` loops of the time per call of fn(), in microseconds."""
    for _ in range(min(300, calls)):
        fn()
    times = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return sorted(times)[loops // 2]


def main():
    torch.set_num_threads(2)
    print(f"linclass from {linclass.__file__}")
    with linclass.backends.use("cpp"):
        for n, c in ((4, 10), (200, 10)):
            x = torch.randn(n, c, requires_grad=True)
            t = torch.randint(0, c, (n,))
            for fn in (linclass.cross_entropy, linclass.multi_margin_loss):
                def step():
                    x.grad = None
                    fn(x, t).backward()

                def forward():
                    with torch.no_grad():
                        fn(x, t)

                print(f"{n}x{c} {fn.__name__}: forward + backward {median_us(step):.1f} us, "
                      f"forward only {median_us(forward):.1f} us")


if __name__ == "__main__":
    main()
