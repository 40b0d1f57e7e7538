"""Regenerate the screenshots of tutorials/viewer.md.

- ``python tutorials/img/make_viewer_screenshots.py --circuit runs/across_rc/circuit.json
  --select resid_15/187@1``: the main walk-through. Computes dashboards for the circuit's features over
  the held-out corpus (each document cut to ``--max-tokens`` tokens), renders
  the page and writes ``real-overview.png``, ``real-hover.png``,
  ``real-selected.png`` and ``real-threshold.png``. Needs the cached model and
  dictionaries of the circuit's model (``sfc dictionaries``).
- ``python tutorials/img/make_viewer_screenshots.py``: the synthetic example
  (no model needed), ``viewer-overview.png`` only.

Pages open in headless Chromium (the system's ``/usr/bin/chromium``, never a
downloaded one). Run with ``OMP_NUM_THREADS=1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the synthetic graph is a test fixture

from tests.synthetic_graph import synthetic_circuit  # noqa: E402
from viz import render_html  # noqa: E402

HERE = Path(__file__).parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1200, "height": 720}


def _open(browser, path: Path) -> Page:
    page = browser.new_page(viewport=VIEWPORT)
    page.goto(path.as_uri())
    page.wait_for_selector("body[data-ready='1']")
    return page


def _hover(page: Page, node_id: str, out: Path) -> None:
    x, y = page.evaluate("id => window.sfcViewer.nodeClientXY(id)", node_id)
    page.mouse.move(x, y)
    page.wait_for_selector("#sfc-tooltip:not([hidden])")
    w, h = 560, 260
    left = min(max(0, x - 200), VIEWPORT["width"] - w)
    top = min(max(0, y - 60), VIEWPORT["height"] - h)
    page.screenshot(path=str(out), clip={"x": left, "y": top, "width": w, "height": h})
    page.mouse.move(5, 5)


def _select(page: Page, node_id: str, out: Path, fit_panel: bool = False) -> None:
    x, y = page.evaluate("id => window.sfcViewer.nodeClientXY(id)", node_id)
    page.mouse.click(x, y)
    page.wait_for_selector("#sfc-panel:not([hidden])")
    page.mouse.move(5, 5)
    if fit_panel:  # grow the window until the whole panel (dashboard and edges) is in view
        need = page.evaluate("() => { const p = document.getElementById('sfc-panel');"
                             " return p.getBoundingClientRect().top + p.scrollHeight + 8; }")
        page.set_viewport_size({"width": VIEWPORT["width"], "height": min(1600, max(VIEWPORT["height"], int(need)))})
    page.wait_for_timeout(300)
    page.screenshot(path=str(out))
    if fit_panel:
        page.set_viewport_size(VIEWPORT)
        page.wait_for_timeout(300)


def _threshold(page: Page, node_value: str, out: Path) -> None:
    page.keyboard.press("Escape")
    page.fill("#sfc-node-value", node_value)
    page.press("#sfc-node-value", "Enter")
    page.wait_for_timeout(300)
    page.screenshot(path=str(out))


def synthetic(browser, tmp: Path) -> None:
    """The secondary example: a synthetic circuit, overview only."""
    circuit = synthetic_circuit(n_layers=4, n_positions=8, n_nodes=60, n_edges=140, seed=7,
                                labels={0: "plural subject noun", 3: "verb agreement"})
    page = _open(browser, render_html(circuit, tmp / "synthetic.html"))
    page.screenshot(path=str(HERE / "viewer-overview.png"))
    page.close()


def _texts(tokenizer, n_texts: int, max_tokens: int) -> list[str]:
    """The first ``n_texts`` held-out documents, each cut to ``max_tokens`` tokens."""
    from attribution.dictionaries.corpus import load_corpus

    out = []
    for text in load_corpus("heldout")[:n_texts]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        out.append(tokenizer.decode(ids))
    return out


def real_dashboards(circuit: dict, n_texts: int, max_tokens: int, cache_dir: Path | None) -> dict:
    import torch

    from attribution.dictionaries.store import load_cached_dictionaries
    from attribution.model.loading import load_model
    from viz import compute_dashboards

    torch.set_num_threads(1)
    meta = circuit["metadata"]
    model = load_model(meta["model"])
    keys = sorted({f"{n['site']}/{n['feature']}" for n in circuit["nodes"]
                   if n["kind"] != "metric" and not n["is_error"]})
    sites = sorted({k.rpartition("/")[0] for k in keys})
    dictionaries = load_cached_dictionaries(meta["model"], sites, model=model)
    texts = _texts(model.tokenizer, n_texts, max_tokens)
    # Similar lengths in a batch waste less on padding; the result does not depend on the order.
    texts.sort(key=lambda t: len(model.tokenizer(t, add_special_tokens=False)["input_ids"]))
    t0 = time.perf_counter()
    dash = compute_dashboards(model, dictionaries, keys, texts, n_contexts=8, n_tokens=10,
                              cache_dir=cache_dir, batch_size=16)
    print(f"dashboards: {len(keys)} features over {len(texts)} texts in {time.perf_counter() - t0:.1f} s")
    return dash


def real(browser, tmp: Path, circuit_path: Path, args: argparse.Namespace) -> None:
    """The main walk-through: a circuit written by ``sfc discover``, with dashboards."""
    circuit = json.loads(circuit_path.read_text(encoding="utf-8"))
    dash = real_dashboards(circuit, args.texts, args.max_tokens, args.cache_dir)
    if args.save_dashboards:
        args.save_dashboards.write_text(json.dumps(dash), encoding="utf-8")
    path = render_html(circuit, tmp / "circuit.html", dashboards=dash)
    features = sorted((n for n in circuit["nodes"] if n["kind"] != "metric" and not n["is_error"]),
                      key=lambda n: -abs(n["effect"]))
    hover_id = args.hover or features[0]["id"]
    select_id = args.select or features[0]["id"]
    for node_id in (hover_id, select_id):
        if not any(n["id"] == node_id for n in circuit["nodes"]):
            raise SystemExit(f"{node_id!r} is not a node of {circuit_path}.")
    page = _open(browser, path)
    page.screenshot(path=str(HERE / "real-overview.png"))
    _hover(page, hover_id, HERE / "real-hover.png")
    _select(page, select_id, HERE / "real-selected.png", fit_panel=True)
    _threshold(page, args.node_threshold, HERE / "real-threshold.png")
    page.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--circuit", type=Path, default=None, help="circuit JSON (sfc discover); omit for the synthetic example")
    p.add_argument("--texts", type=int, default=400, help="held-out documents for the dashboards")
    p.add_argument("--max-tokens", type=int, default=64, help="cut each document to this many tokens")
    p.add_argument("--cache-dir", type=Path, default=Path("~/.cache/sfc/dashboards").expanduser())
    p.add_argument("--save-dashboards", type=Path, default=None, help="also write the dashboards JSON here")
    p.add_argument("--hover", default=None, help="node id to hover (default: the strongest feature)")
    p.add_argument("--select", default=None, help="node id to click (default: the strongest feature)")
    p.add_argument("--node-threshold", default="1", help="node threshold for the last screenshot")
    args = p.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        if args.circuit is None:
            synthetic(browser, Path(tmp))
        else:
            real(browser, Path(tmp), args.circuit, args)
        browser.close()
    print(f"screenshots written to {HERE} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
