"""The one place that runs the model through nnsight.

Attribution needs three kinds of forward pass, all expressed as "run the
model, and at each site read the activation and maybe write another in its
place":

- ``read``: record site activations (no gradients);
- ``total``: site activations stay in the autograd graph, so the gradient of
  the metric with respect to each is the ordinary, whole-model gradient (the
  paper's pass-through gradient, App. A.3);
- ``frozen``: every site's output is replaced by a detached leaf with the same
  value, so the activation recorded at a site depends on the sites directly
  upstream of it and on nothing else. Differentiating one site's activation
  with respect to the leaves is the Jacobian ``∇_{u, stop(M)} d`` of Eq. 5.
  A site named in ``replace`` gets a leaf of the given value instead (IG edges
  take the Jacobian at points between the clean and patch states).

``replace`` maps a site name to what to write there instead of its activation:
a tensor (interpolations for IG, patched rows for exact patching) or a function
of the activation (an SAE splice with ablations, for evaluation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from attribution.model.sites import Site
from attribution.model.wrapper import Batch, SFCModel

Metric = Callable[[Tensor, Tensor], Tensor]
"""``metric(logits [n, s, vocab], rows [n]) -> [n]``: ``rows[i]`` is the example
that row ``i`` of the run belongs to (rows repeat for IG and exact patching)."""

GradMode = Literal["read", "total", "frozen"]
MetricPositions = Literal["all", "last"]
"""Which logits the metric sees: every position, or the last only (``[n, 1, vocab]``),
which skips the unembedding of every other position (HF's ``logits_to_keep``)."""


@dataclass
class Trace:
    """What one pass recorded: site activations (``acts``), the leaves that
    replaced site outputs in ``frozen`` mode (``leaves``) and the metric ``[n]``."""

    acts: dict[str, Tensor] = field(default_factory=dict)
    leaves: dict[str, Tensor] = field(default_factory=dict)
    metric: Tensor | None = None


def site_envoy(model: SFCModel, site: Site):
    """The nnsight envoy of the module that holds ``site``."""
    envoy = model.nn
    for part in site.module.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy


def run(
    model: SFCModel,
    batch: Batch,
    sites: list[Site],
    metric: Metric | None,
    rows: Tensor,
    mode: GradMode = "read",
    replace: dict[str, Tensor | Callable[[Tensor], Tensor]] | None = None,
    positions: MetricPositions = "all",
) -> Trace:
    """One forward pass through nnsight; see the module docstring for ``mode``."""
    replace = replace or {}
    out = Trace()
    needs_grad = mode != "read" or any(isinstance(t, Tensor) and t.requires_grad for t in replace.values())
    grad_ctx = torch.enable_grad() if needs_grad else torch.no_grad()
    kwargs = {"logits_to_keep": 1} if positions == "last" and metric is not None else {}
    with grad_ctx, model.nn.trace(batch.input_ids, attention_mask=batch.attention_mask, **kwargs):
        for site in sites:
            envoy = site_envoy(model, site)
            raw = envoy.input if site.hook == "input" else envoy.output
            x = raw[0] if isinstance(raw, tuple) else raw
            new = None
            if site.name in replace:
                new = replace[site.name]
                new = new(x) if callable(new) else new
                # Values computed in float32 (IG paths, patches, SAE splices) are written
                # back in the model's dtype; the cast passes gradients to the float32 value.
                new = new.to(x.dtype)
                if mode == "frozen":  # the leaf takes the given value (IG edges: a path point)
                    new = new.detach().requires_grad_()
                    out.leaves[site.name] = new
            elif mode == "total":
                # A leaf where nothing upstream requires grad; otherwise a copy that
                # stays in the graph, so gradients pass straight through the site.
                new = x.clone() if x.requires_grad else x.detach().requires_grad_()
            elif mode == "frozen":
                new = x.detach().requires_grad_()
                out.leaves[site.name] = new
            out.acts[site.name] = new if (mode == "total" and new is not None) else x
            if new is not None:
                if site.hook == "input":
                    envoy.input = new
                elif isinstance(raw, tuple):
                    envoy.output = (new, *raw[1:])
                else:
                    envoy.output = new
        if metric is not None:
            logits = model.nn.output.logits
            value = metric(logits, rows)
            # A half-precision model's metric is read in float32 (effects are accumulated there).
            out.metric = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if out.metric is not None:
        _check_metric(out.metric, len(batch))
    return out


def _check_metric(value: Tensor, n: int) -> None:
    if not isinstance(value, Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"The metric returned shape {shape}, but must return one value per row, shape ({n},): "
            "reduce over positions and vocabulary inside the metric."
        )
    if not torch.isfinite(value).all():
        raise ValueError("The metric returned NaN or inf: check the answer token ids and the metric's arithmetic.")
