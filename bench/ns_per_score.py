"""Compute cost per score of the C++ losses, free of memory speed: nanoseconds per score
of one op call on scores that stay in cache (by default 250,000 float32 scores, N =
250,000 // C, one thread), median of 9 loops of 100 calls.  The kernels are
compute-bound on 2 threads on the development VM, so this is what an instruction cut
shows up in; run it against two builds, alternating, to compare them
(bench/results/class-count-ab.md):

    PYTHONPATH=<other checkout> python bench/ns_per_score.py 64,65,128
    python bench/ns_per_score.py 64,65,128 --op multi_margin_loss --forward-only
    python bench/ns_per_score.py 40,65 --scores 3000000   # from memory instead

Each call allocates its gradient; glibc is told to keep freed memory (mallopt), since
otherwise it sometimes returns a freed gradient to the system and the next call pays
page faults for a fresh one (up to 2x the kernel's time at these sizes).
"""

import argparse
import ctypes
import ctypes.util
import time

import torch

import linclass  # noqa: F401  (loads the C++ ops)


def ns_per_score(op: str, classes: int, scores: int, with_grad: bool) -> float:
    n = max(1, scores // classes)
    x, t = torch.randn(n, classes), torch.randint(0, classes, (n,))
    if op == "cross_entropy":
        kernel = torch.ops.linclass.cross_entropy.default
        call = lambda: kernel(x, t, None, -100, 0.0, 1, with_grad)  # noqa: E731
    elif op == "cross_entropy_probs":  # against class probabilities
        kernel = torch.ops.linclass.cross_entropy_probs.default
        probs = torch.softmax(torch.randn(n, classes), 1)
        call = lambda: kernel(x, probs, None, 0.0, 1, with_grad)  # noqa: E731
    else:
        kernel = torch.ops.linclass.multi_margin_loss.default
        call = lambda: kernel(x, t, 1, 1.0, None, 1, with_grad)  # noqa: E731
    for _ in range(30):
        call()
    loops = []
    for _ in range(9):
        start = time.perf_counter()
        for _ in range(100):
            call()
        loops.append((time.perf_counter() - start) / 100)
    return sorted(loops)[4] / (n * classes) * 1e9


def keep_freed_memory():
    """glibc: no trimming of the heap's top, no mmap for blocks up to 32 MiB."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    mallopt = ctypes.CDLL(name).mallopt
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD (its maximum)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("classes", help="comma-separated class counts")
    parser.add_argument("--op", choices=["cross_entropy", "cross_entropy_probs", "multi_margin_loss"],
                        default="cross_entropy")
    parser.add_argument("--forward-only", action="store_true", help="no gradient")
    parser.add_argument("--scores", type=int, default=250_000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    print(f"linclass from {linclass.__file__}")
    print(" ".join(f"{c}:{ns_per_score(args.op, int(c), args.scores, not args.forward_only):.3f}"
                   for c in args.classes.split(",")))


if __name__ == "__main__":
    main()
