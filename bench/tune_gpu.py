"""Launch-configuration sweep for the Triton loss kernels on the present GPU.

    python bench/tune_gpu.py --out DIR        (bench/gpu_check.sh --tune runs it)
    python bench/tune_gpu.py --out DIR --walks   only cross-entropy's large-C row walks
                                              (plain blocks against the walk options)

For each loss family (cross_entropy, multi_margin), benchmark shape and dtype it times the kernel alone
(kernels.*.launch with an explicit config; CUDA events via triton.testing.do_bench),
checks that every candidate gives the same losses and gradient as the default
configuration, and writes DIR/tuned.json ({"<family> <C> <element size>": [block,
num_warps] or, for cross-entropy's row walk, [block, num_warps, reverse,
evict]}, the fastest correct candidate; LINCLASS_TRITON_TUNED=DIR/tuned.json makes the
kernels use it) and DIR/tune.md (all timings).  It also splits the small-C op time
into kernel time and host overhead (per-step host time and a profile of the Triton op).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = [(65536, 10), (8192, 32000), (4096, 128256)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TILE = [(bm, w) for bm in (16, 64, 128, 256) for w in (2, 4, 8)]
# with --shapes: fewer, taller tiles (many rows per program at large N), at most 16384
# elements per tile
TALL_TILE = [(bm, w) for bm in (64, 256, 1024) for w in (4, 8)]
LOOP = [(bc, w) for bc in (2048, 4096, 8192, 16384) for w in (4, 8, 16)]
# Cross-entropy's two-pass walk with (reverse, evict) added: a reversed gradient pass
# starts with the blocks the first pass read last; L2 eviction hints keep the first
# pass's reads and let the gradient stores go (kernels/cross_entropy.py).  Around the
# H200's best plain walks.
WALK_BLOCKS = ((2048, 4), (4096, 8), (8192, 16))
WALKS = [(bc, w, rev, ev) for bc, w in WALK_BLOCKS for rev, ev in ((True, False), (False, True), (True, True))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--walks", action="store_true",
                    help="only cross-entropy at the large-C shapes: the plain walks of WALK_BLOCKS "
                         "against the walk options (no whole-row blocks, no host-overhead part)")
    ap.add_argument("--shapes", help="NxC,... instead of SHAPES (e.g. the tile kernels at large N)")
    ap.add_argument("--no-overhead", action="store_true", help="skip the host-overhead part")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("tune_gpu: needs a CUDA device")
    os.environ.pop("LINCLASS_TRITON_TUNED", None)
    import triton
    import triton.testing

    import linclass
    from linclass.kernels import cross_entropy as ce
    from linclass.kernels import multi_margin
    from linclass.kernels.tuning import ROW_MAX_C

    bench = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")  # noqa: E731
    tuned, lines = {}, ["# Triton launch-configuration sweep: " + torch.cuda.get_device_name(), "",
                        f"torch {torch.__version__}, triton {triton.__version__}; kernel-only median ms "
                        "(loss + gradient, one launch), copy_ of the same bytes for reference.", ""]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    shapes = [s for s in shapes if not args.walks or s[1] > 1024]
    for (n, c), (dname, dtype) in ((s, d) for s in shapes for d in DTYPES.items()):
        x = torch.randn(n, c, device="cuda", dtype=dtype)
        t = torch.randint(0, c, (n,), device="cuda")
        g = torch.empty_like(x)
        copy_ms = bench(lambda: g.copy_(x))
        const = ce.consts(t, None, -100, c, torch.float32, True)
        runs = {"cross_entropy": lambda cfg: ce.launch(x, g, t, None, -100, 0.0, const, config=cfg),
                "multi_margin": lambda cfg: multi_margin.launch(x, g, t, 1, 1.0, None, 1.0 / n,
                                                                config=cfg)}
        width = triton.next_power_of_2(c)
        loop = [(b, w) for b, w in LOOP if b < width]
        for fam, run in runs.items():
            if args.walks and fam != "cross_entropy":
                continue
            # whole-row blocks (one read): cross-entropy up to tuning.ROW_MAX_C classes
            whole = [(width, w) for w in (8, 16, 32)] if fam == "cross_entropy" and width <= ROW_MAX_C else []
            walks = [cfg for cfg in WALKS if cfg[0] < width] if fam == "cross_entropy" else []
            if args.walks:
                loop, whole = [cfg for cfg in WALK_BLOCKS if cfg[0] < width], []
            tile = [(bm, w) for bm, w in TALL_TILE if bm * width <= 16384] if args.shapes else TILE
            cands = tile if c <= ce.TILE_MAX_C else loop + walks + whole
            ref_loss = run(None).clone()
            ref_grad = g.clone()
            default_ms = bench(lambda: run(None))
            rows = []
            for cfg in cands:
                try:
                    g.fill_(float("nan"))
                    loss = run(cfg)
                    ok = (torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
                          and torch.allclose(g.float(), ref_grad.float(), rtol=1e-2, atol=1e-6))
                    ms = bench(lambda cfg=cfg: run(cfg)) if ok else float("inf")
                    rows.append((ms, cfg, "ok" if ok else "WRONG RESULT"))
                except Exception as e:  # noqa: BLE001  (an unlaunchable config is just skipped)
                    rows.append((float("inf"), cfg, f"{type(e).__name__}"))
            rows.sort(key=lambda r: r[0])
            best_ms, best_cfg, _ = rows[0]
            key = f"{fam} {c} {x.element_size()}"
            if best_ms < default_ms:
                tuned[key] = list(best_cfg)
            lines += [f"## {fam} {n}x{c} {dname}", "",
                      f"copy_ {copy_ms:.4f} ms; default config {default_ms:.4f} ms "
                      f"({copy_ms / default_ms:.0%} of copy_); best {best_cfg} {best_ms:.4f} ms "
                      f"({copy_ms / best_ms:.0%} of copy_)", "", "| config | ms | check |", "|---|---:|---|"]
            lines += [f"| {cfg} | {ms:.4f} | {note} |" for ms, cfg, note in rows]
            lines.append("")
            print(f"{key:24s} copy {copy_ms:.4f}  default {default_ms:.4f}  best {best_cfg} {best_ms:.4f}",
                  flush=True)
        del x, g
        torch.cuda.empty_cache()

    if args.walks or args.no_overhead:
        return _write(args.out, tuned, lines)

    # Host overhead at small C: per-step host time (no sync inside) against the device view.
    lines += ["## Host overhead, 65536x10 float32, forward + backward", "",
              "| op | backend | host us/step | device-timed us/step |", "|---|---|---:|---:|"]
    x = torch.randn(65536, 10, device="cuda", requires_grad=True)
    t = torch.randint(0, 10, (65536,), device="cuda")
    for name, ours, theirs in (("cross_entropy", linclass.cross_entropy, F.cross_entropy),
                               ("multi_margin_loss", linclass.multi_margin_loss, F.multi_margin_loss)):
        for backend in ("torch-eager", "triton", "cuda"):
            fn = theirs if backend == "torch-eager" else ours
            ctx = linclass.backends.use(backend) if backend != "torch-eager" else torch.autograd.enable_grad()

            def step():
                x.grad = None
                fn(x, t).backward()

            with ctx:
                for _ in range(20):
                    step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(200):
                    step()
                host = (time.perf_counter() - t0) / 200 * 1e6
                torch.cuda.synchronize()
                dev = bench(step) * 1e3
            lines.append(f"| {name} | {backend} | {host:.0f} | {dev:.0f} |")
            print(f"overhead {name} {backend}: host {host:.0f} us, device-timed {dev:.0f} us", flush=True)
    with linclass.backends.use("triton"), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            x.grad = None
            linclass.cross_entropy(x, t).backward()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    lines += ["", "## Profile of 10 Triton cross_entropy steps (65536x10)", "", "```", table, "```"]
    print(table)

    _write(args.out, tuned, lines)


def _write(out, tuned, lines):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tuned.json"), "w") as f:
        json.dump(tuned, f, indent=1)
    with open(os.path.join(out, "tune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"tune_gpu: wrote {out}/tuned.json ({len(tuned)} entries) and tune.md")


if __name__ == "__main__":
    main()
