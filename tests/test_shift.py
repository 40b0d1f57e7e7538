"""SHIFT (SPEC §6) on a tiny random Llama with a word-level tokenizer.

Ground truths: plain-PyTorch hook interventions written here (tests/hooks.py),
hand-computed pooling and probe metrics, IG's completeness (the sum of a site's
node effects tends to the effect of zero-ablating the whole site), and planted
features whose meaning is known by construction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ablation.shift.data import (
    Examples,
    ambiguous,
    balanced,
    load_bias_in_bios,
    load_table,
    make_splits,
    synthetic_bios,
    synthetic_splits,
)
from ablation.shift.edit import EditedModel
from ablation.shift.judge import auroc, judge
from ablation.shift.probe import ProbeConfig, pool, pooled_activations, probe_model, train_probe
from ablation.shift.run import ROWS, ShiftConfig, run_shift, write_results
from ablation.shift.scoring import RankedFeature, feature_effects, rank_features
from attribution.dictionaries.kinds import Identity, random_sae
from attribution.dictionaries.sets import DictionarySet
from attribution.model.wrapper import SFCModel
from circuits.flags import FeatureFlags, FlagsFileError, load_flags
from tests.hooks import run_hooked

ROOT = Path(__file__).resolve().parents[1]


def word_model(layers: int = 3, seed: int = 0) -> SFCModel:
    """A tiny random Llama whose tokenizer knows every word of the synthetic bios."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for split in ("train", "test") for t in synthetic_bios(60, split).texts for w in t.split()})
    words = ["<pad>", *words]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
    cfg._attn_implementation = "eager"
    return SFCModel(LlamaForCausalLM(cfg), hf_tok, name="tiny-word-llama")


def saes(model: SFCModel, sites: list[str], width: int = 48) -> DictionarySet:
    dicts = {s: random_sae(model.config.hidden_size, width, seed=i + 1)
             for i, s in enumerate(sites)}
    return DictionarySet(dicts, {s: f"test:{s}" for s in sites})


@pytest.fixture(scope="module")
def model() -> SFCModel:
    return word_model()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return synthetic_bios(2, "train", seed=3).texts[:6]


def hand_edit(dic, flagged: list[int], values=None):
    """x -> decode(f with flagged set to values) + (x - decode(f)), written out with the SAE's weights."""
    def fn(x):
        f = dic.encode(x)
        g = f.clone()
        g[..., flagged] = 0 if values is None else values
        return g @ dic.W_dec + dic.b_dec + (x - (f @ dic.W_dec + dic.b_dec))
    return fn


# ------------------------------------------------------------------ the edit


