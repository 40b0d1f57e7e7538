"""Edge effects (SPEC §3, Eq. 5) against finite differences with plain torch hooks.

The finite-difference ground truth freezes every site except the upstream one at
its clean value, nudges one upstream node along its patch delta, and measures
the downstream node: ``∇_d m · (d(+h) - d(-h)) / 2h``.
"""

from __future__ import annotations

import pytest
import torch

from attribution.edges import edge_effects
from attribution.effects import node_effects
from tests.conftest import logit_diff_metric, prompt_pairs, tiny_dictionaries, tiny_model
from tests.hooks import run_hooked
from tests.test_node_effects import sae_parts


def grad_at_site(model, clean, site, metric):
    """∇_x m at one site's activation, from a hooked run with a leaf there."""
    sites = model.all_sites()
    leaf = {}

    def make_leaf(x):
        leaf["x"] = x.detach().requires_grad_()
        return leaf["x"]

    with torch.enable_grad():
        logits, _ = run_hooked(model.hf, clean, sites, {site: make_leaf})
        m = metric(logits, torch.arange(len(clean))).sum()
        (g,) = torch.autograd.grad(m, [leaf["x"]])
    return g


def topk_parts(sae, x):
    """Features and error of a TopK SAE, written out in full."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    top = pre.topk(sae.k, dim=-1)
    f = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return f, x - (f @ sae.W_dec + sae.b_dec)


def downstream_value(sae, x, node, grad, parts=sae_parts):
    """The downstream node's value: feature k, or A · ε with A = ∇_x m (the JVP trick)."""
    f, e = parts(sae, x)
    if node == sae.width:
        return (grad * e).sum(-1)
    return f[..., node]


def fd_edge(model, dicts, clean, acts_c, up, down, b, s_d, k, s_u, j, delta_f, delta_e, g_down, h=1e-6,
            parts=sae_parts):
    sites = model.all_sites()
    sae_u, sae_d = dicts[up], dicts[down]
    vec = delta_e[b, s_u] if j == sae_u.width else delta_f[b, s_u, j] * sae_u.W_dec[j]
    frozen = {st.name: (lambda x, n=st.name: acts_c[n]) for st in sites if st.name not in (up,)}

    def value(t):
        def nudge(x):
            x = acts_c[up].clone()
            x[b, s_u] += t * vec
            return x
        _, seen = run_hooked(model.hf, clean, sites, {**frozen, up: nudge})
        return downstream_value(sae_d, seen[down][b, s_d], k, g_down[b, s_d], parts)

    left = 1.0 if k == sae_d.width else (g_down[b, s_d] * sae_d.W_dec[k]).sum()
    return left * central(value, h)


def central(value, h):
    """Central difference (value(h) - value(-h)) / 2h."""
    return (value(h) - value(-h)) / (2 * h)


@pytest.mark.parametrize("method", ["attrib", "ig"])
def test_edge_weights_equal_finite_differences_with_intermediate_sites_frozen(family, method):
    model = tiny_model(family, torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, method=method, steps=4, progress=False)
    ee = edge_effects(model, dicts, clean, ne, metric, node_threshold=0.0, progress=False)
    sites = model.all_sites()
    _, acts_c = run_hooked(model.hf, clean, sites)
    checked_err_up = 0
    for (up, down), edges in ee.pairs.items():
        g_down = ne.grads[down]  # the left factor of Eq. 5 is the node effects' gradient
        w = edges.weight
        is_err_up = edges.index[4] == edges.up_width
        picks = []
        for group in (is_err_up, ~is_err_up):
            if group.any():
                picks.append(torch.where(group, w.abs(), torch.zeros_like(w)).argmax().item())
        for i in picks:
            b, s_d, k, s_u, j = edges.index[:, i].tolist()
            truth = fd_edge(model, dicts, clean, acts_c, up, down, b, s_d, k, s_u, j,
                            ne.delta_features[up], ne.delta_errors[up], g_down)
            torch.testing.assert_close(w[i], truth, rtol=1e-6, atol=1e-12)
            checked_err_up += int(j == edges.up_width)
    # Edges out of error nodes exist and were checked against the model.
    assert checked_err_up >= 3


