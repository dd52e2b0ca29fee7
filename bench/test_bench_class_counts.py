"""Every class count a user may bring, not only the shapes the other groups name.

For each C in CLASS_COUNTS the scores are N = ELEMENTS // C rows (12 MB of float32
whatever C is), and each op runs in two modes: training (forward + backward: read the
scores, write the gradient) and evaluation (forward only, no gradient: read the
scores).  Each group holds torch.nn.functional, linclass's CPU kernels and a copy_ of
the same 12 MB (the memory floor: it reads and writes them once).  bench/report.py
draws GB/s against C (bench/results/cpu-sweep.png) and tabulates it; a kernel without
cliffs keeps its GB/s from one C to the next.

Effective bytes: training 2 * N * C * 4 (scores in, gradient out), evaluation N * C * 4,
copy_ 2 * N * C * 4.  Inputs rotate through at least 64 MiB (rotation.py).
"""

import pytest
import torch
import torch.nn.functional as F

import linclass
from rotation import copies_for, cycle, forward_backward

CLASS_COUNTS = [2, 3, 5, 8, 10, 16, 20, 31, 32, 33, 48, 64, 65, 100, 127, 128, 200, 255, 256,
                500, 1000, 1024, 4096, 10000, 32000, 50257, 128256]
ELEMENTS = 3_000_000
OPS = {"cross_entropy": (F.cross_entropy, linclass.cross_entropy),
       "multi_margin_loss": (F.multi_margin_loss, linclass.multi_margin_loss)}
MODES = ["train", "eval"]
IMPLS = ["torch"] + ["linclass[cpp]"] * ("cpp" in linclass.backends.available()) + ["copy_"]
ROUNDS = 11


def _step(fn, mode):
    if mode == "train":
        return forward_backward(fn)

    def evaluate(x, t):
        with torch.no_grad():
            fn(x, t)

    return evaluate


@pytest.mark.parametrize("impl", IMPLS)  # varies fastest: a group's members run back to back
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("c", CLASS_COUNTS)
@pytest.mark.parametrize("op", OPS)
def test_class_count(benchmark, op, c, mode, impl):
    if impl == "copy_" and mode == "eval":
        pytest.skip("one copy_ per class count (in the training group)")
    n = ELEMENTS // c
    scores = n * c * 4
    benchmark.group = f"classes {op} {mode} C={c}"
    benchmark.extra_info.update(op=op, impl=impl, n=n, c=c, mode=mode, class_sweep=True,
                                bytes=scores if mode == "eval" and impl != "copy_" else 2 * scores)
    copies = copies_for(scores, least=2)
    inputs = [(torch.randn(n, c, requires_grad=mode == "train"), torch.randint(0, c, (n,)))
              for _ in range(copies)]
    torch_fn, ours = OPS[op]
    if impl == "copy_":
        pairs = [(x.detach(), torch.empty_like(x)) for x, _ in inputs]
        benchmark.pedantic(cycle(pairs, lambda src, dst: dst.copy_(src)), rounds=2 * ROUNDS,
                           warmup_rounds=2)
    elif impl == "torch":
        benchmark.pedantic(cycle(inputs, _step(torch_fn, mode)), rounds=ROUNDS, warmup_rounds=1)
    else:
        with linclass.backends.use("cpp"):
            benchmark.pedantic(cycle(inputs, _step(ours, mode)), rounds=ROUNDS, warmup_rounds=1)
