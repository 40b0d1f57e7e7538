"""Sweep of the catalog's circuit size, start layer and ablation (issue 17's own > other target).

It reads the samples and representations of a catalog folder already built (by default the
full benchmark run's, ``benchmarks/catalog.py --out /tmp/catalog-bench``): the first
``--samples`` of them are the samples ``sfc catalog build --samples N`` would collect. It
clusters them as the CLI does, splits each cluster's members with the package's
``make_job``, computes each cluster's node effects once, and scores every combination of
``--top-k`` and ``--start-layers`` on them. Faithfulness is the package's (``--check`` asserts
that the shared shortcut equals ``ablation.evaluate.faithfulness`` on the first combination).
Circuits are the ``top_k`` nodes of the summed effects without edges or pruning, which is
the CLI's circuit whenever pruning drops no node (it dropped none where checked).

Usage: ``python benchmarks/catalog_sweep.py --samples 1000 --clusters 25 --ablations zero mean
--top-k 128 512 2048 --start-layers 20 --out DIR`` (writes ``DIR/sweep.json``, prints a summary).
Summaries of the two sweeps behind the defaults: ``benchmarks/results_catalog_sweep.json``.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

# Run from anywhere: the repository's packages come first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--src", default="/tmp/catalog-bench")
ap.add_argument("--samples", type=int, default=400)
ap.add_argument("--clusters", type=int, default=10)
ap.add_argument("--ablations", nargs="+", default=["zero"])
ap.add_argument("--metrics", nargs="+", default=["neg_log_prob"])
ap.add_argument("--top-k", nargs="+", type=int, default=[32])
ap.add_argument("--start-layers", nargs="+", type=int, default=[10])
ap.add_argument("--train", type=int, default=16)
ap.add_argument("--cluster-ids", nargs="+", type=int, default=None)
ap.add_argument("--check", action="store_true", help="assert equality with faithfulness() for the first combo")
ap.add_argument("--out", required=True)
args = ap.parse_args()
torch.set_num_threads(1)

from ablation.config import AblationConfig  # noqa: E402
from ablation.evaluate import ablated_metric, endpoints, faithfulness, prepare_ablation, score  # noqa: E402
from attribution.effects import node_effects  # noqa: E402
from circuits.build import build_circuit, circuit_masks  # noqa: E402
from circuits.graph import METRIC_ID  # noqa: E402
from circuits.quanta import affinity_from_blocks, cluster, pad_batch  # noqa: E402
from sfc.catalog import (  # noqa: E402
    CatalogConfig,
    CatalogWorker,
    NamedLoader,
    _load_npy,
    _ratio,
    load_samples,
    make_job,
    sample_shards,
    summarize,
)

src = Path(args.src)
t0 = time.perf_counter()
model, dicts = NamedLoader("smollm2-135m")()
dd = dict(dicts)
widths = {n: d.width for n, d in dd.items()}
samples = load_samples(src)[: args.samples]
reps = np.concatenate([_load_npy(src / "reps" / (p.stem + ".npy")) for p in sample_shards(src)])[: args.samples]
labels = cluster(affinity_from_blocks(1, lambda i: reps), args.clusters, 0)
members = [np.flatnonzero(labels == c).tolist() for c in range(args.clusters)]
print("sizes", [len(m) for m in members], flush=True)
base = CatalogConfig(samples=args.samples, clusters=args.clusters, n_train=args.train)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
results, timing = {}, {}
sites = [s for s in model.all_sites() if s.name in dd]


def tick(name, t):
    timing.setdefault(name, []).append(round(time.perf_counter() - t, 2))


def rounded(v):
    return None if v is None else round(v, 4)



cids = args.cluster_ids if args.cluster_ids is not None else range(args.clusters)
for cid in cids:
    job = make_job(cid, members, samples, base)
    for abl in args.ablations:
        for met in args.metrics:
            cfg = replace(base, ablation=abl, metric=met)
            w = CatalogWorker(None, cfg, loaded=(model, dicts))
            t = time.perf_counter()
            batch = pad_batch([s.tokens for s in job.train], device=model.device)
            effects = node_effects(model, dd, batch, None, w._metric(job.train), sites=sites, method=cfg.method,
                                   steps=cfg.steps, ablation=abl, metric_positions="last", progress=False)
            tick("effects", t)
            circuits = {k: build_circuit(effects, None, model=model, aggregation="sum", node_threshold=0.0, edge_threshold=0.0,
                                         top_k=k, dictionaries=w.ids, task="c", prune=False) for k in args.top_k}
            for sl in args.start_layers:
                conf = AblationConfig(kind=abl, start_layer=sl)
                row = {}
                for which, group in (("own", job.own), ("other", job.other)):
                    if not group:
                        row[which] = {k: None for k in args.top_k}
                        continue
                    t = time.perf_counter()
                    eb = pad_batch([s.tokens for s in group], device=model.device)
                    metric = w._metric(group)
                    setup = prepare_ablation(model, eb, dd, conf)
                    try:
                        m_full, m_empty = endpoints(model, eb, setup, metric)
                    except ValueError:
                        row[which] = {k: None for k in args.top_k}
                        continue
                    row[which] = {}
                    for k, circ in circuits.items():
                        masks = circuit_masks(circ, widths, None)
                        m_c = ablated_metric(model, eb, setup, masks, metric).mean().item()
                        row[which][k] = score(m_c, m_full, m_empty)
                        if args.check:
                            ref = faithfulness(model, eb, dd, masks, metric, config=conf).faithfulness
                            assert abs(ref - row[which][k]) < 1e-6, (ref, row[which][k])
                            print("check ok", ref)
                            args.check = False
                    row[which + "_gap"] = m_full - m_empty
                    tick("eval", t)
                for k, circ in circuits.items():
                    nodes = [n.id for n in circ.nodes if n.id != METRIC_ID]
                    key = f"abl={abl} met={met} k={k} sl={sl}"
                    results.setdefault(key, []).append({"cluster": cid, "size": len(members[cid]),
                        "own": row["own"][k], "other": row["other"][k], "own_gap": row.get("own_gap"),
                        "other_gap": row.get("other_gap"), "nodes": nodes})
                    print(f"c{cid} {key}: own={rounded(row['own'][k])} other={rounded(row['other'][k])}", flush=True)
    summary = {key: summarize([{"faithfulness_own": r["own"], "faithfulness_other": r["other"],
                                "ratio": _ratio(r["own"], r["other"])} for r in rows], args.samples)
               for key, rows in results.items()}
    (out / "sweep.json").write_text(json.dumps({"args": vars(args), "sizes": [len(m) for m in members], "summary": summary,
        "results": results, "timing": timing, "wall_s": round(time.perf_counter() - t0, 1)}, indent=1))
print("wall", round(time.perf_counter() - t0, 1), {k: round(sum(v), 1) for k, v in timing.items()})
for key, s in summary.items():
    fo, ft = s["faithfulness_own"], s["faithfulness_other"]
    print(f"{key}: frac {s['fraction_own_above_other']} n={s['n_evaluated']} med own {fo and fo['median']} med other {ft and ft['median']}")
