"""``sfc view``: turn a circuit JSON file into an interactive HTML page.

- ``sfc view circuit.json --out circuit.html`` writes one self-contained page
  (plotly.js inlined, no network needed) that opens in any browser;
- ``--dashboards dash.json`` embeds feature dashboards computed with
  :func:`viz.compute_dashboards` (a circuit file may also carry its own);
- ``--open`` opens the page in the default browser afterwards.

The circuit is validated first: an invalid file stops with one clear error and
writes nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("view", help="write an interactive HTML viewer for a circuit")
    p.add_argument("circuit", help="circuit JSON file (format sfc-circuit)")
    p.add_argument("--out", default=None, help="HTML file to write (default: the circuit's name with .html)")
    p.add_argument("--dashboards", default=None, help="JSON file of feature dashboards to embed")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sfc.cli.checks import check_readable, check_writable
    from viz.html import render_html

    circuit = check_readable(args.circuit, "circuit file")
    dashboards = None
    if args.dashboards:
        dash_path = Path(args.dashboards)
        if not dash_path.exists():
            raise FileNotFoundError(f"No dashboards file at {dash_path}: check the path.")
        try:
            dashboards = json.loads(dash_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{dash_path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    out = check_writable(Path(args.out) if args.out else circuit.with_suffix(".html"), "--out", is_file=True)
    path = render_html(circuit, out, dashboards=dashboards)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    if args.open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0
