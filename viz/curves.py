"""Faithfulness and completeness curves as a plotly figure (paper Fig. 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots


class CurvePointLike(Protocol):
    """What a curve point carries (:class:`ablation.sweep.CurvePoint` is one)."""

    threshold: float
    n_nodes: int
    faithfulness: float
    completeness: float


def curve_figure(
    curves: Mapping[str, Sequence[CurvePointLike]],
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