def test_first_gradient_factor_is_the_whole_model_gradient():
    """The node effects' ∇_x m at a site equals a hooked whole-model gradient."""
    model = tiny_model("gpt2", torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    for site in ("embed", "attn_0", "resid_0", "mlp_1"):
        torch.testing.assert_close(ne.grads[site], grad_at_site(model, clean, site, metric))


@pytest.mark.parametrize("family_", ["gpt_neox", "llama", "gemma2"])
def test_incoming_residual_edges_sum_to_gradient_times_residual_delta(family_):
    """resid_L = resid_{L-1} + attn_L + mlp_L, so all edges into a resid_L node add up to
    ∇_d m · ∂d/∂resid_L · Δresid_L (computed here from the SAE formula and hooked runs)."""
    model = tiny_model(family_, torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    ee = edge_effects(model, dicts, clean, ne, metric, node_threshold=0.0, progress=False)
    assert {up for up, down in ee.pairs if down == "resid_1"} == {"resid_0", "attn_1", "mlp_1"}
    assert check_resid_edge_sums(model, dicts["resid_1"], clean, patch, metric, ee) > 10


def check_resid_edge_sums(model, sae, clean, patch, metric, ee, site: str = "resid_1", per_position: int = 3) -> int:
    """Assert that the edges into active features of the residual ``site`` add up to
    ``∇_d m · ∂d/∂resid · Δresid``, computed from the SAE formula and hooked runs; returns
    how many nodes were checked."""
    sites = model.all_sites()
    _, acts_c = run_hooked(model.hf, clean, sites)
    _, acts_p = run_hooked(model.hf, patch, sites)
    g = grad_at_site(model, clean, site, metric)
    x = acts_c[site]
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    d_resid = acts_p[site] - x
    n_checked = 0
    for b in range(len(clean)):
        for s in range(clean.shape[1]):
            for k in (pre[b, s] > 0).nonzero()[:per_position, 0].tolist():
                truth = (g[b, s] * sae.W_dec[k]).sum() * (sae.W_enc[:, k] * d_resid[b, s]).sum()
                total = sum(
                    e.weight[(e.index[0] == b) & (e.index[1] == s) & (e.index[2] == k)].sum()
                    for (up, down), e in ee.pairs.items() if down == site
                )
                torch.testing.assert_close(total, truth, rtol=1e-7, atol=1e-12)
                n_checked += 1
    return n_checked


def test_edges_into_the_metric_from_the_last_site_are_its_node_effects():
    model = tiny_model("qwen2", torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    ee = edge_effects(model, dicts, clean, ne, metric, node_threshold=0.0, progress=False)
    assert set(ee.to_metric) == {"resid_1"}
    feats, errs = ee.to_metric["resid_1"]
    torch.testing.assert_close(feats, ne.features["resid_1"])
    torch.testing.assert_close(errs, ne.errors["resid_1"])


def test_only_selected_downstream_nodes_get_edges_and_aggregation_is_a_mean():
    model = tiny_model("gpt_neox")
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    threshold = 0.5 * max(ne.features[s].abs().max().item() for s in ne.features)
    ee = edge_effects(model, dicts, clean, ne, metric, node_threshold=threshold, progress=False)
    for (_up, down), e in ee.pairs.items():
        eff = torch.cat([ne.features[down], ne.errors[down][..., None]], -1)
        assert (eff[e.index[0], e.index[1], e.index[2]].abs() > threshold).all()
        dense = e.to_dense(*clean.shape)
        idx, w = e.aggregate("sum", len(clean))
        expect = dense.sum(dim=(1, 3)).mean(0)
        torch.testing.assert_close(w, expect[idx[0], idx[1]])
        idx, w = e.aggregate("none", len(clean))
        torch.testing.assert_close(w, dense.mean(0)[tuple(idx)])


def test_topk_dictionary_edges_match_finite_differences():
    model = tiny_model("llama", torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean, activation="topk")
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    ee = edge_effects(model, dicts, clean, ne, metric, node_threshold=0.0, progress=False)
    _, acts_c = run_hooked(model.hf, clean, model.all_sites())
    e = ee.pairs[("attn_1", "resid_1")]
    for i in (e.weight.abs().argmax().item(), (e.index[4] == e.up_width).nonzero()[0, 0].item()):
        b, s_d, k, s_u, j = e.index[:, i].tolist()
        truth = fd_edge(model, dicts, clean, acts_c, "attn_1", "resid_1", b, s_d, k, s_u, j,
                        ne.delta_features["attn_1"], ne.delta_errors["attn_1"], ne.grads["resid_1"],
                        parts=topk_parts)
        torch.testing.assert_close(e.weight[i], truth, rtol=1e-6, atol=1e-12)


def test_packing_positions_into_one_backward_changes_no_edge(monkeypatch):
    """Residual and MLP sites carry one node per (example, position) in each backward;
    attention sites mix positions and must not. The edges equal one-node-per-example packing."""
    import attribution.edges as edges_mod

    model = tiny_model("gpt_neox", torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, method="attrib", progress=False)
    packed = edge_effects(model, dicts, clean, ne, metric, node_threshold=0.0, progress=False)
    assert packed.position_local == {"attn_0": False, "mlp_0": True, "resid_0": True,
                                     "attn_1": False, "mlp_1": True, "resid_1": True}
    probe = edges_mod._probe
    monkeypatch.setattr(edges_mod, "_probe", lambda x, leaves: (probe(x, leaves)[0], False))
    plain = edge_effects(model, dicts, clean, ne, metric, node_threshold=0.0, progress=False)
    assert packed.n_backward_slots < plain.n_backward_slots
    for key, e in plain.pairs.items():
        b, s = clean.shape
        torch.testing.assert_close(packed.pairs[key].to_dense(b, s), e.to_dense(b, s), rtol=1e-10, atol=1e-14)
