"""Interventions that ablate nodes: faithfulness and completeness of circuits (SPEC §5)."""

from ablation.config import AblationConfig, ErrorHandling
from ablation.evaluate import (
    AblationValues,
    FaithfulnessResult,
    SiteValues,
    ablated_metric,
    endpoints,
    evaluate_circuit,
    evaluated_sites,
    faithfulness,
    prepare_ablation,
    resample_rows,
    run_with_ablations,
    score,
)
from ablation.sweep import CurvePoint, SelectNodes, sweep

__all__ = [
    "AblationConfig",
    "AblationValues",
    "CurvePoint",
    "ErrorHandling",
    "FaithfulnessResult",
    "SelectNodes",
    "SiteValues",
    "ablated_metric",
    "endpoints",
    "evaluate_circuit",
    "evaluated_sites",
    "faithfulness",
    "prepare_ablation",
    "resample_rows",
    "run_with_ablations",
    "score",
    "sweep",
]
