"""The circuit data model and its JSON file: ids, round trips, validation, graph operations.

Expected answers come from hand-built graphs whose answers are written out
here, or from networkx's own graph algorithms, never from the code under test.
"""

from __future__ import annotations

import json
import random

import networkx as nx
import pytest

from circuits.graph import (
    Circuit,
    CircuitFormatError,
    CircuitMetadata,
    Edge,
    Node,
    node_id,
    parse_node_id,
)

SITES = ["embed", "attn_0", "mlp_0", "resid_0", "attn_1", "mlp_1", "resid_1"]


def _metadata(**kw) -> CircuitMetadata:
    base = dict(
        model="tiny",
        sites=SITES,
        n_layers=2,
        dictionaries={s: f"dicts/{s}.safetensors" for s in SITES},
        task="simple",
        method="ig",
        aggregation="none",
        node_threshold=0.0,
        edge_threshold=0.0,
        n_examples=4,
        prompt_tokens=["The", " parents"],
        total_effect=1.25,
        extra={"steps": 10},
    )
    return CircuitMetadata(**(base | kw))


def _hand_circuit() -> Circuit:
    """A small circuit with a known structure.

    Reaching y:  embed/5@0 -> attn_0/1@1 -> resid_0/3@1 -> y,  mlp_0/2@1 -> resid_0/3@1,
                 resid_0/err@1 -> y.
    Not reaching y:  embed/err@0 -> mlp_0/9@0 (a dead end), attn_1/4@0 (isolated).
    """
    nodes = [
        Node("embed/5@0", "embed", "embed", -1, 0, 5, False, 0.40, activation=1.5),
        Node("embed/err@0", "embed", "embed", -1, 0, None, True, 0.05),
        Node("attn_0/1@1", "attn_0", "attn", 0, 1, 1, False, -0.30),
        Node("mlp_0/2@1", "mlp_0", "mlp", 0, 1, 2, False, 0.10, label="plural nouns"),
        Node("mlp_0/9@0", "mlp_0", "mlp", 0, 0, 9, False, 0.20),
        Node("resid_0/3@1", "resid_0", "resid", 0, 1, 3, False, 0.90),
        Node("resid_0/err@1", "resid_0", "resid", 0, 1, None, True, -0.12),
        Node("attn_1/4@0", "attn_1", "attn", 1, 0, 4, False, 0.01),
        Node("y", "y", "metric", 2, None, None, False, 1.25),
    ]
    edges = [
        Edge("embed/5@0", "attn_0/1@1", 0.25),
        Edge("attn_0/1@1", "resid_0/3@1", -0.04),
        Edge("mlp_0/2@1", "resid_0/3@1", 0.08),
        Edge("resid_0/3@1", "y", 0.9),
        Edge("resid_0/err@1", "y", -0.12),
        Edge("embed/err@0", "mlp_0/9@0", 0.5),
    ]
    dashboards = {
        "embed/5": {
            "contexts": [{"tokens": ["a", "b"], "acts": [0.0, 2.5]}],
            "promoted": [{"token": " are", "value": 0.7}],
            "suppressed": [],
        }
    }
    return Circuit(nodes, edges, _metadata(), dashboards)


# ------------------------------------------------------------------ ids


@pytest.mark.parametrize(
    "nid, parts",
    [
        ("resid_3/1234@5", ("resid_3", 1234, 5)),
        ("attn_2/err@0", ("attn_2", None, 0)),
        ("mlp_1/77", ("mlp_1", 77, None)),
        ("embed/err", ("embed", None, None)),
        ("y", ("y", None, None)),
    ],
)
def test_node_ids_follow_the_documented_convention(nid, parts):
    assert parse_node_id(nid) == parts
    assert node_id(*parts) == nid


@pytest.mark.parametrize("bad", ["resid_3", "resid_3/x@1", "mlp_1/7@", "/7", "attn_0/7@-1"])
def test_malformed_node_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="malformed"):
        parse_node_id(bad)


