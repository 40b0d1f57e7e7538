"""Scoring features for SHIFT: node effects of the probe's metric (SPEC §6.3).

The metric is the probe logit on the pooled ``resid_ℓ``, sign-flipped for label 1:

    m(x) = s_y · (w · pool(resid_ℓ(x)) + b),   s_0 = +1, s_1 = -1,

so ``m`` measures how *wrong* the probe is, and a node whose zero-ablation makes it
more wrong has a positive effect (it carries what the probe relies on). Effects
come from the engine (:func:`attribution.effects.node_effects`: IG, ``steps``
points, zero ablation) at every dictionary site up to layer ``ℓ``, run on the model
cut after block ``ℓ`` (:func:`ablation.shift.probe.probe_model`), summed over
positions and averaged over examples. Features are ranked by positive effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ablation.shift.probe import check_layer, probe_model
from attribution.dictionaries.kinds import Dictionary
from attribution.effects import node_effects
from attribution.model.wrapper import SFCModel


@dataclass(frozen=True)
class RankedFeature:
    """One scored feature: ``site``, ``feature`` index and its mean summed ``effect``."""

    site: str
    feature: int
    effect: float

    @property
    def key(self) -> str:
        return f"{self.site}/{self.feature}"


def scored_sites(model: SFCModel, dictionaries: Mapping[str, Dictionary], layer: int) -> list[str]:
    """The dictionary sites at or below block ``layer`` (``embed`` counts as below 0), in forward order."""
    check_layer(model, layer)
    return [s.name for s in model.all_sites() if s.name in dictionaries and s.layer <= layer]


def probe_metric(mask: Tensor, targets: Tensor, bias: float):
    """``metric(logits [n, s, 1], rows [n]) -> [n]``: ``s_y (pool(logits) + b)`` (module docstring)."""
    sign = 1.0 - 2.0 * targets.float()

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        keep = mask.to(logits.device)[rows].bool()
        zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
        pooled = torch.where(keep, logits[..., 0], zero).sum(1) / keep.sum(1).clamp(min=1).to(logits.dtype)
        return sign.to(logits.device, logits.dtype)[rows] * (pooled + bias)

    return metric


def feature_effects(
    model: SFCModel,
    dictionaries: Mapping[str, Dictionary],
    probe: nn.Linear,
    layer: int,
    texts: list[str],
    targets: list[int],
    *,
    sites: list[str] | None = None,
    steps: int = 10,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Mean over examples of the per-example summed effects: features ``{site: [F]}``, errors ``{site: []}``.

    ``targets`` are the labels the metric's sign follows (the true label for SHIFT,
    the spurious attribute for the feature and neuron skylines).
    """
    if not texts:
        raise ValueError("No texts to score features on: give at least one example.")
    if len(texts) != len(targets):
        raise ValueError(f"{len(texts)} texts but {len(targets)} targets: give one target per text.")
    sites = sites or scored_sites(model, dictionaries, layer)
    if not sites:
        raise ValueError(f"No dictionary at or below layer {layer}: load dictionaries for sites up to the probe layer.")
    cut = probe_model(model, layer, probe.weight.detach()[0])
    dicts = {s: dictionaries[s] for s in sites}
    feats = {s: torch.zeros(dicts[s].width) for s in sites}
    errs = {s: torch.zeros(()) for s in sites}
    bias = float(probe.bias.detach()[0])
    n = len(texts)
    bar = tqdm(range(0, n, batch_size), desc=f"scoring features (IG, {len(sites)} sites)", unit="batch",
               disable=not progress)
    for start in bar:
        batch = cut.tokenize(list(texts[start : start + batch_size]))
        y = torch.as_tensor(targets[start : start + batch_size])
        eff = node_effects(cut, dicts, batch, None, probe_metric(batch.attention_mask, y, bias),
                           sites=sites, method="ig", steps=steps, ablation="zero", max_rows=256, progress=False)
        for s in sites:
            feats[s] += eff.features[s].sum(dim=(0, 1)).detach().float().cpu()
            errs[s] += eff.errors[s].sum().detach().float().cpu()
    return {s: v / n for s, v in feats.items()}, {s: v / n for s, v in errs.items()}


def rank_features(
    effects: Mapping[str, Tensor], *, top: int | None = None, threshold: float = 0.0
) -> list[RankedFeature]:
    """Features with effect > ``threshold`` (positive only), strongest first, at most ``top``."""
    out = []
    for site, eff in effects.items():
        idx = (eff > threshold).nonzero()[:, 0]
        out += [RankedFeature(site, int(i), float(eff[i])) for i in idx]
    out.sort(key=lambda r: (-r.effect, r.site, r.feature))
    return out[:top] if top is not None else out
