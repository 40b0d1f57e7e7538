"""The automatic judge: a *proxy* for the human who flags spurious features.

SHIFT's flagging step is meant for a person reading dashboards
(``sfc shift rank``). For unattended runs (CI, benchmarks) this module stands in
for them, using labelled held-out data the way a person uses their knowledge of
what gender is:

For each candidate feature, its activation is mean-pooled over the non-padding
tokens of every text of a *balanced* labelled set (where the true label and the
spurious attribute are independent). Each feature gets two AUROCs, how well the
pooled activation separates the spurious attribute and how well it separates the
true label, each folded to ``max(AUC, 1 - AUC)`` in [0.5, 1]. The judge flags the
feature if

    auc_spurious >= min_auc  and  auc_spurious > auc_label + margin.

This is not a human judgement: it sees only statistics of the data it is given,
it cannot tell a gender feature from a feature that merely co-varies with gender
in that data, and it uses labels a human would not need. Results obtained with it
are labelled ``flags: auto (proxy judge)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ablation.shift.probe import pool, probe_model
from ablation.shift.scoring import RankedFeature
from attribution.dictionaries.kinds import Dictionary
from attribution.model import tracing
from attribution.model.wrapper import SFCModel


@dataclass(frozen=True)
class Verdict:
    """The judge's view of one feature."""

    key: str
    auc_spurious: float
    auc_label: float
    flagged: bool


def auroc(score: Tensor, y: Tensor) -> float:
    """Area under the ROC curve of ``score`` for binary ``y`` (ties count half)."""
    y = y.bool()
    pos, neg = score[y], score[~y]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUROC needs both classes among the judged examples.")
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


@torch.no_grad()
def pooled_features(
    model: SFCModel, dictionaries: Mapping[str, Dictionary], keys: list[str], texts: list[str],
    batch_size: int = 32, progress: bool = True,
) -> Tensor:
    """Mean-pooled activation of each feature ``keys[j]`` over each text's real tokens, ``[n, len(keys)]``."""
    by_site: dict[str, list[int]] = {}
    for j, key in enumerate(keys):
        site, _, f = key.rpartition("/")
        by_site.setdefault(site, []).append(j)
    feats = {s: torch.tensor([int(keys[j].rpartition("/")[2]) for j in js]) for s, js in by_site.items()}
    top = max(site.layer for site in model.sites(list(by_site)))
    cut = probe_model(model, max(top, 0))
    sites = cut.sites(list(by_site))
    out = torch.zeros(len(texts), len(keys))
    for start in tqdm(range(0, len(texts), batch_size), desc="judge", unit="batch", disable=not progress):
        batch = cut.tokenize(list(texts[start : start + batch_size]))
        acts = tracing.run(cut, batch, sites, None, torch.arange(len(batch))).acts
        for s, js in by_site.items():
            f = dictionaries[s].encode(acts[s].float())[..., feats[s]]
            out[start : start + len(batch), js] = pool(f, batch.attention_mask).cpu()
    return out


def judge(
    model: SFCModel, dictionaries: Mapping[str, Dictionary], candidates: list[RankedFeature],
    texts: list[str], labels: list[int], spurious: list[int], *,
    min_auc: float = 0.6, margin: float = 0.05, progress: bool = True,
) -> list[Verdict]:
    """Verdicts on ``candidates`` from labelled balanced ``texts`` (see the module docstring)."""
    if not candidates:
        return []
    keys = [c.key for c in candidates]
    x = pooled_features(model, dictionaries, keys, texts, progress=progress)
    return verdicts(x, keys, labels, spurious, min_auc=min_auc, margin=margin)


def verdicts(pooled: Tensor, keys: list[str], labels: list[int], spurious: list[int], *,
             min_auc: float = 0.6, margin: float = 0.05) -> list[Verdict]:
    """The judge's rule (module docstring) on pooled activations ``[n, len(keys)]``."""
    y, z = torch.as_tensor(labels), torch.as_tensor(spurious)
    out = []
    for j, key in enumerate(keys):
        a_z = auroc(pooled[:, j], z)
        a_y = auroc(pooled[:, j], y)
        a_z, a_y = max(a_z, 1 - a_z), max(a_y, 1 - a_y)
        out.append(Verdict(key, a_z, a_y, a_z >= min_auc and a_z > a_y + margin))
    return out


proxy_judge = judge
"""The automatic proxy judge (:func:`judge`), under the name the ``sfc`` facade uses."""
