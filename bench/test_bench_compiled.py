"""Forward + backward inside torch.compile(fullgraph=True) (issue 18).

Each group (one op at one shape) holds linclass eager, linclass compiled and torch
compiled (inductor, which fuses the cross-entropy itself) and torch eager.  Compiled
callables are built once per process; their first calls (compilation) are warm-up.
"""

import functools

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn.functional as F

import linclass
from rotation import copies_for, cycle, forward_backward

# Compile afresh: the on-disk caches key a compiled backward by the forward graph, so
# they would hand back one built by an older linclass (or torch) for these ops.
torch._inductor.config.fx_graph_cache = False
torch._functorch.config.enable_autograd_cache = False

SHAPES = [(65536, 10), (4096, 1000), (1024, 32000)]
OPS = {
    "cross_entropy": (F.cross_entropy, linclass.cross_entropy),
    "multi_margin_loss": (F.multi_margin_loss, linclass.multi_margin_loss),
}
IMPLS = ["torch", "torch[compiled]", "linclass[cpp]", "linclass[compiled]"]


@functools.lru_cache(maxsize=None)
def _compiled(op, impl):
    torch_fn, ours = OPS[op]
    return torch.compile(torch_fn if impl.startswith("torch") else ours, fullgraph=True)


@pytest.mark.skipif("cpp" not in linclass.backends.available(), reason="needs the C++ CPU kernels")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_compiled(benchmark, op, n, c, impl):
    benchmark.group = f"compiled {op} {n}x{c}"
    benchmark.extra_info.update(op=op, impl=impl, n=n, c=c, bytes=2 * n * c * 4)
    inputs = [(torch.randn(n, c, requires_grad=True), torch.randint(0, c, (n,)))
              for _ in range(copies_for(n * c * 4))]
    torch_fn, ours = OPS[op]
    fn = {"torch": torch_fn, "linclass[cpp]": ours}.get(impl) or _compiled(op, impl)
    rounds = max(5, min(100, int(1e8 // (n * c))))
    benchmark.pedantic(cycle(inputs, forward_backward(fn)), rounds=rounds, warmup_rounds=3)
