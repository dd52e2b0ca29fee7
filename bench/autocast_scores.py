"""The score losses under torch.autocast on the CPU: 16-bit scores, a float32 loss.

torch casts the 16-bit scores to a float32 copy, computes a float32 gradient and casts
it back; linclass's kernels read the 16-bit scores and write the 16-bit gradient (the
op returns its loss in float32).  "linclass via float32" is what linclass did before
(the same float32 copy as torch, then the fused kernel): the cost of the copies.
Forward + backward, 2 threads, medians and ranges over alternating rounds
(bench/results/autocast.md):

    python bench/autocast_scores.py 8192x1000 1024x32000 4096x50257
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import linclass


def step(fn, x, t):
    def run():
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(x, t)
        assert loss.dtype == torch.float32
        loss.backward()
    return run


def compare(spec, rounds=5, repeats=5):
    n, c = (int(v) for v in spec.split("x"))
    x = (torch.randn(n, c) * 2).bfloat16().requires_grad_()
    t = torch.randint(0, c, (n,))
    variants = {
        "torch": step(F.cross_entropy, x, t),
        "linclass via float32": step(lambda s, y: linclass.cross_entropy(s.float(), y), x, t),
        "linclass": step(linclass.cross_entropy, x, t),
        "torch hinge": step(F.multi_margin_loss, x, t),
        "linclass hinge": step(linclass.multi_margin_loss, x, t),
    }
    times = {name: [] for name in variants}
    for run in variants.values():
        run()  # warm-up
    for _ in range(rounds):
        for name, run in variants.items():
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    mb = n * c * 2 / 1e6
    print(f"\nbfloat16 {n}x{c} ({mb:.0f} MB of scores), forward + backward under autocast")
    base = statistics.median(times["torch"])
    hinge_base = statistics.median(times["torch hinge"])
    for name, ts in times.items():
        med = statistics.median(ts)
        ref = hinge_base if "hinge" in name else base
        print(f"  {name:22s} {med * 1e3:8.2f} ms  ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f})"
              f"  {ref / med:5.2f}x torch")


if __name__ == "__main__":
    torch.set_num_threads(2)
    for spec in sys.argv[1:] or ["8192x1000", "1024x32000", "4096x50257"]:
        compare(spec)
