"""Class-sharded losses at K ranks against one process on the same total work (CPU, gloo).

    python bench/distributed_bench.py                      # the issue's shapes, K = 2
    python bench/distributed_bench.py --rows 256 --classes 32000 --linear 512,256,32000
    python bench/distributed_bench.py --linear '' --probabilities   # targets of class probabilities too

One process runs linclass.cross_entropy / linear_cross_entropy on the whole problem with
K threads; K spawned ranks with 1 thread each run linclass.distributed's op on their class
shard.  Each configuration runs in fresh processes: the time is forward + backward
(median and range over --repeats, after one warm-up), and the extra memory is the peak
resident size during the runs minus the size once the inputs exist (/proc's VmHWM, reset
after the inputs are made, so it counts every allocation of the runs, torch's and gloo's).
For the score op the same processes then time each design's memory traffic with plain
torch ops: the ranks, all at once, a sum of their shard (the row statistics' read) and
a copy_ of it (the gradient pass's read and write); the one process a copy_ of all the
scores (its single pass).  Where the ops are bound by memory their times sit near these
(copy_'s ordinary stores also read each line before writing it, which the kernels'
non-temporal stores skip, so a kernel can be a little faster).  Prints a markdown
table; --out writes it too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> None:
    """Sets the peak resident size (VmHWM) to the current one (Linux: clear_refs 5), so
    the peak measured later is the op's, not the input setup's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _problem(kind, shape, rank, world, seed=0):
    """The inputs of this rank (the whole problem when world == 1)."""
    g = torch.Generator().manual_seed(seed)
    if kind in ("scores", "probs"):
        n, c = shape
        a, b = c * rank // world, c * (rank + 1) // world
        x = torch.randn(n, b - a, generator=g).requires_grad_(True)
        if kind == "probs":  # this rank's columns of (unnormalized) class probabilities
            return (x,), torch.rand(n, b - a, generator=g) * (2 / c)
        y = torch.randint(0, c, (n,), generator=g)
        return (x,), y
    n, d, c = shape
    a, b = c * rank // world, c * (rank + 1) // world
    x = torch.randn(n, d, generator=g).requires_grad_(True)
    w = (torch.randn(b - a, d, generator=g) / d ** 0.5).requires_grad_(True)
    y = torch.randint(0, c, (n,), generator=g)
    return (x, w), y


def _step(kind, tensors, y, sharded):
    import linclass
    import linclass.distributed as ld

    if kind in ("scores", "probs"):
        fn = ld.cross_entropy if sharded else linclass.cross_entropy
        loss = fn(tensors[0], y)
    else:
        fn = ld.linear_cross_entropy if sharded else linclass.linear_cross_entropy
        loss = fn(tensors[0], tensors[1], y)
    grads = torch.autograd.grad(loss, tensors)
    del grads


def _timed(step, repeats, barrier):
    times = []
    for i in range(repeats + 1):
        barrier()
        t0 = time.perf_counter()
        step()
        barrier()
        if i:  # the first run warms up (allocator, gloo buffers, caches)
            times.append(time.perf_counter() - t0)
    return times


def _measure(kind, shape, rank, world, repeats, sharded, barrier):
    tensors, y = _problem(kind, shape, rank, world)
    base = _rss_bytes()
    _reset_peak()
    times = _timed(lambda: _step(kind, tensors, y, sharded), repeats, barrier)
    memory = _peak_bytes() - base
    traffic = []
    if kind in ("scores", "probs"):
        # The memory traffic of each design with plain torch ops, after the peak memory
        # was read: the one-process kernel reads the scores and writes the gradient
        # (copy_); a rank reads its shard for the row statistics (sum) and again with
        # the gradient's write (copy_).  Targets of class probabilities are read in
        # each of those passes too (sum).
        x = tensors[0].detach()
        out = torch.empty_like(x)
        t = y if kind == "probs" else None

        def one_pass():
            out.copy_(x)
            if t is not None:
                t.sum()

        def shard_passes():
            x.sum()
            if t is not None:
                t.sum()
            one_pass()

        traffic = _timed(shard_passes if sharded else one_pass, repeats, barrier)
    return times, memory, traffic


def _rank_main(rank, world, port, kind, shape, repeats, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        queue.put((rank, _measure(kind, shape, rank, world, repeats, True, dist.barrier)))
    finally:
        dist.destroy_process_group()


def _single_main(threads, kind, shape, repeats, queue):
    torch.set_num_threads(threads)
    queue.put((0, _measure(kind, shape, 0, 1, repeats, False, lambda: None)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(kind, shape, world, repeats, sharded):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    if sharded:
        port = _free_port()
        procs = [ctx.Process(target=_rank_main, args=(r, world, port, kind, shape, repeats, queue))
                 for r in range(world)]
    else:
        procs = [ctx.Process(target=_single_main, args=(world, kind, shape, repeats, queue))]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a benchmark process failed (exit code {p.exitcode})")
    # Per rank: the slowest rank's time per step (the ranks wait for each other anyway)
    # and the largest extra memory.
    times = [max(ts) for ts in zip(*(results[r][0] for r in sorted(results)))]
    memory = max(results[r][1] for r in results)
    traffic = [max(ts) for ts in zip(*(results[r][2] for r in sorted(results)))]
    return times, memory, traffic


def _fmt_ms(ts):
    return (f"{1e3 * statistics.median(ts):.1f} ms "
            f"({1e3 * min(ts):.1f}-{1e3 * max(ts):.1f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=128256)
    parser.add_argument("--linear", default="4096,1024,128256",
                        help="N,D,C of the linear + loss op ('' to skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--linear-repeats", type=int, default=2)
    parser.add_argument("--probabilities", action="store_true",
                        help="also cross_entropy against class probabilities (N x C floats)")
    parser.add_argument("--out", help="also write the markdown table here")
    args = parser.parse_args(argv)

    configs = [("scores", (args.rows, args.classes), args.repeats,
                f"cross_entropy {args.rows} x {args.classes}")]
    if args.probabilities:
        configs.append(("probs", (args.rows, args.classes), args.repeats,
                        f"cross_entropy {args.rows} x {args.classes}, class probabilities"))
    if args.linear:
        n, d, c = (int(v) for v in args.linear.split(","))
        configs.append(("linear", (n, d, c), args.linear_repeats,
                        f"linear_cross_entropy N={n} D={d} C={c}"))
    lines = [
        f"# Class-sharded losses: {args.world} ranks x 1 thread vs 1 process x {args.world} threads",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"gloo on 127.0.0.1, float32, forward + backward; {time.strftime('%Y-%m-%d')}.",
        f"`python bench/distributed_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        "",
        "| op | 1 process: time | extra memory | per rank: time | extra memory | time ratio | memory ratio "
        "| traffic as torch ops: rank (sums + copy_) / 1 process (copy_) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, shape, repeats, name in configs:
        single_t, single_m, single_f = _run(kind, shape, args.world, repeats, sharded=False)
        shard_t, shard_m, shard_f = _run(kind, shape, args.world, repeats, sharded=True)
        traffic = f"{_fmt_ms(shard_f)} / {_fmt_ms(single_f)}" if shard_f else ""
        lines.append(
            f"| {name} | {_fmt_ms(single_t)} | {single_m / 2**20:.0f} MiB | {_fmt_ms(shard_t)} | "
            f"{shard_m / 2**20:.0f} MiB | {statistics.median(shard_t) / statistics.median(single_t):.2f}x | "
            f"{shard_m / max(single_m, 1):.0%} | {traffic} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
