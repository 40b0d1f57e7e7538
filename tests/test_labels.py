"""Automatic labels, corpora for dashboards, the labels round trip and the dashboards commands.

Ground truth is computed here: labels by hand from a dashboard written out in
the test, activation histograms from an independent forward pass per text,
corpus pieces by re-tokenising them, and label files checked against the
circuit's own node list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from circuits.graph import Circuit
from sfc.cli import main as sfc_main
from tests.synthetic_graph import synthetic_circuit
from tests.test_viewer import _word_model
from viz.dashboards import (
    DEFAULT_CORPUS_TOKENS,
    HIST_BINS,
    circuit_feature_keys,
    compute_dashboards,
    corpus_texts,
    read_corpus_file,
)
from viz.html import viewer_payload
from viz.labels import (
    AUTO_LABELS_FIELD,
    LABELS_FIELD,
    attach_dashboards,
    auto_label,
    read_labels_file,
    set_labels,
)


def _ctx(tokens: list[str], acts: list[float]) -> dict:
    return {"tokens": tokens, "acts": acts}


# ----------------------------------------------------------------------------- auto labels


def test_auto_label_names_the_peak_tokens_then_the_promoted_tokens():
    dash = {
        "contexts": [
            _ctx(["The", " keys", " are"], [0.0, 0.5, 3.0]),   # peak " are" (3.0)
            _ctx(["dogs", " were", " here"], [0.1, 2.0, 0.2]),  # peak " were" (2.0)
            _ctx(["cats", " are"], [0.0, 1.5]),                 # peak " are" again: 3.0 + 1.5
            _ctx(["a", " b"], [0.0, 0.0]),                      # never fires: ignored
        ],
        "promoted": [{"token": " is", "value": 2.0}, {"token": " is", "value": 1.9}, {"token": "\n", "value": 1.0}],
        "suppressed": [{"token": " was", "value": -1.0}],
    }
    # By hand: " are" scores 4.5 and " were" 2.0; promoted " is", then (the repeat skipped) the newline.
    assert auto_label(dash) == "are · were → is, ↵"
    assert auto_label(dash, k=1) == "are → is"
    assert auto_label({"contexts": [], "promoted": [{"token": " ", "value": 1.0}]}) == "(inactive on corpus) → ␣"
    assert auto_label({}) == "(inactive on corpus)"


# ----------------------------------------------------------------------------- corpus


def test_corpus_texts_are_exact_pieces_of_the_documents_within_the_token_budget():
    model = _word_model()
    docs = [" ".join(f"w{i % 60}" for i in range(n)) for n in (3, 150, 7, 40)]
    pieces = corpus_texts(model.tokenizer, 100, docs, max_tokens=16)
    lengths = [len(model.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces]
    assert all(1 <= n <= 16 for n in lengths)
    assert all(any(p in d for d in docs) for p in pieces)
    assert 100 <= sum(lengths) < 100 + 16  # stops at the first piece that reaches the budget
    assert lengths == sorted(lengths)  # shortest first, for little padding
    assert "w0 w1 w2" in pieces  # the first document, whole


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"  \n\n \t\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not UTF-8 text"),
    (b"text\x00with NUL", "NUL bytes"),
])
def test_a_corpus_file_that_is_empty_or_not_text_is_refused(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_corpus_file(path)
    with pytest.raises(FileNotFoundError, match="No corpus file"):
        read_corpus_file(tmp_path / "missing.txt")


def test_corpus_file_paragraphs_are_its_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first line\ncontinues here\n\n\nsecond  paragraph\r\n\r\nthird")
    assert read_corpus_file(path) == ["first line continues here", "second paragraph", "third"]


def test_a_bad_corpus_stops_the_commands_before_any_model_work(tmp_path, monkeypatch, capsys):
    import sfc.cli.common as common

    monkeypatch.setattr(common, "open_model", lambda *a, **k: pytest.fail("the model was loaded"))
    circuit = tmp_path / "c.json"
    circuit.write_text(json.dumps(synthetic_circuit(n_nodes=8, n_edges=6)))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "d.json"
    with pytest.raises(SystemExit) as exc:
        sfc_main(["dashboards", str(circuit), "--out", str(out), "--corpus", str(empty)])
    assert exc.value.code == 2
    assert "is empty" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        sfc_main(["discover", "--task", "simple", "--out", str(tmp_path / "run"), "--corpus", str(empty)])
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- histogram


def test_histogram_and_density_count_every_nonzero_activation_of_the_corpus(tmp_path):
    from attribution.dictionaries.kinds import random_sae
    from attribution.model import tracing

    model = _word_model()
    gen = torch.Generator().manual_seed(1)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 63, (n,), generator=gen)) for n in (5, 9, 3, 7)]
    site = model.sites(["resid_1"])[0]
    sae = random_sae(site.d, 40, seed=2)
    keys = ["resid_1/4", "resid_1/11"]
    dash = compute_dashboards(model, {"resid_1": sae}, keys, texts, n_contexts=2, batch_size=3, progress=False)
    for key in keys:
        f = int(key.split("/")[1])
        vals, n = [], 0
        for t in texts:  # one unpadded pass per text
            acts = tracing.run(model, model.tokenize([t]), [site], None, torch.arange(1)).acts["resid_1"]
            a = sae.encode(acts)[0, :, f]
            vals += [float(v) for v in a if v > 0]
            n += a.shape[0]
        h = dash[key]["histogram"]
        assert dash[key]["n_tokens"] == n
        assert dash[key]["density"] == pytest.approx(len(vals) / n, abs=1e-6)
        assert sum(h["counts"]) == len(vals) and len(h["counts"]) == HIST_BINS
        assert h["edges"][0] == 0 and h["edges"][-1] == pytest.approx(max(vals), abs=1e-4)
        width = max(vals) / HIST_BINS
        first = sum(1 for v in vals if v < width * (1 - 1e-6))
        assert h["counts"][0] == first


# ----------------------------------------------------------------------------- labels in the circuit


def _synthetic(tmp_path: Path, **kw) -> tuple[Path, dict]:
    c = synthetic_circuit(n_layers=2, n_positions=4, n_nodes=14, n_edges=20, seed=7, **kw)
    path = tmp_path / "circuit.json"
    Circuit.from_json_dict(c).save(path)
    return path, c


def _flags_file(path: Path, labels: dict, model: str = "synthetic") -> Path:
    path.write_text(json.dumps({"format": "sfc-feature-flags", "version": 1, "model": model, "labels": labels,
                                "flagged": []}))
    return path


def test_labels_file_for_another_circuit_lists_its_unknown_feature_keys_and_changes_nothing(tmp_path, capsys):
    path, c = _synthetic(tmp_path)
    before = path.read_bytes()
    keys = circuit_feature_keys(c)
    flags = _flags_file(tmp_path / "flags.json", {keys[0]: "ok", "resid_1/999999": "x", "mlp_0/888888": "y"})
    assert sfc_main(["view", str(path), "--labels", str(flags), "--out", str(tmp_path / "p.html")]) == 2
    err = capsys.readouterr().err
    assert "2 feature(s) that are not in this circuit" in err
    assert "mlp_0/888888" in err and "resid_1/999999" in err
    assert path.read_bytes() == before and not (tmp_path / "p.html").exists()
    other = _flags_file(tmp_path / "other.json", {keys[0]: "ok"}, model="gpt2")
    with pytest.raises(ValueError, match="model 'gpt2'"):
        read_labels_file(other, keys, "synthetic")


def test_view_labels_are_kept_in_the_circuit_metadata_and_round_trip(tmp_path):
    path, c = _synthetic(tmp_path)
    keys = circuit_feature_keys(c)
    flags = _flags_file(tmp_path / "flags.json", {keys[0]: "plural subject", keys[1]: "<b>verb</b>"})
    assert sfc_main(["view", str(path), "--labels", str(flags), "--out", str(tmp_path / "p.html")]) == 0
    doc = json.loads(path.read_text())
    assert doc["metadata"]["extra"][LABELS_FIELD] == {keys[0]: "plural subject", keys[1]: "<b>verb</b>"}
    again = Circuit.load(path)
    assert again.to_json_dict() == doc  # load -> save keeps them
    payload = viewer_payload(path)
    shown = {k: lab for k, lab in zip(payload["nodes"]["key"], payload["nodes"]["label"]) if k}
    assert shown[keys[0]] == "plural subject" and shown[keys[1]] == "<b>verb</b>"
    assert keys[0] not in payload["autoLabels"]  # a human label wins over the automatic one
    assert set(payload["autoLabels"]) == set(keys) - {keys[0], keys[1]}
    # A second file adds to the first; neither is lost.
    flags2 = _flags_file(tmp_path / "flags2.json", {keys[2]: "third"})
    assert sfc_main(["view", str(path), "--labels", str(flags2), "--out", str(tmp_path / "p.html")]) == 0
    assert set(Circuit.load(path).metadata.extra[LABELS_FIELD]) == {keys[0], keys[1], keys[2]}


def test_every_feature_with_a_dashboard_gets_a_label_and_exports_carry_them(tmp_path):
    c = Circuit.from_json_dict(synthetic_circuit(n_layers=2, n_positions=4, n_nodes=14, n_edges=20, seed=8,
                                                 with_dashboards=False))
    dash = {k: {"contexts": [_ctx(["x", " are"], [0.0, 1.0])], "promoted": [{"token": " is", "value": 1.0}],
                "suppressed": []} for k in circuit_feature_keys(c)}
    attach_dashboards(c, dash)
    keys = circuit_feature_keys(c)
    assert c.metadata.extra[AUTO_LABELS_FIELD] == {k: "are → is" for k in keys}
    set_labels(c, {keys[0]: "human words"})
    np_doc = c.to_neuronpedia()
    by_id = {n.id: n for n in c.nodes}
    clerps = {}
    for n, entry in zip(sorted(c.nodes, key=c._order_key()), np_doc["nodes"]):
        clerps[n.id] = entry["clerp"]
    for nid, clerp in clerps.items():
        n = by_id[nid]
        if n.is_error or n.kind == "metric":
            continue
        key = f"{n.site}/{n.feature}"
        assert clerp == (f"{nid}: human words" if key == keys[0] else f"{nid}: are → is (auto)")
    c.save(tmp_path / "c.json")
    back = Circuit.load(tmp_path / "c.json")
    assert back.dashboards == dash and back.metadata.extra[LABELS_FIELD] == {keys[0]: "human words"}


# ----------------------------------------------------------------------------- the commands, tiny model


def _tiny_setup(monkeypatch, tmp_path):
    """A circuit over the tiny word model's resid_0, with its SAE served in place of the cache."""
    import attribution.dictionaries.sets as sets
    import sfc.cli.common as common
    from attribution.dictionaries.kinds import random_sae
    from circuits.graph import CircuitMetadata, Edge, Node

    model = _word_model()
    sae = random_sae(model.sites(["resid_0"])[0].d, 48, seed=1)
    monkeypatch.setattr(common, "open_model", lambda name, device: model)
    monkeypatch.setattr(sets, "load_dictionaries", lambda m, folder=None, sites=None, neurons=False: {"resid_0": sae})
    monkeypatch.setenv("SFC_DASHBOARDS_CACHE", str(tmp_path / "dcache"))
    nodes = [Node.make("resid_0", 3, 1, 0.5), Node.make("resid_0", 10, 2, -0.3), Node.make("resid_0", 3, 2, 0.1),
             Node.make("resid_0", None, 1, 0.2), Node.metric(2, 1.0)]
    edges = [Edge(n.id, "y", n.effect) for n in nodes[:4]]
    c = Circuit(nodes, edges, CircuitMetadata(model="tiny-llama", sites=["resid_0"], n_layers=2,
                                              dictionaries={"resid_0": "test"},
                                              prompt_tokens=["w1", " w2", " w3"]))
    c.save(tmp_path / "c.json")
    corpus = tmp_path / "corpus.txt"
    gen = torch.Generator().manual_seed(3)
    corpus.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 63, (9,), generator=gen))
                                  for _ in range(30)))
    return model, sae, c, corpus


