"""GB/s of both C++ losses at chosen class counts, for A/B runs of two builds on the same
machine state (this VM's memory speed changes from hour to hour, so only runs made
back to back compare).  Like bench/test_bench_class_counts.py: 12 MB of float32 scores
per call (N = 3,000,000 // C), inputs rotating through at least 64 MiB, 2 threads;
training = forward + gradient (8 bytes per score), evaluation = forward only (4 bytes per
score), copy_ 8 bytes per score; median of 40 calls.  Each input keeps its outputs
until its next turn, as x.grad does in the sweep: a gradient buffer reused straight
from the call before sits in the L3 cache, which favours ordinary stores over
non-temporal ones at these sizes and is not what a training step hands the kernel.

    PYTHONPATH=<other checkout> python bench/class_count_ab.py 33,40,64,100   # build A
    python bench/class_count_ab.py 33,40,64,100                               # build B
"""

import sys
import time

import torch

import linclass  # noqa: F401  (loads the C++ ops)

ELEMENTS = 3_000_000
ROTATE_BYTES = 64 << 20


def median_seconds(calls, reps=40):
    times = []
    for i in range(reps):
        call = calls[i % len(calls)]
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def main(class_counts):
    torch.set_num_threads(2)
    ce, mm = torch.ops.linclass.cross_entropy.default, torch.ops.linclass.multi_margin_loss.default
    print(f"linclass from {linclass.__file__}")
    print("| C | cross_entropy train | eval | multi_margin_loss train | eval | copy_ | (GB/s)")
    print("|---|---|---|---|---|---|")
    for c in class_counts:
        n = ELEMENTS // c
        copies = max(2, ROTATE_BYTES // (n * c * 4) + 1)
        xs = [torch.randn(n, c) for _ in range(copies)]
        ys = [torch.empty_like(xs[0]) for _ in range(copies)]
        t = torch.randint(0, c, (n,))
        cases = [(lambda x, y: ce(x, t, None, -100, 0.0, 1, True), 8),
                 (lambda x, y: ce(x, t, None, -100, 0.0, 1, False), 4),
                 (lambda x, y: mm(x, t, 1, 1.0, None, 1, True), 8),
                 (lambda x, y: mm(x, t, 1, 1.0, None, 1, False), 4),
                 (lambda x, y: y.copy_(x), 8)]
        row = []
        for fn, bytes_per_score in cases:
            held = [None] * copies  # input i's outputs, released just before its next call

            def run_slot(i, fn=fn):
                held[i] = None
                held[i] = fn(xs[i], ys[i])

            calls = [lambda i=i: run_slot(i) for i in range(copies)]
            for call in calls:  # warm up every buffer once
                call()
            row.append(bytes_per_score * n * c / median_seconds(calls) / 1e9)
        print(f"| {c} | " + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
    main([int(c) for c in (sys.argv[1] if len(sys.argv) > 1 else "33,40,64,65,100,127,128,255,256,500").split(",")])
