"""The main job: discover a sparse feature circuit for a task, then measure it.

``discover`` runs the paper's pipeline on one batch of training prompts:

1. node effects by integrated gradients (or attribution patching), with the
   metric ``m = logit(patch answer) - logit(clean answer)`` (SPEC §2.4);
2. edge effects into the downstream nodes that pass the node threshold;
3. the graph builder (thresholds, aggregation, pruning to the metric);
4. faithfulness and completeness on the task's test split, with the sign
   flipped so that ``m(M) > 0`` and mean ablation over the patch prompts (SPEC §5);
   sites below ``start_layer`` are neither ablated nor counted (the paper skips
   the first third of the layers; ``sfc discover`` does the same by default).

It also saves the aggregated node effects, so that threshold sweeps need no
new attribution run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ablation.config import AblationConfig
from ablation.evaluate import faithfulness
from ablation.sweep import CurvePoint, sweep
from attribution.cache import atomic_write_bytes
from attribution.dictionaries.kinds import Dictionary, dictionary_shape
from attribution.edges import edge_effects
from attribution.effects import node_effects
from attribution.estimate import Estimate, check_fits, estimate, peak_mb
from attribution.metrics import logit_diff
from attribution.model.wrapper import Batch, SFCModel
from attribution.options import Aggregation, EdgeMethod, Method
from circuits.build import build_circuit, circuit_masks
from circuits.graph import Circuit
from circuits.tasks import Example, TaskData, answer_ids


@dataclass
class DiscoverConfig:
    """Options of :func:`discover` (the CLI's flags); ``ablation`` says how the circuit is
    evaluated (mean ablation over the patch prompts by default, SPEC §5)."""

    n_examples: int = 32
    n_test: int = 40
    method: Method = "ig"
    steps: int = 10
    aggregation: Aggregation = "none"
    node_threshold: float = 0.1
    edge_threshold: float = 0.01
    top_k: int | None = None
    ablation: AblationConfig = field(default_factory=AblationConfig)
    edges: bool = True
    edge_method: EdgeMethod = "attrib"
    seed: int = 0
    check_memory: bool = True


@dataclass
class DiscoverResult:
    circuit: Circuit
    metrics: dict
    effects_features: dict[str, Tensor] = field(repr=False)
    effects_errors: dict[str, Tensor] = field(repr=False)


def _pairs(model: SFCModel, examples: list[Example]) -> tuple[Batch, Batch, Tensor, Tensor]:
    if not examples:
        raise ValueError("The dataset is empty: give at least one example.")
    if any(not ex.paired for ex in examples):
        raise ValueError("Circuit discovery needs paired examples (clean_prefix, patch_prefix, both answers).")
    clean = model.tokenize([ex.clean_prefix for ex in examples])
    patch = model.tokenize([ex.patch_prefix for ex in examples])
    clean_ids, patch_ids = answer_ids(examples, model.tokenizer)
    return clean, patch, clean_ids, patch_ids


def task_accuracy(model: SFCModel, examples: list[Example]) -> float:
    """How often the model prefers the clean answer to the patch answer on the clean prompt."""
    clean, _, good, bad = _pairs(model, examples)
    with torch.no_grad():
        logits = model.hf(clean.input_ids, attention_mask=clean.attention_mask, logits_to_keep=1).logits
    return float((logit_diff(good, bad)(logits, torch.arange(len(good))) > 0).float().mean())


@torch.no_grad()
def check_metric_spread(
    model: SFCModel, clean: Batch, patch: Batch, clean_ids: Tensor, patch_ids: Tensor, what: str,
    rtol: float = 1e-6,
) -> None:
    """Refuse a degenerate task before any attribution (one forward pass each on clean and patch).

    The metric ``m = logit(patch answer) - logit(clean answer)`` must differ
    between the clean and patch prompts on average: else every effect is 0 and
    faithfulness, ``(m(C) - m(empty)) / (m(M) - m(empty))``, is undefined. That
    happens when each row has the same answer on both sides, or when the clean
    and patch prompts tokenise to the same ids.
    """
    same_answer = clean_ids == patch_ids
    if bool(same_answer.all()):
        raise ValueError(f"In {what} every row has the same answer on both sides, so the metric is always 0 and "
                         "faithfulness is undefined: give different clean and patch answers.")
    if clean.input_ids.shape == patch.input_ids.shape and bool((clean.input_ids == patch.input_ids).all()):
        raise ValueError(f"In {what} the clean and patch prompts tokenise to the same ids, so patching changes "
                         "nothing and faithfulness is undefined: make the prompts differ (check that the "
                         "tokenizer does not split or drop the words that differ).")
    metric = logit_diff(patch_ids, clean_ids)
    rows = torch.arange(len(clean_ids), device=clean.input_ids.device)
    m = [float(metric(model.hf(b.input_ids, attention_mask=b.attention_mask, logits_to_keep=1).logits, rows).mean())
         for b in (clean, patch)]
    if abs(m[0] - m[1]) <= rtol * max(1.0, abs(m[0]), abs(m[1])):
        raise ValueError(f"In {what} the metric is the same on the clean and patch prompts (m = {m[0]:.4g}), so "
                         "every effect is 0 and faithfulness is undefined: make the clean and patch prompts "
                         "differ in a way the model sees.")


def evaluate(
    model: SFCModel, dictionaries: Mapping[str, Dictionary], circuit: Circuit, test: list[Example],
    cfg: DiscoverConfig,
) -> dict:
    """Faithfulness and completeness of ``circuit`` on ``test`` (SPEC §5.1)."""
    clean, patch, good, bad = _pairs(model, test)
    widths = {name: dictionary_shape(dictionaries, name)[1] for name in dictionaries}
    masks = circuit_masks(circuit, widths, clean.seq_len)
    res = faithfulness(model, clean, dictionaries, masks, logit_diff(good, bad), config=cfg.ablation, reference=patch)
    return {"faithfulness": res.faithfulness, "completeness": res.completeness, "n_nodes_evaluated": res.n_nodes,
            "m_full": res.m_full, "m_empty": res.m_empty, "m_circuit": res.m_circuit,
            "m_complement": res.m_complement}


def estimate_discover(
    model: SFCModel, dictionaries: Mapping[str, Dictionary], task: TaskData, cfg: DiscoverConfig,
    *, timing: bool = True,
) -> Estimate:
    """The predicted time and peak memory of :func:`discover`'s nodes and edges with ``cfg``
    (see :func:`attribution.estimate.estimate`), without running them."""
    clean, patch, clean_ids, patch_ids = _pairs(model, task.train[: cfg.n_examples])
    sites = [s for s in model.all_sites() if s.name in dictionaries]
    return estimate(
        model, dictionaries, clean, patch, logit_diff(patch_ids, clean_ids), sites=sites, method=cfg.method,
        steps=cfg.steps, edges=cfg.edges, edge_method=cfg.edge_method, node_threshold=cfg.node_threshold,
        selection="position" if cfg.aggregation == "none" else "aggregate", aggregation=cfg.aggregation,
        metric_positions="last", timing=timing,
    )


def discover(
    model: SFCModel,
    dictionaries: Mapping[str, Dictionary],
    task: TaskData,
    cfg: DiscoverConfig,
    *,
    dictionary_ids: Mapping[str, str] | None = None,
    progress: bool = True,
) -> DiscoverResult:
    """Discover and evaluate a circuit for ``task`` (see the module docstring).

    ``dictionary_ids`` (where each dictionary came from) default to those of a
    :class:`~attribution.dictionaries.sets.DictionarySet`. With ``cfg.check_memory``
    a memory estimate runs first, and a job that would not fit stops with a
    ``ValueError`` naming the option to change, before any heavy work.
    """
    if dictionary_ids is None:
        dictionary_ids = getattr(dictionaries, "ids", None)
    train = task.train[: cfg.n_examples]
    test = task.test[: cfg.n_test]
    clean, patch, clean_ids, patch_ids = _pairs(model, train)
    if not test:
        raise ValueError(f"Task {task.name!r} has no test examples: faithfulness is measured on the test split.")
    test_pairs = _pairs(model, test)  # validate before any heavy work
    check_metric_spread(model, clean, patch, clean_ids, patch_ids, f"task {task.name!r} (training pairs)")
    check_metric_spread(model, *test_pairs, f"task {task.name!r} (test pairs)")
    predicted = None
    if cfg.check_memory and cfg.method in ("attrib", "ig"):  # the estimate has no model of exact patching
        predicted = estimate_discover(model, dictionaries, task, cfg, timing=False)
        check_fits(predicted)
    sites = [s for s in model.all_sites() if s.name in dictionaries]
    metric = logit_diff(patch_ids, clean_ids)
    timings = {}
    t0 = time.perf_counter()
    effects = node_effects(
        model, dictionaries, clean, patch, metric, sites=sites, method=cfg.method, steps=cfg.steps,
        metric_positions="last", progress=progress,
        keep_step_grads=cfg.edges and cfg.edge_method == "ig" and cfg.method == "ig",
    )
    timings["nodes_s"] = time.perf_counter() - t0
    edges = None
    if cfg.edges and cfg.method != "exact":  # exact patching has no gradients, so no edges
        t0 = time.perf_counter()
        edges = edge_effects(
            model, dictionaries, clean, effects, metric, node_threshold=cfg.node_threshold,
            selection="position" if cfg.aggregation == "none" else "aggregate", aggregation=cfg.aggregation,
            edge_method=cfg.edge_method, progress=progress,
        )
        timings["edges_s"] = time.perf_counter() - t0
    measured_peak = peak_mb(model.device)  # of nodes and edges (and loading), before the evaluation
    tokens = model.token_strings(clean.input_ids[0]) if cfg.aggregation == "none" else None
    circuit = build_circuit(
        effects, edges, model=model, aggregation=cfg.aggregation,
        node_threshold=cfg.node_threshold, edge_threshold=cfg.edge_threshold, top_k=cfg.top_k,
        dictionaries=dictionary_ids, task=task.name, prompt_tokens=tokens,
        extra={"steps": cfg.steps, "seed": cfg.seed, "n_test": cfg.n_test, "start_layer": cfg.ablation.start_layer,
               "example_prompt": train[0].clean_prefix},
    )
    t0 = time.perf_counter()
    scores = evaluate(model, dictionaries, circuit, test, cfg)
    timings["evaluate_s"] = time.perf_counter() - t0
    n_circuit_nodes = sum(1 for n in circuit.nodes if n.id != "y")
    metrics = {
        "task": task.name, "model": model.name, "method": cfg.method, "edge_method": cfg.edge_method, "aggregation": cfg.aggregation,
        "node_threshold": cfg.node_threshold, "edge_threshold": cfg.edge_threshold, "top_k": cfg.top_k,
        "n_examples": len(train), "n_test": len(test), "start_layer": cfg.ablation.start_layer,
        "faithfulness": scores["faithfulness"], "completeness": scores["completeness"],
        "n_nodes": n_circuit_nodes, "n_edges": len(circuit.edges),
        "n_error_nodes": sum(1 for n in circuit.nodes if n.is_error),
        "total_effect": circuit.metadata.total_effect,
        "task_accuracy_test": task_accuracy(model, test),
        "evaluation": scores, "timings": {k: round(v, 2) for k, v in timings.items()},
        "edges_computed": edges is not None,
        "pruned_to_metric": bool(circuit.metadata.extra.get("pruned_to_metric")),
    }
    metrics["peak_mb"] = round(measured_peak, 1)
    if predicted is not None:
        metrics["predicted_peak_mb"] = round(predicted.peak_mb, 1)
    feats, errs = effects.aggregate(cfg.aggregation)
    metrics["largest_node_effect"] = max(float(v.abs().max()) for v in [*feats.values(), *errs.values()])
    metrics["notes"] = _notes(cfg, task, len(train), len(test), n_circuit_nodes, edges is not None, feats, errs,
                              metrics["largest_node_effect"])
    return DiscoverResult(circuit, metrics, feats, errs)


def _notes(
    cfg: DiscoverConfig, task: TaskData, n_train: int, n_test: int, n_nodes: int, with_edges: bool,
    feats: Mapping[str, Tensor], errs: Mapping[str, Tensor], largest: float,
) -> list[str]:
    """What a user should know about a finished run (``metrics["notes"]``; the CLI prints them):
    fewer examples used than asked for, no pruning without edges, and an empty circuit with the
    threshold that would keep a node."""
    notes = []
    if n_train < cfg.n_examples:
        notes.append(f"--examples {cfg.n_examples} asked for more training pairs than task {task.name!r} has: "
                     f"used {n_train}.")
    if n_test < cfg.n_test:
        notes.append(f"--test {cfg.n_test} asked for more test pairs than task {task.name!r} has: used {n_test}.")
    if not with_edges:
        notes.append("no edges were computed (--no-edges, or method 'exact'), so no pruning was done: the "
                     "circuit keeps every node over the node threshold.")
    if n_nodes == 0:
        over = sum(int((v.abs() > cfg.node_threshold).sum()) for v in [*feats.values(), *errs.values()])
        if over == 0:
            notes.append(f"the circuit is empty: no node's effect exceeds --node-threshold {cfg.node_threshold:g} "
                         f"(the largest is {largest:.4g}); a threshold below {largest:.4g}, e.g. "
                         f"{largest * 0.5:.3g}, keeps at least one node.")
        else:
            notes.append(f"the circuit is empty: {over} node(s) exceed --node-threshold {cfg.node_threshold:g} but "
                         f"none has a path to the metric through edges over --edge-threshold "
                         f"{cfg.edge_threshold:g}: lower --edge-threshold, or use --no-edges.")
    return notes


def save_effects(path: Path, feats: Mapping[str, Tensor], errs: Mapping[str, Tensor]) -> None:
    """Aggregated node effects as ``.npz`` (``f:<site>`` and ``e:<site>`` arrays), atomically."""
    import io

    buf = io.BytesIO()
    arrays = {f"f:{k}": v.detach().cpu().float().numpy() for k, v in feats.items()}
    arrays |= {f"e:{k}": v.detach().cpu().float().numpy() for k, v in errs.items()}
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_effects(path: Path) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The aggregated node effects that :func:`save_effects` wrote: ``(features, errors)`` by site."""
    with np.load(path, allow_pickle=False) as npz:
        feats = {k[2:]: torch.from_numpy(npz[k]) for k in npz.files if k.startswith("f:")}
        errs = {k[2:]: torch.from_numpy(npz[k]) for k in npz.files if k.startswith("e:")}
    return feats, errs


def sweep_curve(
    model: SFCModel, dictionaries: Mapping[str, Dictionary], feats: Mapping[str, Tensor],
    errs: Mapping[str, Tensor], test: list[Example], cfg: DiscoverConfig, thresholds: list[float] | None = None,
    progress: bool = True,
) -> list[CurvePoint]:
    """Faithfulness/completeness curve over node thresholds (x = number of nodes)."""
    clean, patch, good, bad = _pairs(model, test)
    if thresholds is None:
        top = max(float(v.abs().max()) for v in list(feats.values()) + list(errs.values()))
        thresholds = [float(t) for t in np.logspace(np.log10(top) - 4, np.log10(top), 15)]
    return sweep(
        model, clean, dictionaries, feats, errs, logit_diff(good, bad), thresholds,
        config=cfg.ablation, reference=patch, progress=progress,
    )


def write_outputs(out: Path, result: DiscoverResult) -> None:
    """Write ``circuit.json``, ``metrics.json`` and ``effects.npz`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result.circuit.save(out / "circuit.json")
    atomic_write_bytes(out / "metrics.json", (json.dumps(result.metrics, indent=2) + "\n").encode())
    save_effects(out / "effects.npz", result.effects_features, result.effects_errors)


__all__ = ["DiscoverConfig", "DiscoverResult", "discover", "estimate_discover", "evaluate", "sweep_curve", "write_outputs",
           "load_effects", "save_effects", "task_accuracy"]
