"""Synthetic circuits: valid ``sfc-circuit`` dicts of any size, with dashboards.

They let the viewer's tests, its benchmark and the tutorial's screenshots run
without a model. Effects and weights are random; the structure is real: nodes
sit at the sites of a ``n_layers``-layer model, edges only run from an earlier
site to a later one (and, per position, never backwards in position), and the
last sites feed the metric node ``y``.
"""

from __future__ import annotations

import numpy as np

WORDS = ["The", " keys", " to", " the", " cabinet", " are", " on", " the", " table", " near", " the", " door"]


def site_names(n_layers: int) -> list[str]:
    """``embed, attn_0, mlp_0, resid_0, …`` in forward order."""
    return ["embed"] + [f"{k}_{layer}" for layer in range(n_layers) for k in ("attn", "mlp", "resid")]


def _kind_layer(site: str) -> tuple[str, int]:
    if site == "embed":
        return "embed", -1
    kind, layer = site.split("_")
    return kind, int(layer)


def synthetic_circuit(
    n_layers: int = 3,
    n_positions: int = 6,
    n_nodes: int = 40,
    n_edges: int = 80,
    *,
    aggregation: str = "none",
    error_fraction: float = 0.15,
    with_dashboards: bool = True,
    seed: int = 0,
    labels: dict[int, str] | None = None,
) -> dict:
    """A random but valid circuit dict; ``labels`` maps node indices to labels."""
    rng = np.random.default_rng(seed)
    sites = site_names(n_layers)
    per_position = aggregation == "none"
    tokens = [WORDS[i % len(WORDS)] for i in range(n_positions)] if per_position else None
    nodes: list[dict] = []
    seen: set[str] = set()
    while len(nodes) < n_nodes:
        site = sites[int(rng.integers(len(sites)))]
        kind, layer = _kind_layer(site)
        pos = int(rng.integers(n_positions)) if per_position else None
        is_error = bool(rng.random() < error_fraction)
        feature = None if is_error else int(rng.integers(4096))
        name = f"{site}/{'err' if is_error else feature}" + (f"@{pos}" if per_position else "")
        if name in seen:
            continue
        seen.add(name)
        effect = float(rng.choice([-1, 1]) * rng.lognormal(-2.0, 1.2))
        nodes.append({
            "id": name, "site": site, "kind": kind, "layer": layer, "position": pos, "feature": feature,
            "is_error": is_error, "effect": effect, "activation": None if is_error else float(rng.gamma(2.0, 1.0)),
            "label": None,
        })
    for i, text in (labels or {}).items():
        nodes[i]["label"] = text
    order = {s: i for i, s in enumerate(sites)}
    rank = np.array([order[n["site"]] for n in nodes])
    pos_arr = np.array([n["position"] if per_position else 0 for n in nodes])
    metric = {"id": "y", "site": "y", "kind": "metric", "layer": n_layers, "position": None, "feature": None,
              "is_error": False, "effect": 1.0, "activation": None, "label": "metric"}
    edges: dict[tuple[str, str], float] = {}
    attempts = 0
    while len(edges) < n_edges and attempts < 50 * n_edges:
        attempts += 1
        a, b = rng.integers(len(nodes), size=2)
        if rank[a] >= rank[b] or pos_arr[a] > pos_arr[b]:
            continue
        edges[(nodes[a]["id"], nodes[b]["id"])] = float(rng.normal(0, 0.1))
    top = sorted(range(len(nodes)), key=lambda i: -rank[i])[: max(1, len(nodes) // 10)]
    for i in top:
        edges[(nodes[i]["id"], "y")] = nodes[i]["effect"]
    circuit = {
        "format": "sfc-circuit",
        "schema_version": 1,
        "metadata": {
            "model": "synthetic", "dictionaries": {s: f"synthetic/{s}" for s in sites}, "task": "synthetic",
            "method": "ig", "aggregation": aggregation, "node_threshold": 0.0, "edge_threshold": 0.0, "top_k": None,
            "n_examples": 1, "toolkit_version": "0.1.0", "sites": sites, "n_layers": n_layers,
            "prompt_tokens": tokens, "total_effect": 1.0, "extra": {},
        },
        "nodes": [*nodes, metric],
        "edges": [{"source": s, "target": t, "weight": w} for (s, t), w in edges.items()],
    }
    if with_dashboards:
        circuit["dashboards"] = synthetic_dashboards(circuit, seed=seed)
    return circuit


def synthetic_dashboards(circuit: dict, n_contexts: int = 4, context_len: int = 10, seed: int = 0) -> dict:
    """Random dashboards for every feature of ``circuit``, keyed ``"site/feature"``."""
    rng = np.random.default_rng(seed + 1)
    vocab = sorted(set(WORDS)) + [" is", " were", " cat", " dogs", ".", ","]
    out: dict[str, dict] = {}
    for n in circuit["nodes"]:
        if n["kind"] == "metric" or n["is_error"]:
            continue
        key = f"{n['site']}/{n['feature']}"
        if key in out:
            continue
        contexts = []
        for c in range(n_contexts):
            toks = [vocab[int(i)] for i in rng.integers(len(vocab), size=context_len)]
            acts = np.round(np.maximum(rng.normal(0, 1, size=context_len), 0) * (n_contexts - c), 3)
            contexts.append({"tokens": toks, "acts": acts.tolist()})
        promoted = [{"token": vocab[int(i)], "value": round(float(v), 3)}
                    for i, v in zip(rng.integers(len(vocab), size=5), sorted(rng.random(5), reverse=True))]
        suppressed = [{"token": vocab[int(i)], "value": round(-float(v), 3)}
                      for i, v in zip(rng.integers(len(vocab), size=5), sorted(rng.random(5), reverse=True))]
        out[key] = {"contexts": contexts, "promoted": promoted, "suppressed": suppressed}
    return out
