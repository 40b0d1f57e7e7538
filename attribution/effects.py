"""Node effects: the indirect effect of every feature and every SAE error node
on a metric (SPEC §2; paper Eqs. 2-4).

Notation: a site's activation is ``x = decode(f) + e`` with features ``f [F]``
and error ``e [d]``. "Patching" replaces the clean state ``(f, e)`` by a patch
state ``(f', e')``: from paired patch prompts, or an ablation when no patch
prompts are given (``zero``: ``f' = 0, e' = 0``, so ``x' = b_dec``, the paper's
convention; ``mean``: the position-wise mean over the batch).

Because ``decode`` is affine, a node's gradient is the site gradient projected
on its decoder row, ``∂m/∂f_j = ∇_x m · W_dec[j]`` and ``∂m/∂e = ∇_x m``
(with the error's stop-gradient and the pass-through gradient of App. A.3 this
is exactly what the spliced model computes). So no dictionary ever runs inside
the model's forward or backward pass here: one gradient per site activation
serves all ``F + 1`` nodes, and the projection happens once afterwards.

Sign convention: effect = m(patched) - m(clean), estimated per node. For a
metric that measures the *patch* behaviour (e.g. logit(patch answer) -
logit(clean answer)), a positive effect means the node carries the clean
behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attribution import memory
from attribution.dictionaries.kinds import Dictionary, dictionary_shape
from attribution.model import tracing
from attribution.model.sites import Site
from attribution.model.wrapper import Batch, SFCModel
from attribution.options import AblationKind, Aggregation, Method
from attribution.sparse import SparseTensors

IGPoints = Literal["paper", "reference", "midpoint"]


@dataclass
class NodeEffects:
    """Effects of every node at every site, per example and position.

    - ``features[site]``: ``[b, s, F]``, the effect of each feature;
    - ``errors[site]``: ``[b, s]``, the effect of each error node;
    - ``grads[site]``: ``[b, s, d]``, the metric's gradient at the site
      activation used by the estimate (IG: the mean over the path); ``None``
      for exact patching;
    - ``delta_features[site]`` ``[b, s, F]`` and ``delta_errors[site]``
      ``[b, s, d]``: patch state minus clean state;
    - ``clean_features[site]``: ``[b, s, F]``, clean feature activations;
    - ``mask``: ``[b, s]``, 1 for real tokens, 0 for padding (effects are 0 there);
    - ``metric_clean`` ``[b]`` and ``metric_patch`` ``[b]`` (``None`` for ablations);
    - ``input_ids``: ``[b, s]``, the clean token ids (left-padded).
    - ``step_grads[site]``: ``[steps, b, s, d]``, the gradient at each IG point
      (``alphas`` in ``info``), kept only with ``keep_step_grads=True``; IG edges
      (``edge_method="ig"``) pair it with the Jacobian at the same point.

    The three ``[b, s, F]`` mappings are :class:`~attribution.sparse.SparseTensors`:
    stored sparse, handed out dense one site at a time (``effects.features[site]``
    is a fresh tensor; assign to it to change what is stored).
    """

    sites: list[Site]
    method: Method
    features: SparseTensors
    errors: dict[str, Tensor]
    grads: dict[str, Tensor | None]
    delta_features: SparseTensors
    delta_errors: dict[str, Tensor]
    clean_features: SparseTensors
    mask: Tensor
    metric_clean: Tensor
    metric_patch: Tensor | None = None
    info: dict = field(default_factory=dict)
    input_ids: Tensor | None = None
    step_grads: dict[str, Tensor] | None = None

    @property
    def total_effect(self) -> Tensor | None:
        """``m(patch) - m(clean)`` per example, ``[b]``; ``None`` for ablations."""
        return None if self.metric_patch is None else self.metric_patch - self.metric_clean

    def site_total(self, site: str) -> Tensor:
        """Sum of a site's feature and error effects per example, ``[b]``."""
        return self.features[site].sum(dim=(1, 2)) + self.errors[site].sum(dim=1)

    def aggregate(self, how: Aggregation) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Aggregate over examples (SPEC §4.2).

        ``none``: mean over examples, features ``[s, F]``, errors ``[s]``.
        ``sum``: sum over positions, then mean over examples: ``[F]`` and ``[]``.
        """
        feats, errs = {}, {}
        for name in self.features:
            f, e = self.features[name], self.errors[name]
            if how == "sum":
                f, e = f.sum(dim=1), e.sum(dim=1)
            feats[name], errs[name] = f.mean(dim=0), e.mean(dim=0)
        return feats, errs


def wide(x: Tensor) -> Tensor:
    """``x`` in float32, unless it is already float32 or float64 (effects are never bf16)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_inputs(
    model: SFCModel, sites: list[Site], dictionaries: dict[str, Dictionary], clean: Batch, patch: Batch | None
) -> None:
    if not sites:
        raise ValueError("No sites given: pass at least one site, e.g. model.sites(['resid_0']).")
    for site in sites:
        if site.name not in dictionaries:
            raise ValueError(f"No dictionary for site {site.name!r}: add one to the dictionaries mapping.")
        d, _ = dictionary_shape(dictionaries, site.name)  # a lazy set answers without loading
        if d != site.d:
            raise ValueError(
                f"The dictionary for site {site.name!r} expects activations of size {d}, but this "
                f"model's {site.name} has size {site.d}: it was made for another model or site."
            )
    if patch is not None:
        if patch.input_ids.shape != clean.input_ids.shape or not torch.equal(
            patch.attention_mask.bool(), clean.attention_mask.bool()
        ):
            lengths_c = clean.attention_mask.sum(1).tolist()
            lengths_p = patch.attention_mask.sum(1).tolist()
            bad = [i for i, (a, b) in enumerate(zip(lengths_c, lengths_p)) if a != b]
            where = f" (example {bad[0]}: {lengths_c[bad[0]]} vs {lengths_p[bad[0]]} tokens)" if bad else ""
            raise ValueError(
                "Clean and patch prompts have different token lengths"
                f"{where}; per-position effects need equal lengths, so pair prompts of equal "
                "length or use patch=None (ablation)."
            )