def test_edited_model_equals_a_hook_intervention_and_undoes_itself(model, texts):
    dicts = saes(model, ["resid_0", "resid_1"])
    flagged = {"resid_0": [1, 5, 7], "resid_1": [0, 2]}
    batch = model.tokenize(texts)
    ids = batch.input_ids
    sites = model.sites(["resid_0", "resid_1"])
    expected, _ = run_hooked(model.hf, ids, sites, {s: hand_edit(dicts[s], flagged[s]) for s in flagged})
    plain = model.hf(ids).logits
    with EditedModel(model, dicts, flagged):
        got = model.hf(ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(plain, expected)  # the edit does something
    torch.testing.assert_close(model.hf(ids).logits, plain, rtol=0, atol=0)  # and leaving removes it


def test_mean_ablated_neurons_are_set_to_their_values(model, texts):
    d = model.config.hidden_size
    neurons = {"resid_1": Identity(d)}
    values = torch.tensor([0.5, -2.0])
    ids = model.tokenize(texts).input_ids
    sites = model.sites(["resid_1"])

    def fn(x):
        y = x.clone()
        y[..., [3, 9]] = values
        return y

    expected, _ = run_hooked(model.hf, ids, sites, {"resid_1": fn})
    with EditedModel(model, neurons, {"resid_1": [9, 3]}, values={"resid_1": values[[1, 0]]}):
        got = model.hf(ids).logits
    torch.testing.assert_close(got, expected)


def test_edited_model_saves_and_loads_with_flags_and_probe(model, texts, tmp_path):
    dicts = saes(model, ["resid_0", "resid_1"])
    probe = nn.Linear(model.config.hidden_size, 1)
    edit = EditedModel(model, dicts, {"resid_1": [4, 2]}, probe=probe, probe_layer=1, info={"why": "test"})
    edit.save(tmp_path / "edit")
    assert not list(tmp_path.glob("*.tmp"))
    back = EditedModel.load(tmp_path / "edit", model, dicts)
    assert back.flagged == {"resid_1": [2, 4]} and back.probe_layer == 1 and back.info == {"why": "test"}
    torch.testing.assert_close(back.probe.weight, probe.weight.detach().float())
    # the loaded edit acts as the hand-written intervention
    ids = model.tokenize(texts).input_ids
    expected, _ = run_hooked(model.hf, ids, model.sites(["resid_1"]), {"resid_1": hand_edit(dicts["resid_1"], [2, 4])})
    with back:
        torch.testing.assert_close(model.hf(ids).logits, expected)
    # a saved edit refuses another dictionary set
    other = DictionarySet(dict(dicts), {s: f"other:{s}" for s in dicts})
    with pytest.raises(FlagsFileError, match="dictionary"):
        EditedModel.load(tmp_path / "edit", model, other)


# ------------------------------------------------------------------ the probe


def test_pooled_activations_are_the_masked_mean_of_the_residual(model, texts):
    batch = model.tokenize(texts)  # left-padded: bios differ in length
    assert (batch.attention_mask == 0).any()
    got = pooled_activations(model, texts, 1, batch_size=4, progress=False)
    for i, t in enumerate(texts):  # one unpadded pass per text, plain hooks
        ids = model.tokenize([t]).input_ids
        _, seen = run_hooked(model.hf, ids, model.sites(["resid_1"]))
        torch.testing.assert_close(got[i], seen["resid_1"][0].mean(0).float(), rtol=1e-5, atol=1e-6)


def test_probe_model_outputs_the_probe_score_of_each_token(model, texts):
    w = torch.randn(model.config.hidden_size)
    cut = probe_model(model, 1, w)
    batch = model.tokenize(texts)
    out = cut.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    _, seen = run_hooked(model.hf, batch.input_ids, model.sites(["resid_1"]))
    # run_hooked has no attention mask: compare the longest (unpadded) row only
    row = int(batch.attention_mask.sum(1).argmax())
    torch.testing.assert_close(out[row, :, 0], seen["resid_1"][row] @ w, rtol=1e-4, atol=1e-5)
    assert len(cut.hf.model.layers) == 2 and len(model.hf.model.layers) == 3  # the original is untouched
    # and nnsight passes through the original still see the whole model
    from attribution.model import tracing

    tr = tracing.run(model, batch, model.sites(["resid_2"]), lambda lg, rows: lg[:, -1, 0], torch.arange(len(batch)))
    plain = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert plain.shape[-1] == model.config.vocab_size
    torch.testing.assert_close(tr.metric, plain[:, -1, 0])


def test_probe_training_learns_a_separable_direction_and_folds_standardisation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen) * torch.tensor([1000.0, 1, 1, 1, 1, 1, 1, 1])
    y = (x[:, 3] > 0).long()
    per_dim = ProbeConfig(epochs=20, standardize="dimension")
    probe = train_probe(x, y.tolist(), per_dim)
    assert ((probe(x)[:, 0] > 0).long() == y).float().mean() > 0.95
    # standardising makes training blind to per-dimension scale and shift; folding it back
    # into the weights must give the same logits on the rescaled inputs
    scale, shift = torch.tensor([1e-3, 5, 1, 2, 1, 1, 0.1, 1]), torch.arange(8.0)
    other = train_probe(x * scale + shift, y.tolist(), per_dim)
    torch.testing.assert_close(other(x * scale + shift), probe(x), rtol=1e-3, atol=1e-3)
    assert train_probe(x, y.tolist(), ProbeConfig(epochs=20, standardize=True)).weight.equal(probe.weight)


