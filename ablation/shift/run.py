"""The SHIFT workflow end to end, and its results table (SPEC §6, paper Table 2).

:func:`run_shift` does, in order:

1. data: the ambiguous and balanced splits (:mod:`ablation.shift.data`), and the
   numbers that show the testbed is biased;
2. probes: the original probe on the ambiguous train set and the oracle on the
   balanced train set, on cached pooled activations at layer ``ℓ``;
3. scoring: IG node effects of the probe metric on ``n_score`` ambiguous train
   examples, features ranked by positive effect (:mod:`ablation.shift.scoring`);
4. flags: a human's flags file, or the automatic proxy judge (``flags="auto"``)
   on the top ``candidates`` ranked features (:mod:`ablation.shift.judge`);
5. the rows of Table 2 on the balanced test set:

   - ``original``: the original probe;
   - ``random``: as many random features of the scored sites zero-ablated, original probe;
     the mean over ``random_draws`` seeded draws (each draw is kept under ``"draws"``);
   - ``shift``: the flagged features zero-ablated (errors kept), original probe;
   - ``shift_retrain``: a fresh probe trained on ablated ambiguous-train activations;
   - ``feature_skyline``: the top features by IG effect with the *spurious*
     attribute as target (balanced train, no human), as many as flagged,
     zero-ablated, original probe;
   - ``neuron_skyline``: the same with neurons (identity dictionaries),
     mean-ablated (each neuron set to its mean over the balanced train tokens);
   - ``oracle``: a probe trained on the balanced train set.

:func:`write_results` writes ``results.json``, ``results.html`` (a plotly figure
of the table), ``flags.json`` (the flags used, in the viewer's format) and
``edited/`` (the SHIFT + retrain edited model, :class:`EditedModel`).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ablation.shift.data import (
    ShiftSplits,
    check_examples,
    load_bias_in_bios,
    load_table,
    make_splits,
    synthetic_splits,
)
from ablation.shift.edit import EditedModel
from ablation.shift.judge import Verdict, judge
from ablation.shift.probe import (
    MEASURES,
    ProbeConfig,
    accuracies,
    check_layer,
    pooled_activations,
    predict,
    train_probe,
)
from ablation.shift.scoring import RankedFeature, feature_effects, rank_features, scored_sites
from attribution.cache import atomic_write_text
from attribution.dictionaries.kinds import Dictionary
from attribution.model.wrapper import SFCModel
from circuits.flags import FORMAT as FLAGS_FORMAT
from circuits.flags import VERSION as FLAGS_VERSION
from circuits.flags import FeatureFlags, load_flags

ROWS = ("original", "random", "shift", "shift_retrain", "neuron_skyline", "feature_skyline", "oracle")
DEFAULT_LAYERS = {"smollm2-135m": 6}
"""The probe layer per embedded model; see docs/shift.md for how it was chosen."""
KNOWN_DEPTHS = {"smollm2-135m": 30}
"""Depths known without loading the model, so a bad ``layer`` fails at once."""


@dataclass
class ShiftConfig:
    """Everything :func:`run_shift` needs to know; every field is recorded in ``results.json``.

    - ``data``: ``"synthetic"``, or a train file (``data_format`` ``"bias_in_bios"`` or
      ``"table"`` with the ``*_column`` names) with ``test_data`` the test file;
    - ``n_train`` / ``n_test``: synthetic bios per (label, spurious) group;
    - ``layer``: the probe layer (default: :data:`DEFAULT_LAYERS`, else the middle block);
    - ``n_score``: examples scored with IG (``steps`` points); ``candidates``: the
      top ranked features shown to the judge (or on the rank page);
    - ``flags``: ``"auto"`` (the proxy judge) or a flags file path;
    - ``random_draws``: the ``random`` row averages this many draws of random features.
    """

    model: str = "smollm2-135m"
    data: str = "synthetic"
    test_data: str | None = None
    data_format: str = "table"
    text_column: str = "text"
    label_column: str = "label"
    spurious_column: str = "spurious"
    n_train: int = 64
    n_test: int = 50
    layer: int | None = None
    n_score: int = 32
    steps: int = 10
    candidates: int = 1000
    flags: str = "auto"
    min_auc: float = 0.6
    margin: float = 0.05
    seed: int = 0
    random_draws: int = 5
    batch_size: int = 32
    device: str = "cpu"
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    def check(self) -> None:
        """The checks that need no model: raise one sentence for a bad setting or file."""
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"Probe layer {self.layer} is not a block index: give a layer >= 0.")
        depth = KNOWN_DEPTHS.get(self.model)
        if self.layer is not None and depth is not None and self.layer >= depth:
            raise ValueError(f"Probe layer {self.layer} is beyond this model's depth: {self.model} has blocks "
                             f"0..{depth - 1}.")
        if self.n_score < 1 or self.steps < 1 or self.candidates < 1 or self.random_draws < 1:
            raise ValueError("n_score, steps, candidates and random_draws must each be at least 1.")
        if self.data != "synthetic":
            if not Path(self.data).exists():
                raise FileNotFoundError(f"No data file at {self.data}: check the path, or use --data synthetic.")
            if self.test_data is None or not Path(self.test_data).exists():
                raise FileNotFoundError(f"No test data file at {self.test_data}: give --test-data with a file of "
                                        "held-out examples.")
            if self.data_format not in ("table", "bias_in_bios"):
                raise ValueError(f"Unknown data format {self.data_format!r}: choose 'table' or 'bias_in_bios'.")
        if self.flags != "auto":
            load_flags(self.flags)  # schema errors surface before any model work


def resolve_layer(config: ShiftConfig, model: SFCModel) -> int:
    layer = config.layer if config.layer is not None else DEFAULT_LAYERS.get(
        config.model, model.config.num_hidden_layers // 2)
    check_layer(model, layer)
    return layer


def load_splits(config: ShiftConfig) -> ShiftSplits:
    """The splits the config names (synthetic, Bias in Bios or a user table)."""
    if config.data == "synthetic":
        return synthetic_splits(config.n_train, config.n_test, config.seed)
    if config.data_format == "bias_in_bios":
        train, test = load_bias_in_bios(config.data), load_bias_in_bios(config.test_data)
    else:
        cols = dict(text=config.text_column, label=config.label_column, spurious=config.spurious_column)
        train, test = load_table(config.data, **cols), load_table(config.test_data, **cols)
    return make_splits(train, test)


@dataclass
class ShiftResult:
    """Rows of the table, the flags used, the ranking, settings, bias numbers and the edited models."""

    rows: list[dict[str, Any]]
    flags: list[str]
    ranking: list[RankedFeature]
    verdicts: list[Verdict]
    settings: dict[str, Any]
    bias: dict[str, Any]
    edited: EditedModel
    notes: list[str] = field(default_factory=list)

    def row(self, method: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["method"] == method)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "flags": self.flags, "settings": self.settings, "bias": self.bias,
                "notes": self.notes,
                "ranking": [{"key": r.key, "effect": r.effect} for r in self.ranking],
                "verdicts": [asdict(v) for v in self.verdicts]}


def _flags_from(config: ShiftConfig, flags: FeatureFlags | list[str] | None) -> FeatureFlags | None:
    if flags is None:
        return None if config.flags == "auto" else load_flags(config.flags)
    if isinstance(flags, FeatureFlags):
        return flags
    from circuits.flags import flags_from_document

    return flags_from_document(list(flags))


def random_features(dictionaries: dict[str, Dictionary], sites: list[str], n: int, seed: int) -> dict[str, list[int]]:
    """``n`` distinct features drawn uniformly from all features of ``sites`` (seeded)."""
    pool = [(s, i) for s in sites for i in range(dictionaries[s].width)]
    out: dict[str, list[int]] = {}
    for s, i in random.Random(seed).sample(pool, min(n, len(pool))):
        out.setdefault(s, []).append(i)
    return out


@dataclass
class ShiftSetup:
    """Everything up to the ranking: model, dictionaries, layer, scored sites, splits,
    cached pooled activations (``x_amb``, ``x_bal``, ``x_test`` ``[n, d]``), the original
    and oracle probes, and the ranked features."""

    config: ShiftConfig
    model: SFCModel
    dictionaries: dict[str, Dictionary]
    layer: int
    sites: list[str]
    splits: ShiftSplits
    x_amb: Tensor
    x_bal: Tensor
    x_test: Tensor
    original: nn.Linear
    oracle: nn.Linear
    ranking: list[RankedFeature]
    ids: dict[str, str]
    seconds: float

    def pooled(self, texts: list[str], edit: EditedModel | None = None, desc: str = "pooling",
               progress: bool = True) -> Tensor:
        """Pooled ``resid_layer`` of ``texts`` ``[n, d]``, under ``edit`` if given."""
        if edit is None or len(edit) == 0:
            return pooled_activations(self.model, texts, self.layer, self.config.batch_size, progress, desc)
        with edit:
            return pooled_activations(self.model, texts, self.layer, self.config.batch_size, progress, desc)


def prepare_shift(
    config: ShiftConfig | None = None,
    *,
    model: SFCModel | None = None,
    dictionaries: dict[str, Dictionary] | None = None,
    splits: ShiftSplits | None = None,
    progress: bool = True,
) -> ShiftSetup:
    """Data, probes and the feature ranking (steps 1-3 of the module docstring)."""
    config = config or ShiftConfig()
    config.check()
    t0 = time.time()
    splits = splits or load_splits(config)
    for name in ("ambiguous_train", "balanced_train", "balanced_test"):
        check_examples(getattr(splits, name), name.replace("_", " "))
    if model is None:
        from attribution.model.loading import load_model

        model = load_model(config.model, device=config.device)
    layer = resolve_layer(config, model)
    if dictionaries is None:
        from attribution.dictionaries.sets import load_dictionaries

        dictionaries = load_dictionaries(model)
    sites = scored_sites(model, dictionaries, layer)
    if not sites:
        raise ValueError(f"No dictionary at or below layer {layer}: build dictionaries for those sites first.")
    ids = dict(getattr(dictionaries, "ids", {}) or {})
    bs = config.batch_size
    amb, bal, test = splits.ambiguous_train, splits.balanced_train, splits.balanced_test
    x_amb = pooled_activations(model, amb.texts, layer, bs, progress, "pool ambiguous train")
    x_bal = pooled_activations(model, bal.texts, layer, bs, progress, "pool balanced train")
    x_test = pooled_activations(model, test.texts, layer, bs, progress, "pool balanced test")
    original = train_probe(x_amb, amb.labels, config.probe)
    oracle = train_probe(x_bal, bal.labels, config.probe)
    n = min(config.n_score, len(amb))
    effects, _ = feature_effects(model, dictionaries, original, layer, amb.texts[:n], amb.labels[:n], sites=sites,
                                 steps=config.steps, progress=progress)
    return ShiftSetup(config, model, dictionaries, layer, sites, splits, x_amb, x_bal, x_test, original, oracle,
                      rank_features(effects), ids, time.time() - t0)


def run_shift(
    config: ShiftConfig | None = None,
    *,
    model: SFCModel | None = None,
    dictionaries: dict[str, Dictionary] | None = None,
    neuron_dictionaries: dict[str, Dictionary] | None = None,
    splits: ShiftSplits | None = None,
    flags: FeatureFlags | list[str] | None = None,
    setup: ShiftSetup | None = None,
    progress: bool = True,
) -> ShiftResult:
    """Run SHIFT and its baselines (module docstring). ``model``/``dictionaries``/``splits``
    override what ``config`` would load (or pass a ``setup`` from :func:`prepare_shift`);
    ``flags`` overrides ``config.flags``."""
    config = setup.config if setup is not None else (config or ShiftConfig())
    config.check()
    t0 = time.time()
    given = _flags_from(config, flags)
    if given is not None and dictionaries is not None and model is not None:
        given.check({s: d.width for s, d in dictionaries.items()}, model=model.name,
                    dictionary_ids=getattr(dictionaries, "ids", None))
    setup = setup or prepare_shift(config, model=model, dictionaries=dictionaries, splits=splits, progress=progress)
    model, dictionaries, layer, sites, ids = setup.model, setup.dictionaries, setup.layer, setup.sites, setup.ids
    if given is not None:
        given.check({s: d.width for s, d in dictionaries.items()}, model=model.name, dictionary_ids=ids)
    notes: list[str] = []
    bs, pc = config.batch_size, config.probe
    pooled = partial(setup.pooled, progress=progress)
    amb, bal, test = setup.splits.ambiguous_train, setup.splits.balanced_train, setup.splits.balanced_test
    x_amb, x_bal, x_test, original, oracle = setup.x_amb, setup.x_bal, setup.x_test, setup.original, setup.oracle

    def evaluate(probe: nn.Linear, x: Tensor) -> dict[str, Any]:
        return accuracies(predict(probe, x), test.labels, test.spurious)

    results: dict[str, dict[str, Any]] = {"original": evaluate(original, x_test), "oracle": evaluate(oracle, x_test)}
    gender_probe = train_probe(x_bal, bal.spurious, pc)
    bias = {
        "counts": setup.splits.counts(),
        "original_ambiguous_train_acc": float((predict(original, x_amb) == torch.as_tensor(amb.labels)).float().mean()),
        "original_groups": results["original"]["groups"],
        "gender_probe_acc": float((predict(gender_probe, x_test) == torch.as_tensor(test.spurious)).float().mean()),
        "profession_probe_acc": results["oracle"]["profession_acc"],
    }
    ranking = setup.ranking
    n = min(config.n_score, len(amb))
    verdicts: list[Verdict] = []
    if given is None:
        verdicts = judge(model, dictionaries, ranking[: config.candidates], bal.texts, bal.labels, bal.spurious,
                         min_auc=config.min_auc, margin=config.margin, progress=progress)
        keys = [v.key for v in verdicts if v.flagged]
        from circuits.flags import flags_from_document

        flagged = flags_from_document(keys) if keys else FeatureFlags({})
        source = "auto (proxy judge)"
    else:
        flagged, source = given, given.source
    k = len(flagged)
    if k == 0:
        notes.append("No features were flagged: nothing was ablated, so shift equals original and shift_retrain "
                     "is a probe retrained on unablated activations.")

    def edited(flags: dict[str, list[int]], dicts: dict[str, Dictionary], values=None, probe=None,
               info=None) -> EditedModel:
        return EditedModel(model, dicts, flags, values=values, probe=probe, probe_layer=layer,
                           dictionary_ids=getattr(dicts, "ids", ids), info=info)

    shift = edited(flagged.flagged, dictionaries)
    x_test_shift = pooled(test.texts, shift, "pool test (shift)")
    results["shift"] = evaluate(original, x_test_shift)
    retrained = train_probe(pooled(amb.texts, shift, "pool ambiguous train (shift)"), amb.labels, pc)
    results["shift_retrain"] = evaluate(retrained, x_test_shift)
    shift.probe = retrained
    shift.info = {"flags": source, "method": "shift_retrain"}

    draws = [evaluate(original, pooled(test.texts, edited(random_features(dictionaries, sites, k, config.seed + r),
                                                          dictionaries), f"pool test (random {r + 1})"))
             for r in range(config.random_draws)]
    results["random"] = average_draws(draws)

    # skylines: no human; the spurious attribute is the target, on the balanced train set
    nb = min(config.n_score, len(bal))
    if k:
        sky_eff, _ = feature_effects(model, dictionaries, original, layer, bal.texts[:nb], bal.spurious[:nb],
                                     sites=sites, steps=config.steps, progress=progress)
        sky = rank_features(sky_eff, top=k)
    else:
        sky = []
    sky_flags: dict[str, list[int]] = {}
    for r in sky:
        sky_flags.setdefault(r.site, []).append(r.feature)
    results["feature_skyline"] = evaluate(original, pooled(test.texts, edited(sky_flags, dictionaries),
                                                           "pool test (feature skyline)"))
    if neuron_dictionaries is None:
        from attribution.dictionaries.kinds import Identity

        by_name = {s.name: s for s in model.all_sites()}
        neuron_dictionaries = {s: Identity(by_name[s].d) for s in sites}
    neuron_flags: dict[str, list[int]] = {}
    neuron_values: dict[str, Tensor] = {}
    if k:
        neu_eff, _ = feature_effects(model, neuron_dictionaries, original, layer, bal.texts[:nb], bal.spurious[:nb],
                                     sites=sites, steps=config.steps, progress=progress)
        for r in rank_features(neu_eff, top=k):
            neuron_flags.setdefault(r.site, []).append(r.feature)
        means = _token_means(model, layer, bal.texts, list(neuron_flags), bs)
        neuron_values = {s: means[s][sorted(idx)] for s, idx in neuron_flags.items()}
    results["neuron_skyline"] = evaluate(original, pooled(test.texts, edited(neuron_flags, neuron_dictionaries,
                                                                             neuron_values),
                                                          "pool test (neuron skyline)"))
    rows = [{"method": m, **{key: results[m][key] for key in MEASURES},
             "groups": results[m]["groups"], **({"draws": results[m]["draws"]} if "draws" in results[m] else {})}
            for m in ROWS]
    settings = {**{key: v for key, v in asdict(config).items() if key != "probe"}, "probe": asdict(pc),
                "layer": layer, "sites": sites, "flags_source": source, "n_flagged": k,
                "n_feature_skyline": len(sky), "n_neuron_skyline": sum(len(v) for v in neuron_flags.values()),
                "n_scored": n, "model_name": model.name, "dictionaries": {s: ids.get(s) for s in sites},
                "seconds": round(time.time() - t0 + setup.seconds, 1)}
    return ShiftResult(rows, flagged.keys, ranking, verdicts, settings, bias, shift, notes)


def average_draws(draws: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of each accuracy over random draws, with the draws themselves under ``"draws"``."""
    out: dict[str, Any] = {key: sum(d[key] for d in draws) / len(draws) for key in MEASURES}
    out["groups"] = {g: sum(d["groups"][g] for d in draws) / len(draws) for g in draws[0]["groups"]}
    out["draws"] = [{key: d[key] for key in MEASURES} for d in draws]
    return out


