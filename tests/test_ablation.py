"""Faithfulness machinery (SPEC §5) checked against interventions written from scratch
with plain PyTorch forward hooks on tiny random models (no nnsight in the ground truth)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from ablation import AblationConfig, faithfulness, run_with_ablations, sweep
from attribution.dictionaries.kinds import Identity, calibrate_sparsity, random_sae
from attribution.model.sites import get_module
from attribution.model.wrapper import Batch, SFCModel
from circuits.masks import NodeMask, masks_from_effects, n_nodes, random_masks_like
from viz.curves import curve_figure

B, S, V, D, F = 8, 6, 100, 32, 64


def _hf(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt_neox":
        cfg = GPTNeoXConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
        )
        return GPTNeoXForCausalLM(cfg)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64,
    )
    return LlamaForCausalLM(cfg)


class Setup:
    """A tiny model, clean and patch token ids, one calibrated random SAE per site, and a metric."""

    def __init__(self, kind: str, neurons: bool = False) -> None:
        self.hf = _hf(kind)
        self.model = SFCModel(self.hf)
        self.sites = self.model.all_sites()
        gen = torch.Generator().manual_seed(1)
        self.clean = torch.randint(0, V, (B, S), generator=gen)
        self.patch = torch.randint(0, V, (B, S), generator=gen)
        self.answer = torch.randint(0, V, (B,), generator=gen)
        self.wrong = torch.randint(0, V, (B,), generator=gen)
        acts = self.activations(self.clean)
        self.width = D if neurons else F
        self.dicts = {}
        for i, site in enumerate(self.sites):
            if neurons:
                self.dicts[site.name] = Identity(D)
            else:
                self.dicts[site.name] = calibrate_sparsity(random_sae(D, F, seed=i), acts[site.name], 8)

    def metric(self, logits: Tensor, rows: Tensor) -> Tensor:
        last = logits[:, -1]
        idx = torch.arange(len(rows))
        return last[idx, self.answer[rows]] - last[idx, self.wrong[rows]]

    def _register(self, hooks: dict) -> list:
        handles = []
        for site in self.sites:
            if site.name in hooks:
                handles.append(get_module(self.hf, site.module).register_forward_hook(hooks[site.name]))
        return handles

    @torch.no_grad()
    def activations(self, ids: Tensor, attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Un-ablated site activations ``[b, s, d]``, read with plain hooks."""
        acts = {}

        def reader(name):
            def hook(module, inputs, output):
                acts[name] = (output[0] if isinstance(output, tuple) else output).detach().clone()

            return hook

        handles = self._register({s.name: reader(s.name) for s in self.sites})
        try:
            self.hf(ids, attention_mask=attention_mask)
        finally:
            for h in handles:
                h.remove()
        return acts

    @torch.no_grad()
    def hooked_metric(self, replace: dict) -> Tensor:
        """The metric with ``replace[site](x) -> x'`` applied at each named site by plain forward hooks."""

        def writer(fn):
            def hook(module, inputs, output):
                if isinstance(output, tuple):
                    return (fn(output[0]), *output[1:])
                return fn(output)

            return hook

        handles = self._register({name: writer(fn) for name, fn in replace.items()})
        try:
            logits = self.hf(self.clean).logits
        finally:
            for h in handles:
                h.remove()
        return self.metric(logits, torch.arange(B))

    def splice(self, name: str, keep_f: Tensor, keep_e: Tensor, f_abl, e_abl):
        """``x -> decode(f') + e'`` with ``f' = keep·f + (1-keep)·f_abl`` (same for e), written out by hand."""
        sae = self.dicts[name]
        kf, ke = keep_f.float(), keep_e.float().unsqueeze(-1)

        def fn(x):
            f = sae.encode(x)
            e = x - (f @ sae.W_dec + sae.b_dec)
            f_new = kf * f + (1 - kf) * f_abl(x)
            e_new = ke * e + (1 - ke) * e_abl(x)
            return f_new @ sae.W_dec + sae.b_dec + e_new

        return fn

    def mean_values(self, ids: Tensor):
        """Per-site position-specific means ``(f [s, F], e [s, d])`` over the rows of ``ids``."""
        out = {}
        for name, x in self.activations(ids).items():
            sae = self.dicts[name]
            f = sae.encode(x)
            out[name] = (f.mean(0), (x - (f @ sae.W_dec + sae.b_dec)).mean(0))
        return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads only add contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["gpt_neox", "llama"])
