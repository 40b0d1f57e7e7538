"""IG edges (``edge_method="ig"``, issue 16) against ground truth from plain torch hooks.

Along the IG path every site sits at ``x_clean + α Δx`` (``Δx`` from hooked clean and
patch runs). For a downstream node ``d`` whose site reads only chosen sites, the sum of
its IG edges over every upstream feature and error node must equal ``d``'s own
contribution along the path, ``∫ ∇_d m(α) d(d(α))``: here a Stieltjes sum on a fine
grid, with ``d(α)`` the value the model computes at ``d``'s site from the interpolated
upstream sites and ``∇_d m(α)`` a hooked gradient with ``d``'s site at its path point.
A single edge must equal the same sum with ``∂d/∂u`` from central finite differences.
"""

from __future__ import annotations

import pytest
import torch

from attribution.edges import edge_effects
from attribution.effects import node_effects
from tests.conftest import logit_diff_metric, prompt_pairs, tiny_dictionaries, tiny_model
from tests.hooks import run_hooked
from tests.test_node_effects import sae_parts

STEPS = 16


def path_values(model, clean, sites, acts_c, delta, alphas, extra=None):
    """Site activations the model computes when every site is set to ``x_c + α Δx``
    (rows point-major: ``α_i`` for rows ``i*b .. i*b+b-1``); ``extra[site]`` adds a
    nudge ``[n*b, s, d]`` on top of a site's interpolated value."""
    n, b = len(alphas), len(clean)
    a = alphas.to(torch.float64)[:, None, None, None]
    over = {}
    for st in sites:
        value = (acts_c[st.name][None] + a * delta[st.name][None]).reshape(n * b, *acts_c[st.name].shape[1:])
        if extra and st.name in extra:
            value = value + extra[st.name]
        over[st.name] = lambda x, v=value: v
    _, seen = run_hooked(model.hf, clean.repeat(n, 1), sites, over)
    return seen


def path_grads(model, clean, sites, site, acts_c, delta, alphas, metric):
    """``∇_x m`` at ``site`` with only that site set to ``x_c + α Δx``, ``[n, b, s, d]``."""
    n, b = len(alphas), len(clean)
    a = alphas.to(torch.float64)[:, None, None, None]
    leaf = (acts_c[site][None] + a * delta[site][None]).reshape(n * b, *acts_c[site].shape[1:])
    leaf = leaf.detach().requires_grad_()
    with torch.enable_grad():
        logits, _ = run_hooked(model.hf, clean.repeat(n, 1), sites, {site: lambda x: leaf})
        (g,) = torch.autograd.grad(metric(logits, torch.arange(b).repeat(n)).sum(), [leaf])
    return g.reshape(n, b, *g.shape[1:])


def setup(family):
    model = tiny_model(family, torch.float64)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    sites = model.all_sites()
    _, acts_c = run_hooked(model.hf, clean, sites)
    _, acts_p = run_hooked(model.hf, patch, sites)
    delta = {k: acts_p[k] - acts_c[k] for k in acts_c}
    ne = node_effects(model, dicts, clean, patch, metric, method="ig", steps=STEPS, ig_points="midpoint",
                      keep_step_grads=True, progress=False)
    return model, clean, dicts, metric, sites, acts_c, delta, ne


def node_values(sae, x):
    """Every feature and the error vector at activations ``x``."""
    return sae_parts(sae, x)


def path_contributions(model, clean, dicts, sites, acts_c, delta, metric, alphas, slopes_h=None, grid=False):
    """Each downstream node's contribution along the path, ``[b, s, F + 1]`` per site.

    ``grid=False``: ``mean_k ∇_d m(α_k) · d'(α_k)`` at the IG points ``alphas``, with
    ``d'`` a central difference in ``α`` (the quadrature the engine uses, no step error).
    ``grid=True``: ``Σ_j ∇_d m(mid_j) (d(α_{j+1}) − d(α_j))`` on the grid ``alphas``
    (converges to the integral as the grid is refined).
    """
    b, s = clean.shape
    if grid:
        values = path_values(model, clean, sites, acts_c, delta, alphas)
        at = (alphas[:-1] + alphas[1:]) / 2
    else:
        h = slopes_h
        plus = path_values(model, clean, sites, acts_c, delta, alphas + h)
        minus = path_values(model, clean, sites, acts_c, delta, alphas - h)
        at = alphas
    out = {}
    for down in [st.name for st in sites[1:]]:  # every site but embed reads only chosen sites
        sae = dicts[down]
        g = path_grads(model, clean, sites, down, acts_c, delta, at, metric)  # [n, b, s, d]
        if grid:
            f, e = node_values(sae, values[down].reshape(len(alphas), b, s, -1))
            df, de = f.diff(dim=0), e.diff(dim=0)
        else:
            fp, ep = node_values(sae, plus[down].reshape(len(alphas), b, s, -1))
            fm, em = node_values(sae, minus[down].reshape(len(alphas), b, s, -1))
            df, de = (fp - fm) / (2 * h * len(alphas)), (ep - em) / (2 * h * len(alphas))
        out[down] = torch.cat([((g @ sae.W_dec.T) * df).sum(0), (g * de).sum(dim=(0, -1))[..., None]], -1)
    return out


