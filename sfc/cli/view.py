"""``sfc view``: turn a circuit JSON file into an interactive HTML page.

- ``sfc view circuit.json --out circuit.html`` writes one self-contained page
  (plotly.js inlined, no network needed) that opens in any browser;
- ``--dashboards FILE.json`` embeds feature dashboards (as ``sfc dashboards``
  writes them); ``--dashboards auto`` computes them for every feature node, or
  reuses cached ones (this loads the circuit's model and dictionaries; see
  ``sfc dashboards``). A circuit file may also carry its own. Every feature with
  a dashboard and no human label gets an automatic label;
- ``--labels FILE`` reads the labels downloaded from a page (the
  ``sfc-feature-flags`` file) and keeps them in the circuit file, in
  ``metadata.extra["labels"]``, so that they show on every later page; a label
  for a feature that is not in the circuit stops the command, naming it;
- ``--open`` opens the page in the default browser afterwards.

The circuit (and any labels file) is validated first: an invalid file stops
with one clear error and writes nothing. Every write is atomic.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    from sfc.cli.dashboards import add_model_arguments
    from sfc.dashboards_job import add_dashboard_arguments

    p = subparsers.add_parser("view", help="write an interactive HTML viewer for a circuit")
    p.add_argument("circuit", help="circuit JSON file (format sfc-circuit)")
    p.add_argument("--out", default=None, help="HTML file to write (default: the circuit's name with .html)")
    p.add_argument("--dashboards", default=None, metavar="auto|FILE",
                   help="feature dashboards to embed: a JSON file (from `sfc dashboards`), or 'auto' to "
                        "compute them (or reuse cached ones)")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="labels file downloaded from a page; they are stored in the circuit file")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    add_model_arguments(p)
    add_dashboard_arguments(p)
    p.set_defaults(func=run)


def _read_dashboards(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"No dashboards file at {path}: check the path, or pass --dashboards auto.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a JSON text file: give the file `sfc dashboards` writes.") from None


def run(args: argparse.Namespace) -> int:
    from sfc.cli.checks import check_readable, check_writable
    from sfc.cli.dashboards import compute_for_circuit, load_circuit_file
    from viz.dashboards import circuit_feature_keys
    from viz.html import render_html
    from viz.labels import read_labels_file, set_labels

    path = Path(check_readable(args.circuit, "circuit file"))
    circuit = load_circuit_file(path)
    labels = None
    if args.labels:  # checked before any model work
        labels = read_labels_file(args.labels, circuit_feature_keys(circuit), circuit.metadata.model)
    dashboards = None
    if args.dashboards and args.dashboards != "auto":
        dashboards = _read_dashboards(Path(args.dashboards))
    out = check_writable(Path(args.out) if args.out else path.with_suffix(".html"), "--out", is_file=True)
    if args.dashboards == "auto":
        compute_for_circuit(circuit, args)  # attaches dashboards and automatic labels to the circuit
    if labels is not None:
        set_labels(circuit, labels)
    page = render_html(circuit, out, dashboards=dashboards)
    print(f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB)")
    if labels is not None:
        circuit.save(path)
        print(f"kept {len(labels)} labels in {path} (metadata.extra.labels)")
    if args.open:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())
    return 0
