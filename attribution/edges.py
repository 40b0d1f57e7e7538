"""Edge effects between adjacent sites (SPEC §3; paper App. A.1, Eq. 5).

For an upstream node ``u`` and a downstream node ``d``,

    ÎE(m; u → d) = ∇_d m · ∇_{u, stop(M)} d · (u_patch − u_clean),

where the nodes ``M`` between them are held at their clean values. ``∇_d m``
is the gradient the node effects used (IG-averaged for ``ig``).

How it is computed here:

1. One clean forward pass in which every site's output is replaced by a
   detached leaf of equal value (:func:`attribution.model.tracing.run`, ``frozen``).
   A site's recorded activation then depends only on the leaves of the sites
   directly upstream of it: the stop-gradients on ``M`` come for free, and
   "adjacent" is whatever the chosen sites make adjacent.
2. Each selected downstream node becomes a *seed* on its site's activation
   ``x_d``: for feature ``k`` it is ``(∇_{f_k} m) ∂f_k/∂x_d``; for the error
   node it is ``(∇_ε m) ∂ε/∂x_d`` (the JVP trick of App. A.3: one seed replaces
   ``d`` of them). Seeds are per position, so they come from one small local
   backward through the dictionary.
3. Examples never interact, so one backward pass can carry one node of *every*
   example: node ``i`` of each example goes into "slot" ``i``. Where the site's
   Jacobian keeps positions apart (residual and MLP sites; a probe backward
   checks), a slot carries one node per example *and position*. The slots are
   pushed through the model together with a batched vector-Jacobian product
   (``torch.autograd.grad(..., is_grads_batched=True)``), in chunks sized to a
   memory budget, never one backward per node.
4. The gradient at an upstream site's leaf, ``G [d_u]`` per position, gives
   every upstream node at once: ``G · W_dec[j] Δf_j`` for feature ``j`` and
   ``G · Δe`` for the error node. Only features whose state changes
   (``Δf_j ≠ 0``) can carry an edge, so only those are computed and stored.

Edges *out of* error nodes come from the same gradient ``G``: no gradient is
ever zeroed before it is read (the reference implementation's ordering bug).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attribution import memory
from attribution.dictionaries.kinds import SAE, Dictionary
from attribution.effects import Aggregation, NodeEffects, ig_alphas, wide
from attribution.model import tracing
from attribution.model.sites import Site
from attribution.model.wrapper import Batch, SFCModel
from attribution.options import EdgeMethod
from attribution.sparse import SparseFeaturePairs

Selection = Literal["position", "aggregate"]


@dataclass
class SiteEdges:
    """Sparse edge weights from one upstream site into one downstream site.

    ``index [5, nnz]`` holds ``(example, down_position, down_node, up_position,
    up_node)``; a node index equal to the site's width ``F`` is its error node.
    ``weight [nnz]`` holds the edge weights (Eq. 5). Zero weights are not stored.
    """

    upstream: str
    downstream: str
    index: Tensor
    weight: Tensor
    down_width: int
    up_width: int

    def aggregate(self, how: Aggregation, n_examples: int) -> tuple[Tensor, Tensor]:
        """Mean over examples (SPEC §4.2); ``sum`` also sums over both positions.

        Returns ``(index, weight)``: index rows ``(down_pos, down_node, up_pos,
        up_node)`` for ``none``, ``(down_node, up_node)`` for ``sum``.
        """
        keep = [1, 2, 3, 4] if how == "none" else [2, 4]
        idx, inv = torch.unique(self.index[keep], dim=1, return_inverse=True)
        w = torch.zeros(idx.shape[1], dtype=self.weight.dtype, device=self.weight.device).index_add_(0, inv, self.weight)
        return idx, w / n_examples

    def to_dense(self, batch: int, seq: int) -> Tensor:
        """``[b, s, F_d + 1, s, F_u + 1]`` dense weights (for tests and small models)."""
        out = torch.zeros(batch, seq, self.down_width + 1, seq, self.up_width + 1, dtype=self.weight.dtype)
        out[tuple(self.index)] = self.weight
        return out


@dataclass
class EdgeEffects:
    """All edges of a run: ``pairs[(upstream, downstream)]`` and edges into the metric.

    ``to_metric[site] = (features [b, s, F], errors [b, s])``: the edge weights from
    a site's nodes straight into the metric, with every other site frozen. The
    last site has nothing downstream to freeze, so its edges into the metric are
    its node effects (IG-estimated when the node effects are; SPEC §3.3).
    """

    pairs: dict[tuple[str, str], SiteEdges] = field(default_factory=dict)
    to_metric: SparseFeaturePairs = field(default_factory=SparseFeaturePairs)
    n_examples: int = 0
    n_selected: dict[str, int] = field(default_factory=dict)
    n_backward_slots: int = 0
    position_local: dict[str, bool] = field(default_factory=dict)
    method: EdgeMethod = "attrib"
    steps: int = 1
    timings: dict[str, float] = field(default_factory=lambda: {"vjp_s": 0.0, "per_node_s": 0.0})
    """Seconds in the batched VJPs (grows with the slots) and in the per-node work (seeds and
    edge weights; grows with the selected nodes); the cost estimate reads them."""


def select_downstream(
    effects: NodeEffects, threshold: float, selection: Selection = "position", aggregation: Aggregation = "none"
) -> dict[str, Tensor]:
    """Which nodes get incoming edges: ``[b, s, F + 1]`` boolean masks per site.

    ``position``: ``|effect| > threshold`` per example, position and node (the
    reference's rule). ``aggregate``: a node is selected wherever it is active
    if its aggregated effect (per ``aggregation``) passes the threshold, so a
    feature that only passes after summing over positions still gets edges.
    """
    out = {}
    agg_f, agg_e = effects.aggregate(aggregation) if selection == "aggregate" else ({}, {})
    for name in effects.features:
        memory.trim()
        if selection == "position":
            out[name] = torch.cat([effects.features[name].abs() > threshold,
                                   effects.errors[name][..., None].abs() > threshold], dim=-1)
            continue
        eff = torch.cat([effects.features[name], effects.errors[name][..., None]], dim=-1)
        agg = torch.cat([agg_f[name], agg_e[name][..., None]], dim=-1)
        passed = (agg.abs() > threshold).expand_as(eff) if aggregation == "sum" else (agg.abs() > threshold)[None].expand_as(eff)
        out[name] = passed & (eff != 0)
    return out


def _seeds(x: Tensor, dic: Dictionary, grad: Tensor, nodes: Tensor) -> Tensor:
    """Per-node seeds on a downstream site's activation, ``[n, d]``.

    ``x [b, s, d]`` clean activation, ``grad [b, s, d]`` = ∇_x m, ``nodes [n, 3]``
    rows ``(example, position, node)`` with node ``F`` the error. The left factor
    of a feature node is ``∇_{f_k} m = ∇_x m · W_dec[k]``; of the error node,
    ``∇_ε m = ∇_x m`` (the error enters the activation additively).
    """
    width = dic.width
    g = grad[nodes[:, 0], nodes[:, 1]]
    is_err = nodes[:, 2] == width
    feat = nodes[:, 2].clamp(max=width - 1)
    coef = (g * dic.W_dec[feat]).sum(-1)
    if isinstance(dic, SAE):
        # ReLU, JumpReLU and TopK share ∂f_k/∂x = 1[f_k ≠ 0] W_enc[:, k] (the active
        # set is locally constant), so seeds need no backward through the encoder.
        pos, inverse = torch.unique(nodes[:, :2], dim=0, return_inverse=True)
        with torch.no_grad():
            active = dic.encode(x[pos[:, 0], pos[:, 1]]) != 0  # [P, F]
        on = active[inverse, feat]
        seed = torch.where(on & ~is_err, coef, torch.zeros_like(coef))[:, None] * dic.W_enc.T[feat]
        if is_err.any():
            e = is_err.nonzero()[:, 0]
            a = g[e]  # A = ∇_ε m; seed = A (I - ∂x_hat/∂x)^T = A - W_enc (1[f≠0] ⊙ W_dec A)
            back = dic.feature_grads(a) * active[inverse[e]]
            seed[e] = a - back @ dic.W_enc.T.to(back.dtype)
        return seed
    # Any other dictionary: one local backward, each node on its own copy of its row.
    rows = x[nodes[:, 0], nodes[:, 1]].detach().clone().requires_grad_()
    with torch.enable_grad():
        f = dic.encode(rows)
        value = torch.where(is_err, torch.zeros_like(coef), coef * f.gather(1, feat[:, None])[:, 0])
        err = rows - dic.decode(f)
        value = value + torch.where(is_err, (g * err).sum(-1), torch.zeros_like(coef))
        (seed,) = torch.autograd.grad(value.sum(), rows)
    return seed


@dataclass
class _Changed:
    """An upstream site's changed nodes for one example, grouped by position.

    ``feat [s, E]``: the indices of the ``E`` (padded) changed features at each
    position (``-1`` = padding), ``where [2, K]`` the ``(position, column)`` of
    each of the ``K`` changed features in ``feat``, ``delta [K]`` their ``Δf_j``,
    and ``err [s, d]``: ``Δe``. Edge weights into a node with upstream gradient
    ``G [s, d]`` are ``G · Δf_j W_dec[j]`` and ``G · Δe``; the ``Δf_j W_dec[j]``
    rows (:meth:`vec`) are rebuilt when needed rather than kept, since at large
    widths they outweigh everything else an edge run holds.
    """

    feat: Tensor
    where: Tensor
    delta: Tensor
    err: Tensor
    rows: Tensor | None = None

    def vec(self, W_dec: Tensor) -> Tensor:  # noqa: N803
        """``[s, E, d]``: ``Δf_j W_dec[j]`` at each changed feature's place, zeros in the padding
        (``rows`` instead, where :class:`ChangedNodes` built them once)."""
        if self.rows is not None:
            return self.rows
        seq, width = self.feat.shape
        out = torch.zeros(seq, width, W_dec.shape[1], dtype=self.err.dtype, device=self.err.device)
        feats = self.feat[self.where[0], self.where[1]]
        out[self.where[0], self.where[1]] = self.delta[:, None] * W_dec[feats].to(self.err.dtype)
        return out


def _changed_nodes(delta_f: Tensor, delta_e: Tensor) -> list[_Changed]:
    out = []
    for ex in range(delta_f.shape[0]):
        pos, feat = delta_f[ex].nonzero(as_tuple=True)
        seq = delta_f.shape[1]
        counts = torch.bincount(pos, minlength=seq)
        width = int(counts.max()) if len(pos) else 0
        slot = torch.arange(len(pos), device=pos.device) - torch.cumsum(counts, 0)[pos] + counts[pos]
        ids = torch.full((seq, width), -1, dtype=torch.long, device=pos.device)
        ids[pos, slot] = feat
        out.append(_Changed(ids, torch.stack([pos, slot]), delta_f[ex, pos, feat], delta_e[ex]))
    return out


class ChangedNodes:
    """The changed nodes of each upstream site (:class:`_Changed`, per example), built on
    first use from the node effects' deltas; :meth:`hold_only` drops the sites a downstream
    site no longer reads, so only the sites adjacent to the current one are held.
    With ``dictionaries``, each example's ``Δf_j W_dec[j]`` rows are built once and kept
    (faster for many small calls, heavier at large widths)."""

    def __init__(self, effects: NodeEffects, dictionaries: dict[str, Dictionary] | None = None) -> None:
        self._effects = effects
        self._dictionaries = dictionaries
        self._held: dict[str, list[_Changed]] = {}

    def __getitem__(self, name: str) -> list[_Changed]:
        if name not in self._held:
            out = _changed_nodes(self._effects.delta_features[name], self._effects.delta_errors[name])
            if self._dictionaries is not None:  # trade memory for time: build each example's rows once
                for ch in out:
                    ch.rows = ch.vec(self._dictionaries[name].W_dec)
            self._held[name] = out
        return self._held[name]

    def __contains__(self, name: object) -> bool:
        return name in self._held

    def hold_only(self, names: list[str]) -> None:
        self._held = {k: v for k, v in self._held.items() if k in names}


def _upstream_weights(
    G: Tensor, nodes_ex: Tensor, changed: list[_Changed], dic: Dictionary  # noqa: N803
) -> tuple[Tensor, Tensor]:
    """Edge weights from every changed upstream node into ``n`` downstream nodes.

    ``G [n, s, d_u]``: gradient at the upstream leaf for each downstream node,
    whose example is ``nodes_ex [n]``; ``dic`` is the upstream site's dictionary.
    Returns ``(index [3, nnz], weight [nnz])`` with index rows ``(node_row,
    up_position, up_node)``; ``up_node == dic.width`` is the upstream error node.
    """
    out_idx, out_w = [], []
    for ex in nodes_ex.unique().tolist():
        which = (nodes_ex == ex).nonzero()[:, 0]
        Gx = G[which]  # noqa: N806  [n_x, s, d]
        ch = changed[ex]
        if ch.feat.shape[1]:
            # One batched matmul over positions: [s, n_x, d] @ [s, d, E] -> [s, n_x, E].
            w = torch.bmm(Gx.transpose(0, 1), ch.vec(dic.W_dec).transpose(1, 2)) * (ch.feat >= 0)[:, None, :]
            p, r, e = w.nonzero(as_tuple=True)
            out_idx.append(torch.stack([which[r], p, ch.feat[p, e]]))
            out_w.append(w[p, r, e])
        we = (Gx * ch.err[None]).sum(-1)  # [n_x, s]
        r, p = we.nonzero(as_tuple=True)
        out_idx.append(torch.stack([which[r], p, torch.full_like(p, dic.width)]))
        out_w.append(we[r, p])
    return torch.cat(out_idx, dim=1), torch.cat(out_w)


def _edges_to_metric(
    result: EdgeEffects, tr: tracing.Trace, effects: NodeEffects, dictionaries: Mapping[str, Dictionary],
    n_pts: int = 1,
) -> None:
    """Fill ``result.to_metric``: one backward from the metric through the frozen pass ``tr``
    to every site (for IG over ``n_pts`` points, the mean gradient over them), times the
    nodes' deltas. The last site reaches the metric directly: its edges are its node effects."""
    sites = effects.sites
    names = [st.name for st in sites]
    b = effects.mask.shape[0]
    gm = torch.autograd.grad(tr.metric.sum(), [tr.leaves[n] for n in names], retain_graph=True, allow_unused=True)
    for name, g in zip(names, gm):
        if g is None:
            continue
        if name == names[-1]:
            result.to_metric[name] = (effects.features[name], effects.errors[name])
            continue
        g = wide(g)
        if n_pts > 1:
            g = g.reshape(n_pts, b, *g.shape[1:]).mean(0)
        result.to_metric[name] = (
            dictionaries[name].feature_grads(g) * effects.delta_features[name],
            (g * effects.delta_errors[name]).sum(-1),
        )


def _probe(x: Tensor, leaves: list[Tensor]) -> tuple[list[bool], bool]:
    """Which leaves ``x [b, s, d]`` depends on (its adjacent sites), and whether it
    depends on them position by position only.

    A seed on the last position reaches earlier positions of the leaves exactly
    when something (attention) mixes positions, so one probe backward tells both;
    residual and MLP sites are position-local, attention sites are not.
    """
    seed = torch.zeros_like(x)
    seed[:, -1] = 1.0
    grads = torch.autograd.grad(x, leaves, grad_outputs=seed, retain_graph=True, allow_unused=True)
    local = x.shape[1] < 2 or all(g is None or not g[:, :-1].any() for g in grads)
    return [g is not None for g in grads], local


def _slots(nodes: Tensor, batch: int, seq: int, local: bool) -> tuple[Tensor, int]:
    """A backward slot for each node ``(example, position, node)``: nodes sharing a
    slot never share a group (the example, or the example and position if ``local``)."""
    group = nodes[:, 0] * seq + nodes[:, 1] if local else nodes[:, 0]
    counts = torch.bincount(group, minlength=batch * seq if local else batch)
    order = torch.argsort(group, stable=True)
    slot = torch.cat([torch.arange(int(c), device=nodes.device) for c in counts])[order.argsort()]
    return slot, int(counts.max())


def _path_states(
    model: SFCModel, batch: Batch, sites: list[Site], dictionaries: dict[str, Dictionary],
    effects: NodeEffects, alphas: Tensor,
) -> dict[str, Tensor]:
    """Every site's state at every IG point, ``[N * b, s, d]`` (point-major rows):
    ``x_clean + α Δx`` with ``Δx = Δf @ W_dec + Δe``, the node effects' own path."""
    rows = torch.arange(len(batch), device=batch.input_ids.device)
    clean = tracing.run(model, batch, sites, None, rows, "read").acts
    out = {}
    for site in sites:
        dic = dictionaries[site.name]
        xc = wide(clean[site.name].detach())
        df = effects.delta_features[site.name].to(xc.device)
        dx = df @ dic.W_dec.to(df.dtype) + effects.delta_errors[site.name].to(xc.device)
        a = alphas.to(device=xc.device, dtype=xc.dtype)[:, None, None, None]
        out[site.name] = (xc[None] + a * dx[None]).reshape(-1, *xc.shape[1:])
    return out


def _edge_steps(effects: NodeEffects, edge_method: EdgeMethod, steps: int | None) -> tuple[int, Tensor]:
    """The number of points and the patch weights ``α`` at which edges take the Jacobian."""
    if edge_method not in ("attrib", "ig"):
        raise ValueError(f"Unknown edge_method {edge_method!r}: choose 'attrib' (Eq. 5) or 'ig'.")
    if edge_method == "attrib":
        return 1, torch.zeros(1)
    has_steps = bool(effects.step_grads)
    node_steps = effects.info.get("steps", 10) if effects.method == "ig" else None
    if has_steps and steps is not None and steps != node_steps:
        raise ValueError(
            f"IG edges with steps={steps} cannot reuse the node effects' {node_steps} step gradients: "
            "leave steps=None or recompute node effects with the same steps."
        )
    n = steps or node_steps or 10
    if n < 1:
        raise ValueError(f"IG edges need at least one step, got steps={n}.")
    return n, ig_alphas(n, effects.info.get("ig_points", "paper"))


@torch.enable_grad()
def edge_effects(
    model: SFCModel,
    dictionaries: dict[str, Dictionary],
    clean,
    effects: NodeEffects,
    metric: tracing.Metric,
    *,
    node_threshold: float = 0.1,
    selection: Selection = "position",
    aggregation: Aggregation = "none",
    downstream: dict[str, Tensor] | None = None,
    memory_budget_mb: float = 1024.0,
    edge_method: EdgeMethod = "attrib",
    steps: int | None = None,
    progress: bool = True,
) -> EdgeEffects:
    """Edge weights into every selected downstream node, from every changed
    upstream node at the sites adjacent to it, plus edges into the metric.

    ``edge_method="attrib"`` (the default) is the paper's Eq. 5: the Jacobian at
    the clean input, times the node effects' gradient ``∇_d m``.
    ``edge_method="ig"`` integrates both factors along the node effects' IG path
    (see ``docs/scale.md``): at each point ``α`` every site sits at
    ``x_clean + α Δx``, the Jacobian ``∂d/∂u`` is taken there and paired with the
    downstream gradient at the same point (``effects.step_grads``, from
    ``node_effects(..., keep_step_grads=True)``; without them the mean gradient
    ``effects.grads`` serves at every point). All points of a node ride in the
    same backward slot, as extra rows of one batched VJP. ``steps`` defaults to
    the node effects' steps. The sum of the IG edges into ``d`` over every
    upstream node equals ``Σ_α ∇_d m(α) · (d/dα) d(α)``, ``d``'s own contribution
    along the path, when ``d``'s site reads only the chosen sites upstream of it.

    ``downstream`` (``[b, s, F + 1]`` boolean masks per site) overrides the
    selection by ``node_threshold`` (see :func:`select_downstream`).
    ``effects`` must come from ``attrib`` or ``ig`` (exact patching has no gradients).
    """
    if any(g is None for g in effects.grads.values()):
        raise ValueError("Edges need gradients: compute node effects with method 'attrib' or 'ig', not 'exact'.")
    n_pts, alphas = _edge_steps(effects, edge_method, steps)
    batch = model.tokenize(clean)
    sites = effects.sites
    b, s = batch.input_ids.shape
    if (b, s) != tuple(effects.mask.shape):
        raise ValueError("The clean prompts differ from those the node effects were computed on.")
    selected = downstream if downstream is not None else select_downstream(
        effects, node_threshold, selection, aggregation
    )
    rows = torch.arange(b, device=batch.input_ids.device)
    positions = effects.info.get("metric_positions", "all")
    if edge_method == "ig":
        # One frozen pass over all points: N copies of the batch, each site's leaf at its path point.
        path = _path_states(model, batch, sites, dictionaries, effects, alphas)
        tr = tracing.run(model, batch.repeat(n_pts), sites, metric, rows.repeat(n_pts), "frozen",
                         replace=path, positions=positions)
        del path
    else:
        tr = tracing.run(model, batch, sites, metric, rows, "frozen", positions=positions)
    leaves = tr.leaves
    result = EdgeEffects(n_examples=b, method=edge_method, steps=n_pts)

    _edges_to_metric(result, tr, effects, dictionaries, n_pts)

    changed = ChangedNodes(effects)
    work = [st for st in sites if selected.get(st.name) is not None and selected[st.name].any()]
    bar = tqdm(total=sum(int(selected[st.name].sum()) for st in work), desc="edges", unit="node",
               disable=not progress)
    for i_d, down in enumerate(sites):
        if down not in work:
            continue
        x_d = tr.acts[down.name]
        ups = sites[:i_d]
        if x_d.requires_grad and ups:
            used, local = _probe(x_d, [leaves[u.name] for u in ups])
            ups = [u for u, is_used in zip(ups, used) if is_used]
        if not x_d.requires_grad or not ups:
            bar.update(int(selected[down.name].sum()))
            continue
        changed.hold_only([u.name for u in ups])
        # This site's dictionaries, held for the whole site (a lazy set need not keep them all);
        # the previous site's are let go first.
        dic_down = dic_up = None
        dic_down, dic_up = dictionaries[down.name], {u.name: dictionaries[u.name] for u in ups}
        nodes = selected[down.name].nonzero()  # [n, 3] (example, position, node)
        n = len(nodes)
        result.n_selected[down.name] = n
        t_node = time.perf_counter()
        if n_pts == 1:
            seeds = _seeds(x_d, dic_down, effects.grads[down.name], nodes)[None]  # [1, n, d]
        else:
            # Each node's seed at each point: that point's downstream gradient and encoder Jacobian.
            if effects.step_grads and down.name in effects.step_grads:
                g_down = effects.step_grads[down.name].reshape(n_pts * b, *x_d.shape[1:])
            else:
                g_down = effects.grads[down.name].repeat(n_pts, 1, 1)
            at_points = nodes.repeat(n_pts, 1)
            at_points[:, 0] += (torch.arange(n_pts, device=nodes.device) * b).repeat_interleave(n)
            seeds = _seeds(x_d, dic_down, g_down, at_points).reshape(n_pts, n, -1) / n_pts
        result.timings["per_node_s"] += time.perf_counter() - t_node
        # Slot i of the batched backward carries the i-th selected node of every example,
        # or of every (example, position) when the site's Jacobian keeps positions apart;
        # for IG, the node's rows at every point ride in the same slot.
        slot, n_slots = _slots(nodes, b, s, local)
        result.position_local[down.name] = local
        # Memory per slot: the upstream gradients plus the backward's activations,
        # roughly a forward pass of the batch per slot.
        per_slot = n_pts * (b * s * sum(u.d for u in ups) * 4 + b * s * x_d.shape[-1] * 4 * 24)
        chunk = max(1, int(memory_budget_mb * 2**20 // per_slot))
        acc_idx, acc_w = {u.name: [] for u in ups}, {u.name: [] for u in ups}
        pts = torch.arange(n_pts, device=nodes.device)[:, None] * b
        for start in range(0, n_slots, chunk):
            stop = min(start + chunk, n_slots)
            in_chunk = ((slot >= start) & (slot < stop)).nonzero()[:, 0]
            seed = torch.zeros(stop - start, *x_d.shape, dtype=x_d.dtype, device=x_d.device)
            nd = nodes[in_chunk]
            sl = (slot[in_chunk] - start)[None].expand(n_pts, -1)  # [N, n_c]
            run_rows = pts + nd[:, 0][None]  # [N, n_c]
            seed[sl, run_rows, nd[:, 1][None].expand(n_pts, -1)] = seeds[:, in_chunk].to(x_d.dtype)
            t_vjp = time.perf_counter()
            grads = torch.autograd.grad(
                x_d, [leaves[u.name] for u in ups], grad_outputs=seed,
                is_grads_batched=True, retain_graph=True, allow_unused=True,
            )
            t_node = time.perf_counter()
            result.timings["vjp_s"] += t_node - t_vjp
            result.n_backward_slots += stop - start
            for up, G in zip(ups, grads):  # noqa: N806
                if G is None:
                    continue
                if n_pts == 1:
                    Gn = wide(G[sl[0], nd[:, 0]])  # noqa: N806  [n, s, d_u]
                else:  # Δu is the same at every point, so the points' gradients add up first
                    Gn = wide(G[sl, run_rows]).sum(0)  # noqa: N806
                if local:  # a slot holds nodes at other positions too: keep each node's own
                    Gn = Gn * (torch.arange(s, device=Gn.device)[None, :] == nd[:, 1:2])[..., None]  # noqa: N806
                if up.name not in changed:
                    t_fixed = time.perf_counter()
                    changed[up.name]  # noqa: B018 - built here so its time is not counted per node
                    t_node += time.perf_counter() - t_fixed  # once per upstream site: not per node
                idx, w = _upstream_weights(Gn, nd[:, 0], changed[up.name], dic_up[up.name])
                r = in_chunk[idx[0]]
                acc_idx[up.name].append(torch.stack([nodes[r, 0], nodes[r, 1], nodes[r, 2], idx[1], idx[2]]))
                acc_w[up.name].append(w)
            result.timings["per_node_s"] += time.perf_counter() - t_node
            bar.update(len(in_chunk))
        for up in ups:
            if acc_idx[up.name]:
                result.pairs[(up.name, down.name)] = SiteEdges(
                    up.name, down.name, torch.cat(acc_idx[up.name], 1), torch.cat(acc_w[up.name]),
                    dic_down.width, dic_up[up.name].width,
                )
    bar.close()
    return result