@dataclass
class _States:
    """Clean and patch activations of every site, and the derived node deltas."""

    x_clean: dict[str, Tensor]
    x_patch: dict[str, Tensor]
    f_clean: SparseTensors
    delta_f: SparseTensors
    delta_e: dict[str, Tensor]
    metric_clean: Tensor
    metric_patch: Tensor | None


@torch.no_grad()
def _states(
    model: SFCModel,
    sites: list[Site],
    dictionaries: dict[str, Dictionary],
    clean: Batch,
    patch: Batch | None,
    metric: tracing.Metric,
    ablation: AblationKind,
    positions: tracing.MetricPositions = "all",
    clean_run: tracing.Trace | None = None,
) -> _States:
    """Clean and patch states of every site; ``clean_run`` reuses a clean pass already made."""
    rows = torch.arange(len(clean), device=clean.input_ids.device)
    run_c = clean_run or tracing.run(model, clean, sites, metric, rows, "read", positions=positions)
    run_p = tracing.run(model, patch, sites, metric, rows, "read", positions=positions) if patch is not None else None
    mask = clean.attention_mask[..., None]
    x_c, x_p, d_e = {}, {}, {}
    f_c, d_f = SparseTensors(), SparseTensors()  # [b, s, F] per site: mostly zeros
    for site in sites:
        dic = dictionaries[site.name]
        xc = wide(run_c.acts[site.name].detach())
        # States and deltas are float32 whatever the model's and the dictionary's dtypes.
        fc = wide(dic.encode(xc))
        ec = xc - wide(dic.decode(fc))
        if run_p is not None:
            xp = wide(run_p.acts[site.name])
            fp = wide(dic.encode(xp))
            ep = xp - wide(dic.decode(fp))
        elif ablation == "zero":
            fp, ep = torch.zeros_like(fc), torch.zeros_like(ec)
            xp = wide(dic.decode(fp)) + ep
        else:  # position-wise mean over the real tokens of the batch
            w = mask.to(device=fc.device, dtype=fc.dtype)
            denom = w.sum(0).clamp(min=1)
            fp = ((fc * w).sum(0) / denom).expand_as(fc)
            ep = ((ec * w).sum(0) / denom).expand_as(ec)
            xp = wide(dic.decode(fp)) + ep
        # Padding positions carry no node: their deltas are zero by definition.
        x_c[site.name], x_p[site.name], f_c[site.name] = xc, xp, fc
        m = mask.to(device=fc.device, dtype=fc.dtype)  # each site may live on its own device
        d_f[site.name] = (fp - fc) * m
        d_e[site.name] = (ep - ec) * m
        memory.trim()  # this site's dense [b, s, F] blocks are freed: give them back
    m_patch = None if run_p is None else run_p.metric
    return _States(x_c, x_p, f_c, d_f, d_e, run_c.metric.detach(), m_patch)


