"""Node effects (SPEC §2) against ground truth computed with plain torch hooks.

- exact patching equals a from-scratch single-node intervention (Eq. 2);
- attribution patching equals exact patching where the metric is linear in the site;
- IG completeness: a site's effects sum to m(patch at that site) - m(clean).
"""

from __future__ import annotations

import pytest
import torch

from attribution.effects import node_effects
from attribution.model.wrapper import Batch
from tests.conftest import logit_diff_metric, prompt_pairs, tiny_dictionaries, tiny_model
from tests.hooks import run_hooked


def sae_parts(sae, x):
    """Features and error from the SAE's parameters, written out in full."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = torch.relu(pre)
    return f, x - (f @ sae.W_dec + sae.b_dec)


def metric_of(logits, metric):
    return metric(logits, torch.arange(logits.shape[0]))


@pytest.mark.parametrize("ablate", [False, True])
def test_exact_effects_equal_hooked_single_node_patches(family, ablate):
    model = tiny_model(family, torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, None if ablate else patch, metric, method="exact", progress=False)
    sites = model.all_sites()
    logits_c, acts_c = run_hooked(model.hf, clean, sites)
    _, acts_p = run_hooked(model.hf, patch, sites)
    m_clean = metric_of(logits_c, metric)
    for site in [sites[0], sites[2], sites[-1]]:
        sae = dicts[site.name]
        f_c, e_c = sae_parts(sae, acts_c[site.name])
        f_p, e_p = (torch.zeros_like(f_c), torch.zeros_like(e_c)) if ablate else sae_parts(sae, acts_p[site.name])
        changed = (f_p - f_c).nonzero()[:4]
        assert len(changed) > 0
        for b, s, j in changed.tolist():
            def patch_one(x, b=b, s=s, j=j, f_p=f_p, f_c=f_c, sae=sae):
                x = x.clone()
                x[b, s] += (f_p[b, s, j] - f_c[b, s, j]) * sae.W_dec[j]
                return x
            logits, _ = run_hooked(model.hf, clean, sites, {site.name: patch_one})
            truth = metric_of(logits, metric)[b] - m_clean[b]
            torch.testing.assert_close(ne.features[site.name][b, s, j], truth, rtol=1e-8, atol=1e-10)
        for b, s in [(0, 4), (2, 1)]:
            def patch_err(x, b=b, s=s, e_p=e_p, e_c=e_c):
                x = x.clone()
                x[b, s] += e_p[b, s] - e_c[b, s]
                return x
            logits, _ = run_hooked(model.hf, clean, sites, {site.name: patch_err})
            truth = metric_of(logits, metric)[b] - m_clean[b]
            torch.testing.assert_close(ne.errors[site.name][b, s], truth, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("family_, final_norm", [("gpt_neox", "gpt_neox.final_layer_norm"),
                                                 ("llama", "model.norm"), ("gpt2", "transformer.ln_f")])
def test_attrib_equals_exact_when_metric_is_linear_in_the_site(family_, final_norm):
    model = tiny_model(family_, torch.float64)
    parent, _, child = final_norm.rpartition(".")
    setattr(model.hf.get_submodule(parent), child, torch.nn.Identity())  # logits now linear in resid_1
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    sites = ["resid_1"]
    atp = node_effects(model, dicts, clean, patch, metric, sites=sites, method="attrib", progress=False)
    exact = node_effects(model, dicts, clean, patch, metric, sites=sites, method="exact", progress=False)
    assert atp.features["resid_1"].abs().sum() > 0
    torch.testing.assert_close(atp.features["resid_1"], exact.features["resid_1"], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(atp.errors["resid_1"], exact.errors["resid_1"], rtol=1e-7, atol=1e-10)


def _site_patch_truth(model, clean, patch_acts, site, metric):
    sites = model.all_sites()
    logits_c, _ = run_hooked(model.hf, clean, sites)
    logits, _ = run_hooked(model.hf, clean, sites, {site: lambda x: patch_acts[site]})
    return metric_of(logits, metric) - metric_of(logits_c, metric)


@pytest.mark.parametrize("points, steps", [("midpoint", 32), ("paper", 512)])
def test_ig_effects_sum_to_total_effect_of_patching_the_site(family, points, steps):
    model = tiny_model(family, torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ig = node_effects(model, dicts, clean, patch, metric, method="ig", steps=steps, ig_points=points,
                      progress=False)
    _, acts_p = run_hooked(model.hf, patch, model.all_sites())
    for site in ["embed", "attn_0", "mlp_1", "resid_1"]:
        truth = _site_patch_truth(model, clean, acts_p, site, metric)
        total = ig.site_total(site)
        assert truth.abs().max() > 1e-6
        # Within 1% of the site's largest total effect.
        torch.testing.assert_close(total, truth, rtol=0, atol=0.01 * truth.abs().max().item())


def test_ig_with_zero_ablation_sums_to_setting_the_site_to_decoder_bias():
    model = tiny_model("llama", torch.float64)
    clean, _ = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ig = node_effects(model, dicts, clean, None, metric, method="ig", steps=32, ig_points="midpoint",
                      progress=False)
    site = "mlp_0"
    b_dec = dicts[site].b_dec
    logits_c, _ = run_hooked(model.hf, clean, model.all_sites())
    logits, _ = run_hooked(model.hf, clean, model.all_sites(), {site: lambda x: b_dec.expand_as(x)})
    truth = metric_of(logits, metric) - metric_of(logits_c, metric)
    torch.testing.assert_close(ig.site_total(site), truth, rtol=0, atol=0.01 * truth.abs().max().item())


def test_ig_error_shrinks_with_steps_and_reference_one_step_is_attribution_patching():
    model = tiny_model("gpt_neox", torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    _, acts_p = run_hooked(model.hf, patch, model.all_sites())
    truth = _site_patch_truth(model, clean, acts_p, "resid_0", metric)
    errs = []
    for steps in (4, 16, 64):
        ig = node_effects(model, dicts, clean, patch, metric, sites=["resid_0"], method="ig", steps=steps,
                          progress=False)
        errs.append((ig.site_total("resid_0") - truth).abs().max().item())
    assert errs[0] > errs[1] > errs[2]
    ref1 = node_effects(model, dicts, clean, patch, metric, method="ig", steps=1, ig_points="reference",
                        progress=False)
    atp = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    for site in ref1.features:
        torch.testing.assert_close(ref1.features[site], atp.features[site], rtol=1e-9, atol=1e-12)


def test_mean_ablation_patches_position_means(family):
    model = tiny_model(family, torch.float64)
    clean, _ = prompt_pairs(n=4)
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, None, metric, method="exact", ablation="mean", sites=["attn_1"],
                      progress=False)
    sites = model.all_sites()
    logits_c, acts = run_hooked(model.hf, clean, sites)
    sae = dicts["attn_1"]
    f_c, _ = sae_parts(sae, acts["attn_1"])
    f_mean = f_c.mean(0, keepdim=True).expand_as(f_c)
    b, s, j = (f_mean - f_c).nonzero()[0].tolist()

    def patch_one(x):
        x = x.clone()
        x[b, s] += (f_mean[b, s, j] - f_c[b, s, j]) * sae.W_dec[j]
        return x

    logits, _ = run_hooked(model.hf, clean, sites, {"attn_1": patch_one})
    truth = metric_of(logits, metric)[b] - metric_of(logits_c, metric)[b]
    torch.testing.assert_close(ne.features["attn_1"][b, s, j], truth)


def test_padding_positions_carry_no_effect():
    model = tiny_model("llama")
    clean, patch = prompt_pairs()
    mask = torch.ones_like(clean)
    mask[0, :2] = 0
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, Batch(clean, mask), Batch(patch, mask), metric, method="attrib",
                      progress=False)
    for site in ne.features:
        assert ne.features[site][0, :2].abs().sum() == 0
        assert ne.errors[site][0, :2].abs().sum() == 0


# --- bad input: one clear sentence before heavy work ---------------------------------------


@pytest.fixture(scope="module")
def small():
    model = tiny_model("gpt_neox")
    clean, patch = prompt_pairs()
    return model, clean, patch, tiny_dictionaries(model, clean)


def test_clean_and_patch_of_different_lengths_are_refused(small):
    model, clean, patch, dicts = small
    with pytest.raises(ValueError, match="different token lengths"):
        node_effects(model, dicts, clean, patch[:, :-1], logit_diff_metric(3), progress=False)


@pytest.mark.parametrize("bad, message", [
    (lambda lg, rows: lg[:, -1, :2], "must return one value per row"),
    (lambda lg, rows: lg[:, -1, 0] * float("nan"), "NaN"),
])
def test_metric_of_wrong_shape_or_nan_is_refused(small, bad, message):
    model, clean, patch, dicts = small
    with pytest.raises(ValueError, match=message):
        node_effects(model, dicts, clean, patch, bad, progress=False)


def test_unknown_site_is_refused(small):
    model, clean, patch, dicts = small
    with pytest.raises(ValueError, match="Unknown site"):
        node_effects(model, dicts, clean, patch, logit_diff_metric(3), sites=["resid_9"], progress=False)


def test_dictionary_for_another_model_is_refused(small):
    model, clean, patch, dicts = small
    from attribution.dictionaries.kinds import random_sae

    wrong = dict(dicts, resid_0=random_sae(48, 96))
    with pytest.raises(ValueError, match="resid_0.*size 48.*size 32"):
        node_effects(model, wrong, clean, patch, logit_diff_metric(3), progress=False)


def test_empty_input_is_refused(small):
    model, _, _, dicts = small
    with pytest.raises(ValueError, match="empty"):
        node_effects(model, dicts, [], None, logit_diff_metric(3), progress=False)


def test_effects_work_inside_a_callers_no_grad_block(small):
    model, clean, patch, dicts = small
    with torch.no_grad():
        ne = node_effects(model, dicts, clean, patch, logit_diff_metric(3), method="attrib", progress=False)
    assert any(ne.features[s].abs().sum() > 0 for s in ne.features)


def test_last_position_logits_give_the_same_effects():
    model = tiny_model("llama", torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    full = node_effects(model, dicts, clean, patch, metric, method="ig", steps=3, progress=False)
    last = node_effects(model, dicts, clean, patch, metric, method="ig", steps=3, progress=False,
                        metric_positions="last")
    for site in full.features:
        torch.testing.assert_close(last.features[site], full.features[site])


def test_feature_tensors_are_stored_sparse_and_handed_out_exactly():
    """NodeEffects keeps its [b, s, F] tensors sparse: each comes back equal, element for
    element, to the dense tensor computed here from the dictionary, and is stored in far
    fewer bytes than the dense one."""
    model = tiny_model("gpt2")
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    ne = node_effects(model, dicts, clean, None, logit_diff_metric(len(clean)), method="attrib", progress=False)
    batch = model.tokenize(clean)
    with torch.no_grad():
        _, acts = run_hooked(model.hf, batch.input_ids, ne.sites)
    for site in ne.sites:
        f = dicts[site.name].encode(acts[site.name])
        assert torch.allclose(ne.clean_features[site.name], f, atol=1e-6)
        assert torch.allclose(ne.delta_features[site.name], -f, atol=1e-6)  # zero ablation: Δf = 0 - f
        stored = ne.delta_features.sparse(site.name)
        assert stored.indices().nbytes + stored.values().nbytes < f.nelement() * f.element_size()
        copy = ne.features[site.name]
        copy.zero_()  # a fresh tensor: changing it leaves the stored one alone
        assert ne.features[site.name].abs().sum() > 0
