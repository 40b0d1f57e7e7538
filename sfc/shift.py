"""SHIFT's human step: a page of the top-ranked features to read and flag.

The page is the circuit viewer (:func:`viz.html.render_html`) showing a
"circuit" whose nodes are the ranked features (aggregation ``sum``, no edges):
each node's effect is its SHIFT score, its dashboard shows its top contexts and
promoted tokens, its label carries the automatic proxy judge's statistics, and
the panel's flag checkbox and download button write the ``sfc-feature-flags``
file that ``sfc shift run --flags FILE`` reads. The circuit's metadata names
the model and the dictionary ids, so the downloaded file carries them and a
file made for other dictionaries is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ablation.shift.judge import Verdict, judge
from ablation.shift.run import ShiftSetup
from ablation.shift.scoring import RankedFeature
from attribution.cache import atomic_write_text, cache_dir
from circuits.graph import Circuit, CircuitMetadata, Node


def ranking_circuit(
    ranking: list[RankedFeature], *, model: str, sites: list[str], n_layers: int, dictionaries: dict[str, str],
    labels: dict[str, str] | None = None, layer: int | None = None,
) -> Circuit:
    """A node-only circuit of the ranked features (plus the metric node), for the viewer."""
    labels = labels or {}
    nodes = [Node.make(r.site, r.feature, None, r.effect, label=labels.get(r.key)) for r in ranking]
    nodes.append(Node.metric(n_layers, sum(r.effect for r in ranking)))
    meta = CircuitMetadata(
        model=model, sites=list(sites), n_layers=n_layers, dictionaries={s: dictionaries[s] for s in sites
                                                                        if s in dictionaries},
        task="shift", method="ig", aggregation="sum", n_examples=0,
        extra={"shift_probe_layer": layer, "page": "shift-rank"},
    )
    return Circuit(nodes=nodes, edges=[], metadata=meta)


def _verdict_label(v: Verdict) -> str:
    return (f"proxy judge: AUROC gender/spurious {v.auc_spurious:.2f}, label {v.auc_label:.2f}"
            f"{' (would flag)' if v.flagged else ''}")


def write_rank_page(
    setup: ShiftSetup, out: str | os.PathLike, *, top: int = 50, dashboards: bool = True,
    n_corpus: int = 300, dashboard_cache: str | os.PathLike | None = None, progress: bool = True,
) -> dict[str, Path]:
    """Write ``rank.html`` (the flagging page), ``ranking.json`` and ``circuit.json`` under ``out``.

    The top ``top`` ranked features are shown; their dashboards read the balanced
    train texts plus ``n_corpus`` held-out documents of the bundled corpus, cached
    under ``dashboard_cache`` (default ``$SFC_CACHE/dashboards``)."""
    from viz.dashboards import compute_dashboards
    from viz.html import render_html

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    top_features = setup.ranking[:top]
    bal = setup.splits.balanced_train
    verdicts = judge(setup.model, setup.dictionaries, top_features, bal.texts, bal.labels, bal.spurious,
                     min_auc=setup.config.min_auc, margin=setup.config.margin, progress=progress)
    labels = {v.key: _verdict_label(v) for v in verdicts}
    circuit = ranking_circuit(top_features, model=setup.model.name, sites=setup.sites,
                              n_layers=setup.model.config.num_hidden_layers, dictionaries=setup.ids,
                              labels=labels, layer=setup.layer)
    dash = None
    if dashboards and top_features:
        from attribution.dictionaries.corpus import load_corpus

        texts = list(bal.texts) + load_corpus("heldout")[:n_corpus]
        dash = compute_dashboards(setup.model, setup.dictionaries, [r.key for r in top_features], texts,
                                  cache_dir=dashboard_cache or cache_dir() / "dashboards")
    paths = {"page": render_html(circuit, out / "rank.html", dashboards=dash)}
    paths["circuit"] = circuit.save(out / "circuit.json")
    doc = {"model": setup.model.name, "layer": setup.layer, "sites": setup.sites,
           "ranking": [{"key": r.key, "effect": r.effect} for r in setup.ranking],
           "verdicts": [v.__dict__ for v in verdicts]}
    paths["ranking"] = atomic_write_text(out / "ranking.json", json.dumps(doc, indent=1))
    return paths
