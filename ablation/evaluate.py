"""Faithfulness and completeness of a circuit (SPEC §5, paper §3.2).

A circuit ``C`` is evaluated by running the model with every node *outside* ``C``
ablated, in one forward pass, site by site in forward order (SPEC §5.2): at each
evaluated site the activation ``x [b, s, d]`` (which already reflects the upstream
ablations) is split into features ``f = encode(x) [b, s, F]`` and the error
``e = x - decode(f) [b, s, d]``; features and error nodes not in the circuit are
replaced by their ablation values, and ``decode(f') + e'`` is written back.

- ``m(C)``: the mean metric with that ablation;
- ``m(∅)``: every feature and error node of every evaluated site ablated;
- ``m(M)``: the model itself, with no ablation;
- faithfulness ``(m(C) - m(∅)) / (m(M) - m(∅))``; completeness is the faithfulness
  of the complement ``M \\ C``.

Sites whose layer is below ``start_layer`` are neither ablated nor counted (the
paper evaluates the latter 2/3 of the circuit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ablation.config import AblationConfig, ErrorHandling
from attribution.dictionaries.kinds import Dictionary, dictionary_shape
from attribution.model import tracing
from attribution.model.sites import AttnHook, Site
from attribution.model.tracing import Metric
from attribution.model.tracing import run as trace_run
from attribution.model.wrapper import Batch, SFCModel
from circuits.masks import NodeMask, n_nodes


@dataclass
class SiteValues:
    """The values that replace ablated nodes at one site.

    ``features`` (``[s, F]`` for mean, ``[F]`` for zero) and ``errors`` (``[s, d]``
    or ``[d]``) broadcast against ``[b, s, F]`` and ``[b, s, d]``. For resample,
    ``source`` holds the reference activations ``[b, s, d]`` assigned to each row,
    encoded when used so that no ``[b, s, F]`` tensor is stored per site.
    """

    features: Tensor | None = None
    errors: Tensor | None = None
    source: Tensor | None = None

    def values(self, dictionary: Dictionary) -> tuple[Tensor, Tensor]:
        """``(f_ablated, e_ablated)``."""
        if self.source is None:
            return self.features, self.errors
        f = dictionary.encode(self.source)
        return f, self.source - dictionary.decode(f)


@dataclass
class AblationValues:
    """Everything an ablated run needs that does not depend on the circuit: the
    evaluated sites in forward order, their dictionaries and the values that
    replace ablated nodes."""

    sites: list[Site]
    dictionaries: Mapping[str, Dictionary]
    values: dict[str, SiteValues]


@dataclass(frozen=True)
class FaithfulnessResult:
    """Faithfulness and completeness of one circuit (SPEC §5.1), with the mean metrics behind them."""

    faithfulness: float
    completeness: float
    m_circuit: float
    m_complement: float
    m_empty: float
    m_full: float
    n_nodes: int


def resample_rows(n_rows: int, n_reference: int, seed: int) -> Tensor:
    """The reference row each evaluation row takes its values from under resample ablation:
    ``perm[i % n_reference]`` with ``perm = torch.randperm(n_reference)`` under ``manual_seed(seed)``."""
    perm = torch.randperm(n_reference, generator=torch.Generator().manual_seed(seed))
    return perm[torch.arange(n_rows) % n_reference]


def evaluated_sites(
    model: SFCModel,
    dictionaries: Mapping[str, Dictionary],
    start_layer: int = -1,
    attn: AttnHook = "output",
) -> list[Site]:
    """The sites that get ablated: those with a dictionary and ``layer >= start_layer``, in forward order."""
    if not dictionaries:
        raise ValueError("No dictionaries given: pass one per site to evaluate, e.g. {'resid_0': sae}.")
    sites = model.sites(list(dictionaries), attn=attn)
    for site in sites:
        d, _ = dictionary_shape(dictionaries, site.name)
        if d != site.d:
            raise ValueError(
                f"The dictionary for site {site.name!r} reads vectors of size {d}, "
                f"but the site's activation has size {site.d}."
            )
    return [s for s in sites if s.layer >= start_layer]


@torch.no_grad()
def prepare_ablation(
    model: SFCModel,
    batch: Batch,
    dictionaries: Mapping[str, Dictionary],
    config: AblationConfig = AblationConfig(),
    *,
    reference: Batch | None = None,
) -> AblationValues:
    """Compute the ablation values of every evaluated site once, from one un-ablated pass
    over ``reference`` (default: ``batch`` itself; for paired data pass the patch inputs).

    Mean ablation averages ``f [n, s, F]`` and ``e [n, s, d]`` over the reference rows
    at each position, skipping padding. Resample gives evaluation row ``i`` the
    activations of reference row :func:`resample_rows` ``[i]``.
    """
    sites = evaluated_sites(model, dictionaries, config.start_layer, config.attn)
    device = model.device
    ablation = config.kind
    if ablation == "zero":
        values = {}
        for site in sites:
            b_dec = dictionaries[site.name].b_dec
            values[site.name] = SiteValues(
                torch.zeros(dictionaries[site.name].width, dtype=b_dec.dtype, device=device),
                torch.zeros(site.d, dtype=b_dec.dtype, device=device),
            )
        return AblationValues(sites, dictionaries, values)
    reference = model.tokenize(reference) if reference is not None else batch
    if reference.seq_len != batch.seq_len:
        raise ValueError(
            f"The reference inputs have {reference.seq_len} positions but the evaluation inputs have "
            f"{batch.seq_len}: position-specific {ablation} ablation needs inputs of the same token length."
        )
    n_ref = len(reference)
    acts = trace_run(model, reference, sites, None, torch.arange(n_ref, device=device), mode="read").acts
    values = {}
    if ablation == "resample":
        rows = resample_rows(len(batch), n_ref, config.seed).to(device)
        for site in sites:
            values[site.name] = SiteValues(source=acts[site.name][rows].detach())
        return AblationValues(sites, dictionaries, values)
    # Position-specific weights [n, s]: each position averages over its non-padding rows.
    real = reference.attention_mask.float()
    weights = real / real.sum(0).clamp_min(1.0)
    for site in sites:
        dictionary = dictionaries[site.name]
        x = acts[site.name].detach()
        f = dictionary.encode(x)
        e = x - dictionary.decode(f)
        w = weights.to(x.dtype)
        values[site.name] = SiteValues(
            torch.einsum("ns,nsf->sf", w, f), torch.einsum("ns,nsd->sd", w, e)
        )
    return AblationValues(sites, dictionaries, values)


def check_masks(
    masks: Mapping[str, NodeMask],
    dictionaries: Mapping[str, Dictionary],
    seq_len: int,
) -> None:
    """Raise one clear sentence if the masks do not fit the dictionaries or the inputs."""
    for name, mask in masks.items():
        if not isinstance(mask, NodeMask):
            raise TypeError(
                f"masks[{name!r}] is a {type(mask).__name__}; build NodeMask(features, errors), "
                "e.g. with masks_from_effects."
            )
        if name not in dictionaries:
            raise ValueError(f"The circuit names site {name!r} but no dictionary was given for it.")
        _, width = dictionary_shape(dictionaries, name)
        if mask.width != width:
            raise ValueError(
                f"The mask for site {name!r} has {mask.width} features but its dictionary has {width}: "
                "the circuit must come from the same dictionaries."
            )
        if mask.per_position and mask.features.shape[0] != seq_len:
            raise ValueError(
                f"The per-position mask for site {name!r} covers {mask.features.shape[0]} positions but "
                f"the inputs have {seq_len}: evaluate on inputs of the circuit's token length, "
                "or use a summed circuit."
            )


def _keep(
    site: Site,
    mask: NodeMask | None,
    width: int,
    *,
    complement: bool,
    handle_errors: ErrorHandling,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Boolean keep masks broadcasting against ``f [b, s, F]`` and ``e [b, s, d]``."""
    if mask is None:
        mask = NodeMask.empty(width)
    if complement:
        mask = ~mask
    errors = mask.errors
    if handle_errors == "remove" or (handle_errors == "resid_only" and site.kind != "resid"):
        errors = torch.zeros_like(errors)
    elif handle_errors == "keep":
        errors = torch.ones_like(errors)
    return mask.features.to(device), errors.unsqueeze(-1).to(device)


