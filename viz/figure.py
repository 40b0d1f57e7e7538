"""Circuit graphs as plotly figures.

A circuit (SPEC.md §4.4, format ``sfc-circuit``) is drawn the way the paper
draws it (SPEC.md §7), bottom to top:

- one **row per site** in forward order (``embed, attn_0, mlp_0, resid_0, …``),
  with the metric node ``y`` in a row of its own on top;
- for a per-position circuit (aggregation ``"none"``) one **column per token
  position**, labelled with the prompt's tokens; nodes that share a row and a
  position sit side by side inside their column. For a summed circuit (one node
  per feature) each row's nodes are packed left to right, strongest first;
- **squares** are features, **triangles** are SAE error nodes, the **diamond** is
  the metric;
- node colour is a diverging scale of the signed effect (blue positive, red
  negative, white near zero) and node size grows with ``|effect|``;
- edges are blue when their weight is positive and red when negative, and their
  width grows with ``|weight|``.

Rows of sites that hold no node are squeezed to a sliver, so a 30-layer model
whose circuit touches a dozen sites stays readable.

Edges are drawn as a handful of line traces (one per sign and width bucket),
each a single polyline whose segments are separated by gaps: 20,000 edges cost
six SVG paths instead of 20,000.

:func:`layout_circuit` computes positions, sizes and edge buckets once; both
:func:`circuit_figure` (a static figure for notebooks) and the interactive page
(:mod:`viz.html`) draw from it.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

NODE_KINDS = ("embed", "attn", "mlp", "resid", "metric")
COLORSCALE = [
    [0.0, "#b2182b"],
    [0.25, "#ef8a62"],
    [0.5, "#f7f7f7"],
    [0.75, "#67a9cf"],
    [1.0, "#2166ac"],
]
EDGE_COLORS = {1: "rgba(33,102,172,0.55)", -1: "rgba(178,24,43,0.55)"}
EDGE_WIDTHS = (0.6, 1.6, 3.2)
EDGE_BUCKET_EDGES = (0.15, 0.5)  # |weight| / max|weight| above which the next width applies
SYMBOLS = {"feature": "square", "error": "triangle-up", "metric": "diamond"}
EMPTY_ROW_HEIGHT = 0.3
PX_PER_ROW = 22


# ----------------------------------------------------------------------------- loading


def load_circuit(circuit: Any) -> dict:
    """A validated circuit as a plain dict, from a dict, a path or a circuit object.

    Files and dicts go through :class:`circuits.graph.Circuit` (its JSON schema
    and id checks), then through :func:`validate_circuit` for what drawing needs
    (positions within the prompt). Raises ``ValueError`` naming the first problem.
    """
    try:
        from circuits.graph import Circuit
    except ImportError:  # the graph builder is optional for drawing
        Circuit = None  # noqa: N806
    if isinstance(circuit, (str, Path)):
        path = Path(circuit)
        if not path.exists():
            raise FileNotFoundError(f"No circuit file at {path}: check the path.")
        if Circuit is not None:
            return _checked(Circuit.load(path).to_json_dict())
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a JSON circuit file ({exc}).") from exc
    elif isinstance(circuit, Mapping):
        data = dict(circuit)
        if Circuit is not None:
            return _checked(Circuit.from_json_dict(data).to_json_dict())
    elif hasattr(circuit, "to_json_dict"):
        data = circuit.to_json_dict()
    elif hasattr(circuit, "to_dict"):
        data = circuit.to_dict()
    else:
        raise ValueError(
            f"Cannot draw a {type(circuit).__name__}: pass a circuit dict, a Circuit or a path to a circuit JSON file."
        )
    return _checked(data)


def _checked(data: Any) -> dict:
    validate_circuit(data)
    return data


def _fail(msg: str) -> None:
    raise ValueError(f"Invalid circuit: {msg}")


def validate_circuit(data: Any) -> None:
    """Check the fields the viewer reads; raise ``ValueError`` with one clear sentence."""
    if not isinstance(data, Mapping):
        _fail(f"the top level must be a JSON object, not {type(data).__name__}.")
    if data.get("format") != "sfc-circuit":
        _fail(f"'format' is {data.get('format')!r}, expected 'sfc-circuit' (is this a circuit file?).")
    if data.get("schema_version") != 1:
        _fail(f"'schema_version' is {data.get('schema_version')!r}; this viewer reads version 1.")
    meta = data.get("metadata")
    if not isinstance(meta, Mapping):
        _fail("'metadata' is missing or not an object.")
    sites = meta.get("sites")
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        _fail("'metadata.sites' must list the site names in forward order.")
    if meta.get("aggregation") not in ("none", "sum"):
        _fail(f"'metadata.aggregation' is {meta.get('aggregation')!r}, expected 'none' or 'sum'.")
    nodes, edges = data.get("nodes"), data.get("edges")
    if not isinstance(nodes, list) or not isinstance(edges, list):
        _fail("'nodes' and 'edges' must be lists.")
    ids: set[str] = set()
    site_set = set(sites)
    for i, n in enumerate(nodes):
        if not isinstance(n, Mapping):
            _fail(f"node {i} is not an object.")
        for key in ("id", "site", "kind", "effect"):
            if key not in n:
                _fail(f"node {i} ({n.get('id', '?')}) has no '{key}'.")
        if not isinstance(n["id"], str) or n["id"] in ids:
            _fail(f"node {i} has a missing or duplicate id {n['id']!r}.")
        ids.add(n["id"])
        if n["kind"] not in NODE_KINDS:
            _fail(f"node {n['id']} has kind {n['kind']!r}, expected one of {', '.join(NODE_KINDS)}.")
        if n["kind"] != "metric" and n["site"] not in site_set:
            _fail(f"node {n['id']} is at site {n['site']!r}, which 'metadata.sites' does not list.")
        if not isinstance(n["effect"], (int, float)) or not np.isfinite(n["effect"]):
            _fail(f"node {n['id']} has a non-numeric or non-finite effect {n['effect']!r}.")
        pos = n.get("position")
        if pos is not None and (not isinstance(pos, int) or pos < 0):
            _fail(f"node {n['id']} has position {pos!r}; positions are non-negative integers or null.")
    if meta["aggregation"] == "none":
        tokens = meta.get("prompt_tokens")
        if not isinstance(tokens, list):
            _fail("a per-position circuit (aggregation 'none') needs 'metadata.prompt_tokens'.")
        for n in nodes:
            pos = n.get("position")
            if n["kind"] != "metric" and (pos is None or pos >= len(tokens)):
                _fail(f"node {n['id']} has position {pos!r}, outside the {len(tokens)} prompt tokens.")
    for j, e in enumerate(edges):
        if not isinstance(e, Mapping) or not {"source", "target", "weight"} <= set(e):
            _fail(f"edge {j} needs 'source', 'target' and 'weight'.")
        if e["source"] not in ids or e["target"] not in ids:
            _fail(f"edge {j} ({e['source']} -> {e['target']}) names a node that is not in 'nodes'.")
        if not isinstance(e["weight"], (int, float)) or not np.isfinite(e["weight"]):
            _fail(f"edge {j} ({e['source']} -> {e['target']}) has a non-finite weight.")


def feature_key(node: Mapping) -> str | None:
    """``"site/feature"`` for a feature node; ``None`` for error nodes and the metric."""
    if node.get("kind") == "metric" or node.get("is_error") or node.get("feature") is None:
        return None
    return f"{node['site']}/{node['feature']}"


# ----------------------------------------------------------------------------- layout


@dataclass
class GraphLayout:
    """Everything needed to draw a circuit, in node order and edge order.

    ``x, y, size [n_nodes]``; ``symbol`` per node; ``src, dst [n_edges]`` index
    nodes; ``bucket [n_edges]`` is the width bucket (0, 1, 2) of each edge.
    ``layout`` is the plotly layout dict (axes, row and column labels, size).
    """

    nodes: list[dict]
    x: np.ndarray
    y: np.ndarray
    size: np.ndarray
    symbol: list[str]
    src: np.ndarray
    dst: np.ndarray
    weight: np.ndarray
    bucket: np.ndarray
    max_abs_effect: float
    max_abs_weight: float
    layout: dict

    @property
    def effect(self) -> np.ndarray:
        return np.array([float(n["effect"]) for n in self.nodes], dtype=float)


def node_symbol(node: Mapping) -> str:
    if node["kind"] == "metric":
        return SYMBOLS["metric"]
    return SYMBOLS["error"] if node.get("is_error") else SYMBOLS["feature"]


def _row_positions(sites: list[str], occupied: set[str]) -> tuple[dict[str, float], float]:
    """``y`` of each site's row (empty rows squeezed) and of the metric row."""
    y, rows = 0.0, {}
    for site in sites:
        rows[site] = y
        y += 1.0 if site in occupied else EMPTY_ROW_HEIGHT
    return rows, y + 0.5


