"""Attribution over dictionary features: the first half of the paper's pipeline.

- :mod:`attribution.model`: loading and wrapping a model, its sites, tracing, the embedded model;
- :mod:`attribution.dictionaries`: dictionary kinds, file formats, the cache, the corpus,
  the harvest and the trainer;
- :mod:`attribution.effects`: node effects (paper Eqs. 2-4);
- :mod:`attribution.edges`: edge effects (paper Eq. 5);
- :mod:`attribution.metrics`: the metrics effects are taken on;
- :mod:`attribution.options`: the option types shared along the pipeline;
- :mod:`attribution.cache`: the on-disk cache and atomic file writes.

Nothing is imported here, so that importing one piece stays cheap.
"""
