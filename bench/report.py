"""Turn pytest-benchmark JSON files into a markdown report and a PNG chart.

    python bench/report.py bench/results/cpu-1.json [cpu-2.json ...] --md bench/results/cpu.md

Every group (one op at one shape) lists each implementation's median time, its
effective bandwidth (the group's `bytes` / time) and its speed-up over torch; `copy_` is
the memory roofline.  With several runs of the suite (`make bench` does 3), each time is
the median of the runs' medians and the spread column shows the runs' lowest and
highest median: this machine's speed drifts between runs.  Targets (below) compare two
implementations within each run (a ratio of two times from the same run of the suite)
and are checked on the median of those per-run ratios, listed beside it.

The class-count sweep (bench/test_bench_class_counts.py) gets its own section: one
table per op and mode (training, evaluation) with GB/s at every C, and a chart of GB/s
against C with torch and copy_ as lines (`--sweep-png`, default cpu-sweep.png beside
the markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict

# (group, impl) -> minimum speed-up over torch, from the issues.
SPEEDUP_TARGETS = {
    ("cross_entropy 65536x10", "linclass[cpp]"): 5,
    ("cross_entropy 4096x1000", "linclass[cpp]"): 3,
    ("cross_entropy 1024x32000", "linclass[cpp]"): 5,
    ("multi_margin_loss 65536x10", "linclass[cpp]"): 10,
    ("multi_margin_loss 4096x1000", "linclass[cpp]"): 10,
    ("multi_margin_loss 1024x32000", "linclass[cpp]"): 10,
    ("linear_cross_entropy 40000x3073x10", "linclass[cpp]"): 1.5,
    ("linear_multi_margin_loss 40000x3073x10", "linclass[cpp]"): 1.5,
    ("linear_cross_entropy 4096x1024x32000", "linclass[cpp]"): 1.0,
    ("linear_multi_margin_loss 4096x1024x32000", "linclass[cpp]"): 1.0,
    # issue 17: no cliff between them
    **{(f"linear_{op} 10000x3073x{c}", "linclass[cpp]"): 1.5
       for op in ("cross_entropy", "multi_margin_loss") for c in (20, 100, 200)},
    ("linear_cross_entropy 4096x1024x1000", "linclass[cpp]"): 1.0,
    ("linear_multi_margin_loss 4096x1024x1000", "linclass[cpp]"): 1.0,
    # the classifier workflow (bench/test_bench_train.py): "torch" is the seed-style loop
    ("train LinearSVM 1500it 40000x3073", "linclass[cpp]"): 4,
    ("sweep 25 configs 40000x3073", "linclass[sweep]"): 10,
    # per-call cost of small problems (bench/test_bench_small.py, issue 18): what the
    # automatic choice gives, and the C++ kernel forced
    **{(f"small {op} {shape}", impl): 1.0
       for op in ("cross_entropy", "multi_margin_loss")
       for shape in ("4x10", "64x10", "200x10", "128x100")
       for impl in ("linclass[auto]", "linclass[cpp]")},
}
# (group, impl, other impl of the group) -> minimum speed-up over that other impl
RELATIVE_TARGETS = {
    # under torch.compile (bench/test_bench_compiled.py, issue 18): compiled linclass at
    # most 1.1x eager linclass's time, and >= 2x compiled torch for cross-entropy
    **{(f"compiled {op} {shape}", "linclass[compiled]", "linclass[cpp]"): 1 / 1.1
       for op in ("cross_entropy", "multi_margin_loss")
       for shape in ("65536x10", "4096x1000", "1024x32000")},
    **{(f"compiled cross_entropy {shape}", "linclass[compiled]", "torch[compiled]"): 2
       for shape in ("65536x10", "4096x1000", "1024x32000")},
    ("sweep 25 configs 40000x3073", "linclass[sweep]", "linclass[sequential]"): 2,
}
# (group, impl) -> largest peak extra memory as a fraction of torch's in the group.
MEMORY_TARGETS = {
    ("linear_cross_entropy 4096x1024x32000", "linclass[cpp]"): 0.25,
    ("linear_multi_margin_loss 4096x1024x32000", "linclass[cpp]"): 0.25,
}
ROOFLINE_TARGET = 0.60  # fraction of copy_ bandwidth, for inputs of 8 MB or more
ROOFLINE_MIN_BYTES = 8 << 20


def load(paths):
    runs = defaultdict(list)
    data = None
    for run, path in enumerate(paths):
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            runs[(b["group"], info.get("impl", b["name"]))].append((b["stats"]["median"], info, run))
    groups = defaultdict(dict)
    for (group, impl), values in runs.items():
        medians = sorted(m for m, _, _ in values)
        info = values[-1][1]
        groups[group][impl] = {
            "by_run": {run: m for m, _, run in values},
            "median": statistics.median(medians),
            "low": medians[0],
            "high": medians[-1],
            "runs": len(medians),
            "bytes": info.get("bytes"),
            "peak_mb": info.get("peak_extra_mb"),
            "info": info,
        }
    return data, groups


def fmt_ms(s):
    return f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:.0f}"


def machine_line(data):
    m = data.get("machine_info", {})
    cpu = m.get("cpu_model") or m.get("cpu", {}).get("brand_raw", "?")
    return (f"{cpu}, {m.get('threads', '?')} threads, Python {m.get('python_version', '?')}, "
            f"torch {m.get('torch', '?')}, CPU kernels for {m.get('linclass_cpu_isa', '?')}; "
            f"run {data.get('datetime', '?')[:19]}")


def per_run(num, den):
    """num's time / den's time in each run that timed both: (median, [ratios])."""
    ratios = [num["by_run"][k] / den["by_run"][k] for k in sorted(den["by_run"]) if k in num["by_run"]]
    return statistics.median(ratios), ratios


def fmt_ratios(got, ratios, fmt):
    return fmt.format(got) + (" (" + ", ".join(fmt.format(v) for v in ratios) + ")" if len(ratios) > 1 else "")


def report(data, groups):
    nruns = max((r["runs"] for g in groups.values() for r in g.values()), default=0)
    lines = [f"Machine: {machine_line(data)}.", "",
             f"Median of the timed rounds, then the median over {nruns} run(s) of the suite "
             "(spread: the runs' lowest and highest median); effective bandwidth = bytes "
             "moved / time; speed-up = torch's time / this time.", ""]
    checks = []
    for group in sorted(groups, key=_group_key):
        rows = groups[group]
        torch_t = rows.get("torch", {}).get("median")
        copy_t = rows.get("copy_", {}).get("median")
        has_mem = any(r["peak_mb"] is not None for r in rows.values())
        lines.append(f"### {group}")
        lines.append("")
        head = "| implementation | median ms | spread ms | GB/s | vs torch | of copy_ |"
        lines.append(head + (" peak extra MB |" if has_mem else ""))
        lines.append("|---|---:|---:|---:|---:|---:|" + ("---:|" if has_mem else ""))
        for impl in sorted(rows, key=_impl_key):
            r = rows[impl]
            gbs = r["bytes"] / r["median"] / 1e9 if r["bytes"] else float("nan")
            speed = f"{torch_t / r['median']:.2f}x" if torch_t else ""
            roof = f"{copy_t / r['median']:.0%}" if copy_t and impl != "copy_" else ""
            mem = f" {r['peak_mb']:.0f} |" if has_mem and r["peak_mb"] is not None else (" |" if has_mem else "")
            spread = f"{fmt_ms(r['low'])}–{fmt_ms(r['high'])}" if r["runs"] > 1 else ""
            lines.append(f"| {impl} | {fmt_ms(r['median'])} | {spread} | {gbs:.1f} | {speed} | {roof} |{mem}")
            target = SPEEDUP_TARGETS.get((group, impl))
            if target and torch_t:
                got, ratios = per_run(rows["torch"], r)
                checks.append((f"{group}: {impl} vs torch", f">= {target}x",
                               fmt_ratios(got, ratios, "{:.1f}x"), got >= target))
            for (g, i, other), want in RELATIVE_TARGETS.items():
                if (g, i) == (group, impl) and other in rows:
                    got, ratios = per_run(rows[other], r)
                    checks.append((f"{group}: {impl} vs {other}", f">= {want:.2f}x",
                                   fmt_ratios(got, ratios, "{:.2f}x"), got >= want))
            mem_target = MEMORY_TARGETS.get((group, impl))
            torch_mem = rows.get("torch", {}).get("peak_mb")
            if mem_target and torch_mem and r["peak_mb"] is not None:
                frac = r["peak_mb"] / torch_mem
                checks.append((f"{group}: {impl} peak extra memory vs torch",
                               f"<= {mem_target:.0%}", f"{frac:.0%} ({r['peak_mb']:.0f} vs {torch_mem:.0f} MB)",
                               frac <= mem_target))
            if (copy_t and impl.startswith("linclass") and r["bytes"]
                    and r["bytes"] / 2 >= ROOFLINE_MIN_BYTES and "x" in group.split()[-1]):
                frac, fracs = per_run(rows["copy_"], r)
                checks.append((f"{group}: {impl} share of copy_ bandwidth",
                               f">= {ROOFLINE_TARGET:.0%}", fmt_ratios(frac, fracs, "{:.0%}"),
                               frac >= ROOFLINE_TARGET))
        lines.append("")
    if checks:
        summary = ["## Targets", "",
                   "Each ratio is taken within one run of the suite; measured = the median of "
                   "the runs' ratios (each run's in brackets).", "",
                   "| target | wanted | measured | met |", "|---|---|---|---|"]
        summary += [f"| {name} | {want} | {got} | {'yes' if ok else '**no**'} |"
                    for name, want, got, ok in checks]
        lines = summary + [""] + lines
    return "\n".join(lines) + "\n", checks


def _group_key(g):
    op, _, shape = g.rpartition(" ")
    try:
        n, c = (int(v) for v in shape.split("x"))
    except ValueError:
        return (op, 0, 0)
    return (op, c, n)


def _impl_key(impl):
    order = ["naive", "torch", "copy_"]
    return (order.index(impl) if impl in order else 1.5, impl)


def chart(groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g for g in sorted(groups, key=_group_key) if "torch" in groups[g]]
    impls = sorted({i for g in names for i in groups[g] if i not in ("torch", "naive")}, key=_impl_key)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs, ys = [], []
        for i, g in enumerate(names):
            if impl in groups[g]:
                xs.append(i + k * width)
                ys.append(groups[g]["torch"]["median"] / groups[g][impl]["median"])
        ax.bar(xs, ys, width, label=impl)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speed-up over torch (log)")
    ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([g.replace(" ", "\n") for g in names], fontsize=8)
    ax.legend(fontsize=8)
    ax.set_title("forward + backward, median")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def split_class_sweep(groups):
    """(the other groups, the class-count sweep's groups)."""
    sweep = {g: rows for g, rows in groups.items()
             if any(r["info"].get("class_sweep") for r in rows.values())}
    return {g: rows for g, rows in groups.items() if g not in sweep}, sweep


def class_sweep_series(sweep):
    """{(op, mode): {C: {impl: row}}}, and {C: copy_ row} (copy_ runs in the training groups)."""
    series, copies = defaultdict(dict), {}
    for rows in sweep.values():
        for impl, r in rows.items():
            info = r["info"]
            if impl == "copy_":
                copies.setdefault(info["c"], r)
            else:
                series[(info["op"], info["mode"])].setdefault(info["c"], {})[impl] = r
    return series, copies


def _gbs(r):
    return r["bytes"] / r["median"] / 1e9


def class_sweep_report(sweep):
    series, copies = class_sweep_series(sweep)
    lines = ["## Class-count sweep", "",
             "N = 3,000,000 // C rows of float32 scores (12 MB) at every C; training = "
             "forward + backward (scores in, gradient out), evaluation = forward only "
             "(scores in).  GB/s = those bytes / median time; copy_ moves 12 MB in and 12 MB "
             "out.  Speed-up: torch's time / linclass's within each run (median of the runs).", ""]
    for (op, mode) in sorted(series):
        lines += [f"### {op}, {'training' if mode == 'train' else 'evaluation'}", "",
                  "| C | N | torch GB/s | linclass GB/s | copy_ GB/s | speed-up | of copy_ |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for c in sorted(series[(op, mode)]):
            rows = series[(op, mode)][c]
            ours, theirs, copy = rows.get("linclass[cpp]"), rows.get("torch"), copies.get(c)
            speed = f"{per_run(theirs, ours)[0]:.1f}x" if ours and theirs else ""
            share = f"{_gbs(ours) / _gbs(copy):.0%}" if ours and copy else ""
            cells = [f"{_gbs(r):.1f}" if r else "" for r in (theirs, ours, copy)]
            n = (ours or theirs)["info"]["n"]
            lines.append(f"| {c} | {n} | " + " | ".join(cells) + f" | {speed} | {share} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def class_sweep_chart(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series, copies = class_sweep_series(sweep)
    keys = sorted(series)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), sharey=True,
                             squeeze=False)
    for ax, key in zip(axes[0], keys):
        cs = sorted(series[key])
        for impl, style in (("linclass[cpp]", "-o"), ("torch", "-s")):
            pts = [(c, _gbs(series[key][c][impl])) for c in cs if impl in series[key][c]]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label=impl)
        pts = [(c, _gbs(copies[c])) for c in cs if c in copies]
        if pts:
            ax.plot(*zip(*pts), "--", color="gray", label="copy_")
        ax.set_xscale("log")
        ax.set_xlabel("classes C (log)")
        ax.set_title(f"{key[0]}, {'training' if key[1] == 'train' else 'evaluation'}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (12 MB of scores)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files, one per run")
    ap.add_argument("--md", required=True, help="markdown report to write")
    ap.add_argument("--png", help="chart path (default: the markdown path with .png)")
    ap.add_argument("--sweep-png", help="class-count chart (default: cpu-sweep.png beside --md)")
    ap.add_argument("--title", default="linclass CPU benchmarks")
    args = ap.parse_args()
    data, groups = load(args.json)
    groups, sweep = split_class_sweep(groups)
    body, checks = report(data, groups) if groups else (f"Machine: {machine_line(data)}.\n", [])
    if sweep:
        body += "\n" + class_sweep_report(sweep)
    with open(args.md, "w") as f:
        f.write(f"# {args.title}\n\nProduced by `make bench` (pytest-benchmark, then "
                f"`bench/report.py`).\n\n{body}")
    written = [args.md]
    if groups:
        written.append(args.png or os.path.splitext(args.md)[0] + ".png")
        chart(groups, written[-1])
    if sweep:
        written.append(args.sweep_png or os.path.join(os.path.dirname(args.md) or ".", "cpu-sweep.png"))
        class_sweep_chart(sweep, written[-1])
    missed = [c for c in checks if not c[3]]
    print(f"wrote {', '.join(written)}: {len(checks) - len(missed)}/{len(checks)} targets met")
    for name, want, got, _ in missed:
        print(f"  missed: {name}: wanted {want}, measured {got}")


if __name__ == "__main__":
    main()