@torch.no_grad()
def _token_means(model: SFCModel, layer: int, texts: list[str], sites: list[str], batch_size: int) -> dict[str, Tensor]:
    """Mean activation ``[d]`` of each site over all real tokens of ``texts`` (neuron mean ablation)."""
    from ablation.shift.probe import probe_model
    from attribution.model import tracing

    cut = probe_model(model, layer)
    site_objs = cut.sites(sites)
    total = {s: torch.zeros(site.d, dtype=torch.float64) for s, site in zip(sites, site_objs)}
    count = 0
    for start in range(0, len(texts), batch_size):
        batch = cut.tokenize(list(texts[start : start + batch_size]))
        acts = tracing.run(cut, batch, site_objs, None, torch.arange(len(batch))).acts
        m = batch.attention_mask.bool()
        count += int(m.sum())
        for s in sites:
            total[s] += acts[s][m].double().sum(0).cpu()
    return {s: (v / count).float() for s, v in total.items()}


def results_figure(rows: list[dict[str, Any]], title: str = "SHIFT on the balanced test set"):
    """A plotly grouped bar chart of the table: one group per method, one bar per measure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    names = {"profession_acc": "profession ↑", "gender_acc": "gender ↓ (50% = no signal)",
             "worst_group_acc": "worst group ↑"}
    for key, label in names.items():
        fig.add_bar(name=label, x=[r["method"] for r in rows], y=[100 * r[key] for r in rows],
                    text=[f"{100 * r[key]:.1f}" for r in rows], textposition="outside")
    fig.add_hline(y=50, line_dash="dot", line_color="gray")
    fig.update_layout(barmode="group", title=title, yaxis=dict(title="accuracy (%)", range=[0, 108]),
                      template="plotly_white", legend=dict(orientation="h", y=-0.15))
    return fig


def flags_document(keys: list[str], model: str, dictionary_ids: dict[str, str], task: str = "shift") -> dict:
    """The flags in the viewer's ``sfc-feature-flags`` format."""
    sites = {k.rpartition("/")[0] for k in keys}
    return {"format": FLAGS_FORMAT, "version": FLAGS_VERSION, "model": model, "task": task,
            "dictionaries": {s: dictionary_ids[s] for s in sorted(sites) if s in dictionary_ids},
            "labels": {}, "flagged": keys}