def edge_sums(model, dicts, clean, ne, metric, sites):
    """The engine's IG edges into every node of every site but embed, summed over upstream nodes."""
    b, s = clean.shape
    every = {st.name: torch.ones(b, s, dicts[st.name].width + 1, dtype=torch.bool) for st in sites[1:]}
    ee = edge_effects(model, dicts, clean, ne, metric, downstream=every, edge_method="ig", progress=False)
    assert ee.method == "ig" and ee.steps == ne.info["steps"]
    totals = {name: torch.zeros(b, s, dicts[name].width + 1, dtype=torch.float64) for name in every}
    for (_up, down), edges in ee.pairs.items():
        totals[down] += edges.to_dense(b, s).sum(dim=(3, 4))
    return totals


def test_ig_edges_into_a_node_add_up_to_its_contribution_along_the_path(family):
    """The identity at the engine's own points: Σ_u edge(u → d) = mean_k ∇_d m(α_k) d'(α_k)."""
    model, clean, dicts, metric, sites, acts_c, delta, ne = setup(family)
    totals = edge_sums(model, dicts, clean, ne, metric, sites)
    alphas = (torch.arange(STEPS, dtype=torch.float64) + 0.5) / STEPS
    truth = path_contributions(model, clean, dicts, sites, acts_c, delta, metric, alphas, slopes_h=1e-6)
    n_on = 0
    for down, t in truth.items():
        scale = t.abs().max()
        assert scale > 0
        torch.testing.assert_close(totals[down], t, rtol=1e-5, atol=1e-6 * scale.item())
        n_on += int((t.abs() > 1e-3 * scale).sum())
    assert n_on > 50


@pytest.mark.slow
@pytest.mark.parametrize("family_", ["gpt2", "llama"])
def test_ig_edge_sums_converge_to_the_path_integral(family_):
    """With enough steps the sums are within 1% of the integral ∫ ∇_d m(α) d(d(α)), taken on a
    fine grid (relative to the largest contribution at each site; features that switch on
    along the path make the step error first order, so this needs many steps)."""
    model, clean, dicts, metric, sites, acts_c, delta, _ = setup(family_)
    _, patch = prompt_pairs()
    ne = node_effects(model, dicts, clean, patch, metric, method="ig", steps=128, ig_points="midpoint",
                      keep_step_grads=True, progress=False)
    totals = edge_sums(model, dicts, clean, ne, metric, sites)
    truth = path_contributions(model, clean, dicts, sites, acts_c, delta, metric,
                               torch.linspace(0, 1, 513, dtype=torch.float64), grid=True)
    for down, t in truth.items():
        assert ((totals[down] - t).abs().max() / t.abs().max()).item() < 0.01, down


def test_a_feature_off_at_clean_and_on_at_patch_gets_ig_edges_equal_to_finite_differences():
    model, clean, dicts, metric, sites, acts_c, delta, ne = setup("llama")
    down, up = "resid_1", "mlp_1"
    sae_d, sae_u = dicts[down], dicts[up]
    f_c, _ = sae_parts(sae_d, acts_c[down])
    f_p, _ = sae_parts(sae_d, acts_c[down] + delta[down])
    turned_on = (f_c == 0) & (f_p > 0)
    assert turned_on.any()
    mask = torch.cat([turned_on, torch.zeros_like(turned_on[..., :1])], -1)
    eq5 = edge_effects(model, dicts, clean, ne, metric, downstream={down: mask}, progress=False)
    # Eq. 5 takes the Jacobian at the clean input, where these features are off: no edge
    # (zero weights are not stored).
    assert sum(e.weight.numel() for e in eq5.pairs.values()) == 0
    ig = edge_effects(model, dicts, clean, ne, metric, downstream={down: mask}, edge_method="ig", progress=False)
    edges = ig.pairs[(up, down)]
    assert edges.weight.abs().max() > 0
    b, s = clean.shape
    alphas = (torch.arange(STEPS, dtype=torch.float64) + 0.5) / STEPS
    g = path_grads(model, clean, sites, down, acts_c, delta, alphas, metric)
    for i in edges.weight.abs().topk(3).indices.tolist():
        ex, s_d, k, s_u, j = edges.index[:, i].tolist()
        f_u, e_u = sae_parts(sae_u, acts_c[up])
        f_up, e_up = sae_parts(sae_u, acts_c[up] + delta[up])
        vec = (e_up - e_u)[ex, s_u] if j == sae_u.width else (f_up - f_u)[ex, s_u, j] * sae_u.W_dec[j]
        h = 1e-6

        def value(t, ex=ex, s_u=s_u, s_d=s_d, k=k, vec=vec):
            nudge = torch.zeros(STEPS * b, s, vec.shape[-1], dtype=torch.float64)
            nudge[torch.arange(STEPS) * b + ex, s_u] = t * vec
            seen = path_values(model, clean, sites, acts_c, delta, alphas, {up: nudge})
            f, _ = sae_parts(sae_d, seen[down].reshape(STEPS, b, s, -1)[:, ex, s_d])
            return f[:, k]  # [STEPS]

        slope = (value(h) - value(-h)) / (2 * h)
        left = g[:, ex, s_d] @ sae_d.W_dec[k]  # ∇_{f_k} m at each point
        truth = (left * slope).mean()
        torch.testing.assert_close(edges.weight[i], truth, rtol=1e-5, atol=1e-10)


def test_ig_edge_options_are_checked():
    model, clean, dicts, metric, *_ = setup("gpt2")
    ne = node_effects(model, dicts, clean, None, metric, method="ig", steps=2, keep_step_grads=True, progress=False)
    with pytest.raises(ValueError, match="edge_method"):
        edge_effects(model, dicts, clean, ne, metric, edge_method="jacobian", progress=False)
    with pytest.raises(ValueError, match="steps"):
        edge_effects(model, dicts, clean, ne, metric, edge_method="ig", steps=5, progress=False)
