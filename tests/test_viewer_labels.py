"""Labels and dashboards in the circuit page, driven in headless Chromium (fixtures of test_viewer).

Ground truth: the dashboards and labels written into the circuit here, the
automatic label computed by :func:`viz.labels.auto_label` from the same
dashboard (its own rule is tested by hand in test_labels), and the circuit
file read back after the round trip through the page's download.
"""

from __future__ import annotations

import json

import pytest

from circuits.graph import Circuit
from sfc.cli import main as sfc_main
from tests.synthetic_graph import synthetic_circuit
from tests.test_viewer import Viewer, browser  # noqa: F401  (the module-scoped browser fixture)
from viz import render_html
from viz.labels import LABELS_FIELD, auto_label

MARKUP = '<img src=x onerror="alert(7)">'


def _circuit() -> dict:
    c = synthetic_circuit(n_layers=2, n_positions=5, n_nodes=24, n_edges=40, seed=11)
    # One context's peak token carries markup, so that feature's automatic label does too.
    key = sorted(c["dashboards"])[0]
    ctx = c["dashboards"][key]["contexts"][0]
    peak = max(range(len(ctx["acts"])), key=lambda j: ctx["acts"][j])
    ctx["tokens"][peak] = MARKUP
    ctx["acts"][peak] = 100.0
    c["dashboards"][key] |= {"histogram": {"edges": [0.0, 1.0, 2.0, 3.0], "counts": [5, 0, 2]},
                             "density": 0.07, "n_tokens": 100}
    return c


def _overlaps(drawn: list[dict]) -> list[tuple[str, str]]:
    """Pairs of drawn label boxes [x0, y0, x1, y1] that intersect (checked pairwise, by brute force)."""
    out = []
    for i, a in enumerate(drawn):
        for b in drawn[i + 1:]:
            (a0, a1, a2, a3), (b0, b1, b2, b3) = a["box"], b["box"]
            if a0 < b2 and b0 < a2 and a1 < b3 and b1 < a3:
                out.append((a["id"], b["id"]))
    return out


def _feature_node(c: dict, key: str) -> dict:
    return next(n for n in c["nodes"] if n["kind"] != "metric" and not n["is_error"]
                and f"{n['site']}/{n['feature']}" == key)


def test_clicking_a_feature_shows_highlighted_contexts_and_its_automatic_label(browser, tmp_path):  # noqa: F811
    c = _circuit()
    key = sorted(c["dashboards"])[0]
    dash = c["dashboards"][key]
    node = _feature_node(c, key)
    v = Viewer(browser, render_html(c, tmp_path / "page.html")).ready()
    v.js("id => window.sfcViewer.selectId(id)", node["id"])
    panel = v.page.locator("#sfc-panel")
    panel.wait_for(state="visible")
    # Contexts: one line per context; exactly the tokens with a positive activation are highlighted.
    lines = panel.locator(".sfc-context")
    assert lines.count() == len(dash["contexts"])
    for i, ctx in enumerate(dash["contexts"]):
        spans = lines.nth(i).locator(".sfc-tok")
        assert [spans.nth(j).text_content() for j in range(spans.count())] == \
            [t.replace("\n", "↵") for t in ctx["tokens"]]
        lit = [bool(spans.nth(j).evaluate("e => e.style.backgroundColor")) for j in range(spans.count())]
        assert lit == [a > 0 for a in ctx["acts"]]
    # The label: automatic, from the dashboard, shown as such, markup as text.
    expect = auto_label(dash)
    assert MARKUP in expect
    row = panel.locator("tr[data-field=label]")
    assert row.locator(".sfc-auto-label").text_content() == expect
    assert row.locator(".sfc-auto-tag").text_content() == "auto"
    assert v.page.input_value("#sfc-label-input") == expect
    assert v.page.locator("img").count() == 0
    # The histogram: one bar per bin, heights relative to the fullest bin (5 -> 100 %, 2 -> 40 %).
    bars = panel.locator(".sfc-hist-bar")
    assert [bars.nth(j).evaluate("e => e.style.height") for j in range(bars.count())] == ["100%", "0%", "40%"]
    assert "active on 7.00% of 100 corpus tokens" in panel.inner_text()
    # Labels beside the nodes: feature nodes only, truncated, and the toggle hides them.
    drawn = v.js("() => window.sfcViewer.drawnLabels()")
    ids = {n["id"]: n for n in c["nodes"]}
    assert drawn and all(not ids[d["id"]]["is_error"] and ids[d["id"]]["kind"] != "metric" for d in drawn)
    assert all(len(d["text"]) <= 24 for d in drawn)
    assert _overlaps(drawn) == []
    v.page.uncheck("#sfc-labels-toggle")
    assert v.js("() => window.sfcViewer.drawnLabels()") == []
    v.page.check("#sfc-labels-toggle")
    assert v.js("() => window.sfcViewer.drawnLabels()") != []
    v.close()


def test_an_edited_label_survives_download_and_view_labels(browser, tmp_path):  # noqa: F811
    c = _circuit()
    path = tmp_path / "circuit.json"
    Circuit.from_json_dict(c).save(path)
    page = tmp_path / "page.html"
    assert sfc_main(["view", str(path), "--out", str(page)]) == 0
    key = sorted(c["dashboards"])[1]
    node = _feature_node(c, key)
    new_label = "plural noun <i>subject</i>"
    v = Viewer(browser, page).ready()
    v.js("id => window.sfcViewer.selectId(id)", node["id"])
    v.page.wait_for_selector("#sfc-panel:not([hidden])")
    v.page.fill("#sfc-label-input", new_label)
    v.page.press("#sfc-label-input", "Enter")
    assert v.js("id => window.sfcViewer.labelOf(id)", node["id"]) == {"text": new_label, "auto": False}
    with v.page.expect_download() as info:
        v.page.click("#sfc-download")
    flags = tmp_path / "flags.json"
    info.value.save_as(flags)
    v.close()
    doc = json.loads(flags.read_text())
    assert doc["labels"] == {key: new_label}  # automatic labels are not downloaded as human ones

    page2 = tmp_path / "page2.html"
    assert sfc_main(["view", str(path), "--labels", str(flags), "--out", str(page2)]) == 0
    assert Circuit.load(path).metadata.extra[LABELS_FIELD] == {key: new_label}
    v = Viewer(browser, page2).ready()
    assert v.js("id => window.sfcViewer.labelOf(id)", node["id"]) == {"text": new_label, "auto": False}
    v.js("id => window.sfcViewer.selectId(id)", node["id"])
    v.page.wait_for_selector("#sfc-panel:not([hidden])")
    row = v.page.locator("#sfc-panel tr[data-field=label]")
    assert row.locator("td").text_content() == new_label and row.locator(".sfc-auto-tag").count() == 0
    assert v.page.locator("i").count() == 0
    other = next(k for k in sorted(c["dashboards"]) if k != key)
    other_id = _feature_node(c, other)["id"]
    assert v.js("id => window.sfcViewer.labelOf(id)", other_id) == \
        {"text": auto_label(c["dashboards"][other]), "auto": True}
    v.close()


@pytest.mark.slow
def test_labels_on_a_2001_node_page_draw_without_overlaps(browser, tmp_path):  # noqa: F811
    c = synthetic_circuit(n_layers=6, n_positions=12, n_nodes=2000, n_edges=4000, seed=1)
    v = Viewer(browser, render_html(c, tmp_path / "big.html")).ready()
    drawn = v.js("() => window.sfcViewer.drawnLabels()")
    assert 0 < len(drawn) < 2000
    assert _overlaps(drawn) == []
    v.close()
