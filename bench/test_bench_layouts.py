"""Forward + backward of cross_entropy on the layouts users bring besides (N, C) rows:
K-dim scores (N, C, H, W) as a segmentation head makes them (classes strided by H * W,
positions contiguous), against torch, the same scores laid out as (N * H * W, C) rows,
and a copy_ of the same bytes.  Effective bandwidth = 2 * scores * 4 bytes / time.
Inputs rotate through at least 64 MiB (bench/rotation.py)."""

import pytest
import torch
import torch.nn.functional as F

import linclass
from rotation import copies_for, cycle, forward_backward

# Pascal VOC (21 classes), ADE20K (150), a CIFAR-sized map of 10 and a wide 300.
SHAPES = [(8, 21, 128, 128), (4, 150, 64, 64), (16, 10, 32, 32), (2, 300, 32, 32)]
IMPLS = ["torch", "linclass[cpp]", "linclass[cpp] rows", "copy_"]


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs the C++ CPU kernels")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kdim(benchmark, shape, impl):
    n, c, h, w = shape
    scores = n * c * h * w
    benchmark.group = f"kdim cross_entropy {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(op="cross_entropy", impl=impl, n=n * h * w, c=c, bytes=2 * scores * 4)
    copies = copies_for(scores * 4)
    if impl == "linclass[cpp] rows":
        inputs = [(torch.randn(n * h * w, c, requires_grad=True), torch.randint(0, c, (n * h * w,)))
                  for _ in range(copies)]
    else:
        inputs = [(torch.randn(n, c, h, w, requires_grad=True), torch.randint(0, c, (n, h, w)))
                  for _ in range(copies)]
    rounds = max(5, min(100, int(1e8 // scores)))
    if impl == "copy_":
        pairs = [(x.detach(), torch.empty_like(x)) for x, _ in inputs]
        benchmark.pedantic(cycle(pairs, lambda src, dst: dst.copy_(src)), rounds=2 * rounds,
                           warmup_rounds=2)
    elif impl == "torch":
        benchmark.pedantic(cycle(inputs, forward_backward(F.cross_entropy)), rounds=rounds,
                           warmup_rounds=2)
    else:
        with linclass.backends.use("cpp"):
            benchmark.pedantic(cycle(inputs, forward_backward(linclass.cross_entropy)),
                               rounds=rounds, warmup_rounds=2)
