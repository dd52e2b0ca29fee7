"""bench/report.py, the CPU benchmark report: a target compares two times from the same
run of the suite, and is checked on the median of those per-run ratios."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import report  # noqa: E402

GROUP = "cross_entropy 65536x10"


def _run(tmp_path, i, torch_s, ours_s, copy_s):
    rows = (("torch", torch_s), ("linclass[cpp]", ours_s), ("copy_", copy_s))
    data = {"machine_info": {}, "datetime": "2026-11-27T00:00:00", "benchmarks": [
        {"group": GROUP, "name": impl, "stats": {"median": t},
         "extra_info": {"impl": impl, "bytes": 2 * 65536 * 10 * 4}} for impl, t in rows]}
    path = tmp_path / f"cpu-{i}.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_targets_use_the_median_of_per_run_ratios(tmp_path):
    # Per run: 4.2x, 5.9x, 4.5x (median 4.5x: missed), while the ratio of the two
    # medians (3.60 / 0.642 = 5.6x) would mix torch's second run with our first.
    paths = [_run(tmp_path, 1, 2.70e-3, 0.642e-3, 0.25e-3),
             _run(tmp_path, 2, 3.60e-3, 0.611e-3, 0.25e-3),
             _run(tmp_path, 3, 3.73e-3, 0.835e-3, 0.28e-3)]
    _, groups = report.load(paths)
    text, checks = report.report({}, groups)
    (name, want, got, ok), = [c for c in checks if c[0].endswith("vs torch")]
    assert not ok and got == "4.5x (4.2x, 5.9x, 4.5x)"
    assert "| linclass[cpp] | 0.642 | 0.611–0.835 |" in text  # times: median of medians


def test_a_single_run_lists_no_brackets(tmp_path):
    _, groups = report.load([_run(tmp_path, 1, 3.0e-3, 0.5e-3, 0.25e-3)])
    _, checks = report.report({}, groups)
    assert [(c[2], c[3]) for c in checks if c[0].endswith("vs torch")] == [("6.0x", True)]


def test_class_count_sweep_has_its_own_table_and_chart(tmp_path):
    bench = []
    for c, (torch_s, ours_s) in {10: (4e-3, 1e-3), 100: (6e-3, 3e-3)}.items():
        n = 3_000_000 // c
        for mode in ("train", "eval"):
            for impl, t in (("torch", torch_s), ("linclass[cpp]", ours_s), ("copy_", 1e-3)):
                if impl == "copy_" and mode == "eval":
                    continue
                scale = 0.5 if mode == "eval" else 1.0
                bench.append({"group": f"classes cross_entropy {mode} C={c}", "name": impl,
                              "stats": {"median": t * scale},
                              "extra_info": {"impl": impl, "op": "cross_entropy", "mode": mode,
                                             "c": c, "n": n, "class_sweep": True,
                                             "bytes": (1 if mode == "eval" and impl != "copy_"
                                                       else 2) * n * c * 4}})
    path = tmp_path / "cpu-1.json"
    path.write_text(json.dumps({"machine_info": {}, "datetime": "2026-12-03T00:00:00",
                                "benchmarks": bench}))
    _, groups = report.load([str(path)])
    others, sweep = report.split_class_sweep(groups)
    assert not others and len(sweep) == 4
    text = report.class_sweep_report(sweep)
    # C = 10, training: 24 MB in 1 ms, torch 4x slower, the same bandwidth as copy_.
    assert "| 10 | 300000 | 6.0 | 24.0 | 24.0 | 4.0x | 100% |" in text
    assert "### cross_entropy, evaluation" in text
    report.class_sweep_chart(sweep, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 0
