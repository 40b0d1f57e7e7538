"""Regenerate the screenshots of tutorials/viewer.md: ``python tutorials/img/make_viewer_screenshots.py``.

Renders a synthetic circuit, opens it in headless Chromium (the system's
``/usr/bin/chromium``) and captures the overview, a clicked node and a raised
threshold.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from viz import render_html
from viz.synthetic import synthetic_circuit

HERE = Path(__file__).parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


def main() -> None:
    circuit = synthetic_circuit(n_layers=4, n_positions=8, n_nodes=60, n_edges=140, seed=7,
                                labels={0: "plural subject noun", 3: "verb agreement"})
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        path = render_html(circuit, Path(tmp) / "circuit.html")
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 720})
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready='1']")
        page.screenshot(path=str(HERE / "viewer-overview.png"))
        feature = next(n for n in circuit["nodes"] if n["label"] == "verb agreement")
        x, y = page.evaluate("id => window.sfcViewer.nodeClientXY(id)", feature["id"])
        page.mouse.move(x, y)
        page.wait_for_selector("#sfc-tooltip:not([hidden])")
        page.screenshot(path=str(HERE / "viewer-hover.png"), clip={"x": max(0, x - 200), "y": max(0, y - 60),
                                                                    "width": 560, "height": 260})
        page.mouse.click(x, y)
        page.wait_for_selector("#sfc-panel:not([hidden])")
        page.mouse.move(5, 5)
        page.wait_for_timeout(200)
        page.screenshot(path=str(HERE / "viewer-selected.png"))
        page.keyboard.press("Escape")
        page.fill("#sfc-node-value", "0.15")
        page.press("#sfc-node-value", "Enter")
        page.wait_for_timeout(300)
        page.screenshot(path=str(HERE / "viewer-threshold.png"))
        browser.close()


if __name__ == "__main__":
    main()