def setup(request) -> Setup:
    return Setup(request.param)


@pytest.fixture(scope="module")
def neox() -> Setup:
    return Setup("gpt_neox")


def random_masks(
    names, seed: int, p: float = 0.5, per_position: bool = True, width: int = F
) -> dict[str, NodeMask]:
    """Bernoulli(p) masks at every site but the last residual, which is kept whole so that
    every upstream ablation reaches the logits."""
    gen = torch.Generator().manual_seed(seed)
    shape = (S, width) if per_position else (width,)
    masks = {
        n: NodeMask(torch.rand(shape, generator=gen) < p, torch.rand(shape[:-1], generator=gen) < p)
        for n in names
    }
    masks["resid_1"] = NodeMask(torch.ones(shape, dtype=torch.bool), torch.ones(shape[:-1], dtype=torch.bool))
    return masks


def mean_hooks(st: Setup, masks, means, handle=lambda site, errors: errors, names=None):
    names = names if names is not None else [s.name for s in st.sites]
    kinds = {s.name: s.kind for s in st.sites}
    replace = {}
    for name in names:
        mask = masks.get(name, NodeMask.empty(st.width, S))
        f_mean, e_mean = means[name]
        replace[name] = st.splice(
            name, mask.features, handle(kinds[name], mask.errors),
            lambda x, v=f_mean: v, lambda x, v=e_mean: v,
        )
    return replace


def test_full_circuit_reproduces_the_clean_metric(setup: Setup):
    clean = setup.metric(setup.hf(setup.clean).logits, torch.arange(B)).detach()
    for per_position in (True, False):
        full = {n: NodeMask.full(F, S if per_position else None) for n in setup.dicts}
        got = run_with_ablations(setup.model, setup.model.tokenize(setup.clean), setup.dicts, full, setup.metric)
        torch.testing.assert_close(got, clean, rtol=0, atol=1e-6)


