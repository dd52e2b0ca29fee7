"""Command line: ``python -m linclass demo`` (also installed as ``linclass``)."""

from __future__ import annotations

import argparse
import sys
import time


def _demo_ops() -> None:
    import torch
    import torch.nn.functional as F

    import linclass

    print(f"linclass {linclass.__version__}: backends {linclass.backends.available()}, "
          f"CPU kernels built for {linclass._extension.cpu_isa()}")
    print(f"{'op':<20}{'shape':>12}{'|loss-torch|':>14}{'|grad-torch|':>14}"
          f"{'torch ms':>10}{'linclass ms':>13}")
    for name, ours, theirs in [("cross_entropy", linclass.cross_entropy, F.cross_entropy),
                               ("multi_margin_loss", linclass.multi_margin_loss, F.multi_margin_loss)]:
        for n, c in [(65536, 10), (4096, 1000)]:
            x = torch.randn(n, c)
            t = torch.randint(0, c, (n,))
            out = {}
            for key, fn in (("torch", theirs), ("ours", ours)):
                xr = x.clone().requires_grad_()
                best = float("inf")
                for _ in range(5):
                    xr.grad = None
                    start = time.perf_counter()
                    loss = fn(xr, t)
                    loss.backward()
                    best = min(best, time.perf_counter() - start)
                out[key] = (loss.detach(), xr.grad, best * 1e3)
            dl = (out["ours"][0] - out["torch"][0]).abs().item()
            dg = (out["ours"][1] - out["torch"][1]).abs().max().item()
            print(f"{name:<20}{f'{n}x{c}':>12}{dl:>14.2e}{dg:>14.2e}"
                  f"{out['torch'][2]:>10.2f}{out['ours'][2]:>13.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="linclass", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="show the fused ops against torch (forward + backward)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _demo_ops()
    return 0


if __name__ == "__main__":
    sys.exit(main())
