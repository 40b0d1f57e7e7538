"""The cost estimate (issue 16): memory counted from the tensors the engine really keeps,
and a job that would not fit stops before any heavy work, naming the option to change."""

from __future__ import annotations

import pytest
import torch

import attribution.estimate as est_mod
import sfc.pipeline as pipeline
from attribution.effects import node_effects
from attribution.estimate import MB, estimate
from sfc.pipeline import DiscoverConfig, discover, estimate_discover
from tests.conftest import logit_diff_metric, prompt_pairs, tiny_dictionaries, tiny_model
from tests.test_circuits_pipeline import setup  # noqa: F401  (the tiny-llama task fixture)


def test_state_memory_is_the_bytes_of_the_tensors_node_effects_hold():
    """states_mb = every tensor NodeEffects keeps (step gradients included; the [b, s, F] ones
    as the indices and values they are stored as) plus the clean and patch activations the
    IG pass holds, counted here from the tensors themselves."""
    model = tiny_model("gpt_neox")
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    est = estimate(model, dicts, clean, patch, metric, steps=3, edge_method="ig", timing=False)
    ne = node_effects(model, dicts, clean, patch, metric, steps=3, keep_step_grads=True, progress=False)
    dense = [ne.errors, ne.grads, ne.delta_errors, ne.step_grads]
    nbytes = sum(t.nelement() * t.element_size() for d in dense for t in d.values())
    nbytes += sum(2 * t.nelement() * t.element_size() for t in ne.delta_errors.values())  # x_clean, x_patch
    for sparse in (ne.features, ne.delta_features, ne.clean_features):  # stored as indices and values
        nbytes += sum(sparse.sparse(k).indices().nbytes + sparse.sparse(k).values().nbytes for k in sparse)
    assert est.details["states_mb"] == pytest.approx(nbytes / MB, abs=0.05)
    assert est.nodes_peak_mb >= est.held_mb + nbytes / MB
    assert est.dictionary_weights_mb == pytest.approx(
        sum(p.nelement() * p.element_size() for d in dicts.values() for p in d.parameters()) / MB, rel=1e-6
    )


def test_estimate_predicts_time_and_memory_without_running_ig(setup, monkeypatch):  # noqa: F811
    model, task, dicts = setup
    cfg = DiscoverConfig(n_examples=6, n_test=6, method="ig", steps=2, node_threshold=0.0)
    calls = []
    real = est_mod.node_effects

    def spy(*args, **kwargs):
        calls.append(kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(est_mod, "node_effects", spy)
    est = estimate_discover(model, dicts, task, cfg)
    assert calls == ["attrib"]  # the calibration; IG itself never runs
    assert est.nodes_s > 0 and est.edges_s > 0
    assert est.nodes_peak_mb > est.held_mb and est.edges_peak_mb > est.held_mb
    assert est.fits and "nodes:" in est.summary() and est.to_dict()["peak_mb"] == round(est.peak_mb, 3)


def test_a_job_that_does_not_fit_stops_before_heavy_work_naming_the_option(setup, monkeypatch):  # noqa: F811
    model, task, dicts = setup
    monkeypatch.setattr(est_mod, "memory_state", lambda device: (100.0, 100.0))

    def no_ig(*args, **kwargs):
        raise AssertionError("node effects ran although the job does not fit")

    monkeypatch.setattr(pipeline, "node_effects", no_ig)
    cfg = DiscoverConfig(n_examples=6, n_test=6, steps=2)
    with pytest.raises(ValueError, match="exceeds the 0.1 GiB available.*--examples"):
        discover(model, dicts, task, cfg, progress=False)
    cfg.check_memory = False  # the check can be switched off
    with pytest.raises(AssertionError, match="node effects ran"):
        discover(model, dicts, task, cfg, progress=False)


def test_exact_patching_has_no_estimate():
    model = tiny_model("gpt2")
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    with pytest.raises(ValueError, match="exact"):
        estimate(model, dicts, clean, patch, logit_diff_metric(3), method="exact")


def test_graph_bytes_per_row_grows_with_the_graph_above_the_first_site():
    """A graph that starts lower in the model saves more for backward."""
    model = tiny_model("llama")
    clean, _ = prompt_pairs()
    batch = model.tokenize(clean)
    low = est_mod.graph_bytes_per_row(model, batch, model.sites(["embed"])[0], "all")
    high = est_mod.graph_bytes_per_row(model, batch, model.sites(["resid_1"])[0], "all")
    assert low > high > 0
    # At least the logits of one example (float32, [s, vocab]) are kept for the metric.
    assert high >= clean.shape[1] * model.config.vocab_size * 4
    assert torch.is_grad_enabled()


def test_discover_cli_offers_edge_method_and_estimate(capsys):
    from sfc.cli import main as sfc_main

    with pytest.raises(SystemExit) as exc:
        sfc_main(["discover", "--task", "simple", "--out", "x", "--edge-method", "jacobian"])
    assert exc.value.code == 2
    assert "--edge-method" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sfc_main(["discover", "--help"])
    text = capsys.readouterr().out
    assert "--estimate" in text and "{attrib,ig}" in text
