"""Forward + backward of the fused losses against torch, grouped by shape.

Each group (one op at one shape) holds: torch.nn.functional, every linclass backend
that runs on CPU, the naive loop reference (small shapes only) and a plain copy_ of the
same bytes (the memory roofline).  Effective bandwidth = 2 * N * C * 4 bytes (read
scores, write gradient) / time.  The members of a group run back to back, so that the
machine's drift over a run affects them alike.

Every implementation cycles through several input tensors (at least 64 MiB in all,
twice this machine's L3), so that no group is timed on scores that stay in cache
between rounds: the copy_ then measures memory bandwidth, as a roofline should.
"""

import pytest
import torch
import torch.nn.functional as F

import linclass
from linclass import reference
from rotation import copies_for, cycle, forward_backward

SHAPES = [(256, 10), (65536, 10), (4096, 1000), (1024, 32000)]
NAIVE_MAX_ELEMENTS = 4096
OPS = {
    "cross_entropy": (F.cross_entropy, linclass.cross_entropy, reference.cross_entropy),
    "multi_margin_loss": (F.multi_margin_loss, linclass.multi_margin_loss, reference.multi_margin_loss),
}
IMPLS = ["naive", "torch"] + [f"linclass[{b}]" for b in ("cpp",) if b in linclass.backends.available()] + ["copy_"]


def _rounds(n, c):
    return max(5, min(200, int(2e8 // (n * c))))


@pytest.mark.parametrize("impl", IMPLS)  # varies fastest: a group's members run back to back
@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_loss(benchmark, op, n, c, impl):
    if impl == "naive" and n * c > NAIVE_MAX_ELEMENTS:
        pytest.skip("the naive loops only run on small shapes")
    benchmark.group = f"{op} {n}x{c}"
    benchmark.extra_info.update(op=op, impl=impl, n=n, c=c, bytes=2 * n * c * 4)
    copies = copies_for(n * c * 4)
    inputs = [(torch.randn(n, c, requires_grad=True), torch.randint(0, c, (n,)))
              for _ in range(copies)]
    torch_fn, ours, naive = OPS[op]
    rounds = _rounds(n, c)
    if impl == "copy_":
        pairs = [(x.detach(), torch.empty_like(x)) for x, _ in inputs]
        benchmark.pedantic(cycle(pairs, lambda src, dst: dst.copy_(src)), rounds=2 * rounds,
                           warmup_rounds=2)
    elif impl == "naive":
        benchmark.pedantic(cycle(inputs, naive), rounds=3, warmup_rounds=1)
    elif impl == "torch":
        benchmark.pedantic(cycle(inputs, forward_backward(torch_fn)), rounds=rounds, warmup_rounds=2)
    else:
        with linclass.backends.use(impl[len("linclass["):-1]):
            benchmark.pedantic(cycle(inputs, forward_backward(ours)), rounds=rounds, warmup_rounds=2)


# The small ones: the cost of a call; the last, segmentation-shaped (N, C, H, W).
PROBS_SHAPES = [(4, 10), (128, 100)] + SHAPES + [(8, 21, 128, 128)]
PROBS_IMPLS = ["torch"] + [f"linclass[{b}]" for b in ("cpp",) if b in linclass.backends.available()] + ["copy_"]


@pytest.mark.parametrize("impl", PROBS_IMPLS)
@pytest.mark.parametrize("shape", PROBS_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_cross_entropy_probability_targets(benchmark, shape, impl):
    """cross_entropy against class probabilities (soft labels, distillation): torch's
    composite (log_softmax, products, sums, and their backward) against the fused
    kernel; bytes: the scores and the target read, the gradient written."""
    numel = 1
    for size in shape:
        numel *= size
    name = "x".join(map(str, shape))
    benchmark.group = f"cross_entropy probability targets {name}"
    benchmark.extra_info.update(op="cross_entropy_probs", impl=impl, shape=name, bytes=3 * numel * 4)
    copies = copies_for(2 * numel * 4)
    inputs = [(torch.randn(shape, requires_grad=True), torch.softmax(torch.randn(shape), 1))
              for _ in range(copies)]
    rounds = _rounds(numel, 1)
    if impl == "copy_":  # the same bytes: 1.5 N C floats read and 1.5 N C written
        pairs = [(torch.randn(3 * numel // 2), torch.empty(3 * numel // 2)) for _ in inputs]
        benchmark.pedantic(cycle(pairs, lambda src, dst: dst.copy_(src)), rounds=2 * rounds,
                           warmup_rounds=2)
    elif impl == "torch":
        benchmark.pedantic(cycle(inputs, forward_backward(F.cross_entropy)), rounds=rounds, warmup_rounds=2)
    else:
        with linclass.backends.use(impl[len("linclass["):-1]):
            benchmark.pedantic(cycle(inputs, forward_backward(linclass.cross_entropy)), rounds=rounds,
                               warmup_rounds=2)
