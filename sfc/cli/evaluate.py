"""``sfc evaluate``: faithfulness and completeness of a saved circuit, or a sweep."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="faithfulness/completeness of a circuit.json (or a threshold sweep)")
    p.add_argument("circuit", help="a circuit.json written by `sfc discover`")
    p.add_argument("--sweep", action="store_true", help="sweep node thresholds (needs effects.npz beside it)")
    p.add_argument("--thresholds", type=float, nargs="*", default=None)
    p.add_argument("--dictionaries", default=None, help="dictionary folder, if not the cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from ablation.config import AblationConfig
    from attribution.dictionaries.sets import load_dictionaries
    from circuits.graph import Circuit, check_widths
    from sfc.cli.checks import check_device_flag, check_readable
    from sfc.cli.common import check_task_name, load_task, open_model
    from sfc.pipeline import DiscoverConfig, evaluate, load_effects, sweep_curve

    path = check_readable(args.circuit, "circuit file", "run `sfc discover ... --out DIR` first")
    check_device_flag(args.device)
    circuit = Circuit.load(path)  # validates the schema before any model work
    md = circuit.metadata
    effects_path = path.parent / "effects.npz"
    if args.sweep and not effects_path.exists():
        raise FileNotFoundError(f"--sweep needs {effects_path}, written by `sfc discover` beside circuit.json.")
    task_name = md.extra.get("task_source") or md.task
    if task_name is None:
        raise ValueError("The circuit does not name its task, so there is no test split to evaluate on.")
    check_task_name(task_name)
    model = open_model(md.model, args.device)
    neurons = bool(md.extra.get("neurons"))
    folder = args.dictionaries
    if folder is None and md.dictionaries and not neurons:
        first = next(iter(md.dictionaries.values()))
        folder = None if first.startswith("cache:") else str(Path(first).parent)
    dicts = load_dictionaries(model, folder, sites=list(md.sites), neurons=neurons)
    check_widths(circuit, {site: d.width for site, d in dicts.items()}, str(path))  # before any evaluation
    cfg = DiscoverConfig(n_test=int(md.extra.get("n_test", 40)), aggregation=md.aggregation,
                         ablation=AblationConfig(start_layer=int(md.extra.get("start_layer", -1))))
    task = load_task(task_name, model, 0, cfg.n_test, int(md.extra.get("seed", 0)))  # the test split only
    if args.sweep:
        feats, errs = load_effects(effects_path)
        curve = sweep_curve(model, dicts, feats, errs, task.test, cfg, args.thresholds)
        result = {"circuit": str(path), "task": md.task, "neurons": neurons,
                  "curve": [vars(p) for p in curve]}
    else:
        result = {"circuit": str(path), "task": md.task, **evaluate(model, dicts, circuit, task.test, cfg)}
    print(json.dumps(result, indent=2))
    return 0
