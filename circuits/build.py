"""The graph builder: node and edge effects become a :class:`~circuits.graph.Circuit`.

Effects are aggregated over examples first (SPEC §4.2): ``none`` keeps one node
per (position, feature) and averages over examples, ``sum`` sums over positions
and then averages. Nodes pass when ``|effect| > node_threshold`` (then the
``top_k`` largest, if given); edges pass when ``|weight| > edge_threshold`` and
both endpoints are nodes; nodes with no path to the metric are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from attribution.edges import EdgeEffects
from attribution.effects import NodeEffects
from attribution.model.wrapper import SFCModel
from attribution.options import Aggregation
from circuits.graph import METRIC_ID, Circuit, CircuitMetadata, Edge, Node, node_id, parse_node_id
from circuits.masks import NodeMask


def _check_thresholds(node_threshold: float, edge_threshold: float, top_k: int | None) -> None:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not (value >= 0 and value == value and value != float("inf")):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")


def _activations(effects: NodeEffects, how: Aggregation) -> dict[str, Tensor]:
    out = {}
    for name, f in effects.clean_features.items():
        out[name] = f.mean(dim=(0, 1)) if how == "sum" else f.mean(dim=0)
    return out


def build_circuit(
    effects: NodeEffects,
    edges: EdgeEffects | None,
    *,
    model: SFCModel | str,
    n_layers: int | None = None,
    aggregation: Aggregation = "none",
    node_threshold: float = 0.1,
    edge_threshold: float = 0.01,
    top_k: int | None = None,
    dictionaries: Mapping[str, str] | None = None,
    task: str | None = None,
    prompt_tokens: list[str] | None = None,
    prune: bool = True,
    extra: dict | None = None,
) -> Circuit:
    """Threshold aggregated effects into a circuit (see the module docstring).

    ``model`` is the model the effects came from (its name and layer count go
    into the metadata, and, for a per-position circuit, the first prompt's tokens
    unless ``prompt_tokens`` is given), or just its name, with ``n_layers`` given.
    With ``edges=None`` (no edges computed) nothing is pruned: every node over the
    threshold is kept, since pruning to the metric needs edges.
    """
    _check_thresholds(node_threshold, edge_threshold, top_k)
    if isinstance(model, SFCModel):
        n_layers = model.config.num_hidden_layers if n_layers is None else n_layers
        if prompt_tokens is None and aggregation == "none" and effects.input_ids is not None:
            prompt_tokens = model.token_strings(effects.input_ids[0])
        model = model.name
    elif n_layers is None:
        raise ValueError("build_circuit needs n_layers when model is a name: pass the loaded model instead.")
    feats, errs = effects.aggregate(aggregation)
    acts = _activations(effects, aggregation)
    nodes: list[Node] = []
    for name in feats:
        f, e = feats[name], errs[name]
        if aggregation == "none":
            for pos, feat in (f.abs() > node_threshold).nonzero().tolist():
                nodes.append(Node.make(name, feat, pos, f[pos, feat].item(), acts[name][pos, feat].item()))
            for (pos,) in (e.abs() > node_threshold).nonzero().tolist():
                nodes.append(Node.make(name, None, pos, e[pos].item()))
        else:
            for (feat,) in (f.abs() > node_threshold).nonzero().tolist():
                nodes.append(Node.make(name, feat, None, f[feat].item(), acts[name][feat].item()))
            if e.abs() > node_threshold:
                nodes.append(Node.make(name, None, None, e.item()))
    if top_k is not None:
        nodes = sorted(nodes, key=lambda n: (-abs(n.effect), n.id))[:top_k]
    total = effects.total_effect
    total_value = float(total.mean()) if total is not None else float(effects.metric_clean.mean())
    nodes.append(Node.metric(n_layers, total_value))
    kept = {n.id for n in nodes}
    out_edges: list[Edge] = []
    if edges is not None:
        out_edges = _edges(edges, aggregation, kept, edge_threshold, _widths(effects))
    metadata = CircuitMetadata(
        model=model, sites=[s.name for s in effects.sites], n_layers=n_layers,
        dictionaries=dict(dictionaries or {}), task=task, method=effects.method, aggregation=aggregation,
        node_threshold=float(node_threshold), edge_threshold=float(edge_threshold), top_k=top_k,
        n_examples=int(effects.metric_clean.shape[0]), prompt_tokens=prompt_tokens if aggregation == "none" else None,
        total_effect=None if total is None else total_value, extra=dict(extra or {}),
    )
    circuit = Circuit(nodes=nodes, edges=out_edges, metadata=metadata)
    # Without edges no node has a path to the metric, so pruning would empty the circuit: keep every
    # node over the threshold instead (metadata.extra["pruned_to_metric"] says which was done).
    pruned = prune and edges is not None
    circuit.metadata.extra["pruned_to_metric"] = pruned
    return circuit.prune_to_metric() if pruned else circuit


def _widths(effects: NodeEffects) -> dict[str, int]:
    return {name: f.shape[-1] for name, f in effects.features.items()}


def _id(site: str, node: int, pos: int | None, width: int) -> str:
    return node_id(site, None if node == width else node, pos)


def _edges(
    edges: EdgeEffects, how: Aggregation, kept: set[str], threshold: float, widths: dict[str, int]
) -> list[Edge]:
    out = []
    n = edges.n_examples
    for (up, down), site_edges in edges.pairs.items():
        idx, w = site_edges.aggregate(how, n)
        keep = w.abs() > threshold
        idx, w = idx[:, keep].tolist(), w[keep].tolist()
        for i, weight in enumerate(w):
            if how == "none":
                d_pos, d_node, u_pos, u_node = (idx[r][i] for r in range(4))
            else:
                (d_node, u_node), d_pos, u_pos = (idx[0][i], idx[1][i]), None, None
            source = _id(up, u_node, u_pos, widths[up])
            target = _id(down, d_node, d_pos, widths[down])
            if source in kept and target in kept:
                out.append(Edge(source, target, weight))
    for site, (f, e) in edges.to_metric.items():
        if how == "sum":
            f, e = f.sum(1).mean(0), e.sum(1).mean(0)[None]
            positions = [None]
        else:
            f, e = f.mean(0), e.mean(0)
            positions = list(range(f.shape[0]))
        for p_i, pos in enumerate(positions):
            row = f if pos is None else f[p_i]
            for (feat,) in (row.abs() > threshold).nonzero().tolist():
                source = node_id(site, feat, pos)
                if source in kept:
                    out.append(Edge(source, METRIC_ID, row[feat].item()))
            err = e[p_i]
            if err.abs() > threshold and node_id(site, None, pos) in kept:
                out.append(Edge(node_id(site, None, pos), METRIC_ID, err.item()))
    return out


def circuit_masks(circuit: Circuit, widths: Mapping[str, int], seq_len: int | None) -> dict[str, NodeMask]:
    """Node masks for evaluation: the circuit's nodes at every site in its metadata.

    Per-position circuits (aggregation ``none``) give ``[s, F]`` / ``[s]`` masks and
    need ``seq_len``; summed circuits give ``[F]`` / ``[]`` masks.
    """
    per_position = circuit.metadata.aggregation == "none"
    missing = [s for s in circuit.metadata.sites if s not in widths]
    if missing:
        raise ValueError(
            f"The circuit names site(s) {missing} but no dictionary was given for them: "
            "load the dictionaries the circuit was built with."
        )
    masks = {}
    for site in circuit.metadata.sites:
        width = widths[site]
        if per_position:
            masks[site] = NodeMask(torch.zeros(seq_len, width, dtype=torch.bool),
                                   torch.zeros(seq_len, dtype=torch.bool))
        else:
            masks[site] = NodeMask(torch.zeros(width, dtype=torch.bool), torch.zeros((), dtype=torch.bool))
    for node in circuit.nodes:
        if node.id == METRIC_ID:
            continue
        site, feat, pos = parse_node_id(node.id)
        mask = masks[site]
        if per_position and pos is not None and pos >= seq_len:
            raise ValueError(
                f"Node {node.id} sits at position {pos}, but the evaluation prompts have {seq_len} tokens: "
                "evaluate on prompts of the circuit's length."
            )
        if feat is None:
            if per_position:
                mask.errors[pos] = True
            else:
                mask.errors.fill_(True)
        elif per_position:
            mask.features[pos, feat] = True
        else:
            mask.features[feat] = True
    return masks
