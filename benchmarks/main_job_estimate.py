"""Benchmark: the cost estimate against the README's main job, measured.

Runs, each in a fresh process, ``sfc discover --model smollm2-135m --task across_rc
--examples 32 --out DIR`` with ``--estimate`` (the prediction: nodes and edges
time, peak memory) and then for real, and compares what the run's
``metrics.json`` records: ``timings.nodes_s``, ``timings.edges_s`` and ``peak_mb``
(the process's peak resident set after the edges, before evaluation and
dashboards). ``--resident`` adds the same pair with the dictionaries kept on disk
(``--resident-dictionaries N``). Prints one JSON object; wall and CPU time and
the load average come with each run.

Needs the embedded model and its dictionaries (``bash scripts/setup.sh`` and
``sfc dictionaries build --model smollm2-135m``). Usage, from the repository root:
``python benchmarks/main_job_estimate.py --json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB = ["discover", "--model", "smollm2-135m", "--task", "across_rc", "--examples", "32"]


def run_sfc(args: list[str]) -> tuple[dict, dict]:
    """Run ``sfc ARGS --json`` in a fresh process: its JSON output, and wall/CPU seconds and load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = open("/proc/loadavg").read().split()[:3]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "sfc", *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"sfc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads(proc.stdout), {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "loadavg_before": load,
                                     "loadavg_after": open("/proc/loadavg").read().split()[:3]}


def compare(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="sfc-main-job-") as tmp:
        out = str(Path(tmp) / "run")
        est, est_cost = run_sfc(JOB + ["--out", out, "--estimate"] + extra)
        run, run_cost = run_sfc(JOB + ["--out", out] + extra)
    measured = {"nodes_s": run["timings"]["nodes_s"], "edges_s": run["timings"]["edges_s"],
                "peak_mb": run["peak_mb"]}
    predicted = {k: est[k] for k in measured}
    return {
        "flags": extra, "predicted": predicted, "measured": measured,
        "rel_err": {k: round(abs(predicted[k] - measured[k]) / measured[k], 3) for k in measured},
        "estimate_process": est_cost, "run_process": run_cost,
        "faithfulness": run["faithfulness"], "n_nodes": run["n_nodes"], "n_edges": run["n_edges"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    parser.add_argument("--resident", type=int, default=None, metavar="N",
                        help="also run with --resident-dictionaries N")
    args = parser.parse_args()
    result = {"default": compare([])}
    if args.resident is not None:
        result["resident"] = compare(["--resident-dictionaries", str(args.resident)])
    result["estimate_max_rel_err"] = max(v for r in result.values() for v in r["rel_err"].values())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
