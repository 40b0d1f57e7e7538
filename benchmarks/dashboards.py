"""Benchmark: dashboards and automatic labels on the README's main job.

Runs ``python3 -m sfc discover --model smollm2-135m --task across_rc --examples 32``
twice, in fresh processes: once with ``--no-dashboards`` and once with the
default dashboards, the latter with a cold dashboard cache (a temporary
``$SFC_DASHBOARDS_CACHE``). Measured, against the targets of issue 14:

- ``frac_with_5_contexts``: feature nodes (distinct ``site/feature`` keys) whose
  dashboard has >= 5 contexts (target >= 0.95);
- ``frac_labelled``: feature keys with a non-empty label (target 1.0);
- ``dashboards_s``: the time the dashboards and labels took inside the job
  (``metrics.json`` timings), and ``extra_wall_s``: the difference in wall
  time between the two runs (target <= 60 s, or <= 35 % of the job);
  (``dashboards_frac_of_job``: ``dashboards_s`` over the job's wall time without
  them; ``..._same_run``: over the rest of the same run, which does not depend
  on the load staying the same between the two runs);
- ``page_mb``: the size of ``circuit.html`` with dashboards (target <= 15 MB).

Both runs' wall and CPU time and the load average before and after are
reported, since the machine may be shared. Prints one JSON object.

Run: ``python3 benchmarks/dashboards.py [--tokens N] [--out results.json]``.
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


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _run(cmd: list[str], env: dict[str, str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = _loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "loadavg_before": load0, "loadavg_after": _loadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="across_rc")
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=None, help="--dashboard-tokens (default: the CLI's)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-m", "sfc", "discover", "--model", "smollm2-135m", "--task", args.task,
            "--examples", str(args.examples)]
    result: dict = {"job": " ".join(base[1:]), "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, SFC_DASHBOARDS_CACHE=str(Path(tmp) / "dashboards-cache"))
        env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
        plain, dash = Path(tmp) / "plain", Path(tmp) / "dash"
        result["without_dashboards"] = _run(base + ["--out", str(plain), "--no-dashboards"], env)
        extra = ["--dashboard-tokens", str(args.tokens)] if args.tokens else []
        result["with_dashboards"] = _run(base + ["--out", str(dash)] + extra, env)
        metrics = json.loads((dash / "metrics.json").read_text())
        circuit = json.loads((dash / "circuit.json").read_text())
        cov = metrics["dashboards"]
        n_ctx = sorted(len(d["contexts"]) for d in (circuit.get("dashboards") or {}).values())
        job = result["without_dashboards"]["wall_s"]
        dash_s = metrics["timings"]["dashboards_s"]
        result |= {
            "feature_keys": cov["features"],
            "feature_nodes": sum(1 for n in circuit["nodes"] if n["kind"] != "metric" and not n["is_error"]),
            "frac_with_5_contexts": cov["frac_with_5_contexts"],
            "frac_labelled": cov["frac_labelled"],
            "contexts_min_median": [n_ctx[0], n_ctx[len(n_ctx) // 2]] if n_ctx else None,
            "corpus_tokens": cov["corpus_tokens"],
            "dashboards_s": dash_s,
            "extra_wall_s": round(result["with_dashboards"]["wall_s"] - job, 1),
            "dashboards_frac_of_job": round(dash_s / job, 3),
            # the same ratio within one run, robust to the load changing between the two runs
            "dashboards_frac_of_job_same_run": round(dash_s / (result["with_dashboards"]["wall_s"] - dash_s), 3),
            "page_mb": round((dash / "circuit.html").stat().st_size / 1e6, 2),
            "page_mb_without_dashboards": round((plain / "circuit.html").stat().st_size / 1e6, 2),
            "auto_labels_example": dict(list(circuit["metadata"]["extra"].get("auto_labels", {}).items())[:8]),
        }
        result["targets_met"] = {
            "contexts": (cov["frac_with_5_contexts"] or 0) >= 0.95,
            "labels": cov["frac_labelled"] == 1.0,
            "time": dash_s <= 60 or dash_s <= 0.35 * job,
            "page": result["page_mb"] <= 15,
        }
    text = json.dumps(result, indent=2, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
