"""Faithfulness and completeness curves over node thresholds (SPEC §5.3, paper Fig. 3).

One sweep evaluates the circuits ``|effect| > T_N`` for a list of thresholds:
the ablation values, ``m(M)`` and ``m(∅)`` are computed once, then each
threshold costs two forward passes (circuit and complement).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots
from torch import Tensor
from tqdm.auto import tqdm

from ablation.evaluate import (
    AblationKind,
    ErrorHandling,
    check_masks,
    check_options,
    endpoints,
    evaluate_circuit,
    prepare_ablation,
)
from ablation.masks import NodeMask, masks_from_effects
from attribution.dictionaries import Dictionary
from attribution.models import Batch, SFCModel
from attribution.sites import AttnHook
from attribution.tracing import Metric

SelectNodes = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], float], dict[str, NodeMask]]
"""``select(effects_features, effects_errors, threshold) -> masks``; the default is
:func:`ablation.masks.masks_from_effects` (``|effect| > threshold``)."""


@dataclass(frozen=True)
class CurvePoint:
    """One circuit of a sweep: its threshold, size and scores."""

    threshold: float
    n_nodes: int
    faithfulness: float
    completeness: float


def sweep(
    model: SFCModel,
    batch: Batch,
    dictionaries: Mapping[str, Dictionary],
    effects_features: Mapping[str, Tensor],
    effects_errors: Mapping[str, Tensor],
    metric: Metric,
    thresholds: Sequence[float],
    rows: Tensor | None = None,
    *,
    select: SelectNodes = masks_from_effects,
    ablation: AblationKind = "mean",
    reference: Batch | None = None,
    handle_errors: ErrorHandling = "default",
    start_layer: int = -1,
    seed: int = 0,
    attn: AttnHook = "output",
    progress: bool = True,
) -> list[CurvePoint]:
    """Faithfulness and completeness (SPEC §5.1) of the circuit at each node threshold.

    ``effects_features[site]`` is ``[s, F]`` or ``[F]`` and ``effects_errors[site]``
    is ``[s]`` or ``[]``; ``select`` turns them and a threshold into node masks.
    Points come in the order of ``thresholds``; ``n_nodes`` counts sites with
    ``layer >= start_layer`` only.
    """
    if not thresholds:
        raise ValueError("No thresholds given: pass at least one, e.g. numpy.logspace(-4, 0, 15).")
    check_options(ablation, handle_errors)
    batch = model.tokenize(batch)
    # Every threshold's masks have the same shapes, so checking one set checks them all.
    check_masks(select(effects_features, effects_errors, thresholds[0]), dictionaries, batch.seq_len)
    setup = prepare_ablation(
        model, batch, dictionaries,
        ablation=ablation, reference=reference, start_layer=start_layer, seed=seed, attn=attn,
    )
    m_full, m_empty = endpoints(model, batch, setup, metric, rows)
    points = []
    for threshold in tqdm(thresholds, desc="thresholds", disable=not progress):
        masks = select(effects_features, effects_errors, float(threshold))
        result = evaluate_circuit(
            model, batch, setup, masks, metric, rows, m_full, m_empty,
            handle_errors=handle_errors, start_layer=start_layer,
        )
        points.append(CurvePoint(float(threshold), result.n_nodes, result.faithfulness, result.completeness))
    return points


def curve_figure(
    curves: Mapping[str, Sequence[CurvePoint]],
    *,
    log_x: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Faithfulness (left) and completeness (right) against the number of nodes, one
    line per setting (e.g. ``{"features": ..., "neurons": ...}``), as in paper Fig. 3."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Faithfulness", "Completeness"))
    palette = qualitative.Plotly
    for i, (name, points) in enumerate(curves.items()):
        points = sorted(points, key=lambda p: p.n_nodes)
        x = [p.n_nodes for p in points]
        color = palette[i % len(palette)]
        for col, key in ((1, "faithfulness"), (2, "completeness")):
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[getattr(p, key) for p in points],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": color},
                    customdata=[p.threshold for p in points],
                    hovertemplate=f"{name}<br>nodes %{{x}}<br>{key} %{{y:.3f}}<br>T_N %{{customdata:.3g}}"
                    "<extra></extra>",
                ),
                row=1,
                col=col,
            )
    fig.update_xaxes(title_text="nodes", type="log" if log_x else "linear")
    fig.update_yaxes(title_text="faithfulness", row=1, col=1)
    fig.update_yaxes(title_text="completeness", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white")
    return fig