def _spread(k: int, half_width: float) -> np.ndarray:
    return np.zeros(1) if k == 1 else np.linspace(-half_width, half_width, k)


def layout_circuit(data: Mapping) -> GraphLayout:
    """Positions, sizes, edge buckets and axes for a validated circuit dict."""
    meta = data["metadata"]
    nodes = [dict(n) for n in data["nodes"]]
    sites = list(meta["sites"])
    per_position = meta["aggregation"] == "none"
    tokens = list(meta.get("prompt_tokens") or [])
    occupied = {n["site"] for n in nodes if n["kind"] != "metric"}
    row_y, metric_y = _row_positions(sites, occupied)

    n = len(nodes)
    x, y = np.zeros(n), np.zeros(n)
    cells: dict[tuple, list[int]] = {}
    for i, node in enumerate(nodes):
        if node["kind"] == "metric":
            continue
        cell = (node["site"], node.get("position") if per_position else None)
        cells.setdefault(cell, []).append(i)
    effect = np.array([float(nd["effect"]) for nd in nodes], dtype=float)
    width = max((len(v) for v in cells.values()), default=1)
    for (site, pos), members in cells.items():
        # Strongest first: errors after features, then by |effect|.
        members.sort(key=lambda i: (bool(nodes[i].get("is_error")), -abs(effect[i])))
        if per_position:
            offsets = _spread(len(members), 0.38)
            x[members] = pos + offsets
        else:
            x[members] = np.arange(len(members)) - (len(members) - 1) / 2
        y[members] = row_y[site]

    index = {nd["id"]: i for i, nd in enumerate(nodes)}
    src = np.array([index[e["source"]] for e in data["edges"]], dtype=np.int64)
    dst = np.array([index[e["target"]] for e in data["edges"]], dtype=np.int64)
    weight = np.array([float(e["weight"]) for e in data["edges"]], dtype=float)
    for i, node in enumerate(nodes):
        if node["kind"] == "metric":
            parents = src[dst == i]
            parents = parents[[nodes[p]["kind"] != "metric" for p in parents]] if len(parents) else parents
            if len(parents):
                x[i] = float(np.mean(x[parents]))
            else:
                x[i] = (len(tokens) - 1) / 2 if per_position else 0.0
            y[i] = metric_y

    features = effect[[nd["kind"] != "metric" for nd in nodes]] if n else effect
    max_abs_effect = float(np.abs(features).max()) if len(features) else 1.0
    max_abs_effect = max_abs_effect or 1.0
    max_abs_weight = float(np.abs(weight).max()) if len(weight) else 1.0
    max_abs_weight = max_abs_weight or 1.0
    rel = np.abs(effect) / max_abs_effect
    size = 7.0 + 15.0 * np.sqrt(np.clip(rel, 0.0, 1.0))
    size[[nd["kind"] == "metric" for nd in nodes]] = 18.0
    bucket = np.searchsorted(np.array(EDGE_BUCKET_EDGES), np.abs(weight) / max_abs_weight, side="right")

    rows_total = metric_y + 0.5
    layout: dict[str, Any] = {
        "height": int(max(420, 90 + PX_PER_ROW * rows_total)),
        "margin": {"l": 78, "r": 20, "t": 30, "b": 60 if per_position else 20},
        "showlegend": False,
        "plot_bgcolor": "white",
        "paper_bgcolor": "white",
        "hovermode": "closest",
        "hoverdistance": 20,
        "dragmode": "pan",
        "yaxis": {
            "tickmode": "array",
            "tickvals": [row_y[s] for s in sites if s in occupied] + [metric_y],
            "ticktext": [s for s in sites if s in occupied] + ["y"],
            "range": [-0.7, metric_y + 0.7],
            "zeroline": False,
            "showgrid": True,
            "gridcolor": "#eeeeee",
            "fixedrange": False,
        },
        "xaxis": {"zeroline": False, "showgrid": False},
    }
    if per_position:
        layout["xaxis"].update(
            tickmode="array",
            tickvals=list(range(len(tokens))),
            # Plotly reads tick text as a small subset of HTML: escape tokens such as "<b>". Only
            # <, > and &: plotly does not decode &quot; or &#x27;, which would show literally.
            ticktext=[_plotly_text(repr(t)[1:-1] if t.strip() != t or not t else t) for t in tokens],
            range=[-0.6, max(len(tokens), 1) - 0.4],
            tickangle=-45 if max((len(t) for t in tokens), default=0) > 6 else 0,
        )
        layout["shapes"] = [
            {"type": "line", "xref": "x", "yref": "paper", "x0": p + 0.5, "x1": p + 0.5, "y0": 0, "y1": 1,
             "line": {"color": "#dddddd", "width": 1, "dash": "dash"}}
            for p in range(len(tokens) - 1)
        ]
    else:
        layout["xaxis"].update(showticklabels=False, range=[-width / 2 - 0.5, width / 2 + 0.5])
    return GraphLayout(
        nodes=nodes, x=x, y=y, size=size, symbol=[node_symbol(nd) for nd in nodes], src=src, dst=dst,
        weight=weight, bucket=bucket, max_abs_effect=max_abs_effect, max_abs_weight=max_abs_weight, layout=layout,
    )


