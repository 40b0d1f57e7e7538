"""Circuit graphs in the browser: a plotly figure, a self-contained interactive
HTML viewer, and feature dashboards to show in it.

- :func:`circuit_figure`: a static plotly figure of a circuit (for notebooks);
- :func:`render_html`: one offline HTML file with hover, click-to-trace,
  threshold sliders, search, labelling and flagging for SHIFT;
- :func:`compute_dashboards`: top-activating contexts and promoted/suppressed
  tokens for the features of a circuit, cached on disk;
- :func:`curve_figure`: faithfulness and completeness against circuit size.
"""

from viz.curves import curve_figure
from viz.dashboards import compute_dashboards
from viz.figure import circuit_figure
from viz.html import render_html

__all__ = ["circuit_figure", "compute_dashboards", "curve_figure", "render_html"]
