"""``sfc dashboards``: feature dashboards for any circuit file.

``sfc dashboards CIRCUIT --out FILE.json [--corpus TEXT]`` computes the
dashboard of every feature node of ``CIRCUIT`` (top-activating contexts with
per-token activations, promoted and suppressed tokens, an activation
histogram) and writes them as JSON, keyed by feature key ``"site/feature"``,
for ``sfc view CIRCUIT --dashboards FILE.json`` or research code.

The model and dictionaries default to those the circuit names in its
metadata (``metadata.model``; dictionaries from the toolkit's cache); give
``--model`` / ``--dictionaries`` for a circuit made elsewhere. Results are
cached (``$SFC_DASHBOARDS_CACHE`` or ``<cache>/dashboards``), so a second call
is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers) -> None:
    from sfc.dashboards_job import add_dashboard_arguments

    p = subparsers.add_parser("dashboards", help="compute feature dashboards for a circuit file")
    p.add_argument("circuit", help="circuit JSON file (format sfc-circuit)")
    p.add_argument("--out", required=True, help="JSON file to write the dashboards to")
    add_model_arguments(p)
    add_dashboard_arguments(p)
    p.set_defaults(func=run)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--dictionaries``, ``--device``: what computes the dashboards."""
    p.add_argument("--model", default=None, help="model (default: the circuit's metadata.model)")
    p.add_argument("--dictionaries", default=None,
                   help="folder with one dictionary sub-folder per site (default: the toolkit's cache)")
    p.add_argument("--device", default="cpu")


def load_circuit_file(path: str | Path) -> Any:
    """The circuit at ``path``, validated; one clear error if it is missing or invalid."""
    from circuits.graph import Circuit

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No circuit file at {path}: check the path.")
    return Circuit.load(path)


def compute_for_circuit(circuit: Any, args: argparse.Namespace) -> dict:
    """Load the model and the dictionaries the circuit's features need, then compute its dashboards
    (attached to ``circuit`` with their automatic labels)."""
    from attribution.dictionaries.sets import load_dictionaries
    from sfc.cli.common import open_model
    from sfc.dashboards_job import dashboards_for
    from viz.dashboards import circuit_feature_keys, parse_feature_key

    sites = sorted({parse_feature_key(k)[0] for k in circuit_feature_keys(circuit)})
    if not sites:
        return {}
    name = args.model or circuit.metadata.model
    ids = circuit.metadata.dictionaries or {}
    if args.dictionaries is None and any(str(ids.get(s, "")).startswith("identity") for s in sites):
        raise ValueError("This circuit's nodes are neurons (identity dictionaries): dashboards of neurons "
                         "are not made from the cache; give --dictionaries.")
    model = open_model(name, args.device)
    print(f"[sfc] dashboards: {len(circuit_feature_keys(circuit))} features at {len(sites)} sites, "
          f"{args.dashboard_tokens} corpus tokens", file=sys.stderr)
    dicts = load_dictionaries(model, args.dictionaries, sites=sites)
    return dashboards_for(circuit, model, dicts, args)


def run(args: argparse.Namespace) -> int:
    from attribution.cache import atomic_write_text

    circuit = load_circuit_file(args.circuit)
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a JSON file name, e.g. {out / 'dashboards.json'}.")
    dash = compute_for_circuit(circuit, args)
    atomic_write_text(out, json.dumps(dash, ensure_ascii=False) + "\n")
    print(f"wrote {out}: dashboards of {len(dash)} features ({out.stat().st_size / 1e3:.0f} kB)")
    return 0
