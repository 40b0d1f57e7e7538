"""Benchmark: node and edge attribution on a random model of the Pythia-70M shape.

Setup (issue 2): 6 layers, d=512, dictionaries at all 19 sites (width 4096 by
default, sparse), 16 agreement-style prompt pairs. It measures

- AtP node effects, IG node effects (10 steps), and edges (batched VJPs);
- the edge baseline: one backward pass per downstream node, as the reference
  implementation computes edges (each pass runs through the model below the
  downstream site, SPEC §3.4), on the same inputs; and a stricter one whose
  per-node passes stop at the adjacent sites;
- the floor for node effects: the dictionaries spliced in with plain torch forward
  hooks, one no-grad forward on the patch prompts and one forward+backward on the
  clean prompts, the least work attribution patching can do.

Prints one JSON object. Usage: ``python benchmarks/attribution.py --json``.

``--scale`` adds the research-scale fields of issue 16:

- ``ig_edges_identity_max_rel_err``: on tiny float64 models of all 5 families, the
  largest gap between the sum of the IG edges into a node and that node's own
  contribution along the path, computed with plain torch hooks at the same IG
  points (relative to the largest contribution at the site);
- for each width in ``--scale-widths`` (default 4096 16384 32768), in fresh
  processes (the node threshold, the estimate, the run, so none inherits another's
  memory): ``peak_rss_mb_F<width>`` (IG nodes + default edges, the run process's
  peak resident set; ``..._mmap`` in a fourth process after
  :func:`attribution.memory.mmap_large_allocations`, as the CLI runs),
  ``dictionary_weights_mb_F<width>``, the measured times, and the estimate's
  predictions (:func:`attribution.estimate.estimate`); ``estimate_max_rel_err`` is
  the largest relative error of the predicted node and edge times and peak memory
  over those runs;
- ``peak_rss_mb_F<width>_lazy``: the run again with the dictionaries saved to disk
  first and kept there (:class:`~attribution.dictionaries.sets.LazyDictionarySet`,
  at most 4 held), with its own estimate, the number of dictionary reads, and how
  far its results are from the run with the dictionaries held;
  ``peak_rss_mb_F<width>_from_files``: with all of them loaded from those files
  first, as research code loads dictionaries (the other runs build them in the
  process, which leaves the heap fragmented).

Run it from the repository root with the repository on the path
(``PYTHONPATH=. python benchmarks/attribution.py --scale --json``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

# This script's folder would shadow the ``attribution`` package of the same name.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import transformers as tf  # noqa: E402

from attribution.dictionaries.kinds import calibrate_sparsity, random_sae  # noqa: E402
from attribution.edges import (  # noqa: E402
    ChangedNodes,
    _seeds,
    _upstream_weights,
    edge_effects,
    select_downstream,
)
from attribution.effects import node_effects  # noqa: E402
from attribution.model import tracing  # noqa: E402
from attribution.model.sites import get_module  # noqa: E402
from attribution.model.wrapper import SFCModel  # noqa: E402


def pythia_shaped(seed: int = 0) -> SFCModel:
    torch.manual_seed(seed)
    cfg = tf.GPTNeoXConfig(
        vocab_size=50304, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=2048,
    )
    cfg._attn_implementation = "eager"
    return SFCModel(tf.GPTNeoXForCausalLM(cfg))


def prompt_pairs(n: int, seq: int, seed: int = 0):
    """Agreement-style pairs: the patch prompt changes the subject token (position 1)."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 50304, (n, seq), generator=gen)
    patch = clean.clone()
    patch[:, 1] = torch.randint(0, 50304, (n,), generator=gen)
    good = torch.randint(0, 50304, (n,), generator=gen)
    bad = torch.randint(0, 50304, (n,), generator=gen)

    def metric(logits, rows):
        last = logits[:, -1]
        return last.gather(1, bad[rows, None])[:, 0] - last.gather(1, good[rows, None])[:, 0]

    return clean, patch, metric


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def floor_attribution(model, dicts, sites, clean, patch, metric) -> None:
    """SAEs spliced with plain forward hooks: patch forward (no grad), clean forward+backward."""
    hf = model.hf
    store: dict[str, tuple] = {}

    def install(record_grad: bool):
        handles = []
        for site in sites:
            sae = dicts[site.name]

            def hook(mod, args, out, name=site.name, sae=sae):
                x = out[0] if isinstance(out, tuple) else out
                f = sae.encode(x)
                x_hat = sae.decode(f)
                err = (x - x_hat).detach()
                if record_grad:
                    f.retain_grad()
                    err.requires_grad_()
                    # x_hat + err has the clean value; x - x.detach() passes the gradient through.
                    new = x_hat + err + (x - x.detach())
                else:
                    new = x_hat + err
                store[name] = (f, err)
                return (new, *out[1:]) if isinstance(out, tuple) else new

            handles.append(get_module(hf, site.module).register_forward_hook(hook))
        return handles

    rows = torch.arange(len(clean))
    handles = install(False)
    with torch.no_grad():
        metric(hf(patch, logits_to_keep=1).logits, rows)
    for h in handles:
        h.remove()
    # Frozen weights: the embedding output becomes the leaf the backward starts from.
    leaf_hook = get_module(hf, sites[0].module).register_forward_hook(
        lambda m, a, o: o.detach().requires_grad_()
    )
    handles = install(True)
    with torch.enable_grad():
        m = metric(hf(clean, logits_to_keep=1).logits, rows).sum()
        leaf_hook.remove()
        tensors = [t for name in store for t in store[name]]
        torch.autograd.grad(m, tensors, allow_unused=True)
    for h in handles:
        h.remove()


