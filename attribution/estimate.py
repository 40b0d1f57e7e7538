"""What a node-and-edge run will cost, before it runs.

:func:`estimate` predicts the peak memory and the wall time of node effects and
of edges from

- shapes: examples, positions, sites, dictionary widths, IG steps and chunking;
- the dictionaries and the model actually loaded (their weights are resident; of a
  set kept on disk, the few largest that can be in memory at once);
- a short calibration pass on the real prompts: attribution patching over the
  whole batch (one forward and backward; it also says how many downstream nodes
  the node threshold will select, using attribution-patching effects as the
  stand-in for the final ones), one IG chunk at the middle site (1/``n_sites`` of
  the IG work; timed twice, the faster kept), and the edges with one and with two
  backward slots per downstream site: the second run's time, plus the growth of
  the VJP time per extra slot and of the per-node time per extra node, scaled to
  the whole job.

Memory is counted as the memory held before the run (the model and the
dictionaries, and on the CPU the Python runtime: the process's resident set)
plus the engine's working memory: the float32 node states and effects
(``b·s·4d`` dense values per site, the IG step gradients where IG edges keep
them, the sparse feature tensors as large as the calibration found them, and the
dense ``[b, s, F]`` blocks of the one site being built), the autograd graph of
the largest pass (the bytes the autograd engine saves for backward, counted with
``saved_tensors_hooks`` on one example and scaled by the rows of the pass), and
for edges the selection masks and the slot chunk that ``memory_budget_mb``
allows. Where the estimate exceeds the memory available, :func:`check_fits` stops with a message naming the options that shrink it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from attribution.dictionaries.kinds import Dictionary, dictionary_shape
from attribution.dictionaries.sets import LazyDictionarySet
from attribution.edges import edge_effects, select_downstream
from attribution.effects import node_effects, resolve_sites
from attribution.model import tracing
from attribution.model.sites import Site, get_module
from attribution.model.wrapper import Batch, SFCModel
from attribution.options import Aggregation, EdgeMethod, Method

MB = 2**20
_SITE_BLOCKS = 6
"""Dense ``[b, s, F]`` float32 blocks alive at once while one site's states are built:
clean and patch pre-activations and codes, their difference and the masked delta."""


@dataclass
class Estimate:
    """Predicted cost of ``node_effects`` (+ ``edge_effects``); memory in MiB, times in seconds.

    ``nodes_peak_mb`` and ``edges_peak_mb`` include ``held_mb``, the memory held
    before the run (weights, and the runtime on the CPU); ``available_mb`` is what
    the device can hold in all (held plus free), ``None`` where unknown.
    """

    nodes_s: float
    edges_s: float
    nodes_peak_mb: float
    edges_peak_mb: float
    held_mb: float
    model_weights_mb: float
    dictionary_weights_mb: float
    available_mb: float | None
    device: str
    calibration_s: float
    details: dict = field(default_factory=dict)

    @property
    def peak_mb(self) -> float:
        return max(self.nodes_peak_mb, self.edges_peak_mb)

    @property
    def fits(self) -> bool:
        return self.available_mb is None or self.peak_mb <= self.available_mb

    def to_dict(self) -> dict:
        out = asdict(self)
        out["peak_mb"] = self.peak_mb
        out["fits"] = self.fits
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}

    def summary(self) -> str:
        """A few lines for people: predicted time and peak memory of nodes and edges."""
        avail = "unknown" if self.available_mb is None else f"{self.available_mb / 1024:.1f} GiB"
        return "\n".join([
            f"estimate on {self.device} (calibration took {self.calibration_s:.1f} s):",
            f"  nodes: {self.nodes_s:8.1f} s, peak {self.nodes_peak_mb / 1024:6.2f} GiB",
            f"  edges: {self.edges_s:8.1f} s, peak {self.edges_peak_mb / 1024:6.2f} GiB",
            f"  held before the run {self.held_mb / 1024:.2f} GiB (model {self.model_weights_mb / 1024:.2f} GiB, "
            f"dictionaries {self.dictionary_weights_mb / 1024:.2f} GiB); available {avail}"
            + ("" if self.fits else "  -> DOES NOT FIT"),
        ])

    def __str__(self) -> str:
        return self.summary()


def tensor_mb(module: torch.nn.Module) -> float:
    """MiB of a module's parameters and buffers (each storage counted once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / MB


def dictionaries_mb(dictionaries: Mapping[str, Dictionary]) -> float:
    """MiB of all dictionaries' weights (shared storages counted once); for a set kept on
    disk (:class:`~attribution.dictionaries.sets.LazyDictionarySet`), as read from the
    files' headers, without loading them."""
    if isinstance(dictionaries, LazyDictionarySet):
        return sum(dictionaries.nbytes(name) for name in dictionaries) / MB
    holder = torch.nn.ModuleList(list(dictionaries.values()))
    return tensor_mb(holder)


