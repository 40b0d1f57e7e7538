"""Benchmark: the whole ``sfc shift run`` on SmolLM2-135M with the cached default dictionaries.

Runs ``python -m sfc shift run --model smollm2-135m --flags auto --out DIR`` as a
subprocess (the command a user types; dictionaries must already be cached),
and reports the results table, the issue's targets (met or not), the wall time,
the CPU time of the run and the load average before and after (the machine may
be shared). Prints one JSON object and writes it to ``--save``.

Usage: ``python benchmarks/shift.py [--out DIR] [--save benchmarks/results_shift.json] [-- extra sfc args]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGETS = [  # (row, measure, comparison, value): the table
    ("original", "worst_group_acc", "<=", 0.40),
    ("original", "gender_acc", ">=", 0.75),
    ("shift_retrain", "profession_acc", ">=", 0.85),
    ("shift_retrain", "gender_acc", "<=", 0.60),
    ("shift_retrain", "worst_group_acc", ">=", 0.75),
]


def check_targets(rows: list[dict]) -> list[dict]:
    by = {r["method"]: r for r in rows}
    out = []
    for row, key, op, value in TARGETS:
        got = by[row][key]
        out.append({"row": row, "measure": key, "target": f"{op} {value}", "measured": round(got, 4),
                    "met": got <= value if op == "<=" else got >= value})
    for key in ("profession_acc", "gender_acc", "worst_group_acc"):
        diff = abs(by["random"][key] - by["original"][key])
        out.append({"row": "random", "measure": key, "target": "within 0.03 of original",
                    "measured": round(by["random"][key], 4), "met": diff <= 0.03 + 1e-9})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default: a temporary folder)")
    ap.add_argument("--save", default=str(ROOT / "benchmarks" / "results_shift.json"))
    ap.add_argument("extra", nargs="*", help="more arguments for sfc shift run (after --)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="sfc-bench-shift-"))
    cmd = [sys.executable, "-m", "sfc", "shift", "run", "--model", "smollm2-135m", "--flags", "auto",
           "--out", str(out), *args.extra]
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    if done.returncode != 0:
        sys.exit(f"sfc shift run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    doc = json.loads((out / "results.json").read_text())
    report = {
        "command": " ".join(cmd[1:]),
        "rows": [{k: r[k] for k in ("method", "profession_acc", "gender_acc", "worst_group_acc")} for r in doc["rows"]],
        "targets": check_targets(doc["rows"]),
        "n_flagged": len(doc["flags"]),
        "bias": doc["bias"],
        "settings": {k: doc["settings"][k] for k in ("layer", "sites", "n_train", "n_test", "n_score", "steps",
                                                     "candidates", "flags_source", "n_feature_skyline",
                                                     "n_neuron_skyline")},
        "wall_s": round(wall, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cores": os.cpu_count(),
        "out": str(out),
    }
    text = json.dumps(report, indent=1)
    Path(args.save).write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
