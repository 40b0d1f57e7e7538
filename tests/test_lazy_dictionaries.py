"""Dictionaries kept on disk (``load_dictionaries(..., lazy=True)``): the engine gives the
same effects while no more than a few dictionaries are ever alive at once.

Ground truth: the IG completeness identity against a site patched with plain torch
hooks, the edge-sum identity of ``test_edges`` computed from the SAE formula, and
the loaded tensors themselves for what the headers say.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ablation import AblationConfig, faithfulness
from attribution.dictionaries import sets
from attribution.dictionaries.formats import read_header, save_dictionary
from attribution.dictionaries.kinds import random_sae
from attribution.dictionaries.sets import LazyDictionarySet, load_dictionaries
from attribution.edges import edge_effects
from attribution.effects import node_effects
from attribution.estimate import dictionaries_mb, estimate, lazy_resident_mb, tensor_mb
from circuits.masks import masks_from_effects
from tests.conftest import logit_diff_metric, prompt_pairs, tiny_dictionaries, tiny_model
from tests.hooks import run_hooked
from tests.test_edges import check_resid_edge_sums
from tests.test_node_effects import _site_patch_truth


@pytest.fixture
def saved(tmp_path):
    """A float64 tiny llama, its dictionaries saved one folder per site, and its prompts."""
    model = tiny_model("llama", torch.float64)
    clean, patch = prompt_pairs()
    for name, sae in tiny_dictionaries(model, clean).items():
        save_dictionary(sae, tmp_path / name)
    return model, tmp_path, clean, patch, logit_diff_metric(len(clean))


def watch_live(monkeypatch) -> tuple[weakref.WeakSet, list[int]]:
    """Every dictionary the lazy set loads, weakly, and how many were alive at each request."""
    live: weakref.WeakSet = weakref.WeakSet()
    counts: list[int] = []
    load, get = sets.load_dictionary, LazyDictionarySet.__getitem__

    def loading(path, **kw):
        dictionary = load(path, **kw)
        live.add(dictionary)
        return dictionary

    def getting(self, name):
        out = get(self, name)
        counts.append(len(live))
        return out

    monkeypatch.setattr(sets, "load_dictionary", loading)
    monkeypatch.setattr(LazyDictionarySet, "__getitem__", getting)
    return live, counts


def test_lazy_dictionaries_give_exact_effects_holding_only_a_few(saved, monkeypatch):
    model, folder, clean, patch, metric = saved
    live, counts = watch_live(monkeypatch)
    dicts = load_dictionaries(model, folder, lazy=True, resident=2)
    n_sites = len(dicts)
    assert dicts.resident_sites() == [] and len(live) == 0  # opening reads headers only

    ig = node_effects(model, dicts, clean, patch, metric, method="ig", steps=32, ig_points="midpoint",
                      progress=False)
    _, acts_p = run_hooked(model.hf, patch, model.all_sites())
    for site in ["embed", "mlp_0", "resid_1"]:
        truth = _site_patch_truth(model, clean, acts_p, site, metric)
        torch.testing.assert_close(ig.site_total(site), truth, rtol=0, atol=0.01 * truth.abs().max().item())

    # Edges into resid_1 add up to ∇m · ∂d/∂resid_1 · Δresid_1 (test_edges), from the SAE formula.
    atp = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    ee = edge_effects(model, dicts, clean, atp, metric, node_threshold=0.0, progress=False)
    assert check_resid_edge_sums(model, dicts["resid_1"], clean, patch, metric, ee, per_position=2) > 10

    masks = masks_from_effects(*ig.aggregate("none"), 0.01)
    res = faithfulness(model, clean, dicts, masks, metric, config=AblationConfig(kind="mean"))
    assert np.isfinite(res.faithfulness)

    # Never more than what one step needs (edges into resid_1: it and its 3 upstream sites), plus
    # one a caller's variable still names; never all the sites.
    assert max(counts) <= 5 < n_sites
    assert dicts.loads > n_sites  # sites were dropped and read again


def test_lazy_and_loaded_sets_give_the_same_effects_and_faithfulness(saved):
    model, folder, clean, patch, metric = saved
    eager = load_dictionaries(model, folder)
    lazy = load_dictionaries(model, folder, lazy=True, resident=1)
    a = node_effects(model, eager, clean, patch, metric, method="ig", steps=4, progress=False)
    b = node_effects(model, lazy, clean, patch, metric, method="ig", steps=4, progress=False)
    for site in a.features:
        assert torch.equal(a.features[site], b.features[site]) and torch.equal(a.errors[site], b.errors[site])
    ea = edge_effects(model, eager, clean, a, metric, node_threshold=0.0, progress=False)
    eb = edge_effects(model, lazy, clean, b, metric, node_threshold=0.0, progress=False)
    assert ea.pairs.keys() == eb.pairs.keys()
    for key in ea.pairs:
        assert torch.equal(ea.pairs[key].weight, eb.pairs[key].weight)
    masks = masks_from_effects(*a.aggregate("none"), 0.01)
    cfg = AblationConfig(kind="zero")
    assert faithfulness(model, clean, eager, masks, metric, config=cfg) == \
        faithfulness(model, clean, lazy, masks, metric, config=cfg)


def test_the_estimate_counts_only_the_resident_dictionaries(saved):
    model, folder, clean, patch, metric = saved
    lazy = load_dictionaries(model, folder, lazy=True, resident=2)
    eager = load_dictionaries(model, folder)
    assert dictionaries_mb(lazy) == pytest.approx(dictionaries_mb(eager), rel=1e-9)
    est = estimate(model, lazy, clean, patch, metric, steps=4, timing=False)
    sizes = sorted((tensor_mb(d) for d in eager.values()), reverse=True)
    assert est.dictionary_weights_mb == pytest.approx(sum(sizes), rel=1e-9)
    # What one step may hold (4 dictionaries, above resident=2) and the one being read, in the
    # loaded tensors' own sizes.
    assert lazy_resident_mb(lazy, list(lazy)) == pytest.approx(sum(sizes[:5]), rel=1e-9)
    assert lazy_resident_mb(eager, list(eager)) == 0  # held sets are in the memory held before the run


@pytest.mark.parametrize("layout", ["dictionary_learning", "saelens", "gemma_scope"])
def test_headers_say_what_loading_finds(tmp_path, layout):
    sae = random_sae(24, 80, "jumprelu" if layout != "dictionary_learning" else "relu", seed=3)
    if layout == "dictionary_learning":
        save_dictionary(sae, tmp_path)
    elif layout == "saelens":
        keys = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
        save_file({k: getattr(sae, k).detach().contiguous() for k in keys}, str(tmp_path / "sae_weights.safetensors"))
        (tmp_path / "cfg.json").write_text('{"architecture": "jumprelu"}')
    else:
        np.savez(tmp_path / "params.npz", **{k: getattr(sae, k).detach().numpy()
                                             for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")})
    header = read_header(tmp_path)
    loaded = LazyDictionarySet({"x": tmp_path})
    assert (header.d, header.width) == (24, 80) == loaded.shape("x")
    assert header.nbytes == sum(t.numel() * t.element_size() for t in loaded["x"].state_dict().values())
    half = LazyDictionarySet({"x": tmp_path}, dtype=torch.bfloat16)
    assert half["x"].W_dec.dtype == torch.bfloat16
    assert half.nbytes("x") == header.nbytes // 2 == tensor_mb(half["x"]) * 2**20


def test_a_dictionary_of_the_wrong_size_is_refused_before_any_weight_is_read(saved, monkeypatch):
    model, folder, *_ = saved
    save_dictionary(random_sae(7, 16, seed=0), folder / "resid_1")
    monkeypatch.setattr(sets, "load_dictionary", lambda path, **kw: pytest.fail(f"{path} was loaded"))
    with pytest.raises(ValueError, match="expects size 7, but .* has size 32"):
        load_dictionaries(model, folder, lazy=True)
    with pytest.raises(ValueError, match="at least one dictionary"):
        LazyDictionarySet({}, resident=0)


@pytest.mark.parametrize("lazy", [False, True])
def test_dtype_and_a_device_per_site_apply_as_each_dictionary_loads(saved, lazy):
    model, folder, *_ = saved  # saved in float64
    dicts = load_dictionaries(model, folder, lazy=lazy, dtype=torch.float32, device={"resid_1": "meta"})
    assert dicts["resid_1"].W_dec.device.type == "meta"
    assert dicts["resid_0"].W_dec.device.type == "cpu"
    assert {dicts[name].W_enc.dtype for name in dicts} == {torch.float32}


def test_a_non_finite_weight_is_found_on_the_first_read(tmp_path):
    sae = random_sae(8, 16, seed=0)
    sae.W_dec.data[3, 2] = float("nan")
    save_dictionary(sae, tmp_path / "resid_0")
    lazy = LazyDictionarySet({"resid_0": tmp_path / "resid_0"})
    with pytest.raises(ValueError, match="non-finite value.*W_dec"):
        lazy["resid_0"]
