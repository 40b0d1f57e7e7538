"""A circuit as one self-contained, offline HTML page.

The page holds everything it needs: plotly.js (the copy bundled with the
plotly package, inlined), the viewer's own script and style
(``viz/static/viewer.js``, ``viewer.css``), and the circuit itself as JSON. It
opens from disk with no server and no network, and can be mailed around.

What the page does (all in the browser, see ``viewer.js``):

- hover a node for its site, feature, label, effect and activation;
- click a node for a side panel with its dashboard (top-activating contexts,
  promoted and suppressed tokens) and its strongest edges; its ancestors and
  descendants stay lit and everything else dims; Esc clears;
- node and edge threshold sliders re-filter the graph in place;
- a search box finds nodes by id or label;
- every feature shows its label beside its node (a toggle hides them); a label
  is human (from the circuit, or typed in the page) or automatic (read off the
  feature's dashboard, shown in italics with an "auto" tag);
- labels can be edited, features flagged for SHIFT, and both downloaded as a
  ``sfc-feature-flags`` JSON file (human labels only).

Safety: the circuit is embedded as JSON inside ``<script type="application/json">``
with every ``<``, ``>`` and ``&`` written as a ``\\u`` escape, so no label or
token can close the script element; the viewer writes data into the page with
``textContent`` only. The circuit is validated before anything is written.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from plotly.offline import get_plotlyjs
from plotly.utils import PlotlyJSONEncoder

from attribution.cache import atomic_write_text
from viz.figure import (
    COLORSCALE,
    EDGE_COLORS,
    EDGE_WIDTHS,
    feature_key,
    layout_circuit,
    load_circuit,
)
from viz.labels import AUTO_LABELS_FIELD, auto_labels, labels_of_document

STATIC = Path(__file__).parent / "static"


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` at all."""
    text = json.dumps(obj, cls=PlotlyJSONEncoder, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _check_dashboards(dashboards: Any) -> dict:
    if dashboards is None:
        return {}
    if not isinstance(dashboards, Mapping):
        raise ValueError("dashboards must map feature keys ('site/feature') to dashboard dicts.")
    for key, dash in dashboards.items():
        contexts = dash.get("contexts", []) if isinstance(dash, Mapping) else None
        if not isinstance(contexts, list) or any(
            not isinstance(c, Mapping) or len(c.get("tokens", [])) != len(c.get("acts", [])) for c in contexts
        ):
            raise ValueError(f"The dashboard for {key!r} is malformed: each context needs equally long 'tokens' and 'acts'.")
    return dict(dashboards)


def _check_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in labels.items()):
        raise ValueError("labels must map feature keys ('site/feature') to strings.")
    return {k: v for k, v in labels.items() if v.strip()}


def viewer_payload(circuit: Any, dashboards: Mapping | None = None, labels: Mapping[str, str] | None = None) -> dict:
    """The JSON the page's script reads: columnar node and edge arrays, layout, dashboards,
    human labels (in ``nodes.label``) and automatic labels (``autoLabels``, by feature key)."""
    data = load_circuit(circuit)
    dash = _check_dashboards(data.get("dashboards")) | _check_dashboards(dashboards)
    g = layout_circuit(data)
    nodes = g.nodes
    keys = [feature_key(n) for n in nodes]
    key_set = {k for k in keys if k}
    meta = data["metadata"]
    human = labels_of_document(data) | _check_labels(labels)
    stored_auto = (meta.get("extra") or {}).get(AUTO_LABELS_FIELD) or {}
    autos = {k: v for k, v in stored_auto.items() if isinstance(v, str)} | auto_labels(dash)
    return {
        "meta": {k: meta.get(k) for k in ("model", "task", "method", "aggregation", "node_threshold",
                                          "edge_threshold", "prompt_tokens", "total_effect", "n_layers",
                                          "dictionaries")},
        "empty": not any(n["kind"] != "metric" for n in nodes),
        "nodes": {
            "id": [n["id"] for n in nodes],
            "site": [n["site"] for n in nodes],
            "kind": [n["kind"] for n in nodes],
            "position": [n.get("position") for n in nodes],
            "feature": [n.get("feature") for n in nodes],
            "error": [bool(n.get("is_error")) for n in nodes],
            "effect": [float(n["effect"]) for n in nodes],
            "activation": [n.get("activation") for n in nodes],
            "label": [human.get(k) if k else n.get("label") for k, n in zip(keys, nodes)],
            "key": keys,
            "x": np.round(g.x, 4).tolist(),
            "y": np.round(g.y, 4).tolist(),
            "size": np.round(g.size, 2).tolist(),
            "symbol": g.symbol,
        },
        "edges": {
            "src": g.src.tolist(),
            "dst": g.dst.tolist(),
            "w": g.weight.tolist(),
            "bucket": g.bucket.tolist(),
        },
        "style": {
            "colorscale": COLORSCALE,
            "edgeColors": {"pos": EDGE_COLORS[1], "neg": EDGE_COLORS[-1]},
            "edgeWidths": list(EDGE_WIDTHS),
            "maxAbsEffect": g.max_abs_effect,
        },
        "layout": g.layout,
        "dashboards": {k: v for k, v in dash.items() if k in key_set},
        "autoLabels": {k: v for k, v in autos.items() if k in key_set and k not in human},
    }


def _page(payload: dict) -> str:
    meta = payload["meta"]
    title = " · ".join(str(meta[k]) for k in ("model", "task", "method") if meta.get(k)) or "circuit"
    empty = (
        '<p id="sfc-empty" class="sfc-empty">This circuit is empty: no feature or error node passed '
        "the thresholds it was built with. Rebuild it with lower thresholds to see a graph.</p>"
        if payload["empty"] else ""
    )
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Circuit: {html.escape(title)}</title>",
        f"<style>{(STATIC / 'viewer.css').read_text(encoding='utf-8')}</style>",
        f"<script>{get_plotlyjs()}</script>",
        "</head><body>",
        f'<header id="sfc-header"><h1 id="sfc-title">{html.escape(title)}</h1></header>',
        empty,
        '<main id="sfc-main"></main>',
        f'<script type="application/json" id="sfc-data">{_json_for_script(payload)}</script>',
        f"<script>{(STATIC / 'viewer.js').read_text(encoding='utf-8')}</script>",
        "</body></html>",
    ])


def render_html(circuit: Any, path: str | os.PathLike, dashboards: Mapping | None = None, *,
                labels: Mapping[str, str] | None = None) -> Path:
    """Write the interactive viewer for ``circuit`` (dict, ``Circuit`` or JSON path) to ``path``.

    ``dashboards`` (feature key -> dashboard, see :mod:`viz.dashboards`) are merged
    over any the circuit carries; every feature with a dashboard and no human
    label gets an automatic label (:func:`viz.labels.auto_label`), shown as such.
    ``labels`` (feature key -> human label) are merged over the circuit's own
    (:func:`viz.labels.human_labels`). The circuit is validated first, so an
    invalid one raises ``ValueError`` and writes nothing. The write is atomic.
    """
    text = _page(viewer_payload(circuit, dashboards, labels))
    return atomic_write_text(path, text)
