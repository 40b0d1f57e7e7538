"""TopK SAE training, harvesting and the dictionary cache, on a tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attribution.cache import atomic_dir
from attribution.dictionaries import Identity, training
from attribution.dictionaries import harvest as harvest_mod
from attribution.dictionaries.corpus import load_corpus
from attribution.dictionaries.formats import DictionaryFileError, load_dictionary, read_metadata
from attribution.dictionaries.harvest import harvest
from attribution.dictionaries.store import (
    build_dictionaries,
    evaluate_dictionaries,
    load_cached_dictionaries,
)
from attribution.dictionaries.training import TrainConfig, reconstruction_stats, train_topk
from attribution.model.wrapper import SFCModel

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


@pytest.fixture(scope="module")
def plain_resid_1(model, contexts) -> torch.Tensor:
    """resid_1 at positions >= 1 from a plain fp32 forward pass with a torch hook, ``[n, 32]``."""
    seen = []
    hook = model.hf.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model.hf(contexts)
    hook.remove()
    return seen[0][:, 1:].reshape(-1, 32)


def test_harvest_matches_a_plain_forward_pass(acts, plain_resid_1):
    assert torch.allclose(acts, plain_resid_1, atol=1e-5)


def test_bf16_harvest_is_close_to_the_fp32_pass_and_leaves_the_model_as_it_was(model, contexts, plain_resid_1, tmp_path):
    weights = {name: p.clone() for name, p in model.hf.state_dict().items()}
    h = harvest(model, model.sites(["resid_1"]), contexts, tmp_path, batch_size=96, dtype=torch.bfloat16)
    x = torch.from_numpy(h["resid_1"].copy())
    assert x.dtype == torch.float32
    rel = float((x - plain_resid_1).pow(2).sum() / (plain_resid_1 - plain_resid_1.mean(0)).pow(2).sum())
    assert 0 < rel < 1e-3  # it did run in bf16 (the values differ), and stays close to fp32
    assert harvest_mod.load_manifest(next(tmp_path.iterdir())).dtype == "bfloat16"
    for name, p in model.hf.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, weights[name])


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


@pytest.mark.parametrize("n_dead, k_aux", [(5, 3), (5, 5), (3, 8)])
def test_auxk_takes_the_largest_pre_activations_among_dead_latents_only(n_dead, k_aux):
    """The AuxK selection is the top ``min(k_aux, #dead)`` of the pre-activations with every live
    latent masked to -inf (Gao et al.'s definition), computed here directly."""
    gen = torch.Generator().manual_seed(n_dead + k_aux)
    pre = torch.randn(6, 40, generator=gen)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=gen)[:n_dead]] = True
    want_values, want_indices = pre.masked_fill(~dead, -torch.inf).topk(min(k_aux, n_dead), dim=-1)
    values, indices = training._top_dead(pre, dead, k_aux)
    assert dead[indices].all()
    assert torch.equal(values, torch.gather(pre, 1, indices))
    # The same sets per row (the order within a row does not enter the decoded sum).
    assert torch.equal(values.sort(-1).values, want_values.sort(-1).values)
    assert torch.equal(indices.sort(-1).values, want_indices.sort(-1).values)


def test_auxk_revives_latents_that_never_win_the_topk(acts, trained):
    """Latents whose encoder column is shrunk 100x still see positive pre-activations but never
    make the top k, so they get no gradient from the main loss and stay dead; the AuxK loss gives
    them one and brings many of them back."""
    start, _ = trained
    shrunk = start.W_enc.clone()
    shrunk[:, :32] *= 0.01
    init = type(start)(shrunk, start.b_enc.clone(), start.W_dec.clone(), start.b_dec.clone(), "topk", k=start.k)
    cfg = TrainConfig(width=64, k=4, epochs=12, batch_size=128, lr=3e-3, dead_after=1000, refit_decoder=False)
    revived, with_aux = train_topk(acts, cfg, init=init)
    _, without_aux = train_topk(acts, TrainConfig(**{**cfg.__dict__, "aux_coef": 0.0}), init=init)
    assert without_aux.dead_fraction >= 0.45  # the 32 shrunk latents of 64
    assert with_aux.dead_fraction < without_aux.dead_fraction - 0.15  # at least 10 of them back
    fired = (revived.encode(acts)[:, :32] != 0).any(0)
    assert fired.float().mean() > 0.3