def project_effects(
    grad: Tensor, delta_f: Tensor, delta_e: Tensor, dictionary: Dictionary
) -> tuple[Tensor, Tensor]:
    """Gradient times delta for every node of a site (the dot product of Eqs. 3-4).

    ``grad [b, s, d]`` is ∇_x m at the site; features get ``(grad · W_dec[j]) Δf_j``
    (``[b, s, F]``), the error node gets ``grad · Δe`` (``[b, s]``).
    """
    feature_grads = dictionary.feature_grads(grad)
    return feature_grads * delta_f, (grad * delta_e).sum(-1)


@torch.enable_grad()
def attribution_patching(clean_run: tracing.Trace, sites: list[Site]) -> dict[str, Tensor]:
    """Eq. 3: ``ÎE_atp = ∇_a m |_{clean} · (a_patch − a_clean)``.

    ``clean_run`` is one clean forward pass in ``total`` mode; one backward gives
    ∇_x m at every site at once (the whole-model gradient, i.e. the pass-through
    gradient). Returns ``grads[site] [b, s, d]``.
    """
    tensors = [clean_run.acts[s.name] for s in sites]
    grads = torch.autograd.grad(clean_run.metric.sum(), tensors, allow_unused=True)
    return {s.name: wide((g if g is not None else torch.zeros_like(t)).detach())
            for s, g, t in zip(sites, grads, tensors)}


def ig_alphas(steps: int, points: IGPoints) -> Tensor:
    """Weights on the *patch* state for the ``steps`` IG samples.

    ``paper`` (Eq. 4): ``α a_clean + (1 − α) a_patch`` with ``α ∈ {0, 1/N, …, (N−1)/N}``,
    i.e. patch weights ``{1, …, 1/N}``: the patch end is sampled, the clean end is not.
    ``reference``: the reference code's ``(1 − α) a_clean + α a_patch``, patch
    weights ``{0, …, (N−1)/N}``. ``midpoint``: weights ``{(k + ½)/N}``, the
    midpoint rule, whose error shrinks as ``1/N²`` rather than ``1/N``.
    """
    alpha = torch.arange(steps, dtype=torch.float32) / steps
    if points == "midpoint":
        return alpha + 0.5 / steps
    return 1.0 - alpha if points == "paper" else alpha


