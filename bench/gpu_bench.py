"""GPU benchmarks: linclass's Triton and CUDA C++ losses against torch, side by side.

    python bench/gpu_bench.py --out DIR            (a CUDA machine; bench/gpu_check.sh runs it)
    python bench/gpu_bench.py --out DIR --device cpu --quick   (no GPU: tiny shapes on CPU,
                                                   Triton in interpreter mode; tests use it)

Times are medians of forward + backward steps, CUDA-synchronized (triton.testing.do_bench:
CUDA events, L2 flushed before each step).  A plain copy_ of the same bytes is timed in
the same run as the memory roofline; effective bandwidth counts the scores read and the
gradient written.  Writes gpu-<device>.json and gpu-<device>.md into DIR and checks the
GPU targets of the project.

`linclass[auto]` is what a user gets without choosing (backends.gpu_auto: CUDA C++ below
backends.TRITON_MIN_BYTES, Triton above).  A class-count sweep (SWEEP_C at three sizes)
finds where Triton overtakes the CUDA kernels; the field's anchors, Liger-Kernel's
cross-entropy and fused linear cross-entropy and cut-cross-entropy's linear
cross-entropy, run in the same tables when they are importable (bench/gpu_check.sh
installs them from ../shared/wheels).  A host-cost probe times each backend's forward +
backward at a tiny shape on the host alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(65536, 10), (8192, 32000), (4096, 128256)]
QUICK_SHAPES = [(64, 10), (4, 3000)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timer(device: str, rep: int = 200):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")

    def cpu_median(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu_median


def anchors() -> dict:
    """The field's implementations that are importable here: {name: module}."""
    found = {}
    for name, module in (("liger", "liger_kernel.ops.cross_entropy"),
                         ("liger_flce", "liger_kernel.ops.fused_linear_cross_entropy"),
                         ("cce", "cut_cross_entropy")):
        try:
            found[name] = __import__(module, fromlist=["_"])
        except Exception as e:  # noqa: BLE001  (absent or broken: the tables go without it)
            print(f"gpu_bench: anchor {name} not available ({type(e).__name__}: {e})", flush=True)
    return found


def _liger_cross_entropy(mod):
    def fn(x, t):
        return mod.LigerCrossEntropyFunction.apply(x, t, None, -100, 0.0, 0.0, "mean", None,
                                                   False, False, False)[0]

    return fn


def loss_cases(device: str, shapes, dtypes, impls, anchor_mods=None, floor=True, tag=None):
    """Forward + backward of both losses per (N, C) shape and dtype: copy_ (the roofline),
    the do-nothing floor, torch, each linclass backend, the anchors (cross-entropy)."""
    import linclass

    ops = {"cross_entropy": (F.cross_entropy, linclass.cross_entropy),
           "multi_margin_loss": (F.multi_margin_loss, linclass.multi_margin_loss)}
    anchor_mods = anchor_mods or {}
    for (n, c), (dname, dtype) in ((s, d) for s in shapes for d in dtypes.items()):
        x = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
        t = torch.randint(0, c, (n,), device=device)
        nbytes = 2 * n * c * x.element_size()
        src, dst = x.detach(), torch.empty_like(x)
        for op, (theirs, ours) in ops.items():
            group = f"{op} {n}x{c} {dname}" + (f" [{tag}]" if tag else "")
            yield group, "copy_", nbytes, (lambda s=src, d=dst: d.copy_(s)), None
            if floor:
                yield group, "floor", nbytes, _step(_Floor.apply, x, t), None
            yield group, "torch", nbytes, _step(theirs, x, t), None
            for impl in impls:
                yield group, f"linclass[{impl}]", nbytes, _step(ours, x, t), impl
            if op == "cross_entropy" and "liger" in anchor_mods:
                # Liger writes the gradient over its input: a copy of its own
                xl = x.detach().clone().requires_grad_()
                yield group, "liger", nbytes, _step(_liger_cross_entropy(anchor_mods["liger"]), xl, t), None


