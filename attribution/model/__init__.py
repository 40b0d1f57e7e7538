"""A language model wrapped for attribution: loading, sites, tracing, the embedded model."""

from attribution.model.embedded import DEFAULT_SITES, MODEL_NAME, load_smollm2
from attribution.model.loading import load_model
from attribution.model.sites import Site, register_architecture
from attribution.model.tracing import Metric
from attribution.model.wrapper import Batch, SFCModel

__all__ = [
    "DEFAULT_SITES",
    "MODEL_NAME",
    "Batch",
    "Metric",
    "SFCModel",
    "Site",
    "load_model",
    "load_smollm2",
    "register_architecture",
]
