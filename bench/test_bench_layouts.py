"""Forward + backward of cross_entropy on the layouts users bring besides (N, C) rows:
K-dim scores (N, C, H, W) as a segmentation head makes them (classes strided by H * W,
positions contiguous), against torch, the same scores laid out as (N * H * W, C) rows,
and a copy_ of the same bytes; and other dense layouts (channels-last maps, logits
transposed to (B, V, T), column-major matrices, many classes strided), whose gradient
the kernels write in the input's layout.  Effective bandwidth = 2 * scores * 4 bytes /
time.  Inputs rotate through at least 64 MiB (bench/rotation.py)."""

import pytest
import torch
import torch.nn.functional as F

import linclass
from rotation import copies_for, cycle, forward_backward

# Pascal VOC (21 classes), ADE20K (150), a CIFAR-sized map of 10 and a wide 300.
SHAPES = [(8, 21, 128, 128), (4, 150, 64, 64), (16, 10, 32, 32), (2, 300, 32, 32)]
IMPLS = ["torch", "linclass[cpp]", "linclass[cpp] rows", "copy_"]


def _time(benchmark, impl, inputs, rounds):
    """Times forward + backward of `impl` over the rotating (scores, target) inputs, or
    for copy_ a copy of the scores into a tensor laid out like them."""
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
    _time(benchmark, impl, inputs, rounds=max(5, min(100, int(1e8 // scores))))


def _channels_last(n, c, h, w):
    return (lambda: torch.randn(n, c, h, w).to(memory_format=torch.channels_last),
            lambda: torch.randint(0, c, (n, h, w)))


def _transposed_logits(b, t, v):  # F.cross_entropy(logits.transpose(1, 2), target)
    return lambda: torch.randn(b, t, v).transpose(1, 2), lambda: torch.randint(0, v, (b, t))


def _column_major(n, c):
    return lambda: torch.randn(c, n).t(), lambda: torch.randint(0, c, (n,))


def _kdim(n, c, *d):
    return lambda: torch.randn(n, c, *d), lambda: torch.randint(0, c, (n, *d))


LAYOUTS = {
    "channels_last 4x150x64x64": _channels_last(4, 150, 64, 64),
    "logits.transpose(1,2) 8x128x1000": _transposed_logits(8, 128, 1000),
    "column-major 2048x1000": _column_major(2048, 1000),
    "column-major 256x32000": _column_major(256, 32000),
    "kdim 2x1000x32x32": _kdim(2, 1000, 32, 32),
}


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs the C++ CPU kernels")
@pytest.mark.parametrize("impl", ["torch", "linclass[cpp]", "copy_"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dense_layout(benchmark, layout, impl):
    make_scores, make_target = LAYOUTS[layout]
    first = make_scores()
    scores = first.numel()
    c = first.shape[1]
    benchmark.group = f"layout cross_entropy {layout}"
    benchmark.extra_info.update(op="cross_entropy", impl=impl, n=scores // c, c=c, bytes=2 * scores * 4)
    inputs = [(make_scores().requires_grad_(), make_target()) for _ in range(copies_for(scores * 4))]
    _time(benchmark, impl, inputs, rounds=max(5, min(100, int(1e8 // scores))))