def traversing_trace(model, batch, sites):
    """A clean forward whose site outputs are ``leaf + 0 * x``: the values (and so the
    gradients read at the leaves) are those of the frozen pass, but every backward
    still runs through the whole model below the downstream site, as the reference
    implementation's does (SPEC §3.4: stop-gradients zero values, they do not prune)."""
    acts, leaves = {}, {}
    with torch.enable_grad(), model.nn.trace(batch.input_ids, attention_mask=batch.attention_mask,
                                             logits_to_keep=1):
        for site in sites:
            envoy = tracing.site_envoy(model, site)
            raw = envoy.output
            x = raw[0] if isinstance(raw, tuple) else raw
            if not x.requires_grad:  # frozen weights: the first site starts the graph
                x = x.detach().requires_grad_()
            leaf = x.detach().requires_grad_()
            acts[site.name], leaves[site.name] = x, leaf
            new = leaf + 0.0 * x
            envoy.output = (new, *raw[1:]) if isinstance(raw, tuple) else new
    return tracing.Trace(acts=acts, leaves=leaves)


def loop_edges(model, dicts, clean, effects, metric, selected, traverse: bool = False, pairs=None):
    """The baseline: one backward pass per selected downstream node.

    ``traverse=False``: each backward stops at the adjacent sites (the frozen pass).
    ``traverse=True``: each backward runs through the whole model below the
    downstream site, as the reference implementation's does.
    """
    batch = model.tokenize(clean)
    sites = effects.sites
    if traverse:
        tr = traversing_trace(model, batch, sites)
    else:
        tr = tracing.run(model, batch, sites, metric, torch.arange(len(batch)), "frozen", positions="last")
    out = {}
    changed = ChangedNodes(effects, dicts)  # the baseline keeps every site's rows, as before
    for i_d, down in enumerate(sites):
        nodes = selected[down.name].nonzero()
        if not len(nodes) or not tr.acts[down.name].requires_grad or i_d == 0:
            continue
        x_d = tr.acts[down.name]
        ups = [u for u in sites[:i_d] if pairs is None or (u.name, down.name) in pairs]
        if not ups:
            continue
        seeds = _seeds(x_d, dicts[down.name], effects.grads[down.name], nodes)
        for n in range(len(nodes)):
            seed = torch.zeros_like(x_d)
            seed[nodes[n, 0], nodes[n, 1]] = seeds[n]
            grads = torch.autograd.grad(x_d, [tr.leaves[u.name] for u in ups], grad_outputs=seed,
                                        retain_graph=True, allow_unused=True)
            for up, g in zip(ups, grads):
                if g is None:
                    continue
                idx, w = _upstream_weights(g[nodes[n, 0]][None], nodes[n, :1], changed[up.name],
                                           dicts[up.name])
                key = (up.name, down.name)
                rows = torch.stack([nodes[n, 0].expand(len(w)), nodes[n, 1].expand(len(w)),
                                    nodes[n, 2].expand(len(w)), idx[1], idx[2]])
                out.setdefault(key, []).append((rows, w))
    return {k: (torch.cat([r for r, _ in v], 1), torch.cat([w for _, w in v])) for k, v in out.items()}


def max_rel_diff(batched, looped) -> float:
    worst = 0.0
    for key, (idx_l, w_l) in looped.items():
        e = batched.pairs[key]
        a = {tuple(c): w for c, w in zip(e.index.T.tolist(), e.weight.tolist())}
        b = {tuple(c): w for c, w in zip(idx_l.T.tolist(), w_l.tolist())}
        if set(a) != set(b):
            return float("inf")
        scale = max(abs(v) for v in b.values())
        worst = max(worst, max(abs(a[k] - b[k]) for k in b) / scale)
    return worst


