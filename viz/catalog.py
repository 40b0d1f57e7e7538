"""The catalog's offline index page and its faithfulness figure.

:func:`render_catalog_index` writes one self-contained HTML page (no network, no
server) listing every cluster of a catalog (``catalog.json``, see
:mod:`sfc.catalog`): its size, example contexts with the answer token
highlighted, its top features, its faithfulness on held-out members of its own
cluster and on members of other clusters, and a link to its circuit page in the
viewer. A search box filters clusters by any text they show (a token, a feature
id); a menu sorts them by size, faithfulness or the own/other ratio.

Safety as in :mod:`viz.html`: the catalog is embedded as escaped JSON and the
script writes text with ``textContent`` only.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from pathlib import Path

import plotly.graph_objects as go

from attribution.cache import atomic_write_text
from viz.html import _json_for_script

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
#controls{display:flex;gap:1em;align-items:center;margin:1em 0}
#search{flex:1;max-width:30em;padding:.4em}
.cluster{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:.7em 0}
.cluster h2{font-size:1.05em;margin:0 0 .4em 0}
.stats span{margin-right:1.2em}
.ctx{font-family:ui-monospace,monospace;font-size:.9em;white-space:pre-wrap;margin:.2em 0;color:#444}
.ans{background:#ffe066;color:#000;font-weight:bold;border-radius:3px;padding:0 .15em}
.feat{font-family:ui-monospace,monospace;font-size:.85em;margin-right:.8em}
.pos{color:#1a7f37}.neg{color:#b3261e}
#summary{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em}
"""

_SCRIPT = r"""
(function(){
const data = JSON.parse(document.getElementById('catalog-data').textContent);
const list = document.getElementById('clusters');
const search = document.getElementById('search');
const sort = document.getElementById('sort');
const count = document.getElementById('count');
function fmt(x){ return (x === null || x === undefined) ? 'n/a' : Number(x).toFixed(3); }
function el(tag, cls, text){ const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text; return e; }
function haystack(c){
  const parts = [String(c.id)];
  for (const ex of c.examples) { parts.push(ex.context.join('')); parts.push(ex.answer); }
  for (const f of c.top_features) parts.push(f.id);
  return parts.join(' ').toLowerCase();
}
const cards = data.clusters.map(function(c){
  const card = el('div', 'cluster'); card.dataset.id = c.id;
  const h = el('h2'); const a = el('a', null, 'Cluster ' + c.id); a.href = c.page; h.appendChild(a);
  card.appendChild(h);
  const stats = el('div', 'stats');
  stats.appendChild(el('span', 'size', 'size ' + c.size));
  stats.appendChild(el('span', 'own', 'faithfulness own ' + fmt(c.faithfulness_own)));
  stats.appendChild(el('span', 'other', 'other ' + fmt(c.faithfulness_other)));
  stats.appendChild(el('span', 'ratio', 'ratio ' + fmt(c.ratio)));
  stats.appendChild(el('span', null, c.n_nodes + ' nodes, ' + c.n_edges + ' edges'));
  card.appendChild(stats);
  for (const ex of c.examples) {
    const p = el('div', 'ctx');
    p.appendChild(document.createTextNode((ex.truncated ? '\u2026' : '') + ex.context.join('')));
    p.appendChild(el('span', 'ans', ex.answer));
    card.appendChild(p);
  }
  const feats = el('div', 'feats');
  for (const f of c.top_features) feats.appendChild(el('span', 'feat ' + (f.effect >= 0 ? 'pos' : 'neg'),
    f.id + ' ' + Number(f.effect).toPrecision(3)));
  card.appendChild(feats);
  return {c: c, card: card, text: haystack(c)};
});
function key(c, k){ const v = c[k]; return (v === null || v === undefined) ? -Infinity : v; }
function render(){
  const q = search.value.trim().toLowerCase();
  const k = sort.value;
  const shown = cards.filter(x => !q || x.text.includes(q));
  shown.sort((x, y) => (key(y.c, k) - key(x.c, k)) || (x.c.id - y.c.id));
  list.replaceChildren(...shown.map(x => x.card));
  count.textContent = shown.length + ' of ' + cards.length + ' clusters';
}
search.addEventListener('input', render); sort.addEventListener('change', render);
render();
})();
"""


def _summary_html(summary: Mapping) -> str:
    def q(name: str) -> str:
        v = summary.get(name)
        return "n/a" if not v else f"median {v['median']:.3f} (IQR {v['q25']:.3f} to {v['q75']:.3f})"

    frac = summary.get("fraction_own_above_other")
    return (
        f"<div id='summary'>{summary.get('n_samples')} samples, {summary.get('n_clusters')} clusters. "
        f"Faithfulness on own held-out members: {html.escape(q('faithfulness_own'))}; on other clusters' members: "
        f"{html.escape(q('faithfulness_other'))}; own/other ratio: {html.escape(q('ratio_own_over_other'))}; "
        f"own above other for {'n/a' if frac is None else f'{100 * frac:.0f}%'} of clusters. "
        "<a href='faithfulness.html'>Figure</a>.</div>"
    )


def render_catalog_index(catalog: Mapping, path: str | os.PathLike) -> Path:
    """Write the index page of ``catalog`` (the dict of ``catalog.json``) to ``path``, atomically."""
    if catalog.get("format") != "sfc-catalog" or not isinstance(catalog.get("clusters"), list):
        raise ValueError("This is not a catalog: expected the dict of a catalog.json (format 'sfc-catalog').")
    settings = catalog.get("settings", {})
    title = f"Catalog of behaviours: {settings.get('model', 'model')}"
    text = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_STYLE}</style>", "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _summary_html(catalog.get("summary", {})),
        '<div id="controls"><input id="search" type="search" placeholder="search tokens, features, cluster id">',
        '<label>sort by <select id="sort"><option value="size">size</option>'
        '<option value="faithfulness_own">faithfulness (own)</option>'
        '<option value="faithfulness_other">faithfulness (other)</option>'
        '<option value="ratio">own/other ratio</option></select></label><span id="count"></span></div>',
        '<main id="clusters"></main>',
        f'<script type="application/json" id="catalog-data">{_json_for_script(dict(catalog))}</script>',
        f"<script>{_SCRIPT}</script>", "</body></html>",
    ])
    return atomic_write_text(path, text)


def catalog_figure(catalog: Mapping) -> go.Figure:
    """Own-cluster against other-cluster faithfulness, one point per cluster (size = cluster size),
    with the diagonal: points above it explain their own behaviour better than others'."""
    rows = [c for c in catalog["clusters"] if c["faithfulness_own"] is not None and c["faithfulness_other"] is not None]
    xs = [c["faithfulness_other"] for c in rows]
    ys = [c["faithfulness_own"] for c in rows]
    fig = go.Figure(go.Scatter(
        x=xs, y=ys, mode="markers", text=[f"cluster {c['id']} (size {c['size']})" for c in rows],
        marker={"size": [6 + 2 * c["size"] ** 0.5 for c in rows], "opacity": 0.7}, name="clusters",
    ))
    lo = min(xs + ys + [0.0])
    hi = max(xs + ys + [1.0])
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line={"dash": "dash", "color": "gray"},
                             name="own = other"))
    fig.update_layout(title="Faithfulness of each cluster's circuit", xaxis_title="on other clusters' members",
                      yaxis_title="on held-out members of its own cluster", template="plotly_white")
    return fig


__all__ = ["catalog_figure", "render_catalog_index"]
