"""The embedded SmolLM2 and its dictionaries (slow: real model; run with ``pytest -m slow``)."""

from __future__ import annotations

import pytest
import torch

from attribution.dictionaries.formats import DictionaryFileError
from attribution.dictionaries.store import build_dictionaries, load_cached_dictionaries
from attribution.dictionaries.training import TrainConfig
from attribution.model.embedded import DEFAULT_SITES, MODEL_NAME, load_smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    load_smollm2()  # converts once if the cache is empty
    return load_smollm2()


def test_a_cached_load_reads_the_cache_and_gives_the_same_model(model, monkeypatch):
    """Later loads come from the safetensors cache, never the GGUF file (load time is in
    benchmarks/dictionaries.py)."""
    import attribution.model.embedded as smollm

    monkeypatch.setattr(smollm, "_convert", lambda target: pytest.fail("the cached model was converted again"))
    again = load_smollm2()
    for a, b in zip(model.hf.state_dict().values(), again.hf.state_dict().values()):
        assert torch.equal(a, b)


def test_smollm2_predicts_plausible_text(model):
    batch = model.tokenize(["The capital of France is"])
    with torch.no_grad():
        logits = model.hf(batch.input_ids).logits
    assert model.tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_default_sites_exist_and_have_d_576(model):
    sites = model.sites(list(DEFAULT_SITES))
    assert [s.d for s in sites] == [576] * len(DEFAULT_SITES)


def test_corrupt_model_cache_is_rebuilt(tmp_path, monkeypatch):
    from attribution.cache import model_cache

    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    load_smollm2()  # converts the GGUF file into tmp_path
    weights = model_cache(MODEL_NAME) / "model.safetensors"
    weights.write_bytes(b"truncated")
    rebuilt = load_smollm2()
    assert rebuilt.name == MODEL_NAME and weights.stat().st_size > 100_000_000


def test_tiny_build_on_smollm2_reconstructs_held_out_activations(model, tmp_path, monkeypatch):
    from attribution.dictionaries.corpus import corpus_contexts
    from attribution.dictionaries.training import reconstruction_stats

    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    cfg = TrainConfig(width=1152, k=32, epochs=2)
    folders = build_dictionaries(model, model.sites(["resid_3"]), cfg, 4096, log=lambda m: None)
    assert (folders["resid_3"] / "ae.pt").exists()
    sae = load_cached_dictionaries(MODEL_NAME, ["resid_3"], model=model)["resid_3"]
    ids = corpus_contexts(model.tokenizer, 1024, 128, "heldout")
    from attribution.model.tracing import run
    from attribution.model.wrapper import Batch

    x = run(model, Batch(ids, torch.ones_like(ids)), model.sites(["resid_3"]), None, torch.arange(len(ids)))
    stats = reconstruction_stats(sae, x.acts["resid_3"][:, 1:].reshape(-1, 576))
    assert stats["variance_explained"] > 0.5


def test_missing_dictionaries_name_the_build_command(tmp_path):
    with pytest.raises(DictionaryFileError, match="sfc dictionaries build --model smollm2-135m"):
        load_cached_dictionaries(MODEL_NAME, root=tmp_path)