def autocast_cases(device: str, quick: bool, impls):
    """Both losses on bfloat16 scores under torch.autocast (a float32 loss): torch casts
    the scores to a float32 copy and its float32 gradient back; linclass's kernels read
    and write the 16-bit tensors (bench/results/autocast.md has the CPU's figures)."""
    import linclass

    ops = {"cross_entropy": (F.cross_entropy, linclass.cross_entropy),
           "multi_margin_loss": (F.multi_margin_loss, linclass.multi_margin_loss)}

    def under_autocast(fn):
        def run(x, t):
            with torch.autocast(device, dtype=torch.bfloat16):
                return fn(x, t)
        return run

    for n, c in QUICK_SHAPES[:1] if quick else [(8192, 32000)]:
        x = torch.randn(n, c, device=device, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, c, (n,), device=device)
        nbytes = 2 * n * c * x.element_size()
        for op, (theirs, ours) in ops.items():
            group = f"{op} {n}x{c} bfloat16 [autocast]"
            yield group, "torch", nbytes, _step(under_autocast(theirs), x, t), None
            for impl in impls:
                yield group, f"linclass[{impl}]", nbytes, _step(under_autocast(ours), x, t), impl


# The class-count sweep: every C at three sizes of the scores (bytes of the input), from
# host-bound (8 MiB) to device-bound (512 MiB).
SWEEP_C = [10, 100, 1000, 8192, 32000, 128256]
SWEEP_BYTES = [8 * 2**20, 64 * 2**20, 512 * 2**20]
QUICK_SWEEP_C, QUICK_SWEEP_BYTES = [10, 1000], [4000, 16000]


