"""The fused linear ops in 16 bits on the CPU: torch against linclass with the weight
gradient's products forced to float32 (converted operands) and to the input dtype
(csrc/linear_blocks.h; the automatic choice depends on the CPU's 16-bit instructions).
Forward + backward of linear_cross_entropy with bias, 2 threads, medians and ranges over
3 alternating rounds (bench/results/linear-16bit.md):

    python bench/linear_16bit.py bf16x4096x1024x32000 f16x8192x512x1000
    python bench/linear_16bit.py --gemm      # the raw dW product per dtype
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F

import linclass
from gemm_floor import training_step  # bench/ is the script's directory

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def raw_products(classes=32000, rows=1048, features=1024):
    for dtype in DTYPES.values():
        a = torch.randn(rows, classes, dtype=dtype).t()
        b = torch.randn(rows, features, dtype=dtype)
        out = torch.empty(classes, features, dtype=dtype)
        best = min(timed(lambda: torch.mm(a, b, out=out), 3))
        print(f"{dtype} dS^T X {classes}x{rows}x{features}: {best * 1e3:.0f} ms, "
              f"{2 * classes * rows * features / best / 1e9:.0f} GFLOP/s", flush=True)


def compare(spec, rounds=3):
    name, n, d, c = spec.split("x")
    n, d, c, dtype = int(n), int(d), int(c), DTYPES[name]
    x = torch.randn(n, d, dtype=dtype, requires_grad=True)
    w = (torch.randn(c, d, dtype=dtype) * 0.05).requires_grad_()
    b = torch.randn(c, dtype=dtype, requires_grad=True)
    t = torch.randint(0, c, (n,))

    knob = torch.ops.linclass._linear_16bit_products
    repeats = 5 if n * d * c > 1e11 else 9
    variants = {"torch": (None, lambda: F.cross_entropy(F.linear(x, w, b), t)),
                "float32 products": (0, lambda: linclass.linear_cross_entropy(x, w, t, b)),
                "input-dtype products": (1, lambda: linclass.linear_cross_entropy(x, w, t, b))}
    times = {v: [] for v in variants}
    for _ in range(rounds):
        for label, (mode, loss) in variants.items():
            old = knob(mode) if mode is not None else None
            try:
                times[label] += timed(training_step(loss, (x, w, b)), repeats)
            finally:
                if mode is not None:
                    knob(old)
    print(spec, " | ".join(f"{label} {statistics.median(v) * 1e3:.0f} ms "
                           f"({min(v) * 1e3:.0f}-{max(v) * 1e3:.0f})" for label, v in times.items()),
          flush=True)


def main(args):
    torch.set_num_threads(2)
    if "--gemm" in args:
        raw_products()
    for spec in (a for a in args if not a.startswith("--")):
        compare(spec)


if __name__ == "__main__":
    main(sys.argv[1:])