@torch.no_grad()
def ablated_metric(
    model: SFCModel,
    batch: Batch,
    setup: AblationValues,
    masks: Mapping[str, NodeMask] | None,
    metric: Metric,
    rows: Tensor | None = None,
    *,
    complement: bool = False,
    handle_errors: ErrorHandling = "default",
) -> Tensor:
    """The metric ``[b]`` with every node not in ``masks`` ablated (one forward pass, SPEC §5.2).

    ``masks=None`` runs the model with no ablation, giving ``m(M)``. A site of
    ``setup`` missing from ``masks`` has no node in the circuit. Sites where
    every node is kept are not touched, so keeping everything is exact.
    """
    AblationConfig(handle_errors=handle_errors)  # validates
    batch = model.tokenize(batch)
    rows = torch.arange(len(batch), device=model.device) if rows is None else rows
    plan = []
    if masks is not None:
        for site in setup.sites:
            keep_f, keep_e = _keep(
                site, masks.get(site.name), dictionary_shape(setup.dictionaries, site.name)[1],
                complement=complement, handle_errors=handle_errors, device=model.device,
            )
            if not (keep_f.all() and keep_e.all()):
                plan.append((site, keep_f, keep_e, setup.values[site.name]))

    def splice(x: Tensor, name: str, keep_f, keep_e, value) -> Tensor:
        # Looked up as the pass reaches the site, so a lazy set holds only the sites in use.
        dictionary = setup.dictionaries[name]
        f = dictionary.encode(x)
        e = x - dictionary.decode(f)
        f_ablated, e_ablated = value.values(dictionary)
        new = dictionary.decode(torch.where(keep_f, f, f_ablated)) + torch.where(keep_e, e, e_ablated)
        return new.to(x.dtype)

    replace = {site.name: partial(splice, name=site.name, keep_f=kf, keep_e=ke, value=v)
               for site, kf, ke, v in plan}
    value = tracing.run(model, batch, [p[0] for p in plan], metric, rows, "read", replace=replace).metric
    return value.detach()