def _fixture(width: int, pairs: int, seq: int, l0: float, folder: str | None = None, held: bool = False):
    """The model, prompts, metric and dictionaries; with ``folder``, the dictionaries saved there
    before (phase ``save``) and kept on disk, at most 4 in memory, or with ``held`` all loaded
    from there, as a user's code loads them."""
    model = pythia_shaped()
    clean, patch, metric = prompt_pairs(pairs, seq)
    sites = model.all_sites()
    if folder is not None:
        from attribution.dictionaries.sets import LazyDictionarySet

        lazy = LazyDictionarySet({s.name: Path(folder) / s.name for s in sites})
        return model, clean, patch, metric, {n: lazy[n] for n in lazy} if held else lazy
    acts = tracing.run(model, model.tokenize(clean), sites, None, torch.arange(len(clean))).acts
    dicts = {s.name: calibrate_sparsity(random_sae(s.d, width, seed=i), acts[s.name], l0)
             for i, s in enumerate(sites)}
    return model, clean, patch, metric, dicts


def peak_run(width: int, pairs: int, seq: int, l0: float, threshold: float | None, phase: str,
             mmap: bool = False, folder: str | None = None, held: bool = False) -> dict:
    """One of the fresh processes a width gets (so that none sees another's memory):

    - ``threshold``: the node threshold that selects about 3000 downstream nodes, chosen on
      attribution patching (cheap);
    - ``estimate``: :func:`attribution.estimate.estimate` at that threshold;
    - ``run``: IG nodes and default edges, timed, with the process's peak resident set;
      ``mmap``: after :func:`attribution.memory.mmap_large_allocations`, as the CLI runs;
    - ``save``: the dictionaries saved into ``folder``; ``run`` (and ``estimate``) with
      ``folder`` then keep them on disk (:class:`~attribution.dictionaries.sets.LazyDictionarySet`),
      or with ``held`` load them all from there first.
    """
    from attribution.estimate import dictionaries_mb, estimate

    if phase == "save":
        from attribution.dictionaries.formats import save_dictionary

        *_, dicts = _fixture(width, pairs, seq, l0)
        for name, sae in dicts.items():
            save_dictionary(sae, Path(folder) / name)
        return {"saved": folder}
    model, clean, patch, metric, dicts = _fixture(width, pairs, seq, l0, folder, held)
    kw = dict(progress=False, metric_positions="last")
    if phase == "threshold":
        atp = node_effects(model, dicts, clean, patch, metric, method="attrib", **kw)
        every = torch.cat([torch.cat([atp.features[s].flatten(), atp.errors[s].flatten()]) for s in atp.features])
        return {"node_threshold": every.abs().topk(3000).values[-1].item()}
    if phase == "estimate":
        est = estimate(model, dicts, clean, patch, metric, method="ig", steps=10, node_threshold=threshold,
                       metric_positions="last")
        return {"estimate": est.to_dict()}
    if mmap:
        from attribution.memory import mmap_large_allocations

        mmap_large_allocations()
    rss_held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    ne = node_effects(model, dicts, clean, patch, metric, method="ig", steps=10, **kw)
    t_nodes = time.perf_counter() - t0
    rss_nodes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    ee = edge_effects(model, dicts, clean, ne, metric, node_threshold=threshold, progress=False)
    t_edges = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # What the results add up to, so that runs with the dictionaries held or on disk can be compared.
    checksum = sum(ne.features[s].abs().sum().item() + ne.errors[s].abs().sum().item() for s in ne.features)
    checksum_edges = sum(e.weight.abs().sum().item() for e in ee.pairs.values())
    return {
        "width": width, "pairs": pairs, "node_threshold": threshold, "mmap_large_allocations": mmap,
        "dictionaries_on_disk": folder is not None and not held, "dictionaries_from_files": folder is not None,
        "dictionary_loads": getattr(dicts, "loads", None),
        "node_effects_abs_sum": checksum, "edge_weights_abs_sum": checksum_edges,
        "dictionary_weights_mb": round(dictionaries_mb(dicts), 1),
        "nodes_s": round(t_nodes, 3), "edges_s": round(t_edges, 3),
        "peak_rss_mb_before_run": round(rss_held, 1),
        "peak_rss_mb_after_nodes": round(rss_nodes, 1), "peak_rss_mb": round(peak, 1),
        "downstream_nodes": sum(ee.n_selected.values()), "backward_slots": ee.n_backward_slots,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def ig_identity(steps: int = 16) -> dict:
    """The IG-edge identity on tiny float64 models of every family (see the module docstring)."""
    import pytest

    from tests.conftest import FAMILIES, keep_float64
    from tests.test_ig_edges import edge_sums, path_contributions, setup

    out = {}
    with torch.enable_grad(), pytest.MonkeyPatch.context() as mp:
        keep_float64(mp)
        for family in FAMILIES:
            import tests.test_ig_edges as t

            t.STEPS = steps
            model, clean, dicts, metric, sites, acts_c, delta, ne = setup(family)
            totals = edge_sums(model, dicts, clean, ne, metric, sites)
            alphas = (torch.arange(steps, dtype=torch.float64) + 0.5) / steps
            truth = path_contributions(model, clean, dicts, sites, acts_c, delta, metric, alphas, slopes_h=1e-6)
            out[family] = max(((totals[k] - v).abs().max() / v.abs().max()).item() for k, v in truth.items())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the default output)")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--seq", type=int, default=7)
    parser.add_argument("--l0", type=float, default=30.0)
    parser.add_argument("--node-threshold", type=float, default=None,
                        help="downstream selection threshold (default: chosen for ~3000 nodes)")
    parser.add_argument("--skip-loop", action="store_true", help="skip the per-node baseline")
    parser.add_argument("--scale", action="store_true", help="add the research-scale fields (issue 16)")
    parser.add_argument("--scale-widths", type=int, nargs="*", default=[4096, 16384, 32768])
    parser.add_argument("--scale-only", action="store_true", help="print only the --scale fields")
    parser.add_argument("--peak-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peak-phase", choices=["threshold", "estimate", "run", "save"], default="run",
                        help=argparse.SUPPRESS)
    parser.add_argument("--mmap", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--held", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.peak_run:
        print(json.dumps(peak_run(args.width, args.pairs, args.seq, args.l0, args.node_threshold, args.peak_phase,
                                  args.mmap, args.folder, args.held)))
        return
    if args.scale_only:
        print(json.dumps(scale_fields(args), indent=2))
        return

    model = pythia_shaped()
    clean, patch, metric = prompt_pairs(args.pairs, args.seq)
    sites = model.all_sites()
    acts = tracing.run(model, model.tokenize(clean), sites, None, torch.arange(len(clean))).acts
    dicts = {s.name: calibrate_sparsity(random_sae(s.d, args.width, seed=i), acts[s.name], args.l0)
             for i, s in enumerate(sites)}

    kw = dict(progress=False, metric_positions="last")
    node_effects(model, dicts, clean, patch, metric, method="attrib", **kw)  # warm-up
    # The floor reads the same logits the metric needs: the last position only.
    t_floor, _ = timed(lambda: floor_attribution(model, dicts, sites, clean, patch, metric), repeat=3)
    t_attrib, atp = timed(lambda: node_effects(model, dicts, clean, patch, metric, method="attrib", **kw), repeat=3)
    t_ig, ig = timed(lambda: node_effects(model, dicts, clean, patch, metric, method="ig", steps=10, **kw))

    threshold = args.node_threshold
    if threshold is None:  # the threshold that selects about 3000 downstream nodes
        all_eff = torch.cat([torch.cat([ig.features[s].flatten(), ig.errors[s].flatten()]) for s in ig.features])
        threshold = all_eff.abs().topk(3000).values[-1].item()
    selected = select_downstream(ig, threshold)
    n_selected = int(sum(m.sum() for m in selected.values()))
    t_edges, edges = timed(lambda: edge_effects(model, dicts, clean, ig, metric, downstream=selected,
                                                progress=False))
    n_edges = sum(e.weight.numel() for e in edges.pairs.values())
    err_edges = sum(int((e.index[4] == e.up_width).sum()) for e in edges.pairs.values())

    result = {
        "setup": {"model": "random GPT-NeoX, Pythia-70M shape", "sites": len(sites), "width": args.width,
                  "prompt_pairs": args.pairs, "seq_len": args.seq, "target_l0": args.l0,
                  "threads": torch.get_num_threads()},
        "floor_s": round(t_floor, 3),
        "attrib_s": round(t_attrib, 3),
        "attrib_over_floor": round(t_attrib / t_floor, 3),
        "ig_s": round(t_ig, 3),
        "edges_s": round(t_edges, 3),
        "nodes_plus_edges_s": round(t_ig + t_edges, 3),
        "downstream_nodes": n_selected,
        "backward_slots": edges.n_backward_slots,
        "edges": n_edges,
        "edges_out_of_error_nodes": err_edges,
    }
    if not args.skip_loop:
        # The reference's way: one backward per node, through the whole model below it.
        with torch.enable_grad():
            # The per-node passes read the leaves of the sites adjacent to the downstream one.
            t_loop, looped = timed(lambda: loop_edges(model, dicts, clean, ig, metric, selected, traverse=True,
                                                      pairs=set(edges.pairs)))
            t_seg, seg = timed(lambda: loop_edges(model, dicts, clean, ig, metric, selected, traverse=False))
        result["edges_loop_s"] = round(t_loop, 3)
        result["edges_speedup_vs_loop"] = round(t_loop / t_edges, 2)
        result["edges_max_rel_diff"] = max_rel_diff(edges, looped)
        # A stricter baseline than the reference: one backward per node, stopped at the adjacent sites.
        result["edges_segment_loop_s"] = round(t_seg, 3)
        result["edges_speedup_vs_segment_loop"] = round(t_seg / t_edges, 2)
        result["edges_segment_max_rel_diff"] = max_rel_diff(edges, seg)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.scale:
        result |= scale_fields(args)
    print(json.dumps(result, indent=2))


def scale_fields(args) -> dict:
    """The ``--scale`` fields: the IG-edge identity, then one fresh process per width."""
    import os
    import subprocess
    import tempfile

    identity = ig_identity()
    out: dict = {"ig_edges_identity_max_rel_err": max(identity.values()), "ig_edges_identity_by_family": identity}
    errs = []
    env = dict(os.environ)
    for width in args.scale_widths:
        base = [sys.executable, __file__, "--peak-run", "--width", str(width), "--pairs", str(args.pairs),
                "--seq", str(args.seq), "--l0", str(args.l0)]

        def fresh(phase: str, threshold: float | None, mmap: bool = False, folder: str | None = None,
                  held: bool = False, base=base) -> dict:
            cmd = base + ["--peak-phase", phase] + ([] if threshold is None else ["--node-threshold", str(threshold)])
            cmd += (["--mmap"] if mmap else []) + ([] if folder is None else ["--folder", folder])
            cmd += ["--held"] if held else []
            return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)

        threshold = args.node_threshold
        if threshold is None:
            threshold = fresh("threshold", None)["node_threshold"]
        est = fresh("estimate", threshold)["estimate"]
        run = fresh("run", threshold)
        run_mmap = fresh("run", threshold, mmap=True)
        with tempfile.TemporaryDirectory(prefix=f"sfc-bench-F{width}-") as folder:
            fresh("save", None, folder=folder)
            est_lazy = fresh("estimate", threshold, folder=folder)["estimate"]
            run_lazy = fresh("run", threshold, folder=folder)
            run_files = fresh("run", threshold, folder=folder, held=True)
        out[f"peak_rss_mb_F{width}_from_files"] = run_files["peak_rss_mb"]
        out[f"run_F{width}_from_files"] = run_files
        run_lazy["estimate"] = est_lazy
        run_lazy["estimate_rel_err_peak_mb"] = round(
            abs(est_lazy["peak_mb"] - run_lazy["peak_rss_mb"]) / run_lazy["peak_rss_mb"], 3)
        run_lazy["results_rel_diff_vs_held"] = max(
            abs(run_lazy[k] - run[k]) / abs(run[k]) for k in ("node_effects_abs_sum", "edge_weights_abs_sum"))
        out[f"peak_rss_mb_F{width}_lazy"] = run_lazy["peak_rss_mb"]
        out[f"run_F{width}_lazy"] = run_lazy
        run["estimate"] = est
        run["estimate_rel_err"] = {
            "nodes_s": round(abs(est["nodes_s"] - run["nodes_s"]) / run["nodes_s"], 3),
            "edges_s": round(abs(est["edges_s"] - run["edges_s"]) / run["edges_s"], 3),
            "peak_mb": round(abs(est["peak_mb"] - run["peak_rss_mb"]) / run["peak_rss_mb"], 3),
        }
        out[f"peak_rss_mb_F{width}"] = run["peak_rss_mb"]
        out[f"peak_rss_mb_F{width}_mmap"] = run_mmap["peak_rss_mb"]
        out[f"run_F{width}_mmap"] = run_mmap
        out[f"dictionary_weights_mb_F{width}"] = run["dictionary_weights_mb"]
        out[f"run_F{width}"] = run
        errs += list(run["estimate_rel_err"].values()) + [run_lazy["estimate_rel_err_peak_mb"]]
    if errs:
        out["estimate_max_rel_err"] = max(errs)
    out["loadavg"] = open("/proc/loadavg").read().split()[:3]
    return out


if __name__ == "__main__":
    main()
