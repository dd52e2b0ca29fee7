"""Fused linear + loss against torch eager F.linear + loss + backward, with memory.

Groups (N x D x C):
  40000 x 3073 x 10     the CIFAR-10 training set with the bias trick: W takes the
                        gradient, X is data
  4096 x 1024 x 32000   a language-model head: input and weight take gradients
  10000 x 3073 x 20, 100, 200 and 4096 x 1024 x 1000: the class counts between them
  8 x 1024 x 128256     a short batch through a large-vocabulary head
  per-row cross_entropy 4096 x 1024 x 32000: reduction='none' weighted per row (masks,
                        per-token weights), which linclass runs a block of rows at a
                        time, making the scores again in backward (one more GEMM)
  probabilities cross_entropy 4096 x 1024 x 32000: against class probabilities
                        (distillation), a block of rows at a time
Peak extra memory: in a fresh subprocess holding the inputs, the resident-set
high-water mark is reset (/proc/self/clear_refs), one forward + backward runs, and the
new mark minus the resident set before is reported.  It sees the C++ allocations
(linclass's blocks and buffers) as well as torch's, and counts the gradients too.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import linclass

CASES = {
    (40000, 3073, 10): dict(input_grad=False, rounds=10),
    (4096, 1024, 32000): dict(input_grad=True, rounds=3),
    # between the two: where the small-C register-blocked path meets the GEMM path
    (10000, 3073, 20): dict(input_grad=False, rounds=10),
    (10000, 3073, 100): dict(input_grad=False, rounds=10),
    (10000, 3073, 200): dict(input_grad=False, rounds=10),
    (4096, 1024, 1000): dict(input_grad=True, rounds=10),
    # a few rows through a large-vocabulary head: the weight and its gradient dominate
    (8, 1024, 128256): dict(input_grad=True, rounds=5),
}
LOSSES = {
    "cross_entropy": (lambda x, w, t: F.cross_entropy(F.linear(x, w), t), linclass.linear_cross_entropy),
    "multi_margin_loss": (lambda x, w, t: F.multi_margin_loss(F.linear(x, w), t),
                          linclass.linear_multi_margin_loss),
}
# Beyond 'mean' class indices, (torch, linclass) given x, w, class indices t, row weights
# r and probabilities p: reduction='none' weighted per row, and probability targets.
VARIANT_CASES = [(4096, 1024, 32000)]
VARIANTS = {
    "per-row cross_entropy": (
        lambda x, w, t, r, p: (F.cross_entropy(F.linear(x, w), t, reduction="none") * r).sum(),
        lambda x, w, t, r, p: (linclass.linear_cross_entropy(x, w, t, reduction="none") * r).sum()),
    "probabilities cross_entropy": (
        lambda x, w, t, r, p: F.cross_entropy(F.linear(x, w), p),
        lambda x, w, t, r, p: linclass.linear_cross_entropy(x, w, p)),
}
IMPLS = ["torch"] + [f"linclass[{b}]" for b in ("cpp",) if b in linclass.backends.available()]

_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch, torch.nn.functional as F, linclass

    def status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    torch.set_num_threads({threads})
    n, d, c, input_grad, loss, impl = {args!r}
    torch.manual_seed(0)
    x = torch.randn(n, d).requires_grad_(input_grad)
    w = (torch.randn(c, d) * 0.01).requires_grad_()
    t = torch.randint(0, c, (n,))
    r = torch.rand(n)
    p = torch.rand(n, c).softmax(1) if loss.startswith("probabilities") else None
    fns = {{"cross_entropy": (lambda: F.cross_entropy(F.linear(x, w), t),
                              lambda: linclass.linear_cross_entropy(x, w, t)),
            "multi_margin_loss": (lambda: F.multi_margin_loss(F.linear(x, w), t),
                                  lambda: linclass.linear_multi_margin_loss(x, w, t)),
            "per-row cross_entropy": (
                lambda: (F.cross_entropy(F.linear(x, w), t, reduction="none") * r).sum(),
                lambda: (linclass.linear_cross_entropy(x, w, t, reduction="none") * r).sum()),
            "probabilities cross_entropy": (lambda: F.cross_entropy(F.linear(x, w), p),
                                            lambda: linclass.linear_cross_entropy(x, w, p))}}
    fn = fns[loss][0 if impl == "torch" else 1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    before = status_kb("VmRSS")
    fn().backward()
    print(json.dumps((status_kb("VmHWM") - before) / 1024))
""")


def peak_extra_mb(n, d, c, input_grad, loss, impl):
    """RSS high-water growth (MiB) of one forward + backward in a fresh process."""
    code = _MEMORY_SCRIPT.format(threads=torch.get_num_threads(),
                                 args=(n, d, c, input_grad, loss, impl))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, LINCLASS_BACKEND=impl[len("linclass["):-1]) if impl != "torch" else None)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("impl", IMPLS)  # varies fastest: a group's members run back to back
@pytest.mark.parametrize("n,d,c", list(CASES))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_linear_loss(benchmark, loss, n, d, c, impl):
    case = CASES[(n, d, c)]
    benchmark.group = f"linear_{loss} {n}x{d}x{c}"
    torch.manual_seed(0)
    x = torch.randn(n, d).requires_grad_(case["input_grad"])
    w = (torch.randn(c, d) * 0.01).requires_grad_()
    t = torch.randint(0, c, (n,))
    theirs, ours = LOSSES[loss]
    fn = theirs if impl == "torch" else ours

    def step():
        x.grad = w.grad = None
        fn(x, w, t).backward()

    # bytes: the input read once (+ its gradient written), the weight and its gradient
    nbytes = 4 * (n * d * (2 if case["input_grad"] else 1) + 2 * c * d)
    benchmark.extra_info.update(op=f"linear_{loss}", impl=impl, n=n, d=d, c=c, bytes=nbytes,
                                peak_extra_mb=peak_extra_mb(n, d, c, case["input_grad"], loss, impl))
    if impl == "torch":
        benchmark.pedantic(step, rounds=case["rounds"], warmup_rounds=1)
    else:
        with linclass.backends.use(impl[len("linclass["):-1]):
            benchmark.pedantic(step, rounds=case["rounds"], warmup_rounds=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,d,c", VARIANT_CASES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_linear_loss_variant(benchmark, variant, n, d, c, impl):
    benchmark.group = f"linear_{variant} {n}x{d}x{c}"
    torch.manual_seed(0)
    x = torch.randn(n, d).requires_grad_()
    w = (torch.randn(c, d) * 0.01).requires_grad_()
    t = torch.randint(0, c, (n,))
    r = torch.rand(n)
    p = torch.rand(n, c).softmax(1) if variant.startswith("probabilities") else None
    fn = VARIANTS[variant][0 if impl == "torch" else 1]

    def step():
        x.grad = w.grad = None
        fn(x, w, t, r, p).backward()

    # the input read once and its gradient written, the weight and its gradient, the
    # probabilities read once
    nbytes = 4 * (n * d * 2 + 2 * c * d + (n * c if p is not None else 0))
    benchmark.extra_info.update(op=f"linear_{variant}", impl=impl, n=n, d=d, c=c, bytes=nbytes,
                                peak_extra_mb=peak_extra_mb(n, d, c, True, variant, impl))
    if impl == "torch":
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    else:
        with linclass.backends.use(impl[len("linclass["):-1]):
            benchmark.pedantic(step, rounds=3, warmup_rounds=1)
