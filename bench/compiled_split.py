"""Where a compiled fused loss spends its time over eager (issue 18): forward and
backward timed apart, eager and under torch.compile(fullgraph=True), alternating in one
process; medians of each round's median over 30 steps, per shape.

    python bench/compiled_split.py                  # cross_entropy at three shapes
    python bench/compiled_split.py --op multi_margin_loss 65536x10 4096x1000
    python bench/compiled_split.py --op one_op 4x10     # torch.compile's own cost per step

An excess that stays about the same from a few MB of scores to a hundred is a cost per
call (Dynamo's guards, AOTAutograd's and Inductor's wrappers), not a pass over the
scores: the backward's in-place scale of the saved gradient runs in the buffer, after an
Inductor self-copy (`cpp_fused_as_strided_clone_0`) whose load and store of the same
addresses the C++ compiler drops.
"""

import argparse
import statistics
import time

import torch

import linclass


def split_times(loss, x, y, steps=30):
    forward, backward = [], []
    for _ in range(steps):
        x.grad = None
        start = time.perf_counter()
        value = loss(x, y)
        middle = time.perf_counter()
        value.backward()
        end = time.perf_counter()
        forward.append(middle - start)
        backward.append(end - middle)
    return statistics.median(forward), statistics.median(backward)


def one_op(s, t):
    """The least a compiled training step can be: one elementwise op and a sum.  Its
    compiled / eager excess at a tiny shape is torch.compile's own cost per step."""
    return (s * 2).sum()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shapes", nargs="*", default=["65536x10", "4096x1000", "1024x32000"])
    parser.add_argument("--op", default="cross_entropy",
                        choices=["cross_entropy", "multi_margin_loss", "one_op"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    op = one_op if args.op == "one_op" else getattr(linclass, args.op)
    print(f"{args.op}, {torch.get_num_threads()} threads, torch {torch.__version__}; ms, "
          "medians of the rounds")
    print("| N x C | eager fwd | compiled fwd | eager bwd | compiled bwd | compiled / eager |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        n, c = map(int, shape.split("x"))
        x = torch.randn(n, c, requires_grad=True)
        y = torch.randint(0, c, (n,))
        torch._dynamo.reset()
        compiled = torch.compile(lambda s, t: op(s, t), fullgraph=True)
        split_times(compiled, x, y, steps=3)  # compiles
        eager, traced = [], []
        for _ in range(args.rounds):
            eager.append(split_times(op, x, y))
            traced.append(split_times(compiled, x, y))
        ef, eb = (statistics.median(t[i] for t in eager) * 1e3 for i in (0, 1))
        cf, cb = (statistics.median(t[i] for t in traced) * 1e3 for i in (0, 1))
        print(f"| {shape} | {ef:.3f} | {cf:.3f} | {eb:.3f} | {cb:.3f} | "
              f"{(cf + cb) / (ef + eb):.2f}x (+{cf + cb - ef - eb:.3f} ms) |", flush=True)


if __name__ == "__main__":
    main()
