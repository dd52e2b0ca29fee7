"""GPU benchmarks: linclass's Triton and CUDA C++ losses against torch, side by side.

    python bench/gpu_bench.py --out DIR            (a CUDA machine; bench/gpu_check.sh runs it)
    python bench/gpu_bench.py --out DIR --device cpu --quick   (no GPU: tiny shapes on CPU,
                                                   Triton in interpreter mode; tests use it)

Times are medians of forward + backward steps, CUDA-synchronized (triton.testing.do_bench:
CUDA events, L2 flushed before each step).  A plain copy_ of the same bytes is timed in
the same run as the memory roofline; effective bandwidth counts the scores read and the
gradient written.  Writes gpu-<device>.json and gpu-<device>.md into DIR and checks the
GPU targets of the project.
"""

from __future__ import annotations

import argparse
import json
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


def timer(device: str):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    def cpu_median(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return cpu_median


def loss_cases(device: str, shapes, dtypes, impls):
    import linclass

    ops = {"cross_entropy": (F.cross_entropy, linclass.cross_entropy),
           "multi_margin_loss": (F.multi_margin_loss, linclass.multi_margin_loss)}
    for (n, c), (dname, dtype) in ((s, d) for s in shapes for d in dtypes.items()):
        x = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
        t = torch.randint(0, c, (n,), device=device)
        nbytes = 2 * n * c * x.element_size()
        src, dst = x.detach(), torch.empty_like(x)
        for op, (theirs, ours) in ops.items():
            group = f"{op} {n}x{c} {dname}"
            yield group, "copy_", nbytes, (lambda s=src, d=dst: d.copy_(s)), None
            yield group, "floor", nbytes, _step(_Floor.apply, x, t), None
            yield group, "torch", nbytes, _step(theirs, x, t), None
            for impl in impls:
                yield group, f"linclass[{impl}]", nbytes, _step(ours, x, t), impl


# (N, D, C, dtype): a large vocabulary (the chunked cuBLAS path) and the CIFAR-10 linear
# classifier with the bias trick (the one-kernel tl.dot path for few classes).
LINEAR_SHAPES = [(8192, 4096, 128256, torch.bfloat16), (40000, 3073, 10, torch.float32),
                 (40000, 3073, 10, torch.bfloat16)]
QUICK_LINEAR_SHAPES = [(64, 32, 3000, torch.float32), (100, 40, 10, torch.float32)]


def linear_cases(device: str, quick: bool, impls):
    """Fused linear + cross-entropy against F.linear + F.cross_entropy, with the peak
    extra memory of one step (recorded by run_cases)."""
    import linclass

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
            with linclass.backends.use(backend) if backend else _nothing():
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
        if not torch_r:
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
    for group in sorted({r["group"] for r in records}):
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for gpu-<device>.json and .md")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device (use --device cpu --quick for a smoke run)")

    import triton

    import linclass

    impls = [b for b in ("triton", "cuda") if linclass.backends.runs_on(b, args.device)]
    shapes = QUICK_SHAPES if args.quick else SHAPES
    dtypes = {"float32": torch.float32} if args.quick else DTYPES
    measure = timer(args.device)
    cases = list(loss_cases(args.device, shapes, dtypes, impls))
    cases += list(linear_cases(args.device, args.quick, impls))
    records = run_cases(cases, measure, args.device)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu-smoke"
    name = re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-")
    info = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, impls=impls, when=time.strftime("%Y-%m-%d %H:%M"))
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
