"""``sfc discover``: the main job (see :mod:`sfc.pipeline`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from sfc.cli.outputs import staged


def add_parser(sub) -> None:
    p = sub.add_parser("discover", help="discover, evaluate and save a sparse feature circuit")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (embedded), an HF id or a local folder")
    p.add_argument("--task", required=True, help="simple, within_rc, across_rc, across_pp, or a .jsonl file")
    p.add_argument("--examples", type=int, default=32, help="training prompt pairs (default 32)")
    p.add_argument("--test", type=int, default=40, help="test prompt pairs for faithfulness (default 40)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dictionaries", default=None, help="folder with one dictionary sub-folder per site")
    p.add_argument("--sites", nargs="*", default=None, help="sites to use (default: all dictionaries)")
    p.add_argument("--resident-dictionaries", type=int, default=None, metavar="N",
                   help="keep the dictionaries on disk and hold at most N in memory at once (default: load "
                        "all); for dictionaries that do not fit, at the cost of reading each again per pass")
    p.add_argument("--dictionary-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="cast each dictionary to this dtype as it is loaded (default: as stored); "
                        "bfloat16 halves their memory")
    p.add_argument("--method", choices=["ig", "attrib"], default="ig")
    p.add_argument("--steps", type=int, default=10, help="integrated-gradients steps")
    p.add_argument("--edge-method", choices=["attrib", "ig"], default="attrib",
                   help="attrib: the paper's Eq. 5 (default); ig: Jacobian integrated along the IG path")
    p.add_argument("--aggregation", choices=["none", "sum"], default="none")
    p.add_argument("--node-threshold", type=float, default=0.1)
    p.add_argument("--edge-threshold", type=float, default=0.01)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--no-edges", action="store_true", help="nodes only")
    p.add_argument("--neurons", action="store_true", help="also build the neuron circuit at the same sites")
    p.add_argument("--start-layer", type=int, default=None,
                   help="evaluate sites from this layer on (default: a third of the layers, as the paper)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print metrics.json to stdout")
    from sfc.dashboards_job import add_dashboard_arguments

    add_dashboard_arguments(p, switch=True)  # --no-dashboards, --corpus, --dashboard-tokens
    p.add_argument("--estimate", action="store_true", help="print the predicted time and peak memory, run nothing")
    p.set_defaults(func=run)


def _validate(args) -> None:
    from sfc.cli.common import check_task_name

    check_task_name(args.task)
    for name in ("node_threshold", "edge_threshold"):
        value = getattr(args, name)
        if not (0 <= value < float("inf")):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}.")
    if args.examples < 1 or args.test < 1:
        raise ValueError("--examples and --test must be at least 1.")
    if args.steps < 1:
        raise ValueError("--steps must be at least 1.")
    if args.resident_dictionaries is not None and args.resident_dictionaries < 1:
        raise ValueError(f"--resident-dictionaries must be at least 1, got {args.resident_dictionaries}.")
    from sfc.cli.checks import check_discover_args

    check_discover_args(args)  # device, model, --out writable, --start-layer sign


def run(args) -> int:
    """``--estimate`` prints a prediction and writes nothing; a real run is staged
    (:func:`sfc.cli.outputs.staged`) so that ``--out`` is replaced only when it succeeds."""
    if args.estimate:
        return _job(args)
    return staged(_job)(args)


def _job(args) -> int:
    _validate(args)  # before any model work
    import torch

    from ablation.config import AblationConfig
    from attribution.dictionaries.sets import load_dictionaries
    from sfc.cli.checks import check_start_layer
    from sfc.cli.common import load_task, open_model
    from sfc.pipeline import DiscoverConfig, discover, estimate_discover, write_outputs
    from viz import render_html

    t0 = time.perf_counter()
    model = open_model(args.model, args.device)
    task = load_task(args.task, model, args.examples, args.test, args.seed)
    start_layer = args.start_layer if args.start_layer is not None else model.config.num_hidden_layers // 3
    cfg = DiscoverConfig(
        n_examples=args.examples, n_test=args.test, method=args.method, steps=args.steps,
        aggregation=args.aggregation, node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
        top_k=args.top_k, edges=not args.no_edges, edge_method=args.edge_method, seed=args.seed,
        ablation=AblationConfig(start_layer=start_layer),
    )
    out = Path(args.out if args.estimate else args.staged_out)  # see sfc.cli.outputs.staged
    runs = [("features", False, out)] + ([("neurons", True, out / "neurons")] if args.neurons else [])
    summary = {}
    for label, neurons, folder in runs:
        dicts = load_dictionaries(
            model, args.dictionaries, sites=args.sites, neurons=neurons,
            lazy=args.resident_dictionaries is not None, resident=args.resident_dictionaries or 4,  # 4: unused unless lazy
            dtype=getattr(torch, args.dictionary_dtype) if args.dictionary_dtype else None,
        )
        check_start_layer(model, dicts, start_layer, args.start_layer is not None)
        print(f"[sfc] {label}: {len(dicts)} sites, task {task.name}, {len(task.train)} pairs", file=sys.stderr)
        if args.estimate:
            est = estimate_discover(model, dicts, task, cfg)
            print(est.summary(), file=sys.stderr)
            summary[label] = est.to_dict()
            continue
        result = discover(model, dicts, task, cfg)
        result.circuit.metadata.extra.update({"neurons": neurons, "task_source": args.task})
        if not args.no_dashboards:  # dashboards + automatic labels, carried by circuit.json and the page
            from sfc.dashboards_job import dashboards_for

            dashboards_for(result.circuit, model, dicts, args, result.metrics)
        result.metrics["wall_time_s"] = round(time.perf_counter() - t0, 1)
        write_outputs(folder, result)
        render_html(result.circuit, folder / "circuit.html")
        summary[label] = result.metrics
        for note in result.metrics.get("notes", []):
            print(f"[sfc] {label}: note: {note}", file=sys.stderr)
        print(f"[sfc] {label}: {result.metrics['n_nodes']} nodes, {result.metrics['n_edges']} edges, "
              f"faithfulness {result.metrics['faithfulness']:.3f}, completeness "
              f"{result.metrics['completeness']:.3f} -> {Path(args.out) / folder.relative_to(out)}", file=sys.stderr)
    if args.json or args.estimate:
        print(json.dumps(summary["features"] if len(summary) == 1 else summary, indent=2))
    return 0