# ----------------------------------------------------------------------------- figure


def _edge_traces(g: GraphLayout, keep: np.ndarray) -> list[go.Scatter]:
    traces = []
    for sign in (1, -1):
        for b, width in enumerate(EDGE_WIDTHS):
            sel = keep & (np.sign(g.weight) == sign) & (g.bucket == b)
            s, d = g.src[sel], g.dst[sel]
            # One polyline per bucket: (x_src, x_dst, gap) for every edge.
            xs = np.stack([g.x[s], g.x[d], np.full(len(s), np.nan)], axis=1).ravel()
            ys = np.stack([g.y[s], g.y[d], np.full(len(s), np.nan)], axis=1).ravel()
            traces.append(go.Scatter(
                x=xs, y=ys, mode="lines", hoverinfo="skip", name=f"edges {'+' if sign > 0 else '-'}{b}",
                line={"color": EDGE_COLORS[sign], "width": width},
            ))
    return traces


def _plotly_text(text: str) -> str:
    """``text`` for plotly's HTML-like strings: ``&``, ``<`` and ``>`` escaped, quotes kept (plotly shows
    an escaped quote as the literal entity)."""
    return html.escape(text, quote=False)


def hover_text(node: Mapping, tokens: list[str] | None = None) -> str:
    """One node's hover text, HTML-escaped for plotly's hover labels."""
    feat = "ε (error)" if node.get("is_error") else node.get("feature")
    lines = [f"<b>{_plotly_text(node['id'])}</b>", f"site {_plotly_text(str(node['site']))}"]
    if node["kind"] != "metric":
        lines.append(f"feature {_plotly_text(str(feat))}")
    if node.get("position") is not None:
        tok = tokens[node["position"]] if tokens and node["position"] < len(tokens) else ""
        lines.append(f"position {node['position']} {_plotly_text(repr(tok))}")
    if node.get("label"):
        lines.append(_plotly_text(str(node["label"])))
    lines.append(f"effect {node['effect']:+.4g}")
    if node.get("activation") is not None:
        lines.append(f"activation {node['activation']:.4g}")
    return "<br>".join(lines)


