"""Benchmark: the circuit viewer on a large circuit, in headless Chromium.

A synthetic circuit of 2,000 nodes and 20,000 edges (30 layers x 12 positions,
with dashboards for every feature) is rendered to HTML and opened from disk.
Measured:

- ``html_mb``: size of the self-contained page (target < 25 MB);
- ``render_html_s``: Python time to validate and write it;
- ``initial_render_s``: from navigation until the graph is drawn (target < 5 s);
- ``threshold_update_ms``: the median over several node-threshold slider moves
  of the time from the slider's input event until the graph is redrawn
  (target < 1 s); ``threshold_update_max_ms`` is the slowest one.

Run: ``python benchmarks/viewer.py --json`` (prints one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the synthetic graph is a test fixture

from tests.synthetic_graph import synthetic_circuit  # noqa: E402
from viz import render_html  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

SLIDER_MOVE = """async (v) => {
  const api = window.sfcViewer, s = document.getElementById('sfc-node-slider'), r0 = api.renders;
  const t0 = performance.now();
  s.value = String(v);
  s.dispatchEvent(new Event('input'));
  while (api.renders === r0) await new Promise(r => requestAnimationFrame(r));
  await new Promise(r => requestAnimationFrame(r));  // the frame that shows it
  return performance.now() - t0;
}"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--nodes", type=int, default=2000)
    ap.add_argument("--edges", type=int, default=20000)
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"this benchmark needs Chromium at {CHROMIUM}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    n_to_metric = max(1, args.nodes // 10)
    circuit = synthetic_circuit(n_layers=30, n_positions=12, n_nodes=args.nodes,
                                n_edges=args.edges - n_to_metric, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = render_html(circuit, Path(tmp) / "big.html")
        render_s = time.perf_counter() - t0
        size_mb = os.path.getsize(path) / 1e6
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            t0 = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            initial_s = time.perf_counter() - t0
            updates = [page.evaluate(SLIDER_MOVE, v) for v in (200, 400, 600, 800, 300, 0, 500, 100)]
            first_paint_ms = page.evaluate("() => window.sfcViewer.lastRenderMs")
            browser.close()
    result = {
        "nodes": len(circuit["nodes"]),
        "edges": len(circuit["edges"]),
        "features_with_dashboards": len(circuit["dashboards"]),
        "html_mb": round(size_mb, 2),
        "render_html_s": round(render_s, 2),
        "initial_render_s": round(initial_s, 2),
        "threshold_update_ms": round(statistics.median(updates), 1),
        "threshold_update_max_ms": round(max(updates), 1),
        "last_redraw_ms": round(first_paint_ms, 1),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "targets": {"html_mb": 25, "initial_render_s": 5, "threshold_update_ms": 1000},
        "js_errors": errors,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:28s} {v}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