def test_node_make_derives_kind_layer_and_id_from_the_site():
    n = Node.make("mlp_3", 12, 4, 0.5)
    assert (n.id, n.kind, n.layer, n.is_error) == ("mlp_3/12@4", "mlp", 3, False)
    e = Node.make("embed", None, 0, 0.1)
    assert (e.id, e.kind, e.layer, e.is_error) == ("embed/err@0", "embed", -1, True)


# ------------------------------------------------------------------ file format


def test_save_load_save_is_byte_identical(tmp_path):
    c = _hand_circuit()
    c.nodes[2].effect = 0.1 + 0.2  # a float whose shortest repr has 17 digits
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    c.save(a)
    Circuit.load(a).save(b)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes().endswith(b"}\n")


def test_loaded_circuit_has_the_saved_values_exactly(tmp_path):
    c = _hand_circuit()
    c.nodes[2].effect = 0.1 + 0.2
    c.save(tmp_path / "c.json")
    d = Circuit.load(tmp_path / "c.json")
    assert {n.id: n for n in d.nodes} == {n.id: n for n in c.nodes}
    assert {(e.source, e.target): e.weight for e in d.edges} == {
        (e.source, e.target): e.weight for e in c.edges
    }
    assert d.metadata == c.metadata
    assert d.dashboards == c.dashboards


def test_file_bytes_do_not_depend_on_node_or_edge_order(tmp_path):
    c = _hand_circuit()
    shuffled = Circuit(c.nodes[::-1], c.edges[::-1], c.metadata, c.dashboards)
    c.save(tmp_path / "a.json")
    shuffled.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_saved_file_is_plain_json_with_the_versioned_envelope(tmp_path):
    _hand_circuit().save(tmp_path / "c.json")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["format"] == "sfc-circuit" and doc["schema_version"] == 1
    assert set(doc) == {"format", "schema_version", "metadata", "nodes", "edges", "dashboards"}


def test_save_leaves_no_temporary_file_behind(tmp_path):
    _hand_circuit().save(tmp_path / "c.json")
    _hand_circuit().save(tmp_path / "c.json")  # overwrite goes through os.replace too
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def _corrupt(tmp_path, edit) -> str:
    _hand_circuit().save(tmp_path / "c.json")
    doc = json.loads((tmp_path / "c.json").read_text())
    edit(doc)
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(CircuitFormatError) as info:
        Circuit.load(tmp_path / "bad.json")
    msg = str(info.value)
    assert "\n" not in msg and msg.endswith(".")
    return msg


def test_missing_field_is_named_in_the_error(tmp_path):
    msg = _corrupt(tmp_path, lambda d: d["metadata"].pop("model"))
    assert "metadata" in msg and "'model' is a required property" in msg


def test_wrong_type_is_located_in_the_error(tmp_path):
    def edit(d):
        d["nodes"][3]["effect"] = "large"

    msg = _corrupt(tmp_path, edit)
    assert "nodes[3].effect" in msg and "'large' is not of type 'number'" in msg


def test_unknown_method_is_rejected(tmp_path):
    msg = _corrupt(tmp_path, lambda d: d["metadata"].update(method="magic"))
    assert "metadata.method" in msg and "magic" in msg


def test_newer_schema_version_asks_to_upgrade(tmp_path):
    msg = _corrupt(tmp_path, lambda d: d.update(schema_version=99))
    assert "newer version of sparse-feature-circuits" in msg and "upgrade" in msg


def test_file_of_another_format_is_rejected(tmp_path):
    msg = _corrupt(tmp_path, lambda d: d.update(format="something-else"))
    assert "not a sparse-feature-circuits circuit file" in msg


def test_edge_to_a_missing_node_is_rejected(tmp_path):
    msg = _corrupt(
        tmp_path, lambda d: d["edges"].append({"source": "mlp_1/5@0", "target": "y", "weight": 1.0})
    )
    assert "'mlp_1/5@0'" in msg and "not in 'nodes'" in msg


