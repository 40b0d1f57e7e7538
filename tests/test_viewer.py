"""The circuit viewer, driven in headless Chromium as a user would drive it.

Each browser test renders a synthetic circuit (:mod:`tests.synthetic_graph`) to HTML,
opens it from disk, acts through the mouse and keyboard, and checks what the
page shows against ground truth computed here in Python (networkx for
ancestry, the JSON for thresholds). Any JavaScript error or console error
fails the test. The browser is the system Chromium; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pytest
import torch

from circuits.flags import load_flags
from sfc.cli import main as sfc_main
from tests.synthetic_graph import synthetic_circuit
from viz import circuit_figure, compute_dashboards, render_html

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
XSS_LABELS = {0: "<script>alert(1)</script>", 1: '<img src=x onerror="alert(2)">'}


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Viewer:
    """A page with the viewer loaded; collects JavaScript errors, dialogs and network requests."""

    def __init__(self, browser, path: Path):
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.requests: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.route("**/*", self._route)
        self.page.goto(path.as_uri())

    def _route(self, route):
        if not route.request.url.startswith(("file:", "blob:", "data:")):
            self.requests.append(route.request.url)
            return route.abort()
        return route.continue_()

    def ready(self) -> Viewer:
        self.page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        return self

    def js(self, expr: str, arg=None):
        return self.page.evaluate(expr, arg)

    def node_xy(self, node_id: str) -> tuple[float, float]:
        xy = self.js("id => window.sfcViewer.nodeClientXY(id)", node_id)
        assert xy is not None, node_id
        return xy[0], xy[1]

    def wait_render(self, before: int) -> None:
        self.page.wait_for_function("n => window.sfcViewer.renders > n", arg=before)

    def close(self) -> None:
        assert not self.errors, self.errors
        assert not self.dialogs, f"a dialog opened: {self.dialogs}"
        assert not self.requests, f"the page tried to reach the network: {self.requests}"
        self.context.close()


@pytest.fixture(scope="module")
def circuit() -> dict:
    return synthetic_circuit(n_layers=3, n_positions=6, n_nodes=40, n_edges=90, seed=3, labels=XSS_LABELS)


@pytest.fixture(scope="module")
def page_path(circuit, tmp_path_factory) -> Path:
    return render_html(circuit, tmp_path_factory.mktemp("viewer") / "circuit.html")


@pytest.fixture
def viewer(browser, page_path):
    v = Viewer(browser, page_path).ready()
    yield v
    v.close()


def graph_of(circuit: dict) -> nx.DiGraph:
    g = nx.DiGraph()
    g.add_nodes_from(n["id"] for n in circuit["nodes"])
    g.add_edges_from((e["source"], e["target"]) for e in circuit["edges"])
    return g


def isolated_feature(circuit: dict, v: Viewer) -> dict:
    """A feature node whose pixel position is not shared with another node."""
    xy = {n["id"]: v.node_xy(n["id"]) for n in circuit["nodes"]}
    for n in circuit["nodes"]:
        if n["kind"] == "metric" or n["is_error"] or n["id"] in (circuit["nodes"][i]["id"] for i in XSS_LABELS):
            continue
        x, y = xy[n["id"]]
        if all(abs(x - a) + abs(y - b) > 25 for k, (a, b) in xy.items() if k != n["id"]):
            return n
    raise AssertionError("no isolated feature node in the test circuit")


# ----------------------------------------------------------------------------- browser


def test_hover_tooltip_shows_the_nodes_site_feature_effect_and_activation(viewer, circuit):
    node = isolated_feature(circuit, viewer)
    viewer.page.mouse.move(*viewer.node_xy(node["id"]))
    tip = viewer.page.locator("#sfc-tooltip")
    tip.wait_for(state="visible")
    text = tip.inner_text()
    assert node["id"] in text
    assert node["site"] in text and str(node["feature"]) in text
    for field in ("effect", "activation"):
        shown = float(tip.locator(f"tr[data-field={field}] td").inner_text())
        assert shown == pytest.approx(node[field], rel=1e-3)
    viewer.page.mouse.move(2, 2)
    tip.wait_for(state="hidden")


def test_click_keeps_ancestors_and_descendants_lit_and_dims_the_rest(viewer, circuit):
    g = graph_of(circuit)
    node = max((n for n in circuit["nodes"] if n["kind"] != "metric"),
               key=lambda n: len(nx.ancestors(g, n["id"])) + len(nx.descendants(g, n["id"])))
    truth = {node["id"]} | nx.ancestors(g, node["id"]) | nx.descendants(g, node["id"])
    assert 1 < len(truth) < len(g), "the test circuit should have lit and dimmed nodes"
    before = viewer.js("() => window.sfcViewer.renders")
    viewer.page.mouse.click(*viewer.node_xy(node["id"]))
    viewer.wait_render(before)
    assert set(viewer.js("() => window.sfcViewer.litNodeIds()")) == truth
    dimmed = next(n for n in g if n not in truth)
    assert viewer.js("id => window.sfcViewer.nodeStyle(id).opacity", dimmed) < 0.5
    assert viewer.js("id => window.sfcViewer.nodeStyle(id).opacity", node["id"]) == 1
    panel = viewer.page.locator("#sfc-panel")
    assert panel.is_visible()
    assert viewer.page.inner_text("#sfc-panel-title") == node["id"]
    if not node["is_error"]:
        dash = circuit["dashboards"][f"{node['site']}/{node['feature']}"]
        text = panel.inner_text()
        assert "Top-activating contexts" in text and "Promoted tokens" in text
        assert viewer.page.locator("#sfc-panel .sfc-context").count() == len(dash["contexts"])
        assert json.dumps(dash["promoted"][0]["token"]) in text
    viewer.page.screenshot(path=str(Path(viewer.page.url[7:]).with_name("clicked.png")))
    before = viewer.js("() => window.sfcViewer.renders")
    viewer.page.keyboard.press("Escape")
    viewer.wait_render(before)
    assert panel.is_hidden()
    assert len(viewer.js("() => window.sfcViewer.litNodeIds()")) == len(g)


def test_threshold_sliders_keep_exactly_the_nodes_and_edges_above_them(viewer, circuit):
    slider = viewer.page.locator("#sfc-node-slider")
    before = viewer.js("() => window.sfcViewer.renders")
    slider.focus()
    for _ in range(4):  # move by keyboard: 4 pages of 100 steps, out of 1000 on a log scale
        viewer.page.keyboard.press("PageUp")
    viewer.page.wait_for_function("n => window.sfcViewer.renders > n && !document.hidden", arg=before)
    viewer.page.wait_for_timeout(100)
    t_node = float(slider.get_attribute("data-threshold"))
    edge = viewer.page.locator("#sfc-edge-value")
    edge.fill("0.05")
    edge.press("Enter")
    viewer.page.wait_for_timeout(200)
    t_edge = float(viewer.page.locator("#sfc-edge-slider").get_attribute("data-threshold"))
    assert t_node > 0 and t_edge == 0.05
    shown = {n["id"] for n in circuit["nodes"] if n["kind"] == "metric" or abs(n["effect"]) >= t_node}
    edges = [e for e in circuit["edges"]
             if e["source"] in shown and e["target"] in shown and abs(e["weight"]) >= t_edge]
    assert 1 < len(shown) < len(circuit["nodes"])
    assert set(viewer.js("() => window.sfcViewer.visibleNodeIds()")) == shown
    status = viewer.page.locator("#sfc-status")
    assert int(status.get_attribute("data-nodes")) == len(shown) - 1  # the metric is not counted
    assert int(status.get_attribute("data-edges")) == len(edges)


def test_flags_and_edited_labels_download_as_feature_flags_json(viewer, circuit, tmp_path):
    nodes = [n for i, n in enumerate(circuit["nodes"])
             if n["kind"] != "metric" and not n["is_error"] and i not in XSS_LABELS][:2]
    for k, node in enumerate(nodes):
        viewer.page.fill("#sfc-search", node["id"])
        viewer.page.press("#sfc-search", "Enter")
        viewer.page.wait_for_selector("#sfc-panel:not([hidden])")
        assert viewer.page.inner_text("#sfc-panel-title") == node["id"]
        viewer.page.check("#sfc-flag-input")
        if k == 0:
            viewer.page.fill("#sfc-label-input", "plural subject")
            viewer.page.press("#sfc-label-input", "Enter")
    with viewer.page.expect_download() as info:
        viewer.page.click("#sfc-download")
    path = tmp_path / "flags.json"
    info.value.save_as(path)
    doc = json.loads(path.read_text())
    keys = [f"{n['site']}/{n['feature']}" for n in nodes]
    assert doc["format"] == "sfc-feature-flags" and doc["version"] == 1
    assert doc["model"] == "synthetic" and doc["task"] == "synthetic"
    assert doc["flagged"] == sorted(keys)
    assert doc["labels"][keys[0]] == "plural subject"
    xss_key = "{site}/{feature}".format(**circuit["nodes"][0])
    assert doc["labels"][xss_key] == XSS_LABELS[0]  # labels from the file are kept
    flags = load_flags(path)  # the downloaded file follows the flags schema that SHIFT reads
    assert flags.keys == sorted(keys, key=lambda k: (k.split("/")[0], int(k.split("/")[1])))


def test_labels_and_tokens_are_shown_as_text_never_run(browser, tmp_path):
    c = synthetic_circuit(n_layers=2, n_positions=4, n_nodes=12, n_edges=20, seed=5, labels=XSS_LABELS)
    c["metadata"]["prompt_tokens"][1] = "</script><script>alert(3)</script>"
    key = next(k for k in c["dashboards"])
    c["dashboards"][key]["contexts"][0]["tokens"][0] = '<img src=x onerror="alert(4)">'
    c["dashboards"][key]["promoted"][0]["token"] = "</script><b>bold</b>"
    v = Viewer(browser, render_html(c, tmp_path / "xss.html")).ready()
    for i in (0, 1):
        v.js("id => window.sfcViewer.selectId(id)", c["nodes"][i]["id"])
        assert XSS_LABELS[i] in v.page.inner_text("#sfc-panel")
        v.page.mouse.move(*v.node_xy(c["nodes"][i]["id"]))
    v.js("k => window.sfcViewer.selectId(window.sfcViewer.visibleNodeIds().find(id => id.startsWith(k + '@')))",
         key)
    assert "</script><b>bold</b>" in v.page.inner_text("#sfc-panel")
    v.page.fill("#sfc-search", "img")
    v.page.wait_for_timeout(200)
    assert v.page.locator("img").count() == 0 and v.page.locator("b").count() == 0
    assert v.page.locator("script").count() == 3  # plotly.js, the data, the viewer
    assert XSS_LABELS[1] in v.page.inner_text("#sfc-results")
    v.close()


def test_empty_circuit_page_says_it_is_empty(browser, tmp_path):
    c = synthetic_circuit(n_nodes=5, n_edges=0, with_dashboards=False)
    c["nodes"] = [n for n in c["nodes"] if n["kind"] == "metric"]
    c["edges"] = []
    v = Viewer(browser, render_html(c, tmp_path / "empty.html"))
    assert "This circuit is empty" in v.page.inner_text("body")
    v.close()


# ----------------------------------------------------------------------------- Python side


def test_invalid_circuit_raises_one_clear_error_and_writes_nothing(tmp_path):
    out = tmp_path / "bad.html"
    bad = synthetic_circuit(n_nodes=5, n_edges=3)
    bad["edges"].append({"source": "nowhere/1@0", "target": "y", "weight": 1.0})
    with pytest.raises(ValueError, match="nowhere/1@0"):
        render_html(bad, out)
    with pytest.raises(ValueError, match="sfc-circuit"):
        render_html({"nodes": []}, out)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        render_html(broken, out)
    assert not out.exists()
    assert sfc_main(["view", str(broken), "--out", str(out)]) == 2
    assert not out.exists()


def test_cli_writes_a_self_contained_page(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(synthetic_circuit()))
    assert sfc_main(["view", str(path), "--out", str(tmp_path / "c.html")]) == 0
    text = (tmp_path / "c.html").read_text()
    assert "<script src=" not in text and "<link " not in text


def test_figure_rows_follow_forward_site_order_with_metric_on_top():
    c = synthetic_circuit(n_layers=3, n_positions=5, seed=2)
    fig = circuit_figure(c)
    ticks = list(fig.layout.yaxis.ticktext)
    order = c["metadata"]["sites"]
    assert ticks[-1] == "y"
    assert ticks[:-1] == [s for s in order if s in {n["site"] for n in c["nodes"] if n["kind"] != "metric"}]
    assert list(fig.layout.yaxis.tickvals) == sorted(fig.layout.yaxis.tickvals)
    nodes = fig.data[-1]
    n_err = sum(1 for n in c["nodes"] if n["is_error"])
    assert list(nodes.marker.symbol).count("triangle-up") == n_err
    summed = circuit_figure(synthetic_circuit(aggregation="sum", seed=2))
    assert summed.layout.xaxis.showticklabels is False


# ----------------------------------------------------------------------------- dashboards


def _word_model():
    """A tiny random Llama with a word-level tokenizer of its 64-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from attribution.model.wrapper import SFCModel

    words = [f"w{i}" for i in range(63)] + ["<pad>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    return SFCModel(LlamaForCausalLM(cfg), hf_tok, name="tiny-llama")


def test_dashboards_hold_the_strongest_contexts_and_direct_logit_tokens(tmp_path, monkeypatch):
    from attribution.dictionaries.kinds import random_sae
    from attribution.model import tracing

    model = _word_model()
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 63, (n,), generator=gen)) for n in (5, 7, 9, 6, 8, 4)]
    site = model.sites(["resid_0"])[0]
    sae = random_sae(site.d, 48, seed=1)
    keys = ["resid_0/3", "resid_0/10"]
    dash = compute_dashboards(model, {"resid_0": sae}, keys, texts, n_contexts=3, n_tokens=4, cache_dir=tmp_path)

    # Ground truth: each text's max activation, from an independent pass per text.
    for key in keys:
        f = int(key.split("/")[1])
        per_text = []
        for t in texts:
            acts = tracing.run(model, model.tokenize([t]), [site], None, torch.arange(1)).acts["resid_0"]
            per_text.append(float(sae.encode(acts)[0, :, f].max()))
        expect = sorted((v for v in per_text if v > 0), reverse=True)[:3]
        got = [max(c["acts"]) for c in dash[key]["contexts"]]
        assert got == pytest.approx(expect, rel=1e-4, abs=1e-4)
        logits = sae.W_dec[f] @ model.hf.get_output_embeddings().weight.T
        top = [model.tokenizer.decode([int(i)]) for i in logits.topk(4).indices]
        bottom = [model.tokenizer.decode([int(i)]) for i in (-logits).topk(4).indices]
        assert [t["token"] for t in dash[key]["promoted"]] == top
        assert [t["token"] for t in dash[key]["suppressed"]] == bottom

    # A second call with the same inputs reads the cache and never runs the model.
    monkeypatch.setattr(tracing, "run", lambda *a, **k: pytest.fail("the cache was not used"))
    assert compute_dashboards(model, {"resid_0": sae}, keys, texts, n_contexts=3, n_tokens=4,
                              cache_dir=tmp_path) == dash
    assert len(list(tmp_path.glob("dashboards-*.json"))) == 1
    # "~" is the user's home, as in a shell: the same cache, not a folder named "~".
    monkeypatch.setenv("HOME", str(tmp_path))
    assert compute_dashboards(model, {"resid_0": sae}, keys, texts, n_contexts=3, n_tokens=4, cache_dir="~") == dash
