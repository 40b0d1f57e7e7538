"""``sfc shift``: debias a probe by ablating flagged features (SPEC §6).

- ``sfc shift rank --out DIR`` trains the probe on the ambiguous split, scores
  features with IG, and writes ``DIR/rank.html``: the top-ranked features with
  their dashboards, a flag checkbox each and a download button for the flags file;
- ``sfc shift run --flags auto|FILE --out DIR`` ablates the flagged features
  (``auto``: the proxy judge), retrains, runs the baselines and writes
  ``DIR/results.json``, ``DIR/results.html``, ``DIR/flags.json`` and ``DIR/edited/``.

Bad settings, data files and flags files stop with one sentence before the
model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a local folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layer", type=int, default=None, help="probe layer (default: 6 for smollm2-135m)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a train file (csv, json, jsonl, parquet)")
    p.add_argument("--test-data", default=None, help="the test file, with --data FILE")
    p.add_argument("--data-format", choices=["table", "bias_in_bios"], default="table",
                   help="bias_in_bios: LabHC/bias_in_bios files (hard_text, profession, gender)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--spurious-column", default="spurious")
    p.add_argument("--n-train", type=int, default=150, help="synthetic train bios per group (default 150)")
    p.add_argument("--n-test", type=int, default=100, help="synthetic test bios per group (default 100)")
    p.add_argument("--n-score", type=int, default=100, help="ambiguous examples scored with IG (default 100)")
    p.add_argument("--steps", type=int, default=10, help="integrated-gradients steps")
    p.add_argument("--candidates", type=int, default=1000, help="top-ranked features the proxy judge reads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--random-draws", type=int, default=5, help="draws of random features the random row averages")
    p.add_argument("--probe-standardize", choices=["global", "dimension", "none"], default="global",
                   help="input scaling while the probe trains (folded back into its weights; docs/shift.md)")
    p.add_argument("--device", default="cpu")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("shift", help="SHIFT: remove a probe's reliance on a spurious signal")
    sub = p.add_subparsers(dest="shift_command", required=True)
    r = sub.add_parser("rank", help="write a page of the top-ranked features to flag")
    _common(r)
    r.add_argument("--top", type=int, default=50, help="features on the page (default 50)")
    r.add_argument("--no-dashboards", action="store_true", help="skip the dashboards (faster)")
    r.set_defaults(func=run_rank)
    q = sub.add_parser("run", help="ablate flagged features, retrain, and write the results table")
    _common(q)
    q.add_argument("--flags", default="auto",
                   help="'auto' (the proxy judge) or a flags file: the viewer's JSON, a JSON list or a CSV")
    q.add_argument("--json", action="store_true", help="print results.json to stdout")
    q.set_defaults(func=run_run)


def _config(args):
    from ablation.shift.probe import ProbeConfig
    from ablation.shift.run import ShiftConfig, load_splits

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder: choose another path.")
    cfg = ShiftConfig(
        model=args.model, data=args.data, test_data=args.test_data, data_format=args.data_format,
        text_column=args.text_column, label_column=args.label_column, spurious_column=args.spurious_column,
        n_train=args.n_train, n_test=args.n_test, layer=args.layer, n_score=args.n_score, steps=args.steps,
        candidates=args.candidates, flags=getattr(args, "flags", "auto"), seed=args.seed, device=args.device,
        random_draws=args.random_draws, probe=ProbeConfig(standardize=args.probe_standardize),
    )
    cfg.check()
    splits = load_splits(cfg)  # data errors (a missing column, a single class) before the model loads
    return cfg, splits


def _print_bias(setup) -> None:
    counts = setup.splits.counts()
    print(f"[sfc] data: {json.dumps(counts)}", file=sys.stderr)


def run_rank(args) -> int:
    if args.top < 1:
        raise ValueError("--top must be at least 1.")
    cfg, splits = _config(args)
    from ablation.shift.run import prepare_shift
    from sfc.shift import write_rank_page

    setup = prepare_shift(cfg, splits=splits)
    _print_bias(setup)
    paths = write_rank_page(setup, args.out, top=args.top, dashboards=not args.no_dashboards)
    print(f"[sfc] {len(setup.ranking)} features with positive effect at {', '.join(setup.sites)} "
          f"(probe layer {setup.layer}); the top {min(args.top, len(setup.ranking))} are on {paths['page']}",
          file=sys.stderr)
    print(f"[sfc] flag the spurious ones there, download the flags file, then:\n"
          f"      sfc shift run --model {args.model} --flags flags.json --out {Path(args.out) / 'run'}",
          file=sys.stderr)
    return 0


def run_run(args) -> int:
    cfg, splits = _config(args)
    from ablation.shift.run import format_table, run_shift, write_results

    t0 = time.perf_counter()
    result = run_shift(cfg, splits=splits)
    result.settings["wall_time_s"] = round(time.perf_counter() - t0, 1)
    paths = write_results(result, args.out)
    print(format_table(result.rows), file=sys.stderr)
    for note in result.notes:
        print(f"[sfc] note: {note}", file=sys.stderr)
    print(f"[sfc] {len(result.flags)} features ablated (flags: {result.settings['flags_source']}); "
          f"wrote {paths['results']} and {paths['figure']}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    return 0