def sweep_shapes(classes, sizes, elem):
    return [(max(1, b // (c * elem)), c) for b in sizes for c in classes]


def sweep_cases(device, quick, impls, anchor_mods, classes=None):
    """The sweep's cases: `classes` (default SWEEP_C, or QUICK_SWEEP_C with `quick`)."""
    default, sizes = (QUICK_SWEEP_C, QUICK_SWEEP_BYTES) if quick else (SWEEP_C, SWEEP_BYTES)
    classes = classes or default
    dtypes = {"float32": torch.float32} if quick else DTYPES
    for dname, dtype in dtypes.items():
        shapes = sweep_shapes(classes, sizes, torch.empty((), dtype=dtype).element_size())
        yield from loss_cases(device, shapes, {dname: dtype}, impls, anchor_mods, floor=False,
                              tag="sweep")


# (N, D, C, dtype): a large vocabulary (the chunked cuBLAS path), the CIFAR-10 linear
# classifier with the bias trick (the one-kernel tl.dot path for few classes) on the whole
# training set and on the classic workflow's minibatch of 200 (host-bound).
LINEAR_SHAPES = [(8192, 4096, 128256, torch.bfloat16), (40000, 3073, 10, torch.float32),
                 (40000, 3073, 10, torch.bfloat16), (200, 3073, 10, torch.float32)]
QUICK_LINEAR_SHAPES = [(64, 32, 3000, torch.float32), (100, 40, 10, torch.float32)]


def linear_cases(device: str, quick: bool, impls, anchor_mods=None):
    """Fused linear + cross-entropy against F.linear + F.cross_entropy, with the peak
    extra memory of one step (recorded by run_cases)."""
    import linclass

    anchor_mods = anchor_mods or {}
    for n, d, c, dtype in QUICK_LINEAR_SHAPES if quick else LINEAR_SHAPES:
        x = (torch.randn(n, d, device=device, dtype=dtype)).requires_grad_()
        w = (torch.randn(c, d, device=device, dtype=dtype) * 0.02).requires_grad_()
        t = torch.randint(0, c, (n,), device=device)
        nbytes = 2 * (n * d + c * d) * x.element_size()
        group = f"linear_cross_entropy {n}x{d}x{c} {str(dtype).split('.')[-1]}"

        def step(fn, x=x, w=w, t=t):
            def run():
                x.grad = w.grad = None
                fn(x, w, t).backward()

            return run

        yield group, "torch", nbytes, step(lambda x, w, t: F.cross_entropy(F.linear(x, w), t)), None
        for impl in impls:
            yield group, f"linclass[{impl}]", nbytes, step(linclass.linear_cross_entropy), impl
        if c < 1000:  # the anchors are built for vocabularies (and autotune per shape)
            continue
        if "liger_flce" in anchor_mods:
            flce = anchor_mods["liger_flce"].LigerFusedLinearCrossEntropyFunction

            def liger(x, w, t, flce=flce):
                out = flce.apply(x, w, t)
                return out[0] if isinstance(out, tuple) else out

            yield group, "liger", nbytes, step(liger), None
        if "cce" in anchor_mods:  # its default: gradient filtering (filter_eps="high")
            yield group, "cce", nbytes, step(anchor_mods["cce"].linear_cross_entropy), None


class _Floor(torch.autograd.Function):
    """An op that does nothing: its forward + backward step is the host's floor for any
    autograd op (one Python call, one graph node, one backward through the engine).
    Where torch itself is near this floor, no op can be many times faster than torch."""

    @staticmethod
    def forward(ctx, x, t):
        return x.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return None, None


def _step(fn, x, t):
    def run():
        x.grad = None
        fn(x, t).backward()

    return run


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _peak_extra_mb(fn, device):
    """Peak memory one call of fn allocates beyond what was allocated before it (CUDA)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_cases(cases, measure, device):
    import linclass

    records = []
    for group, impl, nbytes, fn, backend in cases:
        try:
            with linclass.backends.use(backend) if backend not in (None, "auto") else _nothing():
                fn()  # compile / warm up outside the timing
                peak = _peak_extra_mb(fn, device) if group.startswith("linear") else None
                ms = measure(fn)
            records.append(dict(group=group, impl=impl, ms=ms, bytes=nbytes, peak_extra_mb=peak))
            print(f"{group:40s} {impl:18s} {ms:9.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001  (record and go on: one failure must not hide the rest)
            records.append(dict(group=group, impl=impl, error=f"{type(e).__name__}: {e}"))
            print(f"{group:40s} {impl:18s} FAILED {type(e).__name__}: {e}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return records


def check_targets(records):
    """The GPU targets of the project, checked on one run's numbers."""
    by = {(r["group"], r["impl"]): r for r in records if "ms" in r}
    checks = []
    groups = sorted({r["group"] for r in records})
    for g in groups:
        torch_r, copy_r = by.get((g, "torch")), by.get((g, "copy_"))
        tri, cu = by.get((g, "linclass[triton]")), by.get((g, "linclass[cuda]"))
        auto, liger = by.get((g, "linclass[auto]")), by.get((g, "liger"))
        if not torch_r:
            continue
        if auto:
            checks.append((g, "auto vs torch", ">= 1x", torch_r["ms"] / auto["ms"], 1.0))
        if g in ("cross_entropy 8192x32000 bfloat16", "cross_entropy 4096x128256 bfloat16") and tri and liger:
            checks.append((g, "triton vs liger", ">= 1x", liger["ms"] / tri["ms"], 1.0))
        if g.endswith("[sweep]"):
            continue
        if g.startswith("cross_entropy 8192x32000 bfloat16") and tri:
            checks.append((g, "triton vs torch", ">= 2x", torch_r["ms"] / tri["ms"], 2.0))
            if copy_r:
                checks.append((g, "triton share of copy_ bandwidth", ">= 70%",
                               copy_r["ms"] / tri["ms"], 0.70))
        if g.startswith("multi_margin_loss") and tri:
            checks.append((g, "triton vs torch", ">= 5x", torch_r["ms"] / tri["ms"], 5.0))
        if cu and "x" in g and not g.startswith("linear"):
            checks.append((g, "cuda vs torch", ">= 1x", torch_r["ms"] / cu["ms"], 1.0))
        if g.startswith("linear_cross_entropy 8192x4096x128256") and tri:
            checks.append((g, "triton time vs torch", ">= 1x", torch_r["ms"] / tri["ms"], 1.0))
            if tri.get("peak_extra_mb") and torch_r.get("peak_extra_mb"):
                checks.append((g, "triton peak memory vs torch", "<= 25%",
                               tri["peak_extra_mb"] / torch_r["peak_extra_mb"], None))
    return [dict(target=f"{g}: {what}", wanted=want, measured=got,
                 bound=_bound(by, g) if what.endswith("vs torch") else None,
                 met=(got <= 0.25) if need is None else got >= need)
            for g, what, want, got, need in checks]


def _bound(by, group):
    """The best speed-up over torch any op could show in `group`: torch's time over the
    slower of the two floors, the copy_ of the same bytes and the do-nothing autograd op."""
    torch_r, copy_r, floor_r = (by.get((group, k)) for k in ("torch", "copy_", "floor"))
    if not (torch_r and copy_r and floor_r):
        return None
    return torch_r["ms"] / max(copy_r["ms"], floor_r["ms"])


def triton_resources():
    """Registers and spills of every Triton kernel this process compiled (linclass.kernels),
    from the CompiledKernel objects in the JIT caches: the GPU's own compile of what ran,
    next to tests/triton_aot.py's ahead-of-time view.  Best effort across Triton versions."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import linclass.kernels as pkg

    out, seen = [], set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, fn in vars(mod).items():
            if not isinstance(fn, JITFunction) or id(fn) in seen:
                continue
            seen.add(id(fn))
            for entry in getattr(fn, "device_caches", {}).values():
                for cache in (e for e in entry if isinstance(e, dict)):
                    for k in cache.values():
                        if not hasattr(k, "_init_handles"):
                            continue
                        try:
                            k._init_handles()
                            src = getattr(k, "src", None)
                            names = getattr(getattr(src, "fn", None), "arg_names", [])
                            consts = {}
                            for key, v in (getattr(src, "constants", None) or {}).items():
                                i = key[0] if isinstance(key, tuple) and key else key
                                consts[names[i] if isinstance(i, int) and i < len(names) else str(key)] = v
                            out.append(dict(kernel=f"{info.name}.{name}", num_warps=k.metadata.num_warps,
                                            regs=k.n_regs, spills=k.n_spills,
                                            constexprs={c: str(v) for c, v in consts.items()
                                                        if c.isupper()}))
                        except Exception as e:  # noqa: BLE001  (a report, never a failure)
                            out.append(dict(kernel=f"{info.name}.{name}", error=repr(e)[:200]))
    return out


def _sweep_key(group):
    """(op, dtype, C, N) of a sweep group "op NxC dtype [sweep]"."""
    op, shape, dtype, _ = group.split()
    n, c = (int(v) for v in shape.split("x"))
    return op, dtype, c, n


def crossovers(records):
    """Per (op, dtype, C) of the sweep: the input size (MiB) from which Triton's forward +
    backward beats the CUDA kernels', interpolated (log-log) between the two sweep sizes
    that bracket it; 0 when Triton wins at every size, inf when it never does."""
    by = {(r["group"], r["impl"]): r["ms"] for r in records if "ms" in r}
    series = {}
    for g in {r["group"] for r in records if r["group"].endswith("[sweep]")}:
        tri, cu = by.get((g, "linclass[triton]")), by.get((g, "linclass[cuda]"))
        if tri and cu:
            op, dtype, c, n = _sweep_key(g)
            mib = n * c * (2 if dtype == "bfloat16" else 4) / 2**20
            series.setdefault((op, dtype, c), []).append((mib, cu / tri))
    out = {}
    for key, pts in series.items():
        pts.sort()
        if pts[0][1] >= 1:
            out[key] = (0.0, pts)
            continue
        cross = float("inf")
        for (b1, r1), (b2, r2) in zip(pts, pts[1:]):
            if r1 < 1 <= r2:
                f = (0 - math.log(r1)) / (math.log(r2) - math.log(r1))
                cross = b1 * (b2 / b1) ** f
                break
        out[key] = (cross, pts)
    return out


def sweep_lines(records):
    """The class-count sweep as one table per op and dtype, and where Triton overtakes CUDA."""
    groups = sorted({r["group"] for r in records if r["group"].endswith("[sweep]")}, key=_sweep_key)
    if not groups:
        return []
    by = {(r["group"], r["impl"]): r.get("ms") for r in records}
    impls = [i for i in ("torch", "linclass[auto]", "linclass[triton]", "linclass[cuda]", "liger", "copy_")
             if any((g, i) in by for g in groups)]
    lines = ["", "## Class-count sweep", "",
             "Forward + backward ms at three sizes of the scores; `auto` is the automatic choice "
             f"(CUDA C++ below {linclass_threshold_mib()} MiB of input, Triton above).", ""]
    for op_dtype in dict.fromkeys(_sweep_key(g)[:2] for g in groups):
        lines += [f"### {op_dtype[0]} {op_dtype[1]}", "",
                  "| C | N | MiB | " + " | ".join(i.replace("linclass[", "").rstrip("]") for i in impls)
                  + " | auto vs torch |", "|" + "---:|" * (len(impls) + 4)]
        for g in (g for g in groups if _sweep_key(g)[:2] == op_dtype):
            _, dtype, c, n = _sweep_key(g)
            mib = n * c * (2 if dtype == "bfloat16" else 4) / 2**20
            cells = [f"{by[(g, i)]:.3f}" if by.get((g, i)) else "-" for i in impls]
            t, a = by.get((g, "torch")), by.get((g, "linclass[auto]"))
            vs = f"{t / a:.2f}x" if t and a else ""
            lines.append(f"| {c} | {n} | {mib:.3g} | " + " | ".join(cells) + f" | {vs} |")
        lines.append("")
    cross = crossovers(records)
    if cross:
        lines += ["### Where Triton overtakes the CUDA kernels", "",
                  "CUDA time over Triton time at each size (> 1: Triton faster), and the input size "
                  "from which Triton is faster (log-log interpolation).", "",
                  "| op | dtype | C | cuda / triton by MiB | Triton faster from MiB |", "|---|---|---:|---|---:|"]
        for (op, dtype, c), (mib, pts) in sorted(cross.items()):
            ratios = ", ".join(f"{b:.0f}: {r:.2f}" for b, r in pts)
            lines.append(f"| {op} | {dtype} | {c} | {ratios} | {mib:.0f} |")
    return lines


def linclass_threshold_mib():
    import linclass

    return linclass.backends.TRITON_MIN_BYTES // 2**20


def host_probe(impls, device, steps=200):
    """Host time of one forward + backward per implementation, at a shape whose kernels
    take microseconds (4096 x 10 float32): the wall time of `steps` unsynchronized steps
    over `steps` (the GPU idles, so this is the host's time), and a profile of the Triton
    cross-entropy's steps (printed)."""
    import cProfile
    import io
    import pstats

    import linclass

    x = torch.randn(4096, 10, device=device, requires_grad=True)
    t = torch.randint(0, 10, (4096,), device=device)
    cands = [("floor", _Floor.apply, None), ("torch cross_entropy", F.cross_entropy, None),
             ("torch multi_margin_loss", F.multi_margin_loss, None)]
    for impl in impls:
        cands += [(f"{impl} cross_entropy", linclass.cross_entropy, impl),
                  (f"{impl} multi_margin_loss", linclass.multi_margin_loss, impl)]
    out = []
    for name, fn, backend in cands:
        step = _step(fn, x, t)
        with linclass.backends.use(backend) if backend else _nothing():
            for _ in range(min(20, steps)):
                step()
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            us = (time.perf_counter() - t0) / steps * 1e6
            if name == "triton cross_entropy":
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(steps):
                    step()
                prof.disable()
                _sync(device)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
                print(f"gpu_bench: host profile of {steps} Triton cross-entropy steps at 4096x10\n"
                      + text.getvalue(), flush=True)
        out.append(dict(impl=name, us=us))
        print(f"host 4096x10 float32 {name:28s} {us:8.1f} us per step", flush=True)
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def host_lines(host):
    if not host:
        return []
    lines = ["", "## Host time per forward + backward", "",
             "4096 x 10 float32, the GPU idle: wall time of 200 unsynchronized steps over 200.", "",
             "| implementation | us per step |", "|---|---:|"]
    return lines + [f"| {h['impl']} | {h['us']:.1f} |" for h in host]


def write_report(records, checks, info, out_dir, name):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"gpu-{name}.json"), "w") as f:
        json.dump(dict(info=info, records=records, targets=checks), f, indent=1)
    lines = [f"# linclass GPU benchmarks: {info['device']}", "",
             f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}; "
             f"{info['when']}. Forward + backward, median of CUDA-event-timed steps "
             "(triton.testing.do_bench). GB/s counts the scores read and the gradient written; "
             "`copy_` of the same bytes is the roofline; `floor` is an autograd op that does "
             "nothing (the host's cost of one forward + backward step, the other floor).", "",
             "## Targets", "",
             "`bound`: torch's time over the slower of `copy_` and `floor`, the best ratio any "
             "op could reach there.", "",
             "| target | wanted | measured | met | bound |", "|---|---|---|---|---|"]
    if info.get("tuned"):
        lines[-3:-3] = [f"Triton launch configurations from this run's sweep (LINCLASS_TRITON_TUNED): "
                        f"`{json.dumps(info['tuned'])}`.", ""]
    for c in checks:
        shown = f"{c['measured']:.0%}" if c["wanted"].endswith("%") else f"{c['measured']:.2f}x"
        bound = f"{c['bound']:.2f}x" if c.get("bound") else ""
        lines.append(f"| {c['target']} | {c['wanted']} | {shown} | {'yes' if c['met'] else '**no**'} | {bound} |")
    lines += sweep_lines(records) + host_lines(info.get("host") or [])
    for group in sorted({r["group"] for r in records if not r["group"].endswith("[sweep]")}):
        rows = [r for r in records if r["group"] == group]
        base = next((r["ms"] for r in rows if r["impl"] == "torch" and "ms" in r), None)
        copy = next((r["ms"] for r in rows if r["impl"] == "copy_" and "ms" in r), None)
        lines += ["", f"### {group}", "", "| implementation | median ms | GB/s | vs torch | of copy_ | peak extra MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            if "ms" not in r:
                lines.append(f"| {r['impl']} | failed: {r['error'][:80]} | | | | |")
                continue
            gbs = r["bytes"] / r["ms"] / 1e6 if r.get("bytes") else float("nan")
            vs = f"{base / r['ms']:.2f}x" if base else ""
            of = f"{copy / r['ms']:.0%}" if copy and r["impl"] not in ("copy_", "floor") else ""
            peak = f"{r['peak_extra_mb']:.0f}" if r.get("peak_extra_mb") is not None else ""
            lines.append(f"| {r['impl']} | {r['ms']:.3f} | {gbs:.0f} | {vs} | {of} | {peak} |")
    kernels = info.get("triton_kernels") or []
    if kernels:
        spilled = [k for k in kernels if k.get("spills")]
        lines += ["", "## Compiled Triton kernels", "",
                  f"{len(kernels)} kernels compiled in this run; {len(spilled)} spill "
                  f"(most registers: {max((k.get('regs') or 0) for k in kernels)} per thread).", ""]
        lines += [f"- spills {k['spills']} B: {k['kernel']} num_warps={k['num_warps']} "
                  f"regs={k['regs']} {k['constexprs']}" for k in spilled]
    with open(os.path.join(out_dir, f"gpu-{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _dist_version(anchor):
    from importlib import metadata

    try:
        return metadata.version("cut-cross-entropy" if anchor == "cce" else "liger-kernel")
    except metadata.PackageNotFoundError:
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu-<device>.json and .md")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the class-count sweep")
    ap.add_argument("--sweep-only", action="store_true", help="only the class-count sweep")
    ap.add_argument("--sweep-c", help="the sweep's class counts, e.g. 10,100 (default: SWEEP_C)")
    ap.add_argument("--no-anchors", action="store_true", help="without Liger and cut-cross-entropy")
    ap.add_argument("--name", help="report name (default: the device's)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (use --device cpu --quick for a smoke run)")

    import triton

    import linclass

    impls = [b for b in ("triton", "cuda") if linclass.backends.runs_on(b, args.device)]
    if args.device == "cuda":
        impls = ["auto"] + impls
    forced = [i for i in impls if i != "auto"]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = {"float32": torch.float32} if args.quick else DTYPES
    anchor_mods = {} if args.no_anchors else anchors()
    sweep_c = [int(c) for c in args.sweep_c.split(",")] if args.sweep_c else None
    records, host = [], []
    if not args.sweep_only:
        host = host_probe(forced, args.device, steps=10 if args.quick else 200)
        records += run_cases(list(loss_cases(args.device, shapes, dtypes, impls, anchor_mods)),
                             timer(args.device), args.device)
        records += run_cases(list(linear_cases(args.device, args.quick, impls, anchor_mods)),
                             timer(args.device), args.device)
        records += run_cases(list(autocast_cases(args.device, args.quick, impls)),
                             timer(args.device), args.device)
    if not args.no_sweep:
        records += run_cases(list(sweep_cases(args.device, args.quick, impls, anchor_mods, sweep_c)),
                             timer(args.device, rep=100), args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu-smoke"
    name = args.name or re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-")
    info = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, impls=impls, when=time.strftime("%Y-%m-%d %H:%M"),
                anchors={k: getattr(m, "__version__", None) or _dist_version(k) for k, m in anchor_mods.items()},
                triton_min_bytes=linclass.backends.TRITON_MIN_BYTES, host=host)
    if os.environ.get("LINCLASS_TRITON_TUNED"):
        with open(os.environ["LINCLASS_TRITON_TUNED"]) as f:
            info["tuned"] = json.load(f)
    if args.device == "cuda":
        try:
            info["triton_kernels"] = triton_resources()
        except Exception as e:  # noqa: BLE001  (a report, never a failure)
            info["triton_kernels"] = [dict(kernel="?", error=repr(e)[:200])]
        for k in info["triton_kernels"]:
            if k.get("spills") or k.get("error"):
                print("gpu_bench: triton kernel", k, flush=True)
    checks = check_targets(records)
    write_report(records, checks, info, args.out, name)
    met = sum(c["met"] for c in checks)
    print(f"gpu_bench: wrote {args.out}/gpu-{name}.md; targets met {met}/{len(checks)}")
    failed = [r for r in records if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