def test_global_scaling_keeps_geometry_and_folds_back():
    """``standardize="global"`` centres each dimension and divides by one scalar: training
    is blind to a per-dimension shift and a global scale (same logits after folding), but
    not to a per-dimension scale, which changes the geometry the probe sees."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=gen)
    y = (x[:, 0] + 0.3 * x[:, 1] > 0).long()
    cfg = ProbeConfig(epochs=20, standardize="global")
    probe = train_probe(x, y.tolist(), cfg)
    assert ((probe(x)[:, 0] > 0).long() == y).float().mean() > 0.95
    shift = torch.arange(6.0) * 100
    moved = train_probe(x * 7.0 + shift, y.tolist(), cfg)
    torch.testing.assert_close(moved(x * 7.0 + shift), probe(x), rtol=1e-3, atol=1e-3)
    stretched = train_probe(x * torch.tensor([1.0, 50, 1, 1, 1, 1]), y.tolist(), cfg)
    assert not torch.allclose(stretched(x * torch.tensor([1.0, 50, 1, 1, 1, 1])), probe(x), atol=1e-2)
    with pytest.raises(ValueError, match="standardize"):
        train_probe(x, y.tolist(), ProbeConfig(standardize="zscore"))
    with pytest.raises(ValueError, match="single class"):
        train_probe(x, [1] * 200)


# ------------------------------------------------------------------ scoring


def test_site_effects_sum_to_the_zero_ablation_of_the_site(model, texts):
    """IG's completeness: with many steps, a site's feature + error effects add up to
    m(site zero-ablated) - m(clean), both computed here by hand with hooks."""
    dicts = saes(model, ["resid_0"])
    probe = nn.Linear(model.config.hidden_size, 1)
    targets = [0, 1, 0, 1, 1, 0]
    feats, errs = feature_effects(model, dicts, probe, 1, texts, targets, steps=200, batch_size=3, progress=False)

    def metric(x_resid1, mask, y):
        logit = probe(pool(x_resid1, mask))[:, 0]
        return (1 - 2 * torch.tensor(y, dtype=logit.dtype)) * logit

    b_dec = dicts["resid_0"].b_dec.detach()
    total = 0.0
    for i, t in enumerate(texts):
        ids = model.tokenize([t]).input_ids
        mask = torch.ones_like(ids)
        sites = model.sites(["resid_0", "resid_1"])
        _, clean = run_hooked(model.hf, ids, sites)
        _, ablated = run_hooked(model.hf, ids, sites, {"resid_0": lambda x: b_dec.expand_as(x)})
        # run_hooked records resid_1 before any override at resid_1: none here
        with torch.no_grad():
            total += float(metric(ablated["resid_1"], mask, [targets[i]]) - metric(clean["resid_1"], mask, [targets[i]]))
    got = float(feats["resid_0"].sum() + errs["resid_0"])
    assert got == pytest.approx(total / len(texts), rel=2e-2, abs=1e-6)


def test_ranking_keeps_positive_effects_strongest_first():
    eff = {"resid_0": torch.tensor([0.5, -1.0, 0.0, 2.0]), "resid_1": torch.tensor([1.0, 0.2])}
    ranked = rank_features(eff)
    assert [r.key for r in ranked] == ["resid_0/3", "resid_1/0", "resid_0/0", "resid_1/1"]
    assert [r.key for r in rank_features(eff, top=2, threshold=0.3)] == ["resid_0/3", "resid_1/0"]


# ------------------------------------------------------------------ the judge


def test_proxy_judge_flags_a_planted_gender_feature_and_spares_a_profession_feature():
    """Neurons of the embedding: dimension 0 is set only on she/her, dimension 1 only on
    nurse words. The judge must flag embed/0 (spurious) and keep embed/1 (the label)."""
    model = word_model(layers=1)
    vocab = model.tokenizer.get_vocab()
    emb = model.hf.model.embed_tokens.weight
    with torch.no_grad():
        emb[:, :2] = 0
        for w, i in vocab.items():
            if w.lower() in ("she", "her"):
                emb[i, 0] = 1.0
            if w.strip(".").lower() in ("patients", "hospital", "nurse", "clinic", "ward", "surgery", "room",
                                        "wounds", "operations", "care", "home", "patients.", "ward."):
                emb[i, 1] = 1.0
    bal = balanced(synthetic_bios(10, "test", seed=1))
    dicts = {"embed": Identity(model.config.hidden_size)}
    cands = [RankedFeature("embed", 0, 1.0), RankedFeature("embed", 1, 0.5)]
    verdicts = judge(model, dicts, cands, bal.texts, bal.labels, bal.spurious, progress=False)
    by = {v.key: v for v in verdicts}
    assert by["embed/0"].auc_spurious == pytest.approx(1.0) and by["embed/0"].flagged
    assert by["embed/1"].auc_label > 0.9 and not by["embed/1"].flagged


def test_auroc_matches_pair_counting():
    s = torch.tensor([0.1, 0.4, 0.35, 0.8])
    y = torch.tensor([0, 0, 1, 1])
    assert auroc(s, y) == pytest.approx(0.75)  # pairs (pos > neg): 0.35>0.1, 0.8>0.1, 0.8>0.4


# ------------------------------------------------------------------ data


def test_synthetic_splits_are_biased_balanced_and_held_out():
    s = synthetic_splits(10, 8, seed=0)
    amb = s.ambiguous_train
    assert amb.labels == amb.spurious and set(amb.labels) == {0, 1}
    assert set(s.balanced_test.counts().values()) == {8}
    train_words = {t.split()[0] for t in s.balanced_train.texts}
    test_words = {t.split()[0] for t in s.balanced_test.texts}
    assert not train_words & test_words  # first names are held out
    assert synthetic_bios(5, "train", seed=2).texts == synthetic_bios(5, "train", seed=2).texts


def test_table_and_bias_in_bios_loaders(tmp_path):
    rows = [{"bio": f"text {i}", "y": i % 2, "g": (i // 2) % 2} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ex = load_table(tmp_path / "d.jsonl", text="bio", label="y", spurious="g")
    assert ex.labels == [r["y"] for r in rows] and ex.spurious == [r["g"] for r in rows]
    with pytest.raises(ValueError, match="no column 'label'"):
        load_table(tmp_path / "d.jsonl", text="bio")
    bib = [{"hard_text": "a", "profession": 21, "gender": 1}, {"hard_text": "b", "profession": 13, "gender": 0},
           {"hard_text": "c", "profession": 5, "gender": 0}]
    (tmp_path / "bib.json").write_text(json.dumps(bib))
    ex = load_bias_in_bios(tmp_path / "bib.json")
    assert ex.texts == ["a", "b"] and ex.labels == [0, 1] and ex.spurious == [1, 0]


def test_single_class_data_is_refused():
    one = Examples(["a", "b"], [1, 1], [0, 1])
    with pytest.raises(ValueError, match="single class"):
        make_splits(one, one)
    assert len(ambiguous(synthetic_bios(3, "train"))) == 6


# ------------------------------------------------------------------ the workflow


@pytest.fixture(scope="module")
def tiny_run(model):
    dicts = saes(model, ["resid_0", "resid_1", "resid_2"])
    cfg = ShiftConfig(model="tiny-word-llama", layer=1, n_train=6, n_test=4, n_score=4, steps=2, candidates=20,
                      min_auc=0.5, margin=-1.0, batch_size=8)  # this permissive judge flags every candidate
    return cfg, dicts, run_shift(cfg, model=model, dictionaries=dicts, progress=False)


def test_results_json_has_every_row_with_accuracies_and_the_flags(tiny_run, tmp_path):
    cfg, dicts, result = tiny_run
    paths = write_results(result, tmp_path / "out")
    doc = json.loads(paths["results"].read_text())
    assert [r["method"] for r in doc["rows"]] == list(ROWS)
    for r in doc["rows"]:
        for key in ("profession_acc", "gender_acc", "worst_group_acc"):
            assert 0.0 <= r[key] <= 1.0
        if r["method"] == "random":  # the mean of seeded draws, each a full evaluation
            assert len(r["draws"]) == cfg.random_draws == 5
            for key in ("profession_acc", "gender_acc", "worst_group_acc"):
                assert r[key] == pytest.approx(sum(d[key] for d in r["draws"]) / len(r["draws"]))
            assert r["worst_group_acc"] <= min(r["groups"].values()) + 1e-9
        else:
            assert r["worst_group_acc"] == min(r["groups"].values())
    assert doc["flags"] and doc["settings"]["layer"] == 1 and doc["settings"]["flags_source"] == "auto (proxy judge)"
    assert set(doc["settings"]["sites"]) == {"resid_0", "resid_1"}  # sites up to the probe layer only
    flags = load_flags(paths["flags"])
    assert flags.keys == doc["flags"] and flags.model == "tiny-word-llama"
    assert (tmp_path / "out" / "results.html").read_text().count("plotly") > 0
    edit = EditedModel.load(paths["edited"], result.edited.model, dicts)
    assert edit.keys == doc["flags"] and edit.probe is not None


def test_empty_flag_list_runs_and_says_nothing_was_ablated(model, tiny_run):
    cfg, dicts, _ = tiny_run
    res = run_shift(cfg, model=model, dictionaries=dicts, flags=[], progress=False)
    assert any("nothing was ablated" in n for n in res.notes)
    # nothing ablated: SHIFT is the original probe, and retraining on the same data and seed gives it back
    for key in ("profession_acc", "gender_acc", "worst_group_acc"):
        assert res.row("shift")[key] == res.row("original")[key]
        assert res.row("shift_retrain")[key] == res.row("original")[key]


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("flagged, message", [
    (["resid_9/1"], "no dictionary here"),
    (["resid_0/999"], "has only 48 features"),
])
def test_flags_for_missing_sites_or_features_are_refused(model, tiny_run, flagged, message):
    cfg, dicts, _ = tiny_run
    with pytest.raises(FlagsFileError, match=message):
        run_shift(cfg, model=model, dictionaries=dicts, flags=flagged, progress=False)


def test_flags_for_another_model_or_dictionary_set_are_refused(model, tiny_run):
    cfg, dicts, _ = tiny_run
    other_model = FeatureFlags({"resid_0": [1]}, model="gpt2", source="f.json")
    with pytest.raises(FlagsFileError, match="model 'gpt2'"):
        run_shift(cfg, model=model, dictionaries=dicts, flags=other_model, progress=False)
    other_dicts = FeatureFlags({"resid_0": [1]}, model="tiny-word-llama", dictionaries={"resid_0": "cache:x/resid_0"},
                               source="f.json")
    with pytest.raises(FlagsFileError, match="made with dictionary"):
        run_shift(cfg, model=model, dictionaries=dicts, flags=other_dicts, progress=False)


def test_probe_layer_beyond_the_depth_is_refused(model, tiny_run):
    cfg, dicts, _ = tiny_run
    bad = ShiftConfig(**{**cfg.__dict__, "layer": 7})
    with pytest.raises(ValueError, match="beyond this model's depth.*blocks 0..2"):
        run_shift(bad, model=model, dictionaries=dicts, progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sfc", "shift", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli_refuses_bad_input_before_loading_the_model(tmp_path):
    bad = tmp_path / "flags.json"
    bad.write_text(json.dumps({"format": "sfc-feature-flags", "version": 1, "flagged": ["resid_3"]}))
    done = _cli("run", "--flags", str(bad), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "does not follow the flags schema" in done.stderr
    done = _cli("run", "--layer", "30", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "beyond this model's depth" in done.stderr
    table = tmp_path / "t.csv"
    table.write_text("text,label\na,0\nb,1\n")
    done = _cli("run", "--data", str(table), "--test-data", str(table), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "no column 'spurious'" in done.stderr
    one = tmp_path / "one.csv"
    one.write_text("text,label,spurious\na,1,0\nb,1,1\n")
    done = _cli("run", "--data", str(one), "--test-data", str(one), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "single class" in done.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ the rank page, in a browser


def test_rank_page_flags_download_and_feed_shift(model, tiny_run, tmp_path):
    """A person flags a feature on the rank page and downloads the file; SHIFT reads it."""
    from ablation.shift.run import prepare_shift
    from circuits.graph import node_id
    from sfc.shift import write_rank_page
    from tests.test_viewer import ARGS, CHROMIUM, Viewer

    if not Path(CHROMIUM).exists():
        pytest.skip(f"browser tests need Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    cfg, dicts, _ = tiny_run
    setup = prepare_shift(cfg, model=model, dictionaries=dicts, progress=False)
    paths = write_rank_page(setup, tmp_path / "rank", top=5, n_corpus=0, dashboard_cache=tmp_path, progress=False)
    circuit = json.loads(paths["circuit"].read_text())
    shown = [n for n in circuit["nodes"] if n["kind"] != "metric"]
    assert sorted(f"{n['site']}/{n['feature']}" for n in shown) == sorted(r.key for r in setup.ranking[:5])
    effects = {f"{n['site']}/{n['feature']}": n["effect"] for n in shown}
    assert all(effects[r.key] == pytest.approx(r.effect) for r in setup.ranking[:5])
    target = setup.ranking[1]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            v = Viewer(browser, paths["page"]).ready()
            v.page.fill("#sfc-search", node_id(target.site, target.feature, None))
            v.page.press("#sfc-search", "Enter")
            v.page.wait_for_selector("#sfc-panel:not([hidden])")
            v.page.check("#sfc-flag-input")
            with v.page.expect_download() as info:
                v.page.click("#sfc-download")
            info.value.save_as(tmp_path / "flags.json")
            v.close()
        finally:
            browser.close()
    flags = load_flags(tmp_path / "flags.json")
    assert flags.keys == [target.key] and flags.model == model.name
    assert flags.dictionaries[target.site] == dicts.ids[target.site]  # the page carries the dictionary ids
    result = run_shift(setup=setup, flags=flags, progress=False)
    assert result.flags == [target.key] and result.settings["flags_source"] == str(tmp_path / "flags.json")