def capped_weights(x: torch.Tensor, cap: float = 3.0) -> torch.Tensor:
    """Row weights ``min(1, (cap * median norm / norm)^2)`` of ``x [n, d]`` (TrainConfig.norm_cap)."""
    norms = x.norm(dim=-1)
    return (cap * norms.median() / norms).pow(2).clamp(max=1.0)


def spiked_copy(acts: torch.Tensor, factor: float) -> torch.Tensor:
    """``acts`` with rows 5, 700 and 1900 scaled by ``factor`` (SmolLM2's secondary attention sinks
    are 5-190x the median norm)."""
    spiked = acts.clone()
    spiked[SPIKED_ROWS] *= factor
    return spiked


SPIKED_ROWS = [5, 700, 1900]


def test_decoder_refit_leaves_a_residual_orthogonal_to_every_code(acts):
    """With no ridge the refit decoder is the least-squares fit to the codes, so (normal equations)
    the training residual is orthogonal to each code column and to the constant column. With
    k = width every latent is selected, so moving row norms into the encoder changes no selection
    and the property holds exactly for the saved SAE."""
    sae, stats = train_topk(acts, TrainConfig(width=16, k=16, epochs=2, batch_size=128, ridge=0.0))
    f = sae.encode(acts).double()
    residual = acts.double() - sae.decode(sae.encode(acts)).double()
    design = torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], dim=1)
    cosines = (design.T @ residual).norm(dim=-1) / (design.norm(dim=0) * residual.norm()).clamp_min(1e-12)
    assert cosines.max() < 1e-4
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-5)
    before, after = stats.refit_fvu
    assert after < before
    assert after == pytest.approx(1 - reconstruction_stats(sae, acts)["variance_explained"], rel=1e-4)


def test_refit_reproduces_the_weighted_least_squares_fit_to_the_pre_refit_codes(acts):
    """The refit decoder minimises the training loss, ``sum_n w_n ||x_n - f_n W - b||^2`` with
    high-norm rows down-weighted, for the codes the SGD encoder gives (k = width: no selection
    changes). The weights matter: the unweighted fit is a different decoder."""
    x = spiked_copy(acts, 20.0).double()
    cfg = TrainConfig(width=16, k=16, epochs=2, batch_size=128, ridge=0.0)
    plain, _ = train_topk(x.float(), TrainConfig(**{**cfg.__dict__, "refit_decoder": False}))
    refit, stats = train_topk(x.float(), cfg)
    assert stats.capped_rows == len(SPIKED_ROWS)
    assert torch.equal(plain.encode(x.float()) != 0, refit.encode(x.float()) != 0)
    f = plain.encode(x.float()).double()
    design = torch.cat([f, torch.ones(len(f), 1, dtype=torch.float64)], dim=1)
    root_w = capped_weights(x).sqrt()[:, None]
    weighted = design @ torch.linalg.lstsq(design * root_w, x * root_w).solution
    unweighted = design @ torch.linalg.lstsq(design, x).solution
    got = refit.decode(refit.encode(x.float())).double()
    typical = float(x.norm(dim=-1).median())
    assert float((got - weighted).norm(dim=-1).max()) < 1e-4 * typical
    assert float((unweighted - weighted).norm(dim=-1).max()) > 1e-2 * typical


def test_refit_fvu_is_measured_on_the_saved_sae_when_selection_can_change(acts):
    sae, stats = train_topk(acts, CONFIG)
    before, after = stats.refit_fvu
    assert after is not None and after < before  # the refit was kept, and it helped
    assert after == pytest.approx(1 - reconstruction_stats(sae, acts)["variance_explained"], rel=1e-3)


def test_rows_far_above_the_median_norm_do_not_steer_training(acts):
    """Three rows at 500x the median norm carry 99.9% of the squared norm. Down-weighted to the
    norm cap, they leave the dictionary as good on the other rows as one trained without them;
    at full weight they ruin it. The scale comes from the rows under the cap."""
    spiked = spiked_copy(acts, 500.0)
    others = torch.ones(len(acts), dtype=torch.bool)
    others[SPIKED_ROWS] = False
    cfg = TrainConfig(width=64, k=4, epochs=4, batch_size=128, lr=3e-3)
    capped, stats = train_topk(spiked, cfg)
    reference, _ = train_topk(acts[others], cfg)
    uncapped, _ = train_topk(spiked, TrainConfig(**{**cfg.__dict__, "norm_cap": None}))
    ve = {name: reconstruction_stats(sae, acts[others])["variance_explained"]
          for name, sae in (("capped", capped), ("reference", reference), ("uncapped", uncapped))}
    assert stats.capped_rows == len(SPIKED_ROWS)
    want = float(acts[others].pow(2).sum(-1).mean().sqrt() / acts.shape[1] ** 0.5)
    assert stats.scale == pytest.approx(want, rel=1e-5)
    assert ve["capped"] > ve["reference"] - 0.03
    assert ve["uncapped"] < ve["capped"] - 0.1


