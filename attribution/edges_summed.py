"""Edge weights summed over positions, for ``sum``-aggregated circuits (SPEC §4.2).

:func:`attribution.edges.edge_effects` gives every downstream node at every
position its own backward slot when attention mixes positions between the two
sites, which costs one batched backward per (node, position). A ``sum`` circuit
only needs, for each downstream node ``d`` and upstream node ``u``,

    Σ_{t, t'} ∇_{d_t} m · ∂d_t/∂u_{t'} · Δu_{t'},

and the sum over ``t`` is linear in the seeds, so all positions (and all examples)
of one downstream node can share one slot: seed every position of node ``d`` in
the same slot, and the upstream gradient ``G`` of that slot is already summed over
``t``. The number of backward slots is then the number of selected downstream
nodes, whatever the sequence length. Seeds, upstream weights and edges into the
metric are the engine's own (:mod:`attribution.edges`).

The result is an :class:`~attribution.edges.EdgeEffects` whose positions are all
0: aggregate it with ``"sum"`` only (``build_circuit(aggregation="sum")``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attribution.dictionaries.kinds import Dictionary
from attribution.edges import (
    ChangedNodes,
    EdgeEffects,
    SiteEdges,
    _edges_to_metric,
    _probe,
    _seeds,
    _upstream_weights,
)
from attribution.effects import NodeEffects, wide
from attribution.model import tracing
from attribution.model.wrapper import SFCModel


@torch.enable_grad()
def summed_edge_effects(
    model: SFCModel,
    dictionaries: dict[str, Dictionary],
    clean,
    effects: NodeEffects,
    metric: tracing.Metric,
    downstream: dict[str, Tensor],
    *,
    memory_budget_mb: float = 1024.0,
) -> EdgeEffects:
    """Edge weights into the downstream nodes ``downstream[site]`` (node indices ``[n]``, the
    site's width ``F`` for its error node), summed over both positions (see the module docstring),
    from every changed upstream node of the adjacent sites; plus edges into the metric."""
    if any(g is None for g in effects.grads.values()):
        raise ValueError("Edges need gradients: compute node effects with method 'attrib' or 'ig', not 'exact'.")
    batch = model.tokenize(clean)
    sites = effects.sites
    b, s = batch.input_ids.shape
    if (b, s) != tuple(effects.mask.shape):
        raise ValueError("The clean prompts differ from those the node effects were computed on.")
    rows = torch.arange(b, device=batch.input_ids.device)
    tr = tracing.run(model, batch, sites, metric, rows, "frozen",
                     positions=effects.info.get("metric_positions", "all"))
    leaves = tr.leaves
    result = EdgeEffects(n_examples=b)
    _edges_to_metric(result, tr, effects, dictionaries)

    changed = ChangedNodes(effects)
    for i_d, down in enumerate(sites):
        ids = downstream.get(down.name)
        if ids is None or len(ids) == 0:
            continue
        ids = torch.as_tensor(ids, device=rows.device).long().unique()  # sorted
        x_d = tr.acts[down.name]
        ups = sites[:i_d]
        if x_d.requires_grad and ups:
            used, _ = _probe(x_d, [leaves[u.name] for u in ups])
            ups = [u for u, is_used in zip(ups, used) if is_used]
        if not x_d.requires_grad or not ups:
            continue
        changed.hold_only([u.name for u in ups])
        dic = dic_up = None  # the previous site's dictionaries are let go before this site's load
        dic, dic_up = dictionaries[down.name], {u.name: dictionaries[u.name] for u in ups}
        eff = torch.cat([effects.features[down.name], effects.errors[down.name][..., None]], dim=-1)
        sel = torch.zeros_like(eff, dtype=torch.bool)
        sel[..., ids.to(eff.device)] = True
        nodes = (sel & (eff != 0)).nonzero()  # [n, 3] (example, position, node)
        if len(nodes) == 0:
            continue
        result.n_selected[down.name] = len(nodes)
        seeds = _seeds(x_d, dic, effects.grads[down.name], nodes)
        slot = torch.searchsorted(ids.to(nodes.device), nodes[:, 2])  # one slot per downstream node
        n_slots = len(ids)
        per_slot = b * s * sum(u.d for u in ups) * 4 + b * s * x_d.shape[-1] * 4 * 24
        chunk = max(1, int(memory_budget_mb * 2**20 // per_slot))
        acc_idx, acc_w = {u.name: [] for u in ups}, {u.name: [] for u in ups}
        for start in range(0, n_slots, chunk):
            stop = min(start + chunk, n_slots)
            in_chunk = ((slot >= start) & (slot < stop)).nonzero()[:, 0]
            if len(in_chunk) == 0:
                continue
            nd = nodes[in_chunk]
            seed = torch.zeros(stop - start, *x_d.shape, dtype=x_d.dtype, device=x_d.device)
            seed[slot[in_chunk] - start, nd[:, 0], nd[:, 1]] = seeds[in_chunk].to(x_d.dtype)
            grads = torch.autograd.grad(
                x_d, [leaves[u.name] for u in ups], grad_outputs=seed,
                is_grads_batched=True, retain_graph=True, allow_unused=True,
            )
            result.n_backward_slots += stop - start
            pairs = torch.unique(torch.stack([slot[in_chunk] - start, nd[:, 0]]), dim=1)  # (slot, example)
            for up, G in zip(ups, grads):  # noqa: N806
                if G is None:
                    continue
                Gn = wide(G[pairs[0], pairs[1]])  # noqa: N806  [P, s, d_u], summed over downstream positions
                idx, w = _upstream_weights(Gn, pairs[1], changed[up.name], dic_up[up.name])
                r = idx[0]
                zero = torch.zeros_like(r)
                acc_idx[up.name].append(torch.stack([pairs[1][r], zero, ids[pairs[0][r] + start], zero, idx[2]]))
                acc_w[up.name].append(w)
        for up in ups:
            if acc_idx[up.name]:
                result.pairs[(up.name, down.name)] = SiteEdges(
                    up.name, down.name, torch.cat(acc_idx[up.name], 1), torch.cat(acc_w[up.name]),
                    dic.width, dic_up[up.name].width,
                )
    return result


__all__ = ["summed_edge_effects"]