def test_id_that_disagrees_with_its_fields_is_rejected(tmp_path):
    def edit(d):
        d["nodes"][0]["position"] = 7  # id still says @0

    msg = _corrupt(tmp_path, edit)
    assert "nodes[0]" in msg and "disagrees" in msg


def test_invalid_json_names_the_line(tmp_path):
    (tmp_path / "bad.json").write_text('{"format": "sfc-circuit",\n  oops}')
    with pytest.raises(CircuitFormatError, match="not valid JSON \\(line 2"):
        Circuit.load(tmp_path / "bad.json")


def test_non_finite_effects_are_refused_on_save(tmp_path):
    c = _hand_circuit()
    c.nodes[0].effect = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        c.save(tmp_path / "c.json")


# ------------------------------------------------------------------ graph operations


def test_networkx_export_has_the_same_nodes_edges_and_weights():
    c = _hand_circuit()
    g = c.to_networkx()
    assert set(g.nodes) == {n.id for n in c.nodes}
    assert {(u, v): w for u, v, w in g.edges(data="weight")} == {
        (e.source, e.target): e.weight for e in c.edges
    }
    assert g.nodes["mlp_0/2@1"]["label"] == "plural nouns"
    assert g.nodes["embed/err@0"]["is_error"] is True
    back = Circuit.from_networkx(g)
    assert {n.id: n for n in back.nodes} == {n.id: n for n in c.nodes}
    assert back.metadata == c.metadata


def test_prune_to_metric_removes_exactly_the_nodes_that_cannot_reach_y():
    pruned = _hand_circuit().prune_to_metric()
    assert {n.id for n in pruned.nodes} == {
        "embed/5@0",
        "attn_0/1@1",
        "mlp_0/2@1",
        "resid_0/3@1",
        "resid_0/err@1",
        "y",
    }
    assert {(e.source, e.target) for e in pruned.edges} == {
        ("embed/5@0", "attn_0/1@1"),
        ("attn_0/1@1", "resid_0/3@1"),
        ("mlp_0/2@1", "resid_0/3@1"),
        ("resid_0/3@1", "y"),
        ("resid_0/err@1", "y"),
    }


def test_prune_to_metric_agrees_with_networkx_ancestors_on_random_dags():
    rng = random.Random(0)
    for _ in range(20):
        nodes = [Node.make(f"resid_{i // 4}", i % 4, 0, rng.uniform(-1, 1)) for i in range(24)]
        nodes.append(Node.metric(6, 1.0))
        ids = [n.id for n in nodes]
        edges = [
            Edge(ids[i], ids[j], rng.uniform(-1, 1))
            for i in range(len(ids))
            for j in range(i + 1, len(ids))
            if rng.random() < 0.08
        ]
        g = nx.DiGraph()
        g.add_nodes_from(ids)
        g.add_edges_from((e.source, e.target) for e in edges)
        expected = nx.ancestors(g, "y") | {"y"}
        c = Circuit(nodes, edges, _metadata(sites=[f"resid_{i}" for i in range(6)], n_layers=6))
        assert {n.id for n in c.prune_to_metric().nodes} == expected


def test_filter_keeps_nodes_and_edges_strictly_above_the_thresholds():
    f = _hand_circuit().filter(node_threshold=0.15, edge_threshold=0.05)
    # |effect| > 0.15: embed/5@0 .40, attn_0/1@1 .30, mlp_0/9@0 .20, resid_0/3@1 .90; y always.
    assert {n.id for n in f.nodes} == {"embed/5@0", "attn_0/1@1", "mlp_0/9@0", "resid_0/3@1", "y"}
    # |weight| > 0.05 with both ends kept (attn_0 -> resid_0 is 0.04; embed/err is gone).
    assert {(e.source, e.target) for e in f.edges} == {
        ("embed/5@0", "attn_0/1@1"),
        ("resid_0/3@1", "y"),
    }
    assert (f.metadata.node_threshold, f.metadata.edge_threshold) == (0.15, 0.05)


