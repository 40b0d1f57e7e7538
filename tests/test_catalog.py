"""The catalog (unsupervised circuit discovery, paper §5), checked against ground truth:
gradients and activations against plain torch hooks, the loss filter against a plain
forward pass, clustering against planted clusters, resume against an uninterrupted run,
faithfulness against a from-scratch zero-ablation with hooks, and every bad input."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.quanta import (
    Sample,
    affinity_from_blocks,
    cluster,
    pad_batch,
    represent,
    select_samples,
)
from sfc.catalog import CatalogConfig, CatalogWorker, build_catalog, make_job
from sfc.cli import main as sfc_main
from tests.conftest import VOCAB, tiny_dictionaries, tiny_model

ROW_LEN = 9


def tiny_loader(dtype: torch.dtype = torch.float32):
    """A tiny random Llama and random sparse dictionaries at its three residual sites
    (module level, so Ray workers can import it)."""
    model = tiny_model("llama", dtype=dtype)
    ids = torch.randint(0, VOCAB, (8, ROW_LEN), generator=torch.Generator().manual_seed(5))
    sites = model.sites(["resid_0", "resid_1"])
    return model, tiny_dictionaries(model, ids, sites=sites, width=48)


def random_rows(n: int = 48, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)

    def rows(model):
        return iter(torch.randint(0, VOCAB, (n, ROW_LEN), generator=gen).tolist())

    return rows


FAST = CatalogConfig(samples=24, clusters=3, loss_threshold=7.5, max_context=ROW_LEN - 1, min_context=2,
                     max_per_row=2, top_k=12, n_train=4, n_eval=4, n_other=4, shard_rows=5, batch_size=8)


# --------------------------------------------------------------------------- ground truth helpers


def hook_grads_and_acts(model, dicts, sample: Sample):
    """∂L/∂f summed over positions and f summed over positions, per site, by splicing the
    dictionary into the model with a forward hook (f a leaf; the error detached)."""
    grads, acts = {}, {}
    ids = torch.tensor([list(sample.tokens)])
    for site in model.sites(list(dicts)):
        dic = dicts[site.name]
        layer = int(site.name.split("_")[1])
        module = model.hf.model.layers[layer]
        leaf = {}

        def hook(mod, inp, out, dic=dic, leaf=leaf):
            x = out[0] if isinstance(out, tuple) else out
            f = dic.encode(x.detach()).detach().requires_grad_()
            leaf["f"] = f
            new = dic.decode(f) + (x - dic.decode(dic.encode(x))).detach()
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                logits = model.hf(ids).logits[0, -1]
                loss = -torch.log_softmax(logits.double(), -1)[sample.answer]
                (g,) = torch.autograd.grad(loss, [leaf["f"]])
        finally:
            handle.remove()
        grads[site.name] = g[0].sum(0)
        acts[site.name] = leaf["f"][0].detach().sum(0)
    return grads, acts


def test_representations_match_plain_hooks():
    model, dicts = tiny_loader(torch.float64)
    gen = torch.Generator().manual_seed(0)
    samples = [Sample(i, i, n - 1, tuple(torch.randint(0, VOCAB, (n,), generator=gen).tolist()),
                      int(torch.randint(0, VOCAB, (1,), generator=gen)), 1.0) for i, n in enumerate([3, 6, 5])]
    rep_g = represent(model, dicts, samples, "gradient", batch_size=2)  # left padding within a batch
    rep_a = represent(model, dicts, samples, "activation", batch_size=3)
    rep_b = represent(model, dicts, samples, "both", batch_size=3)
    assert rep_g.shape == (3, 96)
    for i, s in enumerate(samples):
        g, a = hook_grads_and_acts(model, dicts, s)
        want_g = torch.cat([g["resid_0"], g["resid_1"]]).numpy()
        want_a = torch.cat([a["resid_0"], a["resid_1"]]).numpy()
        # neg_log_prob takes log_softmax in float32, so gradients agree to float32 precision.
        np.testing.assert_allclose(rep_g[i], want_g, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rep_a[i], want_a, rtol=1e-6, atol=1e-9)
        both = np.concatenate([want_g / np.linalg.norm(want_g), want_a / np.linalg.norm(want_a)])
        np.testing.assert_allclose(rep_b[i], both, rtol=1e-5, atol=1e-7)


def test_sample_selection_matches_plain_losses():
    model, _ = tiny_loader()
    rows = torch.randint(0, VOCAB, (6, ROW_LEN), generator=torch.Generator().manual_seed(1))
    threshold = 6.0  # about the loss of a random 64-token model: some pass, some do not
    got = select_samples(model, rows, first_row=10, first_id=100, loss_threshold=threshold, min_context=2,
                         max_per_row=ROW_LEN, batch_size=4)
    with torch.no_grad():
        logp = torch.log_softmax(model.hf(rows).logits.double(), -1)
    want = []
    for r in range(len(rows)):
        for p in range(1, ROW_LEN - 1):
            bits = -logp[r, p, rows[r, p + 1]].item() / math.log(2)
            if bits < threshold:
                want.append((10 + r, p, tuple(rows[r, : p + 1].tolist()), int(rows[r, p + 1]), bits))
    assert 0 < len(want) < len(rows) * (ROW_LEN - 2)
    assert [(s.row, s.position, s.tokens, s.answer) for s in got] == [w[:4] for w in want]
    assert [s.id for s in got] == list(range(100, 100 + len(want)))
    np.testing.assert_allclose([s.loss_bits for s in got], [w[4] for w in want], rtol=1e-4)
    capped = select_samples(model, rows, first_row=0, first_id=0, loss_threshold=threshold, min_context=2,
                            max_per_row=1)
    assert len(capped) == len({w[0] for w in want})  # one per row that has any


def test_clustering_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 50))
    truth = np.repeat(np.arange(4), [12, 9, 7, 5])
    reps = centres[truth] + 0.15 * rng.normal(size=(len(truth), 50))
    order = rng.permutation(len(truth))
    reps, truth = reps[order], truth[order]
    blocks = np.array_split(reps, 4)
    aff = affinity_from_blocks(len(blocks), lambda i: blocks[i])
    unit = reps / np.linalg.norm(reps, axis=1, keepdims=True)
    np.testing.assert_allclose(aff, 1 - np.arccos(np.clip(unit @ unit.T, -1, 1)) / np.pi, atol=1e-12)
    labels = cluster(aff, 4, seed=0)
    same_truth = truth[:, None] == truth[None, :]
    same_label = labels[:, None] == labels[None, :]
    assert (same_truth == same_label).all()
    sizes = [int((labels == c).sum()) for c in range(4)]
    assert sizes == [12, 9, 7, 5]  # numbered by decreasing size


# --------------------------------------------------------------------------- the job


def test_catalog_end_to_end_and_resume_identical(tmp_path: Path, monkeypatch):
    full = build_catalog(tmp_path / "full", tiny_loader, FAST, rows=random_rows(), progress=False)
    cat = json.loads((tmp_path / "full" / "catalog.json").read_text())
    assert full.summary["n_samples"] == 24 and len(cat["clusters"]) == 3
    members = sorted(m for c in cat["clusters"] for m in c["members"])
    assert members == list(range(24))  # a partition of the samples
    for c in cat["clusters"]:
        assert c["size"] == len(c["members"])
        assert (tmp_path / "full" / c["circuit"]).exists() and (tmp_path / "full" / c["page"]).exists()
        if c["ratio"] is not None:
            assert c["ratio"] == pytest.approx(c["faithfulness_own"] / c["faithfulness_other"])
    assert "catalog-data" in (tmp_path / "full" / "index.html").read_text()

    # Interrupt a second run after its first cluster, then resume it.
    calls = {"n": 0}
    original = CatalogWorker.run

    def flaky(self, job):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, job)

    monkeypatch.setattr(CatalogWorker, "run", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_catalog(tmp_path / "resumed", tiny_loader, FAST, rows=random_rows(), progress=False)
    assert not (tmp_path / "resumed" / "catalog.json").exists()
    monkeypatch.setattr(CatalogWorker, "run", original)
    build_catalog(tmp_path / "resumed", tiny_loader, FAST, rows=random_rows(), progress=False)
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["clusters_run_now"] == 2
    names = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("*")
                   if p.is_file() and p.name != "run.json")
    assert names == sorted(p.relative_to(tmp_path / "resumed") for p in (tmp_path / "resumed").rglob("*")
                           if p.is_file() and p.name != "run.json")
    for name in names:
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def zero_ablation_metric(model, dicts, masks, samples, start_layer: int, keep_all: bool = False) -> float:
    """Mean -log p(answer) with every node outside ``masks`` zero-ablated, by forward hooks."""
    batch = pad_batch([s.tokens for s in samples])
    handles = []
    for site in model.sites(list(dicts)):
        if site.layer < start_layer or keep_all:
            continue
        dic, mask = dicts[site.name], masks.get(site.name)
        keep_f = mask.features if mask is not None else torch.zeros(dic.width, dtype=torch.bool)
        keep_e = bool(mask.errors) if mask is not None else False

        def hook(mod, inp, out, dic=dic, keep_f=keep_f, keep_e=keep_e):
            x = out[0] if isinstance(out, tuple) else out
            f = dic.encode(x)
            e = x - dic.decode(f)
            new = dic.decode(f * keep_f) + (e if keep_e else 0 * e)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handles.append(model.hf.model.layers[site.layer].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model.hf(batch.input_ids, attention_mask=batch.attention_mask).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    answers = torch.tensor([s.answer for s in samples])
    return float(-torch.log_softmax(logits.double(), -1)[torch.arange(len(samples)), answers].mean())


def test_faithfulness_matches_hand_ablation(tmp_path: Path):
    from circuits.build import circuit_masks
    from circuits.graph import Circuit

    loader = partial(tiny_loader, torch.float64)
    build_catalog(tmp_path, loader, FAST, rows=random_rows(), progress=False)
    cat = json.loads((tmp_path / "catalog.json").read_text())
    model, dicts = loader()
    from sfc.catalog import load_samples

    samples = load_samples(tmp_path)
    entry = next(c for c in cat["clusters"] if c["faithfulness_own"] is not None)
    res = json.loads((tmp_path / "clusters" / f"{entry['id']:03d}" / "result.json").read_text())
    circuit = Circuit.load(tmp_path / entry["circuit"])
    masks = circuit_masks(circuit, {k: d.width for k, d in dicts.items()}, None)
    start = 2 * model.config.num_hidden_layers // 3
    for key, ids in (("faithfulness_own", res["held_out"]), ("faithfulness_other", res["other"])):
        ev = [samples[i] for i in ids]
        m_c = zero_ablation_metric(model, dicts, masks, ev, start)
        m_empty = zero_ablation_metric(model, dicts, {}, ev, start)
        m_full = zero_ablation_metric(model, dicts, masks, ev, start, keep_all=True)
        # The toolkit's metric takes log_softmax in float32: agreement to float32 precision.
        assert res[key] == pytest.approx((m_c - m_empty) / (m_full - m_empty), rel=1e-4, abs=1e-5)
    # The split: training and held-out members are disjoint members of the cluster; "other" are not members.
    assert not set(res["train"]) & set(res["held_out"])
    assert set(res["train"]) | set(res["held_out"]) <= set(entry["members"])
    assert not set(res["other"]) & set(entry["members"])


# --------------------------------------------------------------------------- bad input


def never_load():
    raise AssertionError("the model was loaded before the input was checked")


def test_bad_inputs_fail_before_loading(tmp_path: Path):
    with pytest.raises(ValueError, match="empty"):
        build_catalog(tmp_path / "a", never_load, FAST, texts=["", "  \n"])
    with pytest.raises(ValueError, match="only 5 samples"):
        build_catalog(tmp_path / "b", never_load, CatalogConfig(samples=5, clusters=6), texts=["text"])
    build_catalog(tmp_path / "c", tiny_loader, FAST, rows=random_rows(), progress=False)
    with pytest.raises(ValueError, match="loss_threshold=7.5.*loss_threshold=5.0"):
        build_catalog(tmp_path / "c", never_load, CatalogConfig(**{**FAST.__dict__, "loss_threshold": 5.0}),
                      rows=random_rows())


def test_no_sample_passes_and_too_few_samples(tmp_path: Path):
    strict = CatalogConfig(**{**FAST.__dict__, "loss_threshold": 1e-6})
    with pytest.raises(ValueError, match="No sample passed the loss threshold"):
        build_catalog(tmp_path / "a", tiny_loader, strict, rows=random_rows(n=6), progress=False)
    few = CatalogConfig(**{**FAST.__dict__, "clusters": 20, "samples": 40})
    with pytest.raises(ValueError, match="fewer than the 20 clusters"):
        build_catalog(tmp_path / "b", tiny_loader, few, rows=random_rows(n=4), progress=False)


def test_make_job_small_cluster():
    samples = [Sample(i, i, 1, (1, 2), 3, 0.0) for i in range(5)]
    job = make_job(1, [[0, 1, 2], [3], [4]], samples, FAST)
    assert [s.id for s in job.train] == [3] and job.own == []  # a singleton has no held-out member
    assert sorted(s.id for s in job.other) == [0, 1, 2, 4]


def test_cli_bad_input_exit_2(tmp_path: Path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = sfc_main(["catalog", "build", "--text", str(empty), "--samples", "10", "--clusters", "2",
                   "--out", str(tmp_path / "o")])
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = sfc_main(["catalog", "build", "--samples", "3", "--clusters", "4", "--out", str(tmp_path / "o")])
    assert rc == 2 and "4 clusters" in capsys.readouterr().err
    rc = sfc_main(["catalog", "view", str(tmp_path / "nothing")])
    assert rc == 2 and "No catalog" in capsys.readouterr().err


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_two_ray_workers_give_the_in_process_outputs(tmp_path: Path):
    """A local two-worker Ray cluster (actors import this module's loader) writes the same
    catalog as the in-process run: same samples, clusters and circuits, equal faithfulness."""
    pytest.importorskip("ray")
    build_catalog(tmp_path / "local", tiny_loader, FAST, rows=random_rows(), progress=False)
    build_catalog(tmp_path / "ray", tiny_loader, FAST, rows=random_rows(), workers=2, progress=False)
    run = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert run["workers"] == 2 and run["clusters_run_now"] == 3
    a = json.loads((tmp_path / "local" / "catalog.json").read_text())
    b = json.loads((tmp_path / "ray" / "catalog.json").read_text())
    for ca, cb in zip(a["clusters"], b["clusters"]):
        assert ca["members"] == cb["members"]
        assert ca["faithfulness_own"] == pytest.approx(cb["faithfulness_own"], rel=1e-5, abs=1e-6)
        assert ca["faithfulness_other"] == pytest.approx(cb["faithfulness_other"], rel=1e-5, abs=1e-6)
        na = json.loads((tmp_path / "local" / ca["circuit"]).read_text())["nodes"]
        nb = json.loads((tmp_path / "ray" / cb["circuit"]).read_text())["nodes"]
        assert [n["id"] for n in na] == [n["id"] for n in nb]
        np.testing.assert_allclose([n["effect"] for n in na], [n["effect"] for n in nb], rtol=1e-5, atol=1e-7)


def test_summed_edges_equal_the_engines_sum_aggregate(family):
    """One backward slot per downstream node (positions summed in the seed) gives the
    same ``sum``-aggregated edges as the engine's per-position slots, on every family."""
    from attribution.edges import edge_effects
    from attribution.edges_summed import summed_edge_effects
    from attribution.effects import node_effects
    from attribution.metrics import neg_log_prob
    from sfc.catalog import top_k_nodes

    model = tiny_model(family, dtype=torch.float64)
    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    dicts = tiny_dictionaries(model, ids, width=24)
    batch = pad_batch([ids[0].tolist(), ids[1, 2:].tolist(), ids[2, 1:].tolist()])
    metric = neg_log_prob(torch.tensor([3, 7, 11]))
    eff = node_effects(model, dicts, batch, None, metric, method="attrib", metric_positions="last", progress=False)
    chosen = top_k_nodes(eff, 20, 0.0)
    mine = summed_edge_effects(model, dicts, batch, eff, metric, chosen)
    masks = {}
    for name in eff.features:
        e = torch.cat([eff.features[name], eff.errors[name][..., None]], -1)
        keep = torch.zeros(e.shape[-1], dtype=torch.bool)
        keep[chosen[name]] = True
        masks[name] = keep.expand_as(e) & (e != 0)
    ref = edge_effects(model, dicts, batch, eff, metric, aggregation="sum", downstream=masks, progress=False)
    assert set(mine.pairs) == set(ref.pairs) and mine.pairs
    assert mine.n_backward_slots < ref.n_backward_slots
    for key in ref.pairs:
        ia, wa = mine.pairs[key].aggregate("sum", 3)
        ib, wb = ref.pairs[key].aggregate("sum", 3)
        da = {tuple(i): w for i, w in zip(ia.T.tolist(), wa.tolist())}
        db = {tuple(i): w for i, w in zip(ib.T.tolist(), wb.tolist())}
        assert set(da) == set(db)
        np.testing.assert_allclose([da[k] for k in db], list(db.values()), rtol=1e-9, atol=1e-12)
