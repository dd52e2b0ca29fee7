"""A smoke test of linclass's CPU kernels, for emulated CPUs and installed wheels.

Run as a script it prints the kernels in use, checks both losses (lane and row paths),
the fused linear op and the SGD step against float64 torch (check()), and prints
"smoke ok".  numpy is kept out unless --with-numpy: its current wheels need AVX, so on
an emulated CPU without AVX it would stop the run before linclass is reached (linclass's
ops do not use it).
"""

import sys

if __name__ == "__main__" and "--with-numpy" not in sys.argv:
    sys.modules["numpy"] = None  # torch then runs without its numpy bridge

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import linclass  # noqa: E402


def check() -> None:
    """The CPU ops in use against float64 torch; raises AssertionError on a mismatch."""
    for C in (3, 33, 100, 1000):  # lane path, row path with and without a vector tail
        x64 = torch.randn(37, C, dtype=torch.float64)
        y = torch.randint(0, C, (37,))
        for ours, ref in ((linclass.functional.cross_entropy, F.cross_entropy),
                          (linclass.functional.multi_margin_loss, F.multi_margin_loss)):
            x = x64.float().requires_grad_()
            loss = ours(x, y)
            loss.backward()
            r = x64.clone().requires_grad_()
            ref_loss = ref(r, y)
            ref_loss.backward()
            assert abs(loss.item() - ref_loss.item()) < 1e-5, (C, ours.__name__)
            assert (x.grad.double() - r.grad).abs().max().item() < 1e-6, (C, ours.__name__)
    X, W = torch.randn(50, 20), torch.randn(7, 20)
    y = torch.randint(0, 7, (50,))
    loss = linclass.functional.linear_cross_entropy(X, W, y)
    assert abs(loss.item() - F.cross_entropy(X.double() @ W.double().T, y).item()) < 1e-5
    step = linclass.sgd.linear_sgd_step(X, torch.zeros(7, 20), y, torch.arange(50), "softmax", 0.1, 0.0)
    assert abs(step - float(torch.log(torch.tensor(7.0)))) < 1e-5


if __name__ == "__main__":
    print("torch", torch.__version__, "capability", torch.backends.cpu.get_cpu_capability())
    print("linclass CPU kernels:", linclass.backends.cpu_isa(), "from", linclass.__file__)
    torch.manual_seed(0)
    check()
    print("smoke ok")