_STEP_DICTIONARIES = 4
"""Dictionaries one step of the engine holds at most: edges into a downstream site hold its
own and those of the adjacent upstream sites (attention, MLP and residual of one layer)."""


def lazy_resident_mb(dictionaries: Mapping[str, Dictionary], names: list[str]) -> float:
    """MiB a set kept on disk holds at most while the engine runs over ``names``: the largest
    ``max(resident, 4)`` dictionaries (a step may hold four, whatever ``resident`` says) plus
    the one being loaded; ``0`` for other sets, whose weights are already in the memory held
    before the run."""
    if not isinstance(dictionaries, LazyDictionarySet):
        return 0.0
    sizes = sorted((dictionaries.nbytes(n) for n in names), reverse=True)
    return sum(sizes[: max(dictionaries.resident, _STEP_DICTIONARIES) + 1]) / MB


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def memory_state(device: torch.device) -> tuple[float, float | None]:
    """``(held, available)`` in MiB: what the process holds now on ``device`` and the most
    it can hold (held plus free); ``available`` is ``None`` where it cannot be read."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        held = torch.cuda.memory_allocated(device) / MB
        return held, held + free / MB
    held = _rss_mb()
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh}
        return held, held + info["MemAvailable"] / 1024
    except (OSError, KeyError):
        return held, None


def peak_mb(device: torch.device) -> float:
    """The high-water mark, in MiB, of what the process has held on ``device`` so far: the
    most memory allocated on a CUDA device, else the peak resident set (what
    :attr:`Estimate.peak_mb` predicts)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def graph_bytes_per_row(model: SFCModel, batch: Batch, first: Site, positions: tracing.MetricPositions) -> float:
    """Bytes autograd saves for backward per example in a pass whose graph starts at
    ``first`` (the whole model above it), counted on one example with saved-tensor
    hooks; parameters are not counted (they are resident anyway)."""
    params = {p.untyped_storage().data_ptr() for p in model.hf.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    module = get_module(model.hf, first.module)

    def leaf(mod, args, out):
        x = out[0] if isinstance(out, tuple) else out
        x = x.detach().requires_grad_()
        return (x, *out[1:]) if isinstance(out, tuple) else x

    def leaf_in(mod, args):
        return (args[0].detach().requires_grad_(), *args[1:])

    handle = module.register_forward_pre_hook(leaf_in) if first.hook == "input" else module.register_forward_hook(leaf)
    kwargs = {"logits_to_keep": 1} if positions == "last" else {}
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model.hf(batch.input_ids[:1], attention_mask=batch.attention_mask[:1], **kwargs)
            out.logits.float().log_softmax(-1)  # what a metric keeps of the logits
    finally:
        handle.remove()
    return float(sum(saved.values()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _limit_slots(selected: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """At most ``k`` selected nodes per example at each site (so at most ``k`` slots)."""
    out = {}
    for name, mask in selected.items():
        flat = mask.reshape(mask.shape[0], -1)
        rank = flat.long().cumsum(-1)
        out[name] = (flat & (rank <= k)).reshape(mask.shape)
    return out


def _slot_counts(selected: Tensor, local: bool) -> int:
    """Backward slots a site needs: most selected nodes of one example (or one example
    and position, where the site's Jacobian keeps positions apart)."""
    per = selected.sum(-1) if local else selected.reshape(selected.shape[0], -1).sum(-1)
    return int(per.max()) if per.numel() else 0


def estimate(
    model: SFCModel,
    dictionaries: dict[str, Dictionary],
    clean: list[str] | Batch | Tensor,
    patch: list[str] | Batch | Tensor | None,
    metric: tracing.Metric,
    *,
    sites: list[Site] | list[str] | None = None,
    method: Method = "ig",
    steps: int = 10,
    edges: bool = True,
    edge_method: EdgeMethod = "attrib",
    node_threshold: float = 0.1,
    selection: str = "position",
    aggregation: Aggregation = "none",
    metric_positions: tracing.MetricPositions = "all",
    max_rows: int = 1024,
    memory_budget_mb: float = 1024.0,
    timing: bool = True,
) -> Estimate:
    """Predict the time and peak memory of ``node_effects`` and ``edge_effects`` with
    these options, without running them (see the module docstring for how).

    ``timing=False`` skips the timed calibration (times are then 0) and predicts
    memory only, from one forward on one example and one attribution-patching pass
    (this is the check :func:`sfc.pipeline.discover` makes before any heavy work).
    """
    if method == "exact":
        raise ValueError("The estimate covers method 'attrib' and 'ig'; exact patching runs one pass per node.")
    t_start = time.perf_counter()
    sites = resolve_sites(model, dictionaries, sites)
    batch = model.tokenize(clean)
    patch_b = model.tokenize(patch) if patch is not None else None
    device = model.device
    b, s = batch.input_ids.shape
    n_sites = len(sites)
    held, available = memory_state(device)
    names = [x.name for x in sites]
    w_model = tensor_mb(model.hf)
    if isinstance(dictionaries, LazyDictionarySet):  # kept on disk: only the resident ones add to what is held
        w_dicts = dictionaries_mb(dictionaries)
        held += lazy_resident_mb(dictionaries, names)
    else:
        w_dicts = dictionaries_mb({k: dictionaries[k] for k in names})

    # Calibration 1: attribution patching on the whole batch (times the attrib job itself,
    # selects the downstream nodes the edges will need, and says how sparse the states are).
    _sync(device)
    t0 = time.perf_counter()
    atp = node_effects(model, dictionaries, batch, patch_b, metric, sites=sites, method="attrib",
                       metric_positions=metric_positions, progress=False)
    _sync(device)
    t_atp = time.perf_counter() - t0
    selected = select_downstream(atp, node_threshold, selection, aggregation)

    # Working memory of the node states and effects, per the engine's tensors: the dense
    # float32 [b, s, d] ones of every site, the sparse [b, s, F] ones (their size read off
    # the calibration), and the dense [b, s, F] blocks of the one site being worked on.
    dense_values = sum(b * s * (4 * st.d + 1) for st in sites)
    keep_steps = edges and edge_method == "ig" and method == "ig"
    step_values = steps * b * s * sum(st.d for st in sites) if keep_steps else 0
    sparse_mb = sum(m.nbytes() for m in (atp.features, atp.delta_features, atp.clean_features)) / MB
    states_mb = 4 * (dense_values + step_values) / MB + sparse_mb
    widths = {st.name: dictionary_shape(dictionaries, st.name)[1] for st in sites}
    site_mb = _SITE_BLOCKS * 4 * b * s * max(widths.values()) / MB
    row_graph = graph_bytes_per_row(model, batch, sites[0], metric_positions) / MB
    per_pass = max(1, max_rows // b)
    ig_rows = min(steps, per_pass) * b
    ig_graph = row_graph * ig_rows + 2 * 4 * ig_rows * s * max(st.d for st in sites) / MB
    pass_graph = ig_graph if method == "ig" else row_graph * b
    nodes_peak = held + states_mb + max(site_mb, pass_graph)
    details: dict = {"examples": b, "positions": s, "sites": n_sites, "method": method, "steps": steps,
                     "edge_method": edge_method, "graph_mb_per_row": round(row_graph, 3),
                     "states_mb": round(states_mb, 1), "attrib_calibration_s": round(t_atp, 3),
                     "selected_nodes": int(sum(int(m.sum()) for m in selected.values()))}

    nodes_s = t_atp
    if method == "ig" and timing:
        # Calibration 2: one IG chunk at the middle site (its backward covers half the model).
        mid = sites[n_sites // 2]
        rows = torch.arange(b, device=batch.input_ids.device)
        t0 = time.perf_counter()
        acts = tracing.run(model, batch, [mid], metric, rows, "read", positions=metric_positions).acts[mid.name]
        _sync(device)
        t_read = time.perf_counter() - t0
        n = min(steps, per_pass)
        path = acts.detach().float().repeat(n, 1, 1).requires_grad_()
        times = []
        for _ in range(2):  # the first chunk also pays for touching its memory the first time
            t0 = time.perf_counter()
            with torch.enable_grad():
                tr = tracing.run(model, batch.repeat(n), [mid], metric, rows.repeat(n), "read",
                                 replace={mid.name: path}, positions=metric_positions)
                torch.autograd.grad(tr.metric.sum(), [path])
            del tr
            _sync(device)
            times.append(time.perf_counter() - t0)
        t_chunk = min(times)
        chunks = [min(per_pass, steps - c) for c in range(0, steps, per_pass)]
        reads = 2 if patch is not None else 1
        nodes_s = reads * t_read + n_sites * sum(t_chunk * c / n for c in chunks) + 0.5 * t_atp
        details |= {"ig_chunk_s": round(t_chunk, 4), "read_pass_s": round(t_read, 4)}

    edges_s, edges_peak = 0.0, 0.0
    if edges:
        n_pts = steps if edge_method == "ig" else 1
        frozen = row_graph * b * n_pts
        slots = {}
        if any(m.any() for m in selected.values()) and not timing:
            # Memory only: no edge pass. Slots as if no site kept positions apart (an upper
            # bound), edges as every selected node times the changed nodes of three sites above.
            slots = {name: _slot_counts(m, False) for name, m in selected.items() if m.any()}
            changed = [int((atp.delta_features[st.name] != 0).sum() + (atp.delta_errors[st.name] != 0).any(-1)
                            .sum()) / b for st in sites]
            n_edges = sum(int(selected[st.name].sum()) * sum(changed[max(0, i - 3):i])
                          for i, st in enumerate(sites))
            details |= {"slots": sum(slots.values()), "edges_predicted": int(n_edges)}
        elif any(m.any() for m in selected.values()):
            # Calibration 3: the edges with one slot per downstream site, then with two where a
            # site needs more. edge_effects times its batched VJPs and its per-node work; the
            # VJPs' growth from one to two slots gives their cost per extra slot.
            kw = dict(edge_method=edge_method, steps=steps if edge_method == "ig" else None,
                      memory_budget_mb=memory_budget_mb, progress=False)
            runs = []
            for k in (1, 2):
                _sync(device)
                t0 = time.perf_counter()
                res = edge_effects(model, dictionaries, batch, atp, metric, downstream=_limit_slots(selected, k), **kw)
                _sync(device)
                runs.append((time.perf_counter() - t0, res))
                slots = {name: _slot_counts(selected[name], res.position_local.get(name, False))
                         for name in res.position_local}
                if sum(slots.values()) <= res.n_backward_slots:
                    break  # this is already the whole job
            (_, r1), (t2, r2) = runs[0], runs[-1]
            total = sum(slots.values())
            nodes_all = sum(int(selected[name].sum()) for name in r1.position_local)
            d_slots = r2.n_backward_slots - r1.n_backward_slots
            per_slot = max(0.0, (r2.timings["vjp_s"] - r1.timings["vjp_s"]) / d_slots) if d_slots else 0.0
            per_node = max(0.0, (r2.timings["per_node_s"] - r1.timings["per_node_s"])
                           / max(1, sum(r2.n_selected.values()) - sum(r1.n_selected.values())))
            # Scaled up from the last calibration run: the first also pays for first touches.
            edges_s = (t2 + per_slot * max(0, total - r2.n_backward_slots)
                       + per_node * max(0, nodes_all - sum(r2.n_selected.values())))
            n_edges = sum(e.weight.numel() for e in r2.pairs.values()) * nodes_all / max(1, sum(r2.n_selected.values()))
            details |= {"slots": total, "edge_calibration_s": round(sum(r[0] for r in runs), 3),
                        "edges_predicted": int(n_edges)}
        else:
            n_edges = 0
        # One chunk of slots, as edge_effects sizes it, over the widest site.
        chunk_mb = 0.0
        for st in sites:
            if slots.get(st.name):
                ups_d = sum(u.d for u in sites if u.order < st.order)
                per = n_pts * (b * s * ups_d * 4 + b * s * st.d * 4 * 24) / MB
                in_chunk = max(1, int(memory_budget_mb // per))
                chunk_mb = max(chunk_mb, per * min(slots[st.name], in_chunk))
        results_mb = n_edges * (5 * 8 + 4) * 2 / MB  # index and weight, gathered then concatenated
        masks_mb = sum(b * s * (widths[st.name] + 1) for st in sites) / MB  # boolean selection
        edges_peak = held + states_mb + masks_mb + frozen + chunk_mb + results_mb
        details |= {"frozen_graph_mb": round(frozen, 1), "slot_chunk_mb": round(chunk_mb, 1)}
    return Estimate(
        nodes_s=nodes_s, edges_s=edges_s, nodes_peak_mb=nodes_peak, edges_peak_mb=edges_peak, held_mb=held,
        model_weights_mb=w_model, dictionary_weights_mb=w_dicts, available_mb=available, device=str(device),
        calibration_s=time.perf_counter() - t_start, details=details,
    )


def check_fits(est: Estimate) -> None:
    """Raise ``ValueError`` (one sentence naming the options to change) where the run will not fit."""
    if est.fits:
        return
    over = est.peak_mb - (est.available_mb or 0)
    part = "nodes" if est.nodes_peak_mb >= est.edges_peak_mb else "edges"
    advice = (
        "fewer examples (--examples), fewer IG steps (--steps) or smaller IG chunks (max_rows)"
        if part == "nodes" else
        "a higher --node-threshold (fewer downstream nodes), a smaller memory_budget_mb, "
        "--edge-method attrib, fewer --examples, or --no-edges"
    )
    raise ValueError(
        f"The estimated peak memory of the {part} ({est.peak_mb / 1024:.1f} GiB) exceeds the "
        f"{(est.available_mb or 0) / 1024:.1f} GiB available by {over / 1024:.1f} GiB: use {advice}."
    )
