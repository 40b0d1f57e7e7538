"""TopK SAE training, harvesting and the dictionary cache, on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attribution import harvest as harvest_mod
from attribution.cache import atomic_dir
from attribution.corpus import load_corpus
from attribution.dictionaries import Identity
from attribution.dictionary_io import DictionaryFileError, load_dictionary, read_metadata
from attribution.dictionary_store import (
    build_dictionaries,
    evaluate_dictionaries,
    load_dictionaries,
)
from attribution.harvest import harvest
from attribution.models import SFCModel
from attribution.training import TrainConfig, reconstruction_stats, train_topk

SITES = ["resid_0", "resid_1"]


def _tiny(hidden: int = 32, seed: int = 0, name: str = "tiny-llama") -> SFCModel:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=100, max_position_embeddings=64)
    return SFCModel(LlamaForCausalLM(cfg), None, name=name)


@pytest.fixture(scope="module")
def model() -> SFCModel:
    return _tiny()


@pytest.fixture(scope="module")
def contexts() -> torch.Tensor:
    return torch.randint(0, 100, (96, 32), generator=torch.Generator().manual_seed(1))  # 3k tokens


@pytest.fixture(scope="module")
def acts(model, contexts, tmp_path_factory) -> torch.Tensor:
    h = harvest(model, model.sites(["resid_1"]), contexts, tmp_path_factory.mktemp("acts"), batch_size=96)
    return torch.from_numpy(h["resid_1"].copy())


CONFIG = TrainConfig(width=64, k=4, epochs=8, batch_size=128, lr=3e-3, dead_after=2000)


@pytest.fixture(scope="module")
def trained(acts):
    return train_topk(acts, CONFIG)


def test_harvest_matches_a_plain_forward_pass(model, contexts, acts):
    seen = []
    hook = model.hf.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model.hf(contexts)
    hook.remove()
    hidden = seen[0]
    assert torch.allclose(acts, hidden[:, 1:].reshape(-1, 32), atol=1e-5)


def test_training_lowers_reconstruction_error(trained, acts):
    sae, stats = trained
    assert stats.final_fvu < 0.6 * stats.initial_fvu
    assert reconstruction_stats(sae, acts)["variance_explained"] > 1 - 0.6 * stats.initial_fvu


def test_decoder_rows_are_unit_norm(trained):
    sae, _ = trained
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(sae.width), atol=1e-5)


def test_topk_l0_equals_k(trained, acts):
    sae, _ = trained
    assert ((sae.encode(acts) != 0).sum(-1) <= CONFIG.k).all()
    assert reconstruction_stats(sae, acts)["l0"] == pytest.approx(CONFIG.k, abs=0.05)


def test_scale_is_folded_into_the_saved_dictionary(acts):
    big = acts * 50.0
    sae_small, _ = train_topk(acts, TrainConfig(width=64, k=4, epochs=1, batch_size=128, seed=3))
    sae_big, _ = train_topk(big, TrainConfig(width=64, k=4, epochs=1, batch_size=128, seed=3))
    ve_small = reconstruction_stats(sae_small, acts)["variance_explained"]
    ve_big = reconstruction_stats(sae_big, big)["variance_explained"]
    assert ve_big == pytest.approx(ve_small, abs=0.02)


def test_built_dictionaries_reload_with_identical_encodings(model, contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    cfg = TrainConfig(width=64, k=4, epochs=1, batch_size=128)
    folders = build_dictionaries(model, model.sites(SITES), cfg, 0, contexts=contexts, batch_size=96, log=lambda m: None)
    loaded = load_dictionaries(model.name, SITES, model=model)
    x = torch.randn(10, 32)
    for site, folder in folders.items():
        meta = read_metadata(folder)
        assert meta["model"] == model.name and meta["site"] == site and meta["d"] == 32
        assert meta["width"] == 64 and meta["k"] == 4 and meta["tokens_trained"] > 0
        assert torch.equal(load_dictionary(folder).encode(x), loaded[site].encode(x))
    assert not (tmp_path / "activations" / model.name).exists() or not any(
        (tmp_path / "activations" / model.name).iterdir()
    )


def test_interrupted_build_resumes_skipping_finished_sites_and_reusing_the_harvest(
    model, contexts, tmp_path, monkeypatch
):
    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    cfg = TrainConfig(width=64, k=4, epochs=1, batch_size=128)
    sites = model.sites(SITES)
    build_dictionaries(model, sites, cfg, 0, contexts=contexts, batch_size=96, keep_activations=True,
                       log=lambda m: None)
    finished = tmp_path / "dictionaries" / model.name / "resid_0" / "ae.pt"
    before = finished.read_bytes()
    # "Interrupt": one site's dictionary is gone, the harvest is complete.
    for p in (tmp_path / "dictionaries" / model.name / "resid_1").iterdir():
        p.unlink()
    (tmp_path / "dictionaries" / model.name / "resid_1").rmdir()

    def no_model_runs(*args, **kwargs):
        raise AssertionError("the harvest should have been reused")

    monkeypatch.setattr(harvest_mod, "_read_sites", no_model_runs)
    logs: list[str] = []
    build_dictionaries(model, sites, cfg, 0, contexts=contexts, batch_size=96, log=logs.append)
    assert finished.read_bytes() == before
    assert any("resid_0: already built" in m for m in logs)
    assert (tmp_path / "dictionaries" / model.name / "resid_1" / "ae.pt").exists()


def test_failed_write_leaves_no_cache_entry(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "ae.pt").write_bytes(b"half")
        raise OSError("No space left on device")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def _save_random(folder: Path, model_name: str, d: int = 32) -> None:
    from attribution.dictionaries import random_sae
    from attribution.dictionary_io import save_dictionary

    save_dictionary(random_sae(d, 64, "topk", k=4), folder, {"model": model_name, "site": folder.name, "d": d})


def test_corrupt_ae_pt_raises_dictionary_file_error(model, tmp_path):
    _save_random(tmp_path / "resid_0", model.name)
    (tmp_path / "resid_0" / "ae.pt").write_bytes(b"not a torch file")
    with pytest.raises(DictionaryFileError, match="corrupt"):
        load_dictionaries(model.name, ["resid_0"], model=model, root=tmp_path)


def test_missing_dictionary_says_how_to_build_it(model, tmp_path):
    with pytest.raises(DictionaryFileError, match="sfc dictionaries build --model tiny-llama --sites resid_1"):
        load_dictionaries(model.name, ["resid_1"], model=model, root=tmp_path)


def test_dictionary_of_another_model_is_rejected(model, tmp_path):
    _save_random(tmp_path / "resid_0", "some-other-model")
    with pytest.raises(DictionaryFileError, match="built for model 'some-other-model'"):
        load_dictionaries(model.name, ["resid_0"], model=model, root=tmp_path)


def test_dictionary_of_another_width_is_rejected_naming_both_shapes(model, tmp_path):
    _save_random(tmp_path / "resid_0", model.name, d=48)
    with pytest.raises(DictionaryFileError, match=r"resid_0.*d=48.*\(64, 48\).*d=32"):
        load_dictionaries(model.name, ["resid_0"], model=model, root=tmp_path)


def test_unknown_site_is_rejected(model, tmp_path):
    with pytest.raises(ValueError, match="Unknown site"):
        load_dictionaries(model.name, ["resid_7"], model=model, root=tmp_path)


def test_identity_dictionary_recovers_all_of_the_ce_loss(model, contexts):
    rows = evaluate_dictionaries(model, {"resid_0": Identity(32)}, contexts=contexts[:8])
    assert rows[0]["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["variance_explained"] == pytest.approx(1.0, abs=1e-6)


def test_corpus_documents_are_unique_and_free_of_task_templates():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "build_corpus.py"
    spec = importlib.util.spec_from_file_location("build_corpus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    docs = load_corpus(None)
    assert len(docs) > 10_000
    keys = [" ".join(d.lower().split()) for d in docs]
    assert len(set(keys)) == len(keys)
    assert not any(module.LEAKAGE.search(d) for d in docs)
    assert module.LEAKAGE.search("Yes, the athlete that the managers like does.")
    assert json.loads(json.dumps(load_corpus("heldout")[:1]))


def test_cleanup_spares_the_temporary_folder_of_a_running_build(tmp_path):
    """A build's in-progress folder must survive another build's clean-up (they share the cache)."""
    import os

    from attribution.cache import atomic_dir, remove_stale_temporaries

    with atomic_dir(tmp_path / "harvest") as live:
        (live / "part.npy").write_bytes(b"x")
        dead = tmp_path / ".harvest.pid999999999.abc.tmp"
        dead.mkdir()
        remove_stale_temporaries(tmp_path)
        assert live.exists() and (live / "part.npy").exists()
        assert not dead.exists()
        assert str(os.getpid()) in live.name
    assert (tmp_path / "harvest" / "part.npy").exists()