def test_warm_start_begins_from_the_given_dictionary(acts, trained):
    """From ``init`` the trainer keeps its rows and encoder as they read raw activations (``b_enc``
    in raw units) and sets ``b_dec`` to the mean of the new data, here activations at twice the
    scale shifted by a constant, as a deeper site's would be."""
    start, _ = trained
    x = 2.0 * acts + 0.5
    # One step at a vanishing learning rate and no refit: the weights stay where they began.
    cfg = TrainConfig(width=64, k=4, epochs=128 / len(acts), batch_size=128, lr=1e-12, refit_decoder=False)
    warm, _ = train_topk(x, cfg, init=start)
    assert torch.allclose(warm.W_dec, start.W_dec, atol=1e-6)
    assert torch.allclose(warm.W_enc, start.W_enc, atol=1e-6)
    assert torch.allclose(warm.b_enc, start.b_enc, atol=1e-5)
    assert torch.allclose(warm.b_dec, x.mean(0), atol=1e-4)
    cold, _ = train_topk(x, cfg)
    assert not torch.allclose(cold.W_dec, start.W_dec, atol=1e-2)
    with pytest.raises(ValueError, match="initial SAE has d=32, width=64.*width=128"):
        train_topk(acts, TrainConfig(width=128, k=4, epochs=1, batch_size=128), init=start)


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
    loaded = load_cached_dictionaries(model.name, SITES, model=model)
    x = torch.randn(10, 32)
    for site, folder in folders.items():
        meta = read_metadata(folder)
        assert meta["model"] == model.name and meta["site"] == site and meta["d"] == 32
        assert meta["width"] == 64 and meta["k"] == 4 and meta["tokens_trained"] > 0
        assert torch.equal(load_dictionary(folder).encode(x), loaded[site].encode(x))
    assert read_metadata(folders["resid_0"])["init_from"] is None
    assert read_metadata(folders["resid_1"])["init_from"] == "resid_0"
    assert not (tmp_path / "activations" / model.cache_key).exists() or not any(
        (tmp_path / "activations" / model.cache_key).iterdir()
    )


def test_a_dictionary_built_with_other_settings_is_rebuilt(model, contexts, tmp_path, monkeypatch):
    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    first = TrainConfig(width=64, k=4, epochs=1, batch_size=128)
    folder = build_dictionaries(model, model.sites(["resid_0"]), first, 0, contexts=contexts, batch_size=96,
                                log=lambda m: None)["resid_0"]
    assert read_metadata(folder)["train"]["epochs"] == 1
    logs = []
    second = TrainConfig(width=64, k=4, epochs=2, batch_size=128)
    build_dictionaries(model, model.sites(["resid_0"]), second, 0, contexts=contexts, batch_size=96, log=logs.append)
    assert any("built with other settings; rebuilding" in m for m in logs)
    assert read_metadata(folder)["train"]["epochs"] == 2 and read_metadata(folder)["build"]["train"]["epochs"] == 2


def test_interrupted_build_resumes_skipping_finished_sites_and_reusing_the_harvest(
    model, contexts, tmp_path, monkeypatch
):
    monkeypatch.setenv("SFC_CACHE", str(tmp_path))
    cfg = TrainConfig(width=64, k=4, epochs=1, batch_size=128)
    sites = model.sites(SITES)
    build_dictionaries(model, sites, cfg, 0, contexts=contexts, batch_size=96, keep_activations=True,
                       log=lambda m: None)
    finished = tmp_path / "dictionaries" / model.cache_key / "resid_0" / "ae.pt"
    before = finished.read_bytes()
    # "Interrupt": one site's dictionary is gone, the harvest is complete.
    for p in (tmp_path / "dictionaries" / model.cache_key / "resid_1").iterdir():
        p.unlink()
    (tmp_path / "dictionaries" / model.cache_key / "resid_1").rmdir()

    def no_model_runs(*args, **kwargs):
        raise AssertionError("the harvest should have been reused")

    monkeypatch.setattr(harvest_mod, "_read_sites", no_model_runs)
    logs: list[str] = []
    build_dictionaries(model, sites, cfg, 0, contexts=contexts, batch_size=96, log=logs.append)
    assert finished.read_bytes() == before
    assert any("resid_0: already built" in m for m in logs)
    assert read_metadata(tmp_path / "dictionaries" / model.cache_key / "resid_1")["init_from"] == "resid_0"
    assert (tmp_path / "dictionaries" / model.cache_key / "resid_1" / "ae.pt").exists()