def test_filter_top_k_keeps_the_largest_absolute_effects_and_the_metric():
    f = _hand_circuit().filter(top_k=2)
    assert {n.id for n in f.nodes} == {"resid_0/3@1", "embed/5@0", "y"}
    assert f.metadata.top_k == 2


def test_filter_does_not_change_the_original():
    c = _hand_circuit()
    c.filter(node_threshold=10.0)
    assert len(c.nodes) == 9 and len(c.edges) == 6 and c.metadata.node_threshold == 0.0


def test_summary_counts_nodes_per_site():
    s = _hand_circuit().summary()
    assert (s.n_nodes, s.n_features, s.n_errors, s.n_edges, s.n_edges_to_metric) == (8, 6, 2, 6, 2)
    assert {k: (v.features, v.errors) for k, v in s.per_site.items()} == {
        "embed": (1, 1),
        "attn_0": (1, 0),
        "mlp_0": (2, 0),
        "resid_0": (1, 1),
        "attn_1": (1, 0),
    }
    assert list(s.per_site) == ["embed", "attn_0", "mlp_0", "resid_0", "attn_1"]  # forward order
    assert s.sum_of_effects == pytest.approx(0.40 + 0.05 - 0.30 + 0.10 + 0.20 + 0.90 - 0.12 + 0.01)
    assert "8 nodes" in str(s)


# ------------------------------------------------------------------ Neuronpedia


def test_neuronpedia_export_has_the_frontend_fields_and_consistent_ids(tmp_path):
    c = _hand_circuit()
    g = c.to_neuronpedia()
    assert set(g) == {"metadata", "qParams", "nodes", "links"}
    assert {"slug", "scan", "prompt_tokens", "prompt", "node_threshold", "schema_version"} <= set(
        g["metadata"]
    )
    assert set(g["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    node_fields = {
        "node_id",
        "feature",
        "layer",
        "ctx_idx",
        "feature_type",
        "token_prob",
        "is_target_logit",
        "jsNodeId",
        "clerp",
        "influence",
        "activation",
    }
    for n in g["nodes"]:
        assert node_fields <= set(n)
        assert isinstance(n["layer"], str) and isinstance(n["feature"], int)
        assert 0 <= n["ctx_idx"] < len(g["metadata"]["prompt_tokens"])
    ids = [n["node_id"] for n in g["nodes"]]
    assert len(ids) == len(set(ids)) == len(c.nodes)
    assert all(link["source"] in ids and link["target"] in ids for link in g["links"])
    assert len(g["links"]) == len(c.edges)
    types = sorted(n["feature_type"] for n in g["nodes"])
    assert types.count("logit") == 1 and types.count("mlp reconstruction error") == 1
    assert types.count("embedding") == 2  # the embed-site feature and error node
    assert sum(n["is_target_logit"] for n in g["nodes"]) == 1
    # The metric node gets every edge that pointed into y.
    logit = next(n["node_id"] for n in g["nodes"] if n["feature_type"] == "logit")
    assert sum(link["target"] == logit for link in g["links"]) == 2
    path = c.save_neuronpedia(tmp_path / "np.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(g))


def test_neuronpedia_export_works_for_position_summed_circuits():
    nodes = [
        Node.make("resid_0", 3, None, 0.5),
        Node.make("resid_0", None, None, 0.1),
        Node.metric(1, 0.6),
    ]
    edges = [Edge("resid_0/3", "y", 0.5), Edge("resid_0/err", "y", 0.1)]
    c = Circuit(
        nodes,
        edges,
        _metadata(sites=["resid_0"], n_layers=1, aggregation="sum", prompt_tokens=None),
    )
    g = c.to_neuronpedia()
    assert {n["ctx_idx"] for n in g["nodes"]} == {0}
    assert len({n["node_id"] for n in g["nodes"]}) == 3
