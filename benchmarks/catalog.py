"""The catalog on SmolLM2-135M with its default dictionaries (issue targets in docs/catalog.md).

    python benchmarks/catalog.py --samples 2000 --clusters 50 --out /tmp/catalog-bench   # the full target run
    python benchmarks/catalog.py --samples 200 --clusters 10 --ray-jobs 4 --rss-clusters 10 20

Prints one JSON object:

- ``run``: one in-process build of the catalog (samples, clusters): wall and CPU
  time per stage, throughput (samples/s, clusters/min), the load average;
- ``ray``: the cluster stage alone, ``--ray-jobs`` cluster jobs on one Ray worker
  and on two (one torch thread each): wall time including actor start-up, the
  steady-state rate (results after the first, per second) and the speed-up;
- ``rss``: the driver's peak RSS (VmHWM) after the ``a``-th and after the ``b``-th
  cluster of the in-process run (``--rss-clusters a b``), and their ratio;
- ``faithfulness``: the catalog's summary: own and other-cluster faithfulness and
  the distribution of their ratio.

The machine's load average is reported at the start and end: on a shared machine
wall times are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--clusters", type=int, default=50)
    ap.add_argument("--ray-jobs", type=int, default=6, help="cluster jobs per Ray measurement (0: skip Ray)")
    ap.add_argument("--rss-clusters", type=int, nargs=2, default=(10, 50))
    ap.add_argument("--train", type=int, default=16)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--other", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the in-process run")
    ap.add_argument("--out", default="/tmp/sfc-catalog-bench")
    args = ap.parse_args()

    import torch

    from attribution.dictionaries.corpus import load_corpus
    from sfc.catalog import (
        CatalogConfig,
        NamedLoader,
        cluster_samples,
        collect_samples,
        load_samples,
        make_job,
        run_jobs,
        token_rows,
        write_catalog,
        write_cluster,
    )

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cfg = CatalogConfig(samples=args.samples, clusters=args.clusters, n_train=args.train, n_eval=args.eval,
                        n_other=args.other)
    loader = NamedLoader("smollm2-135m")
    load_start = _load()
    t0, c0 = time.perf_counter(), _cpu()
    model, dicts = loader()
    t_load = time.perf_counter() - t0
    rows = token_rows(model.tokenizer, load_corpus("train"), cfg.max_context + 1)
    t1, c1 = time.perf_counter(), _cpu()
    n = collect_samples(out, model, dicts, rows, cfg, progress=False)
    t2, c2 = time.perf_counter(), _cpu()
    members = cluster_samples(out, cfg, n)
    t3, c3 = time.perf_counter(), _cpu()
    samples = load_samples(out)
    hwm = {}
    jobs = (make_job(c, members, samples, cfg) for c in range(cfg.clusters))
    done = 0
    for result in run_jobs(jobs, cfg.clusters, lambda: _worker(cfg, model, dicts), loader, cfg, progress=False):
        write_cluster(out, result)
        done += 1
        hwm[done] = _hwm_mb()
    t4, c4 = time.perf_counter(), _cpu()
    catalog = write_catalog(out, samples, members, model, {"model": "smollm2-135m"})
    t5, c5 = time.perf_counter(), _cpu()
    a, b = (min(x, cfg.clusters) for x in args.rss_clusters)
    report = {
        "config": {"samples": args.samples, "clusters": args.clusters, "n_train": args.train, "n_eval": args.eval,
                   "n_other": args.other, "torch_threads": args.threads, "cpu_count": os.cpu_count()},
        "loadavg_start": load_start,
        "run": {
            "n_samples": n, "n_clusters": cfg.clusters,
            "wall_s": {"load": round(t_load, 1), "samples_and_representations": round(t2 - t1, 1),
                       "clustering": round(t3 - t2, 1), "circuits": round(t4 - t3, 1), "catalog": round(t5 - t4, 1),
                       "total": round(t5 - t0, 1)},
            "cpu_s": {"samples_and_representations": round(c2 - c1, 1), "clustering": round(c3 - c2, 1),
                      "circuits": round(c4 - c3, 1), "total": round(c5 - c0, 1)},
            "samples_per_s": round(n / (t2 - t1), 3), "clusters_per_min": round(60 * cfg.clusters / (t4 - t3), 3),
        },
        "rss": {"peak_mb_after": {str(a): round(hwm[a], 1), str(b): round(hwm[b], 1)},
                "ratio": round(hwm[b] / hwm[a], 4)},
        "faithfulness": catalog["summary"],
    }
    if args.ray_jobs:
        report["ray"] = _ray(args.ray_jobs, members, samples, cfg, loader)
    report["loadavg_end"] = _load()
    print(json.dumps(report, indent=1))


def _worker(cfg, model, dicts):
    from sfc.catalog import CatalogWorker

    return CatalogWorker(None, cfg, loaded=(model, dicts))


def _ray(n_jobs: int, members, samples, cfg, loader) -> dict:
    from sfc.catalog import make_job, run_jobs

    out = {}
    for workers in (1, 2):
        jobs = (make_job(c % cfg.clusters, members, samples, cfg) for c in range(n_jobs))
        t0 = time.perf_counter()
        stamps = []
        for _ in run_jobs(jobs, n_jobs, None, loader, cfg, workers=workers, torch_threads=1, progress=False):
            stamps.append(time.perf_counter())
        wall = time.perf_counter() - t0
        steady = (len(stamps) - workers) / (stamps[-1] - stamps[workers - 1]) if len(stamps) > workers else None
        out[f"{workers}_workers"] = {"jobs": n_jobs, "wall_s": round(wall, 1),
                                     "steady_jobs_per_s": None if steady is None else round(steady, 4),
                                     "first_result_s": round(stamps[0] - t0, 1)}
    one, two = out["1_workers"], out["2_workers"]
    out["speedup_wall"] = round(one["wall_s"] / two["wall_s"], 3)
    if one["steady_jobs_per_s"] and two["steady_jobs_per_s"]:
        out["speedup_steady"] = round(two["steady_jobs_per_s"] / one["steady_jobs_per_s"], 3)
    return out


if __name__ == "__main__":
    main()