def test_failed_write_leaves_no_cache_entry(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(OSError), atomic_dir(target) as tmp:
        (tmp / "ae.pt").write_bytes(b"half")
        raise OSError("No space left on device")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def _save_random(folder: Path, model_name: str, d: int = 32) -> None:
    from attribution.dictionaries.formats import save_dictionary
    from attribution.dictionaries.kinds import random_sae

    save_dictionary(random_sae(d, 64, "topk", k=4), folder, {"model": model_name, "site": folder.name, "d": d})


def test_corrupt_ae_pt_raises_dictionary_file_error(model, tmp_path):
    _save_random(tmp_path / "resid_0", model.name)
    (tmp_path / "resid_0" / "ae.pt").write_bytes(b"not a torch file")
    with pytest.raises(DictionaryFileError, match="corrupt"):
        load_cached_dictionaries(model.name, ["resid_0"], model=model, root=tmp_path)


def test_missing_dictionary_says_how_to_build_it(model, tmp_path):
    with pytest.raises(DictionaryFileError, match="sfc dictionaries build --model tiny-llama --sites resid_1"):
        load_cached_dictionaries(model.name, ["resid_1"], model=model, root=tmp_path)


def test_dictionary_of_another_model_is_rejected(model, tmp_path):
    _save_random(tmp_path / "resid_0", "some-other-model")
    with pytest.raises(DictionaryFileError, match="built for model 'some-other-model'"):
        load_cached_dictionaries(model.name, ["resid_0"], model=model, root=tmp_path)


def test_dictionary_of_another_width_is_rejected_naming_both_shapes(model, tmp_path):
    _save_random(tmp_path / "resid_0", model.name, d=48)
    with pytest.raises(DictionaryFileError, match=r"resid_0.*d=48.*\(64, 48\).*d=32"):
        load_cached_dictionaries(model.name, ["resid_0"], model=model, root=tmp_path)


def test_unknown_site_is_rejected(model, tmp_path):
    with pytest.raises(ValueError, match="Unknown site"):
        load_cached_dictionaries(model.name, ["resid_7"], model=model, root=tmp_path)


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


def test_build_command_passes_its_options_to_the_trainer_and_defaults_to_trainconfig(model, monkeypatch):
    """``sfc dictionaries build`` hands --width/--k/--epochs/--tokens/--sites on, and leaves every
    option not given at TrainConfig's default (the one place defaults live)."""
    import attribution.dictionaries.store as store
    import attribution.model.loading as models
    from sfc.cli import main as sfc_main

    calls = []
    monkeypatch.setattr(models, "load_model", lambda name, device="cpu": model)
    monkeypatch.setattr(store, "build_dictionaries", lambda m, sites, config, n_tokens, **kw: (
        calls.append((sites, config, n_tokens, kw)) or {s.name: Path("/nowhere") / s.name for s in sites}))
    assert sfc_main(["dictionaries", "build", "--model", "tiny-llama", "--sites", "resid_1", "--k", "8",
                     "--tokens", "5000"]) == 0
    sites, config, n_tokens, kw = calls[-1]
    assert [s.name for s in sites] == ["resid_1"] and n_tokens == 5000 and kw["harvest_dtype"] is None
    assert config == TrainConfig(k=8)
    assert sfc_main(["dictionaries", "build", "--model", "tiny-llama", "--width", "96", "--epochs", "0.5",
                     "--harvest-dtype", "float32"]) == 0
    sites, config, _, kw = calls[-1]
    assert config == TrainConfig(width=96, epochs=0.5) and kw["harvest_dtype"] == torch.float32
    assert [s.name for s in sites] == [s.name for s in model.sites(kinds=("resid",))]
