"""linclass against torch on the inputs users bring beyond the benchmark groups: dtypes,
reductions, class weights, label smoothing, sliced and transposed scores, K-dim maps in
both memory formats, logits transposed to (B, V, T), scores far apart (subnormal
probabilities), a 1-D row, a huge row, probability targets (`probs`); and the fused
linear ops at assorted N x D x C,
dtypes, without bias, with transposed operands, large weights, against F.linear + the
loss.  Forward + backward (a 'none' loss is summed), 2 threads,
the best of two medians of 15 (linear: 9) steps each; torch on 16-bit hinge inputs
(which it lacks on the CPU) runs in float32.  A scan for cliffs, not a benchmark group:
a case below 1.0x is a finding.

    python bench/shape_scan.py            # every case
    python bench/shape_scan.py colmajor   # cases whose name contains the word
    python bench/shape_scan.py --linear [word]
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


def spread(n, c, width):
    """Scores spread over `width`: most probabilities below the smallest normal float."""
    return lambda: (torch.rand(n, c) * -width, torch.randint(0, c, (n,)))


def transposed_logits(b, t, v):
    return lambda: (torch.randn(b, t, v).transpose(1, 2), torch.randint(0, v, (b, t)))


def probs(make):
    """The same scores against class probabilities (a float target in their layout)."""
    def made():
        x, _ = make()
        noise = torch.randn_like(x, dtype=torch.float32)  # in x's layout
        return x, torch.softmax(noise, 1 if x.dim() > 1 else 0).to(x.dtype)

    return made


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
    ("f32 colmajor 256x50257", column_major(256, 50257), {}, True),
    ("f32 kdim 4x19x128x128", kdim(4, 19, 128, 128), {}, False),
    ("f32 kdim 16x1000x7", kdim(16, 1000, 7), {}, False),
    ("f32 kdim 64x600x16", kdim(64, 600, 16), {}, False),
    ("f32 kdim 8x50x3", kdim(8, 50, 3), {}, False),
    ("f32 kdim 2x1000x32x32", kdim(2, 1000, 32, 32), {}, False),
    ("f32 kdim 2x10000x8x8", kdim(2, 10000, 8, 8), {}, False),
    ("f32 kdim 4x32000x64", kdim(4, 32000, 64), {}, False),
    ("f32 kdim 2x50257x32", kdim(2, 50257, 32), {}, False),
    ("f32 channels_last 4x19x128x128", channels_last(4, 19, 128, 128), {}, False),
    ("f32 channels_last 4x150x64x64", channels_last(4, 150, 64, 64), {}, False),
    ("f32 transposed logits 8x128x32000", transposed_logits(8, 128, 32000), {}, False),
    ("f32 transposed logits 64x256x1000", transposed_logits(64, 256, 1000), {}, False),
    ("f32 spread 8192x1000 over 110", spread(8192, 1000, 110.0), {}, True),
    ("f32 spread 65536x10 over 110", spread(65536, 10, 110.0), {}, True),
    ("f32 1-D 100000", lambda: (torch.randn(100000), torch.tensor(5)), {}, False),
    ("f32 2x1000000", rows(2, 1000000), {}, True),
    ("f32 probs 8192x1000", probs(rows(8192, 1000)), {}, False),
    ("bf16 probs 8192x1000", probs(rows(8192, 1000, torch.bfloat16)), {}, False),
    ("f64 probs 256x32000", probs(rows(256, 32000, torch.float64)), {}, False),
    ("f32 probs 65536x10", probs(rows(65536, 10)), {}, False),
    ("f32 probs 65536x10 weight smoothing", probs(rows(65536, 10)),
     {"weight": torch.rand(10), "label_smoothing": 0.1}, False),
    ("f32 probs 40000x40", probs(rows(40000, 40)), {}, False),
    ("f32 probs 8192x1000 none", probs(rows(8192, 1000)), {"reduction": "none"}, False),
    ("f32 probs colmajor 2048x1000", probs(column_major(2048, 1000)), {}, False),
    ("f32 probs kdim 4x19x128x128", probs(kdim(4, 19, 128, 128)), {}, False),
    ("f32 probs kdim 2x1000x32x32", probs(kdim(2, 1000, 32, 32)), {}, False),
    ("bf16 probs kdim 4x19x128x128", probs(lambda: (torch.randn(4, 19, 128, 128).bfloat16(), None)), {}, False),
    ("f32 probs channels_last 4x150x64x64", probs(channels_last(4, 150, 64, 64)), {}, False),
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


# name, (N, D, C), dtype, bias, input transposed, weight transposed[, weight scale (0.05)]
LINEAR_CASES = [
    ("4096x512x10", (4096, 512, 10), torch.float32, True, False, False),
    ("4096x512x37", (4096, 512, 37), torch.float32, True, False, False),
    ("2048x768x300", (2048, 768, 300), torch.float32, True, False, False),
    ("1024x1024x5000", (1024, 1024, 5000), torch.float32, True, False, False),
    ("64x4096x1000", (64, 4096, 1000), torch.float32, True, False, False),
    ("30000x64x10", (30000, 64, 10), torch.float32, True, False, False),
    ("1x1024x32000", (1, 1024, 32000), torch.float32, True, False, False),
    ("bf16 1024x1024x32000", (1024, 1024, 32000), torch.bfloat16, True, False, False),
    ("bf16 4096x1024x32000", (4096, 1024, 32000), torch.bfloat16, True, False, False),
    ("bf16 8192x512x1000", (8192, 512, 1000), torch.bfloat16, True, False, False),
    ("f64 2048x256x100", (2048, 256, 100), torch.float64, True, False, False),
    ("no bias 4096x512x100", (4096, 512, 100), torch.float32, False, False, False),
    ("x.t() 4096x512x100", (4096, 512, 100), torch.float32, True, True, False),
    ("w.t() 4096x512x100", (4096, 512, 100), torch.float32, True, False, True),
    # weights of scale 1: scores ~20 apart per unit of x, most probabilities subnormal
    ("spread 8192x512x10", (8192, 512, 10), torch.float32, True, False, False, 1.0),
    ("spread 4096x512x300", (4096, 512, 300), torch.float32, True, False, False, 1.0),
]


def scan_linear(name, shape, dtype, bias, x_transposed, w_transposed, op, w_scale=0.05):
    n, d, c = shape
    x = torch.randn(d, n, dtype=dtype).t() if x_transposed else torch.randn(n, d, dtype=dtype)
    w = (torch.randn(d, c, dtype=dtype).t() if w_transposed else torch.randn(c, d, dtype=dtype)) * w_scale
    b = torch.randn(c, dtype=dtype) if bias else None
    t = torch.randint(0, c, (n,))
    leaves = [v.requires_grad_() for v in (x, w, b) if v is not None]
    loss_fn = F.cross_entropy if op == "cross_entropy" else F.multi_margin_loss
    if op == "multi_margin_loss" and dtype in (torch.float16, torch.bfloat16):
        loss_fn = lambda s, t: F.multi_margin_loss(s.float(), t)  # noqa: E731
    fused = getattr(linclass, f"linear_{op}")

    def step(loss):
        def run():
            for v in leaves:
                v.grad = None
            loss().backward()
        return run

    torch_s = min(median_seconds(step(lambda: loss_fn(F.linear(x, w, b), t)), 9) for _ in range(2))
    ours_s = min(median_seconds(step(lambda: fused(x, w, t, b)), 9) for _ in range(2))
    print(f"linear_{op:18s} {name:27s} torch {torch_s * 1e3:9.2f} ms  linclass {ours_s * 1e3:8.2f} ms"
          f"  {torch_s / ours_s:6.2f}x", flush=True)


def main(args):
    torch.set_num_threads(2)
    print(f"linclass from {linclass.__file__}")
    linear = "--linear" in args
    words = [a for a in args if a != "--linear"]
    word = words[0] if words else ""
    if linear:
        for name, *case in LINEAR_CASES:
            if word in name:
                for op in ("cross_entropy", "multi_margin_loss"):
                    scan_linear(name, *case[:5], op, *case[5:])
        return
    for name, make, kwargs, hinge in CASES:
        if word and word not in name:
            continue
        scan(name, make, kwargs, "cross_entropy")
        if hinge:
            scan(name, make, {k: v for k, v in kwargs.items() if k in ("reduction", "weight")},
                 "multi_margin_loss")


if __name__ == "__main__":
    main(sys.argv[1:])