def run_with_ablations(
    model: SFCModel,
    batch: Batch,
    dictionaries: Mapping[str, Dictionary],
    masks: Mapping[str, NodeMask],
    metric: Metric,
    rows: Tensor | None = None,
    *,
    complement: bool = False,
    config: AblationConfig = AblationConfig(),
    reference: Batch | None = None,
) -> Tensor:
    """The metric ``[b]`` of the circuit ``masks`` (or its complement), SPEC §5.2.

    ``masks[site]`` marks the nodes in the circuit; every other feature and error
    node of each site with a dictionary and ``layer >= start_layer`` is replaced by
    its ablation value (``config.kind``, computed from ``reference``, default ``batch``), in one
    forward pass in which downstream sites see the upstream ablations. With
    ``complement=True`` the nodes in the circuit are the ones ablated.
    ``rows[i]`` is the example of row ``i`` passed to the metric (default ``arange(b)``).
    """
    batch = model.tokenize(batch)
    check_masks(masks, dictionaries, batch.seq_len)
    setup = prepare_ablation(model, batch, dictionaries, config, reference=reference)
    return ablated_metric(
        model, batch, setup, masks, metric, rows, complement=complement, handle_errors=config.handle_errors
    )


def endpoints(
    model: SFCModel,
    batch: Batch,
    setup: AblationValues,
    metric: Metric,
    rows: Tensor | None = None,
) -> tuple[float, float]:
    """``(m(M), m(∅))``: the mean metric of the model and of the empty circuit (every
    feature and error node of every evaluated site ablated). Raises if they coincide."""
    m_full = ablated_metric(model, batch, setup, None, metric, rows).mean().item()
    m_empty = ablated_metric(model, batch, setup, {}, metric, rows, handle_errors="remove").mean().item()
    if math.isclose(m_full, m_empty, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(
            f"m(M) = m(∅) = {m_full:.6g}: ablating every node does not change the metric, so faithfulness "
            "is undefined; the model does not do the task, or the metric ignores the ablated sites."
        )
    return m_full, m_empty


def score(m: float, m_full: float, m_empty: float) -> float:
    """``(m - m(∅)) / (m(M) - m(∅))``: 0 for the empty circuit, 1 for the full model (SPEC §5.1)."""
    return (m - m_empty) / (m_full - m_empty)


def faithfulness(
    model: SFCModel,
    batch: Batch,
    dictionaries: Mapping[str, Dictionary],
    masks: Mapping[str, NodeMask],
    metric: Metric,
    rows: Tensor | None = None,
    *,
    config: AblationConfig = AblationConfig(),
    reference: Batch | None = None,
) -> FaithfulnessResult:
    """Faithfulness ``(m(C) - m(∅)) / (m(M) - m(∅))`` and completeness (the same for ``M \\ C``),
    SPEC §5.1, with metrics averaged over the rows of ``batch``.

    ``m(∅)`` ablates every feature and error node of every evaluated site whatever
    ``config.handle_errors`` says; ``handle_errors`` applies to ``m(C)`` and ``m(M \\ C)``.
    """
    batch = model.tokenize(batch)
    check_masks(masks, dictionaries, batch.seq_len)
    setup = prepare_ablation(model, batch, dictionaries, config, reference=reference)
    m_full, m_empty = endpoints(model, batch, setup, metric, rows)
    return evaluate_circuit(model, batch, setup, masks, metric, rows, m_full, m_empty, config=config)


def evaluate_circuit(
    model: SFCModel,
    batch: Batch,
    setup: AblationValues,
    masks: Mapping[str, NodeMask],
    metric: Metric,
    rows: Tensor | None,
    m_full: float,
    m_empty: float,
    *,
    config: AblationConfig = AblationConfig(),
) -> FaithfulnessResult:
    """Faithfulness and completeness of ``masks`` given precomputed ``m(M)`` and ``m(∅)``."""
    handle_errors = config.handle_errors
    m_circuit = ablated_metric(model, batch, setup, masks, metric, rows, handle_errors=handle_errors)
    m_complement = ablated_metric(
        model, batch, setup, masks, metric, rows, complement=True, handle_errors=handle_errors
    )
    m_c, m_cc = m_circuit.mean().item(), m_complement.mean().item()
    return FaithfulnessResult(
        faithfulness=score(m_c, m_full, m_empty),
        completeness=score(m_cc, m_full, m_empty),
        m_circuit=m_c,
        m_complement=m_cc,
        m_empty=m_empty,
        m_full=m_full,
        n_nodes=n_nodes(masks, config.start_layer),
    )
