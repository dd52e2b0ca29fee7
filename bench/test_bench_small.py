"""The per-call cost on the minibatches the classic workflow trains on (issue 18).

Forward + backward of one small loss, called back to back on the same tensors as a
training loop does (they stay in cache: what is timed is the fixed cost of a call —
Python checks, dispatch, autograd, allocation — not memory).  Groups are named
"small <op> NxC"; each holds torch and linclass.
"""

import pytest
import torch
import torch.nn.functional as F

import linclass
from rotation import forward_backward

SHAPES = [(4, 10), (64, 10), (200, 10), (128, 100)]
OPS = {
    "cross_entropy": (F.cross_entropy, linclass.cross_entropy),
    "multi_margin_loss": (F.multi_margin_loss, linclass.multi_margin_loss),
}
# linclass[auto]: the automatic choice (what a user gets; a small hinge runs on torch,
# linclass.backends.CPU_TORCH_HINGE_MAX_SCORES); linclass[cpp]: the C++ kernel forced.
IMPLS = ["torch", "linclass[auto]"] + [f"linclass[{b}]" for b in ("cpp",)
                                       if b in linclass.backends.available()]
CALLS_PER_ROUND = 200  # one round = this many calls; times are per call


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_small(benchmark, op, n, c, impl):
    benchmark.group = f"small {op} {n}x{c}"
    benchmark.extra_info.update(op=op, impl=impl, n=n, c=c, bytes=2 * n * c * 4)
    x, t = torch.randn(n, c, requires_grad=True), torch.randint(0, c, (n,))
    torch_fn, ours = OPS[op]
    step = forward_backward(torch_fn if impl == "torch" else ours)
    if impl in ("torch", "linclass[auto]"):
        benchmark.pedantic(step, args=(x, t), rounds=40, iterations=CALLS_PER_ROUND, warmup_rounds=3)
    else:
        with linclass.backends.use(impl[len("linclass["):-1]):
            benchmark.pedantic(step, args=(x, t), rounds=40, iterations=CALLS_PER_ROUND,
                               warmup_rounds=3)
