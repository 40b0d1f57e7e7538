"""Faithfulness and completeness curves over node thresholds (SPEC §5.3, paper Fig. 3).

One sweep evaluates the circuits ``|effect| > T_N`` for a list of thresholds:
the ablation values, ``m(M)`` and ``m(∅)`` are computed once, then each
threshold costs two forward passes (circuit and complement).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor
from tqdm.auto import tqdm

from ablation.config import AblationConfig
from ablation.evaluate import check_masks, endpoints, evaluate_circuit, prepare_ablation
from attribution.dictionaries.kinds import Dictionary
from attribution.model.tracing import Metric
from attribution.model.wrapper import Batch, SFCModel
from circuits.masks import NodeMask, masks_from_effects

SelectNodes = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], float], dict[str, NodeMask]]
"""``select(effects_features, effects_errors, threshold) -> masks``; the default is
:func:`circuits.masks.masks_from_effects` (``|effect| > threshold``)."""


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
    config: AblationConfig = AblationConfig(),
    reference: Batch | None = None,
    progress: bool = True,
) -> list[CurvePoint]:
    """Faithfulness and completeness (SPEC §5.1) of the circuit at each node threshold.

    ``effects_features[site]`` is ``[s, F]`` or ``[F]`` and ``effects_errors[site]``
    is ``[s]`` or ``[]``; ``select`` turns them and a threshold into node masks.
    Points come in the order of ``thresholds``; ``n_nodes`` counts sites with
    ``layer >= config.start_layer`` only.
    """
    if not thresholds:
        raise ValueError("No thresholds given: pass at least one, e.g. numpy.logspace(-4, 0, 15).")
    batch = model.tokenize(batch)
    # Every threshold's masks have the same shapes, so checking one set checks them all.
    check_masks(select(effects_features, effects_errors, thresholds[0]), dictionaries, batch.seq_len)
    setup = prepare_ablation(model, batch, dictionaries, config, reference=reference)
    m_full, m_empty = endpoints(model, batch, setup, metric, rows)
    points = []
    for threshold in tqdm(thresholds, desc="thresholds", disable=not progress):
        masks = select(effects_features, effects_errors, float(threshold))
        result = evaluate_circuit(model, batch, setup, masks, metric, rows, m_full, m_empty, config=config)
        points.append(CurvePoint(float(threshold), result.n_nodes, result.faithfulness, result.completeness))
    return points