def circuit_figure(circuit: Any, node_threshold: float = 0.0, edge_threshold: float = 0.0) -> go.Figure:
    """A static plotly figure of a circuit (dict, ``Circuit`` or path).

    Nodes with ``|effect| < node_threshold`` are hidden (the metric node never
    is); an edge is drawn when both its ends are shown and ``|weight| >=
    edge_threshold``.
    """
    data = load_circuit(circuit)
    g = layout_circuit(data)
    tokens = data["metadata"].get("prompt_tokens")
    is_metric = np.array([n["kind"] == "metric" for n in g.nodes], dtype=bool)
    show = is_metric | (np.abs(g.effect) >= node_threshold)
    keep = show[g.src] & show[g.dst] & (np.abs(g.weight) >= edge_threshold) if len(g.src) else np.zeros(0, bool)
    idx = np.flatnonzero(show)
    nodes = go.Scatter(
        x=g.x[idx], y=g.y[idx], mode="markers", name="nodes",
        hovertext=[hover_text(g.nodes[i], tokens) for i in idx], hoverinfo="text",
        marker={
            "symbol": [g.symbol[i] for i in idx], "size": g.size[idx], "color": g.effect[idx],
            "colorscale": COLORSCALE, "cmin": -g.max_abs_effect, "cmax": g.max_abs_effect,
            "line": {"color": "#555555", "width": 0.8},
            "colorbar": {"title": {"text": "effect"}, "thickness": 10, "len": 160, "lenmode": "pixels", "y": 1, "yanchor": "top"},
        },
    )
    fig = go.Figure(data=[*_edge_traces(g, keep), nodes], layout=g.layout)
    meta = data["metadata"]
    fig.update_layout(title={"text": _plotly_text(f"{meta.get('model', '')} · {meta.get('task', '')}"), "x": 0.01})
    fig.layout.margin.t = 50
    return fig
