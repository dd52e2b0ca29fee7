"""linclass against torch on the inputs users bring beyond the benchmark groups: dtypes,
reductions, class weights, label smoothing, sliced and transposed scores, K-dim maps in
both memory formats, logits transposed to (B, V, T), a 1-D row, a huge row.  Forward +
backward (a 'none' loss is summed, or weighted and summed), 2 threads, the best of two
medians of 15 steps each; torch on 16-bit hinge inputs (which it lacks on the CPU) runs
in float32.  A scan for cliffs, not a benchmark group: a case below 1.0x is a finding.

    python bench/shape_scan.py            # every case
    python bench/shape_scan.py colmajor   # cases whose name contains the word
"""

import sys
import time

import torch
import torch.nn.functional as F

import linclass


def median_seconds(step, reps=15):
    step()
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[reps // 2]


def training_step(fn, x, t, kwargs):
    def step():
        x.grad = None
        loss = fn(x, t, **kwargs)
        (loss.sum() if loss.dim() else loss).backward()
    return step


def rows(n, c, dtype=torch.float32):
    return lambda: (torch.randn(n, c, dtype=dtype), torch.randint(0, c, (n,)))


def sliced(n, c, extra):  # a view of the first c columns of wider rows
    return lambda: (torch.randn(n, c + extra)[:, :c], torch.randint(0, c, (n,)))


def column_major(n, c):
    return lambda: (torch.randn(c, n).t(), torch.randint(0, c, (n,)))


def kdim(n, c, *d):
    return lambda: (torch.randn(n, c, *d), torch.randint(0, c, (n, *d)))


def channels_last(n, c, h, w):
    return lambda: (torch.randn(n, c, h, w).to(memory_format=torch.channels_last),
                    torch.randint(0, c, (n, h, w)))


def transposed_logits(b, t, v):
    return lambda: (torch.randn(b, t, v).transpose(1, 2), torch.randint(0, v, (b, t)))


# name, inputs, options, whether the hinge takes them too
CASES = [
    ("f32 8192x1000", rows(8192, 1000), {}, True),
    ("f64 8192x1000", rows(8192, 1000, torch.float64), {}, True),
    ("bf16 8192x1000", rows(8192, 1000, torch.bfloat16), {}, True),
    ("f16 8192x1000", rows(8192, 1000, torch.float16), {}, True),
    ("bf16 65536x10", rows(65536, 10, torch.bfloat16), {}, True),
    ("f16 65536x10", rows(65536, 10, torch.float16), {}, True),
    ("f64 65536x10", rows(65536, 10, torch.float64), {}, True),
    ("bf16 256x32000", rows(256, 32000, torch.bfloat16), {}, True),
    ("f32 8192x1000 none", rows(8192, 1000), {"reduction": "none"}, True),
    ("f32 8192x1000 sum smoothing", rows(8192, 1000), {"reduction": "sum", "label_smoothing": 0.1}, False),
    ("f32 8192x1000 weight", rows(8192, 1000), {"weight": torch.rand(1000)}, True),
    ("f32 65536x10 weight", rows(65536, 10), {"weight": torch.rand(10)}, True),
    ("f32 sliced 8192x1000 of 1024", sliced(8192, 1000, 24), {}, True),
    ("f32 sliced 65536x10 of 16", sliced(65536, 10, 6), {}, True),
    ("f32 colmajor 2048x1000", column_major(2048, 1000), {}, True),
    ("f32 colmajor 2048x5000", column_major(2048, 5000), {}, True),
    ("f32 colmajor 256x32000", column_major(256, 32000), {}, True),
    ("f32 kdim 4x19x128x128", kdim(4, 19, 128, 128), {}, False),
    ("f32 kdim 16x1000x7", kdim(16, 1000, 7), {}, False),
    ("f32 kdim 64x600x16", kdim(64, 600, 16), {}, False),
    ("f32 kdim 8x50x3", kdim(8, 50, 3), {}, False),
    ("f32 kdim 2x1000x32x32", kdim(2, 1000, 32, 32), {}, False),
    ("f32 kdim 2x10000x8x8", kdim(2, 10000, 8, 8), {}, False),
    ("f32 kdim 4x32000x64", kdim(4, 32000, 64), {}, False),
    ("f32 channels_last 4x19x128x128", channels_last(4, 19, 128, 128), {}, False),
    ("f32 channels_last 4x150x64x64", channels_last(4, 150, 64, 64), {}, False),
    ("f32 transposed logits 8x128x32000", transposed_logits(8, 128, 32000), {}, False),
    ("f32 transposed logits 64x256x1000", transposed_logits(64, 256, 1000), {}, False),
    ("f32 1-D 100000", lambda: (torch.randn(100000), torch.tensor(5)), {}, False),
    ("f32 2x1000000", rows(2, 1000000), {}, True),
]


def scan(name, make, kwargs, op):
    x, t = make()
    x.requires_grad_()
    theirs = F.cross_entropy if op == "cross_entropy" else F.multi_margin_loss
    ours = getattr(linclass, op)
    if op == "multi_margin_loss" and x.dtype in (torch.float16, torch.bfloat16):
        theirs = lambda x, t, **kw: F.multi_margin_loss(x.float(), t, **kw)  # noqa: E731
    torch_s = min(median_seconds(training_step(theirs, x, t, kwargs)) for _ in range(2))
    ours_s = min(median_seconds(training_step(ours, x, t, kwargs)) for _ in range(2))
    print(f"{op:18s} {name:36s} torch {torch_s * 1e3:9.3f} ms  linclass {ours_s * 1e3:8.3f} ms"
          f"  {torch_s / ours_s:6.2f}x", flush=True)


def main(word):
    torch.set_num_threads(2)
    print(f"linclass from {linclass.__file__}")
    for name, make, kwargs, hinge in CASES:
        if word and word not in name:
            continue
        scan(name, make, kwargs, "cross_entropy")
        if hinge:
            scan(name, make, {k: v for k, v in kwargs.items() if k in ("reduction", "weight")},
                 "multi_margin_loss")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
