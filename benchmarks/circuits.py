"""Benchmark: the paper's central claims on SmolLM2-135M with the default dictionaries.

For each agreement task it computes node effects for the feature circuit (the
default SAEs) and the neuron circuit (the identity at the same sites), sweeps
node thresholds on the test split, and reports

- the number of nodes needed to reach faithfulness >= 0.5, features vs neurons;
- completeness at the smallest circuit whose faithfulness is >= 0.8.

Also writes the curves as a plotly figure (``--figure PATH``, HTML; PNG if the
path ends in .png and a browser is available). Prints one JSON object.
Usage: ``python benchmarks/circuits.py [--tasks …] [--examples 32] [--method ig]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ablation.config import AblationConfig  # noqa: E402
from attribution.dictionaries.kinds import Identity  # noqa: E402
from attribution.dictionaries.store import load_cached_dictionaries  # noqa: E402
from attribution.effects import node_effects  # noqa: E402
from attribution.metrics import logit_diff  # noqa: E402
from attribution.model.loading import load_model  # noqa: E402
from circuits.tasks import TASKS, answer_ids, make_task  # noqa: E402
from sfc.pipeline import DiscoverConfig, sweep_curve, task_accuracy  # noqa: E402
from viz.curves import curve_figure  # noqa: E402


def nodes_to_reach(curve, level: float) -> int | None:
    ok = [p.n_nodes for p in curve if p.faithfulness >= level]
    return min(ok) if ok else None


def completeness_at(curve, level: float) -> float | None:
    ok = [p for p in curve if p.faithfulness >= level]
    return min(ok, key=lambda p: p.n_nodes).completeness if ok else None


def screenshot(html: str, png: str) -> None:
    """A PNG of a plotly HTML page, taken by Debian's chromium through playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1200, "height": 560})
        page.goto(Path(html).resolve().as_uri())
        page.wait_for_selector(".main-svg")
        page.screenshot(path=png, full_page=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--method", choices=["ig", "attrib"], default="ig")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--points", type=int, default=16, help="thresholds per sweep")
    parser.add_argument("--start-layer", type=int, default=None, help="default: a third of the layers")
    parser.add_argument("--figure", default="benchmarks/circuits.html", help="the curves, as offline HTML")
    parser.add_argument("--png", default=None, help="also a PNG of the curves (needs chromium)")
    parser.add_argument("--json", action="store_true", help="(the output is always one JSON object)")
    args = parser.parse_args()

    model = load_model("smollm2-135m")
    saes = load_cached_dictionaries("smollm2-135m", model=model)
    sites = [s for s in model.all_sites() if s.name in saes]
    neurons = {s.name: Identity(s.d) for s in sites}
    start = model.config.num_hidden_layers // 3 if args.start_layer is None else args.start_layer
    cfg = DiscoverConfig(n_examples=args.examples, n_test=args.test, ablation=AblationConfig(start_layer=start))
    rows, curves = {}, {}
    for name in args.tasks:
        task = make_task(name, model.tokenizer, args.examples, args.test, seed=0)
        clean = [e.clean_prefix for e in task.train]
        patch = [e.patch_prefix for e in task.train]
        good, bad = answer_ids(task.train, model.tokenizer)
        row = {"task_accuracy_test": task_accuracy(model, task.test)}
        for label, dicts in (("features", saes), ("neurons", neurons)):
            t0 = time.perf_counter()
            eff = node_effects(model, dicts, clean, patch, logit_diff(bad, good), method=args.method,
                               steps=args.steps, metric_positions="last", progress=False)
            feats, errs = eff.aggregate("none")
            top = max(float(v.abs().max()) for v in list(feats.values()) + list(errs.values()))
            thresholds = [float(t) for t in np.logspace(np.log10(top) - 5, np.log10(top), args.points)]
            curve = sweep_curve(model, dicts, feats, errs, task.test, cfg, thresholds, progress=False)
            curves[f"{name} {label}"] = curve
            row[label] = {
                "nodes_for_faithfulness_0.5": nodes_to_reach(curve, 0.5),
                "nodes_for_faithfulness_0.8": nodes_to_reach(curve, 0.8),
                "completeness_at_faithfulness_0.8": completeness_at(curve, 0.8),
                "max_faithfulness": max(p.faithfulness for p in curve),
                "seconds": round(time.perf_counter() - t0, 1),
                "curve": [vars(p) for p in curve],
            }
            print(f"[circuits] {name} {label}: {row[label]['nodes_for_faithfulness_0.5']} nodes for F>=0.5",
                  file=sys.stderr)
        f, n = row["features"]["nodes_for_faithfulness_0.5"], row["neurons"]["nodes_for_faithfulness_0.5"]
        row["neuron_over_feature_nodes_at_0.5"] = (n / f) if (f and n) else None
        rows[name] = row
    ratios = [r["neuron_over_feature_nodes_at_0.5"] for r in rows.values()]
    comps = [r["features"]["completeness_at_faithfulness_0.8"] for r in rows.values()]
    summary = {
        "tasks_with_10x_fewer_feature_nodes": sum(1 for r in ratios if r is not None and r >= 10),
        "tasks_with_completeness_le_0.2_at_f0.8": sum(1 for c in comps if c is not None and c <= 0.2),
        "method": args.method, "steps": args.steps, "start_layer": start, "examples": args.examples, "test": args.test,
        "sites": [s.name for s in sites], "threads": torch.get_num_threads(),
    }
    fig = curve_figure(curves, title="SmolLM2-135M: feature vs neuron circuits")
    fig.write_html(args.figure, include_plotlyjs=True)
    if args.png:
        screenshot(args.figure, args.png)
    print(json.dumps({"summary": summary, "tasks": rows}, indent=2))


if __name__ == "__main__":
    main()