def test_empty_circuit_with_zero_ablation_sets_every_site_to_b_dec(setup: Setup):
    replace = {n: (lambda x, b=sae.b_dec: b.expand_as(x)) for n, sae in setup.dicts.items()}
    expected = setup.hooked_metric(replace)
    got = run_with_ablations(
        setup.model, setup.model.tokenize(setup.clean), setup.dicts, {}, setup.metric, config=AblationConfig(kind="zero")
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_partial_mean_ablation_matches_sequential_hooks(setup: Setup):
    masks = random_masks(setup.dicts, seed=3)
    means = setup.mean_values(setup.patch)
    expected = setup.hooked_metric(mean_hooks(setup, masks, means))
    got = run_with_ablations(
        setup.model, setup.model.tokenize(setup.clean), setup.dicts, masks, setup.metric,
        reference=setup.model.tokenize(setup.patch),
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # Ablations compose: splicing each site from its *clean* activation gives another answer.
    clean_acts = setup.activations(setup.clean)
    parallel = {
        name: (lambda x, fn=fn, x0=clean_acts[name]: fn(x0))
        for name, fn in mean_hooks(setup, masks, means).items()
    }
    assert (got - setup.hooked_metric(parallel)).abs().max() > 1e-3


def test_neuron_mean_ablation_matches_hooks():
    st = Setup("gpt_neox", neurons=True)
    masks = random_masks(st.dicts, seed=4, p=0.3, width=D)
    means = st.mean_values(st.clean)
    expected = st.hooked_metric(mean_hooks(st, masks, means))
    got = run_with_ablations(st.model, st.model.tokenize(st.clean), st.dicts, masks, st.metric)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_mean_ablation_averages_each_position_over_non_padding_rows(neox: Setup):
    attention_mask = torch.ones(B, S, dtype=torch.long)
    attention_mask[:3, :2] = 0  # three left-padded reference rows
    acts = neox.activations(neox.patch, attention_mask)
    real = attention_mask.float().unsqueeze(-1)
    means = {}
    for name, x in acts.items():
        sae = neox.dicts[name]
        f = sae.encode(x)
        e = x - (f @ sae.W_dec + sae.b_dec)
        means[name] = ((f * real).sum(0) / real.sum(0), (e * real).sum(0) / real.sum(0))
    masks = random_masks(neox.dicts, seed=13)
    expected = neox.hooked_metric(mean_hooks(neox, masks, means))
    got = run_with_ablations(
        neox.model, neox.model.tokenize(neox.clean), neox.dicts, masks, neox.metric,
        reference=Batch(neox.patch, attention_mask),
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_random_baseline_keeps_every_error_node_at_the_circuit_density():
    gen = torch.Generator().manual_seed(14)
    masks = {"resid_0": NodeMask(torch.rand(50, 400, generator=gen) < 0.1, torch.zeros(50, dtype=torch.bool))}
    rand = random_masks_like(masks, seed=1)["resid_0"]
    assert rand.errors.all()
    assert abs(rand.features.float().mean().item() - masks["resid_0"].features.float().mean().item()) < 0.01
    assert not torch.equal(rand.features, masks["resid_0"].features)


def test_summed_mask_equals_per_position_mask_repeated_over_positions(neox: Setup):
    summed = random_masks(neox.dicts, seed=5, per_position=False)
    repeated = {
        n: NodeMask(m.features.expand(S, F).clone(), m.errors.expand(S).clone()) for n, m in summed.items()
    }
    batch = neox.model.tokenize(neox.clean)
    a = run_with_ablations(neox.model, batch, neox.dicts, summed, neox.metric)
    b = run_with_ablations(neox.model, batch, neox.dicts, repeated, neox.metric)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert n_nodes(summed) == sum(int(m.features.sum()) + int(m.errors) for m in summed.values())


def test_complement_equals_the_inverted_mask(setup: Setup):
    masks = random_masks(setup.dicts, seed=6)
    masks.pop("mlp_0")  # a site missing from the masks has no node in the circuit
    inverted = {n: ~m for n, m in masks.items()} | {"mlp_0": NodeMask.full(F, S)}
    batch = setup.model.tokenize(setup.clean)
    for ablation in ("mean", "zero"):
        a = run_with_ablations(setup.model, batch, setup.dicts, masks, setup.metric, complement=True,
                               config=AblationConfig(kind=ablation))
        b = run_with_ablations(setup.model, batch, setup.dicts, inverted, setup.metric, config=AblationConfig(kind=ablation))
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sites_below_start_layer_are_neither_ablated_nor_counted(setup: Setup):
    masks = random_masks(setup.dicts, seed=7)
    means = setup.mean_values(setup.clean)
    upper = [s.name for s in setup.sites if s.layer >= 1]
    expected = setup.hooked_metric(mean_hooks(setup, masks, means, names=upper))
    got = run_with_ablations(
        setup.model, setup.model.tokenize(setup.clean), setup.dicts, masks, setup.metric, config=AblationConfig(start_layer=1)
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert n_nodes(masks, start_layer=1) == sum(masks[n].n_nodes for n in upper)
    assert n_nodes(masks, start_layer=0) == n_nodes(masks) - masks["embed"].n_nodes


@pytest.mark.parametrize("mode", ["default", "remove", "keep", "resid_only"])
def test_error_handling_modes_match_hooks(neox: Setup, mode: str):
    rules = {
        "default": lambda kind, errors: errors,
        "remove": lambda kind, errors: torch.zeros_like(errors),
        "keep": lambda kind, errors: torch.ones_like(errors),
        "resid_only": lambda kind, errors: errors if kind == "resid" else torch.zeros_like(errors),
    }
    masks = random_masks(neox.dicts, seed=8)
    means = neox.mean_values(neox.clean)
    expected = neox.hooked_metric(mean_hooks(neox, masks, means, handle=rules[mode]))
    got = run_with_ablations(
        neox.model, neox.model.tokenize(neox.clean), neox.dicts, masks, neox.metric, config=AblationConfig(handle_errors=mode)
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_error_handling_modes_give_different_metrics(neox: Setup):
    masks = random_masks(neox.dicts, seed=8)
    batch = neox.model.tokenize(neox.clean)
    outs = [
        run_with_ablations(neox.model, batch, neox.dicts, masks, neox.metric, config=AblationConfig(handle_errors=mode))
        for mode in ("default", "remove", "keep", "resid_only")
    ]
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert (outs[i] - outs[j]).abs().max() > 1e-3


def test_resample_ablation_matches_hooks_with_the_same_permutation(setup: Setup):
    seed = 11
    rows = torch.randperm(B, generator=torch.Generator().manual_seed(seed))
    ref = setup.activations(setup.patch)
    masks = random_masks(setup.dicts, seed=9)
    replace = {}
    for name, sae in setup.dicts.items():
        src = ref[name][rows]
        f_src = sae.encode(src)
        e_src = src - (f_src @ sae.W_dec + sae.b_dec)
        replace[name] = setup.splice(
            name, masks[name].features, masks[name].errors, lambda x, v=f_src: v, lambda x, v=e_src: v
        )
    expected = setup.hooked_metric(replace)
    got = run_with_ablations(
        setup.model, setup.model.tokenize(setup.clean), setup.dicts, masks, setup.metric,
        config=AblationConfig(kind="resample", seed=seed), reference=setup.model.tokenize(setup.patch),
    )
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_full_circuit_is_faithful_and_empty_circuit_is_complete(neox: Setup):
    batch = neox.model.tokenize(neox.clean)
    clean = neox.metric(neox.hf(neox.clean).logits, torch.arange(B)).detach().mean().item()
    full = {n: NodeMask.full(F, S) for n in neox.dicts}
    res = faithfulness(neox.model, batch, neox.dicts, full, neox.metric, config=AblationConfig(start_layer=0))
    assert res.faithfulness == pytest.approx(1.0, abs=1e-5)
    assert res.completeness == pytest.approx(0.0, abs=1e-5)
    assert res.m_full == pytest.approx(clean, abs=1e-6)
    assert res.n_nodes == 6 * (S * F + S)  # embed (layer -1) not counted
    empty = faithfulness(neox.model, batch, neox.dicts, {}, neox.metric, config=AblationConfig(start_layer=0))
    assert empty.faithfulness == pytest.approx(0.0, abs=1e-5)
    assert empty.completeness == pytest.approx(1.0, abs=1e-5)
    assert empty.n_nodes == 0


def test_faithfulness_is_the_normalised_circuit_metric(neox: Setup):
    batch = neox.model.tokenize(neox.clean)
    masks = random_masks(neox.dicts, seed=10, p=0.7)
    res = faithfulness(neox.model, batch, neox.dicts, masks, neox.metric)
    means = neox.mean_values(neox.clean)
    m_c = neox.hooked_metric(mean_hooks(neox, masks, means)).mean().item()
    m_cc = neox.hooked_metric(mean_hooks(neox, {n: ~m for n, m in masks.items()}, means)).mean().item()
    m_empty = neox.hooked_metric(mean_hooks(neox, {}, means)).mean().item()
    m_full = neox.metric(neox.hf(neox.clean).logits, torch.arange(B)).mean().item()
    assert res.m_empty == pytest.approx(m_empty, abs=1e-5)
    assert res.faithfulness == pytest.approx((m_c - m_empty) / (m_full - m_empty), rel=1e-3)
    assert res.completeness == pytest.approx((m_cc - m_empty) / (m_full - m_empty), rel=1e-3)


def test_masks_from_effects_keep_nodes_above_threshold_in_absolute_value():
    feats = {"resid_0": torch.tensor([[0.5, -0.2, 0.05], [0.0, -0.9, 0.1]])}
    errs = {"resid_0": torch.tensor([[-0.3], [0.01]])}  # the reference's [s, 1] layout
    masks = masks_from_effects(feats, errs, 0.1)
    assert masks["resid_0"].features.tolist() == [[True, True, False], [False, True, False]]
    assert masks["resid_0"].errors.tolist() == [True, False]
    assert n_nodes(masks) == 4


def test_sweep_runs_from_full_model_to_empty_circuit(neox: Setup):
    gen = torch.Generator().manual_seed(12)
    effects_f = {n: torch.randn(S, F, generator=gen) for n in neox.dicts}
    effects_e = {n: torch.randn(S, generator=gen) for n in neox.dicts}
    thresholds = [-1.0, 1.0, 2.0, math.inf]
    points = sweep(
        neox.model, neox.model.tokenize(neox.clean), neox.dicts, effects_f, effects_e, neox.metric,
        thresholds, progress=False,
    )
    assert [p.threshold for p in points] == thresholds
    assert points[0].n_nodes == 7 * (S * F + S) and points[-1].n_nodes == 0
    assert all(a.n_nodes >= b.n_nodes for a, b in zip(points, points[1:]))
    assert points[0].faithfulness == pytest.approx(1.0, abs=1e-5)
    assert points[0].completeness == pytest.approx(0.0, abs=1e-5)
    assert points[-1].faithfulness == pytest.approx(0.0, abs=1e-5)
    assert points[-1].completeness == pytest.approx(1.0, abs=1e-5)
    fig = curve_figure({"features": points, "neurons": points[1:]})
    assert len(fig.data) == 4 and fig.layout.xaxis.type == "log"


def test_masks_naming_a_site_without_dictionary_are_rejected(neox: Setup):
    dicts = {n: d for n, d in neox.dicts.items() if n != "mlp_1"}
    with pytest.raises(ValueError, match="names site 'mlp_1' but no dictionary"):
        run_with_ablations(
            neox.model, neox.model.tokenize(neox.clean), dicts, {"mlp_1": NodeMask.full(F, S)}, neox.metric
        )


def test_masks_and_options_that_do_not_fit_are_rejected(neox: Setup):
    batch = neox.model.tokenize(neox.clean)
    with pytest.raises(ValueError, match="has 10 features but its dictionary has 64"):
        run_with_ablations(neox.model, batch, neox.dicts, {"resid_0": NodeMask.full(10, S)}, neox.metric)
    with pytest.raises(ValueError, match=f"covers 3 positions but the inputs have {S}"):
        run_with_ablations(neox.model, batch, neox.dicts, {"resid_0": NodeMask.full(F, 3)}, neox.metric)
    with pytest.raises(ValueError, match="boolean"):
        NodeMask(torch.ones(S, F), torch.ones(S, dtype=torch.bool))
    with pytest.raises(ValueError, match="Unknown handle_errors 'none'"):
        run_with_ablations(neox.model, batch, neox.dicts, {}, neox.metric, config=AblationConfig(handle_errors="none"))
    with pytest.raises(ValueError, match="same token length"):
        run_with_ablations(
            neox.model, batch, neox.dicts, {}, neox.metric, reference=neox.model.tokenize(neox.clean[:, :3])
        )


def test_identical_full_and_empty_metric_is_reported_as_degenerate(neox: Setup):
    def constant(logits: Tensor, rows: Tensor) -> Tensor:
        return logits[:, -1, 0] * 0

    with pytest.raises(ValueError, match="faithfulness is undefined"):
        faithfulness(neox.model, neox.model.tokenize(neox.clean), neox.dicts, {}, constant)
