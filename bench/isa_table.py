"""What each CPU kernel ISA gets: the loss benchmarks (bench/test_bench_losses.py) run
once per ISA with LINCLASS_CPU_ISA forced, several times, into one markdown table.

    make bench-isa      # runs the suite and writes bench/results/cpu-isa.md
    python bench/isa_table.py RESULTS_DIR RUNS --md OUT.md   (reads cpu-isa-<isa>-<run>.json)

Each cell is linclass's median time over the runs and, in brackets, the median over
the runs of torch's time / linclass's time within the same run (torch itself does not
depend on LINCLASS_CPU_ISA).
"""

import argparse
import json
import os
import platform
import statistics
from collections import defaultdict

ISAS = ("default", "avx2", "avx512")


def load(results_dir: str, runs: int):
    times = defaultdict(lambda: defaultdict(list))  # group -> (isa, impl) -> [ms per run]
    machine = {}
    for isa in ISAS:
        for r in range(1, runs + 1):
            path = os.path.join(results_dir, f"cpu-isa-{isa}-{r}.json")
            if not os.path.exists(path):
                continue
            data = json.load(open(path))
            machine = data.get("machine_info", machine)
            for b in data["benchmarks"]:
                times[b["group"]][(isa, b["params"]["impl"])].append(b["stats"]["median"] * 1e3)
    return times, machine


def size_key(group: str):
    op, shape = group.split()
    n, c = (int(v) for v in shape.split("x"))
    return op, n * c, n


def table(times) -> list[str]:
    isas = [i for i in ISAS if any((i, "linclass[cpp]") in m for m in times.values())]
    lines = ["| group | torch ms | " + " | ".join(f"{i} ms (vs torch)" for i in isas) + " |",
             "|---|---:|" + "---:|" * len(isas)]
    for group in sorted(times, key=size_key):
        m = times[group]
        torch_ms = [t for i in isas for t in m[(i, "torch")]]
        cells = [group, f"{statistics.median(torch_ms):.3f}"]
        for isa in isas:
            ours = m[(isa, "linclass[cpp]")]
            ratio = statistics.median(t / o for t, o in zip(m[(isa, "torch")], ours))
            cells.append(f"{statistics.median(ours):.3f} ({ratio:.1f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results_dir")
    ap.add_argument("runs", type=int)
    ap.add_argument("--md", required=True)
    args = ap.parse_args()
    times, machine = load(args.results_dir, args.runs)
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor() or "?")
    text = [
        "# linclass CPU kernels per ISA",
        "",
        "Produced by `make bench-isa` (bench/isa_table.py): the loss benchmarks (forward + "
        f"backward, float32, 2 threads) with LINCLASS_CPU_ISA forced, {args.runs} runs per ISA.",
        "",
        f"Machine: {cpu}, Python {machine.get('python_version', '?')}, torch "
        f"{machine.get('torch', '?')}.",
        "",
        *table(times),
        "",
    ]
    # Prose written below the table by hand (after a line "What it shows:") is kept.
    notes = ""
    if os.path.exists(args.md):
        old = open(args.md).read()
        notes = old[old.index("What it shows:"):] if "What it shows:" in old else ""
    with open(args.md, "w") as f:
        f.write("\n".join(text) + ("\n" + notes if notes else ""))


if __name__ == "__main__":
    main()