@torch.enable_grad()
def integrated_gradients(
    model: SFCModel, sites: list[Site], clean: Batch, st: _States, metric: tracing.Metric,
    steps: int = 10, points: IGPoints = "paper", max_rows: int = 1024, progress: bool = True,
    positions: tracing.MetricPositions = "all", step_grads: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Eq. 4: the mean gradient along the straight path from clean to patch state
    of one site at a time (other sites keep the model's own values).

    The path of the site's nodes maps to the path of its activation,
    ``x(w) = x_clean + w (x_patch − x_clean)``, since ``decode`` is affine; all
    ``steps`` points run as one batch of ``steps · b`` rows (chunked to
    ``max_rows``). Returns the mean gradient ``grads[site] [b, s, d]``; when
    ``step_grads`` is a dict, it also receives each point's gradient ``[steps, b, s, d]``.
    """
    b = len(clean)
    weights = ig_alphas(steps, points)
    per_pass = max(1, max_rows // b)
    grads: dict[str, Tensor] = {}
    bar = tqdm(sites, desc=f"IG ({steps} steps)", disable=not progress, unit="site")
    for site in bar:
        xc, xp = st.x_clean[site.name], st.x_patch[site.name]
        total = torch.zeros_like(xc)
        weights = weights.to(xc.device)
        kept = torch.empty(steps, *xc.shape, dtype=xc.dtype, device=xc.device) if step_grads is not None else None
        for start in range(0, steps, per_pass):
            w = weights[start : start + per_pass]
            n = len(w)
            path = (xc[None] + w[:, None, None, None] * (xp - xc)[None]).reshape(n * b, *xc.shape[1:])
            path = path.detach().requires_grad_()
            rows = torch.arange(b, device=clean.input_ids.device).repeat(n)
            tr = tracing.run(model, clean.repeat(n), [site], metric, rows, "read", replace={site.name: path},
                             positions=positions)
            (g,) = torch.autograd.grad(tr.metric.sum(), [path])
            total += g.reshape(n, *xc.shape).sum(0)
            if kept is not None:
                kept[start : start + n] = g.reshape(n, *xc.shape)
        grads[site.name] = total / steps
        if kept is not None:
            step_grads[site.name] = kept
    return grads


@torch.no_grad()
def exact_patching(
    model: SFCModel, sites: list[Site], dictionaries: dict[str, Dictionary], clean: Batch,
    st: _States, metric: tracing.Metric, max_rows: int = 256, progress: bool = True,
    positions: tracing.MetricPositions = "all",
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Eq. 2: ``IE = m(x_clean | do(node = patch)) − m(x_clean)``, one node at a time.

    Each node whose patch state differs from its clean state gets its own run
    row (its example, with only that node patched: ``x + Δf_j W_dec[j]`` or
    ``x + Δe``); rows run in batches of ``max_rows``. Returns feature effects
    ``[b, s, F]`` and error effects ``[b, s]``.
    """
    feats, errs = SparseTensors(), {}
    for site in tqdm(sites, desc="exact patching", disable=not progress, unit="site"):
        dic = dictionaries[site.name]
        xc = st.x_clean[site.name]
        df, de = st.delta_f[site.name], st.delta_e[site.name]
        f_idx = df.nonzero()  # [n_f, 3] (example, position, feature)
        e_idx = (de != 0).any(-1).nonzero()  # [n_e, 2]
        f_vec = df[f_idx[:, 0], f_idx[:, 1], f_idx[:, 2], None] * dic.W_dec[f_idx[:, 2]]
        e_vec = de[e_idx[:, 0], e_idx[:, 1]]
        ex = torch.cat([f_idx[:, 0], e_idx[:, 0]])
        pos = torch.cat([f_idx[:, 1], e_idx[:, 1]])
        vec = torch.cat([f_vec, e_vec])
        out = torch.empty(len(ex), device=xc.device, dtype=xc.dtype)
        for start in range(0, len(ex), max_rows):
            sl = slice(start, start + max_rows)
            rows = ex[sl]
            x = xc[rows].clone()
            x[torch.arange(len(rows), device=x.device), pos[sl]] += vec[sl]
            rows_in = rows.to(clean.input_ids.device)
            tr = tracing.run(model, clean.rows(rows_in), [site], metric, rows_in, "read",
                             replace={site.name: x}, positions=positions)
            out[sl] = (tr.metric - st.metric_clean[rows_in]).to(out.device)
        fe = torch.zeros_like(df)
        fe[f_idx[:, 0], f_idx[:, 1], f_idx[:, 2]] = out[: len(f_idx)]
        ee = torch.zeros(df.shape[:2], device=xc.device, dtype=xc.dtype)
        ee[e_idx[:, 0], e_idx[:, 1]] = out[len(f_idx) :]
        feats[site.name], errs[site.name] = fe, ee
    return feats, errs


def resolve_sites(
    model: SFCModel, dictionaries: dict[str, Dictionary], sites: list[Site] | list[str] | None
) -> list[Site]:
    """The sites to attribute, in forward order: those named (or given), else every site
    that has a dictionary."""
    if sites is None:
        sites = [s for s in model.all_sites() if s.name in dictionaries]
    elif sites and isinstance(sites[0], str):
        sites = model.sites(list(sites))
    return sorted(sites, key=lambda s: s.order)


def node_effects(
    model: SFCModel,
    dictionaries: dict[str, Dictionary],
    clean: list[str] | Batch | Tensor,
    patch: list[str] | Batch | Tensor | None,
    metric: tracing.Metric,
    *,
    sites: list[Site] | list[str] | None = None,
    method: Method = "ig",
    steps: int = 10,
    ig_points: IGPoints = "paper",
    ablation: AblationKind = "zero",
    max_rows: int = 1024,
    metric_positions: tracing.MetricPositions = "all",
    progress: bool = True,
    keep_step_grads: bool = False,
) -> NodeEffects:
    """Indirect effects of every feature and error node at ``sites`` on ``metric``.

    ``patch=None`` patches in an ablation (``ablation="zero"``: the paper's
    convention, features and errors set to 0; ``"mean"``: position-wise batch
    means). ``method``: ``attrib`` (Eq. 3), ``ig`` (Eq. 4, ``steps`` points,
    ``ig_points`` choosing the paper's or the reference code's endpoints) or
    ``exact`` (Eq. 2). ``metric(logits, rows) -> [n]``, see
    :data:`attribution.model.tracing.Metric`; with ``metric_positions="last"`` it
    receives the last position's logits only (``[n, 1, vocab]``), which is much
    cheaper for large vocabularies. ``keep_step_grads`` (``ig`` only) keeps the
    gradient at every IG point (``steps`` times the memory of ``grads``) for IG
    edges, :func:`attribution.edges.edge_effects` with ``edge_method="ig"``.
    """
    sites = resolve_sites(model, dictionaries, sites)
    clean_b = model.tokenize(clean)
    patch_b = model.tokenize(patch) if patch is not None else None
    _check_inputs(model, sites, dictionaries, clean_b, patch_b)
    if method not in ("attrib", "ig", "exact"):
        raise ValueError(f"Unknown method {method!r}: choose 'attrib', 'ig' or 'exact'.")
    if patch is None and ablation not in ("zero", "mean"):
        raise ValueError(
            f"Node effects with patch=None support ablation='zero' or 'mean', not {ablation!r}: "
            "for resampled inputs pass them as patch prompts."
        )
    pos = metric_positions
    # Attribution patching needs the clean pass with gradients; the states reuse it.
    clean_run = None
    if method == "attrib":
        rows = torch.arange(len(clean_b), device=clean_b.input_ids.device)
        with torch.enable_grad():
            clean_run = tracing.run(model, clean_b, sites, metric, rows, "total", positions=pos)
    st = _states(model, sites, dictionaries, clean_b, patch_b, metric, ablation, pos, clean_run)

    grads: dict[str, Tensor | None]
    step_grads: dict[str, Tensor] | None = {} if keep_step_grads and method == "ig" else None
    if method == "exact":
        feats, errs = exact_patching(model, sites, dictionaries, clean_b, st, metric, progress=progress,
                                     positions=pos)
        grads = {s.name: None for s in sites}
    else:
        if method == "attrib":
            grads = attribution_patching(clean_run, sites)
        else:
            grads = integrated_gradients(
                model, sites, clean_b, st, metric, steps=steps, points=ig_points,
                max_rows=max_rows, progress=progress, positions=pos, step_grads=step_grads,
            )
        feats, errs = SparseTensors(), {}
        for site in sites:
            feats[site.name], errs[site.name] = project_effects(
                grads[site.name], st.delta_f[site.name], st.delta_e[site.name], dictionaries[site.name]
            )
            memory.trim()
    return NodeEffects(
        sites=sites, method=method, features=feats, errors=errs, grads=grads,
        delta_features=st.delta_f, delta_errors=st.delta_e, clean_features=st.f_clean,
        mask=clean_b.attention_mask, metric_clean=st.metric_clean, metric_patch=st.metric_patch,
        info={"steps": steps, "ig_points": ig_points, "ablation": None if patch is not None else ablation,
              "metric_positions": metric_positions},
        input_ids=clean_b.input_ids,
        step_grads=step_grads,
    )