def test_sfc_dashboards_and_view_auto_make_the_same_dashboards_for_every_feature(tmp_path, monkeypatch):
    model, sae, c, corpus = _tiny_setup(monkeypatch, tmp_path)
    out = tmp_path / "dash.json"
    assert sfc_main(["dashboards", str(tmp_path / "c.json"), "--out", str(out), "--corpus", str(corpus)]) == 0
    dash = json.loads(out.read_text())
    assert set(dash) == {"resid_0/3", "resid_0/10"}  # every feature key, no error node
    texts = corpus_texts(model.tokenizer, DEFAULT_CORPUS_TOKENS, read_corpus_file(corpus))
    expect = compute_dashboards(model, {"resid_0": sae}, sorted(dash), texts, progress=False)
    assert dash == json.loads(json.dumps(expect))
    assert all(len(d["contexts"]) >= 5 for d in dash.values())
    # `view --dashboards auto` reuses the cache (no model pass) and labels every feature.
    from attribution.model import tracing

    monkeypatch.setattr(tracing, "run", lambda *a, **k: pytest.fail("the cache was not used"))
    page = tmp_path / "p.html"
    assert sfc_main(["view", str(tmp_path / "c.json"), "--dashboards", "auto", "--corpus", str(corpus),
                     "--out", str(page)]) == 0
    text = page.read_text()
    data = text.split('<script type="application/json" id="sfc-data">', 1)[1].split("</script>", 1)[0]
    payload = json.loads(data)
    assert payload["dashboards"] == dash
    assert payload["autoLabels"] == {k: auto_label(d) for k, d in dash.items()}