def write_results(result: ShiftResult, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.html``, ``flags.json`` and ``edited/`` under ``out`` (atomically each)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    doc = result.to_json()
    paths = {"results": atomic_write_text(out / "results.json", json.dumps(doc, indent=1))}
    title = f"SHIFT on {result.settings['model_name']}, layer {result.settings['layer']} " \
            f"(flags: {result.settings['flags_source']})"
    html = results_figure(result.rows, title).to_html(include_plotlyjs=True, full_html=True)
    paths["figure"] = atomic_write_text(out / "results.html", html)
    ids = {s: i for s, i in result.settings["dictionaries"].items() if i}
    paths["flags"] = atomic_write_text(out / "flags.json", json.dumps(
        flags_document(result.flags, result.settings["model_name"], ids), indent=1))
    paths["edited"] = result.edited.save(out / "edited")
    return paths


def format_table(rows: list[dict[str, Any]]) -> str:
    """The table as text, in percent."""
    lines = [f"{'method':<16} {'profession':>10} {'gender':>8} {'worst':>8}"]
    lines += [f"{r['method']:<16} {100 * r['profession_acc']:10.1f} {100 * r['gender_acc']:8.1f} "
              f"{100 * r['worst_group_acc']:8.1f}" for r in rows]
    return "\n".join(lines)
