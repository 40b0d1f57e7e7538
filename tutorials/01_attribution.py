# %% [markdown]
# # Tutorial 1: node and edge attribution on a tiny model
#
# This tutorial walks through the attribution half of *Sparse Feature Circuits*
# (Marks et al., ICLR 2025) end to end, on a model small enough to run on a
# laptop CPU in a few seconds:
#
# 1. build a model and wrap it for attribution;
# 2. list its *sites* (the hooked activations: `embed`, `attn_L`, `mlp_L`, `resid_L`);
# 3. put a *dictionary* (an SAE) at every site;
# 4. define a *metric* on the logits;
# 5. compute the *effect* of every *node* (feature or error node) with attribution
#    patching and with integrated gradients, and check IG's completeness;
# 6. compute *edge weights* between nodes at adjacent sites, including edges out of
#    error nodes, and aggregate them over examples.
#
# The model and the dictionaries are random, so the numbers mean nothing about
# language; the code is exactly what you run on a real model with real SAEs.
#
# Run it as a script (`python tutorials/01_attribution.py`) or open it as a
# notebook (VS Code, Jupyter with jupytext). `SFC_TUTORIAL_QUICK=1` skips the one
# optional slower cell.

# %%
import os
import time

import torch
import transformers as tf

import sfc
from sfc import tracing

QUICK = os.environ.get("SFC_TUTORIAL_QUICK") == "1"
torch.manual_seed(0)
torch.set_num_threads(1)  # a model this small runs fastest on one thread
start = time.perf_counter()

# %% [markdown]
# ## 1. A tiny Llama, built in code
#
# Any Hugging Face causal LM of a supported family (`gpt2`, `gpt_neox`, `llama`,
# `qwen2`, `gemma2`) works. Here we build a 3-layer Llama with `d_model = 64`
# from a config, with a toy word-level vocabulary so prompts stay readable.
# We use float64 so the checks below are not blurred by rounding.

# %%
VOCAB = ("<pad> the a cat cats dog dogs near behind with is are runs run sleeps sleep "
         "big small old . , and").split()
ID = {w: i for i, w in enumerate(VOCAB)}


def encode(sentences: list[str]) -> torch.Tensor:
    """Token ids ``[b, s]`` for space-separated sentences of equal length."""
    return torch.tensor([[ID[w] for w in s.split()] for s in sentences])


config = tf.LlamaConfig(
    vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
config._attn_implementation = "eager"
hf_model = tf.AutoModelForCausalLM.from_config(config).to(torch.float64)
model = sfc.SFCModel(hf_model, name="tiny-llama")
print(model.name, "with", model.config.num_hidden_layers, "layers, d_model =", model.config.hidden_size)

# %% [markdown]
# A real model is one line: `model = load_model("EleutherAI/pythia-70m-deduped")`
# (`sfc.SFCModel`), or `SFCModel(hf_model, tokenizer)` for a model you
# already loaded. Then prompts can be lists of strings; here, without a tokenizer,
# we pass token-id tensors.
#
# ## 2. Sites
#
# A *site* is one hooked activation. Sites come in forward order: the embedding,
# then per layer the attention output, the MLP output and the residual stream
# after the block (SPEC §1.3). Each names the HF module it reads.

# %%
for site in model.all_sites()[:5]:
    print(f"{site.name:8s} {site.hook:6s} of {site.module:28s} d={site.d}")
print("...", len(model.all_sites()), "sites in all")

# Select by name or by kind and layer; unknown names raise an error listing what exists.
print([s.name for s in model.sites(["resid_2", "mlp_0"])])
print([s.name for s in model.sites(kinds=("resid",))])

# %% [markdown]
# Gemma Scope's attention SAEs read the *input* of the attention output projection
# (the concatenated heads) instead of the attention output; ask for those sites with
# `model.sites(..., attn="o_proj_input")`.
#
# ## 3. Dictionaries
#
# A *dictionary* encodes a site's activation `x` into features `f` and decodes
# them back: `x = decode(f) + e`, where `e` is the SAE *error*. Here we make a
# random SAE per site and calibrate its encoder bias so that about 8 features
# fire per token on the model's own activations. Calibration needs many more tokens
# than `width / target_l0` (each feature fires on at least one calibration token),
# so we calibrate on random token sequences.

# %%
# Clean and patch prompts differ in one token (the subject's number) and have equal lengths.
clean = encode(["the cat near the dogs", "a dog behind the cats", "the old dog near a"])
patch = encode(["the cats near the dogs", "a dogs behind the cats", "the old dogs near a"])
rows = torch.arange(len(clean))
sites = model.all_sites()

calibration = torch.randint(1, len(VOCAB), (64, 8))
cal_acts = tracing.run(model, model.tokenize(calibration), sites, None, torch.arange(64)).acts
dictionaries = {}
for i, site in enumerate(sites):
    sae = sfc.random_sae(site.d, 256, "relu", seed=i, dtype=torch.float64)
    dictionaries[site.name] = sfc.calibrate_sparsity(sae, cal_acts[site.name], target_l0=8)

acts = tracing.run(model, model.tokenize(clean), sites, None, rows).acts  # clean activations per site
sae = dictionaries["resid_1"]
f = sae.encode(acts["resid_1"])
print(sae, "| mean L0 on the clean prompts:", (f > 0).sum(-1).double().mean().item())
print("relative error |e| / |x|:", (sae.error(acts["resid_1"]).norm() / acts["resid_1"].norm()).item())

# %% [markdown]
# Random SAEs reconstruct badly (the error is most of the activation), so below the
# error nodes carry most of the effects. With trained SAEs the features do.

# %% [markdown]
# ### Loading real dictionaries
#
# `load_dictionary(folder)` detects the layout (no file is ever unpickled):
#
# ```python
# from attribution.dictionaries.formats import load_dictionary
#
# # dictionary_learning (the paper's Pythia SAEs): ae.pt + config.json
# root = "dictionaries/pythia-70m-deduped"
# dictionaries = {"embed": load_dictionary(f"{root}/embed/10_32768")}
# for L in range(6):
#     dictionaries[f"attn_{L}"] = load_dictionary(f"{root}/attn_out_layer{L}/10_32768")
#     dictionaries[f"mlp_{L}"] = load_dictionary(f"{root}/mlp_out_layer{L}/10_32768")
#     dictionaries[f"resid_{L}"] = load_dictionary(f"{root}/resid_out_layer{L}/10_32768")
#
# # SAELens export (cfg.json + sae_weights.safetensors), or Gemma Scope params.npz
# sae = load_dictionary("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz")
#
# # Neurons instead of features (the paper's baseline): the identity dictionary
# neurons = load_dictionary("identity:512")
# ```
#
# `save_dictionary(sae, folder)` writes the dictionary_learning layout.
#
# ## 4. A metric
#
# A metric maps the logits `[n, s, vocab]` of a run to one number per row, `[n]`.
# `rows[i]` says which example row `i` belongs to (IG runs each example several
# times), so per-example data such as answer tokens is indexed with `rows`.
# Following the paper, we measure the *patch* behaviour: logit of the patch answer
# minus logit of the clean answer, at the last position. A positive effect then
# means a node carries the clean behaviour.

# %%
clean_answer = torch.tensor([ID["is"], ID["is"], ID["runs"]])
patch_answer = torch.tensor([ID["are"], ID["are"], ID["run"]])


def metric(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1]
    return last.gather(1, patch_answer[rows, None])[:, 0] - last.gather(1, clean_answer[rows, None])[:, 0]


# %% [markdown]
# ## 5. Node effects
#
# `node_effects` estimates, for every feature and error node at every site and
# position, the indirect effect `m(patched) - m(clean)` of patching that node alone
# from its clean to its patch value. `method="attrib"` is attribution patching (a
# first-order estimate from one gradient, Eq. 3); `method="ig"` is integrated
# gradients along the straight line from clean to patch (Eq. 4).

# %%
atp = sfc.node_effects(model, dictionaries, clean, patch, metric, method="attrib", progress=False)
ig = sfc.node_effects(model, dictionaries, clean, patch, metric, method="ig", steps=10, progress=False)
print("features at resid_1:", tuple(ig.features["resid_1"].shape), "(example, position, feature)")
print("error nodes at resid_1:", tuple(ig.errors["resid_1"].shape), "(example, position)")
print("total effect m(patch) - m(clean) per example:", ig.total_effect)

# %% [markdown]
# ### IG completeness
#
# Patching *every* node of a site at once is patching the site's activation, so a
# site's effects should sum to `m(clean with that site patched) - m(clean)`. For
# IG this holds up to the Riemann-sum error of its `steps` points; attribution
# patching is only a linear estimate. The residual stream after a block carries
# everything downstream, so patching `resid_L` at every position is the full patch:
# its effects sum to the total effect. For other sites we patch the site by hand,
# writing the patch activation in its place with `tracing.run(..., replace=...)`.

# %%
patch_acts = tracing.run(model, model.tokenize(patch), sites, None, rows).acts


def site_patched_effect(name: str) -> torch.Tensor:
    """m(clean run with site ``name`` set to its patch activation) - m(clean), per example."""
    patched = tracing.run(model, model.tokenize(clean), sites, metric, rows, replace={name: patch_acts[name]})
    return patched.metric - ig.metric_clean


print(f"{'site':8s} {'patched':>10s} {'IG sum':>10s} {'attrib sum':>10s}   (example 0)")
for name in ["embed", "attn_0", "mlp_1", "resid_1", "resid_2"]:
    truth = site_patched_effect(name)
    print(f"{name:8s} {truth[0].item():10.4f} {ig.site_total(name)[0].item():10.4f} "
          f"{atp.site_total(name)[0].item():10.4f}")
print("total effect:", ig.total_effect[0].item())

# %% [markdown]
# More IG steps close the remaining gap; `ig_points="midpoint"` (midpoints of the
# `steps` intervals) converges faster than the paper's endpoints. (Skipped with
# `SFC_TUTORIAL_QUICK=1`.)

# %%
if not QUICK:
    truth = site_patched_effect("resid_1")
    for points in ("paper", "midpoint"):
        for steps in (4, 16, 64):
            est = sfc.node_effects(model, dictionaries, clean, patch, metric, sites=["resid_1"], method="ig",
                               steps=steps, ig_points=points, progress=False)
            gap = (est.site_total("resid_1") - truth).abs().max().item()
            print(f"{points:8s} IG, {steps:2d} steps: largest completeness gap at resid_1 {gap:.1e}")

# %% [markdown]
# ### The top nodes
#
# Effects are per example and position. `aggregate("none")` averages over examples
# (keeping positions, as for templatic data where positions align);
# `aggregate("sum")` sums over positions first.

# %%
feats, errs = ig.aggregate("none")
nodes = []
for name in feats:
    for pos, j in torch.cartesian_prod(torch.arange(feats[name].shape[0]), torch.arange(feats[name].shape[1])):
        nodes.append((feats[name][pos, j].item(), f"{name}/f{j.item()}@{pos.item()}"))
    nodes += [(errs[name][pos].item(), f"{name}/err@{pos}") for pos in range(errs[name].shape[0])]
nodes.sort(key=lambda t: -abs(t[0]))
for value, node in nodes[:10]:
    print(f"{node:22s} {value:+.4f}")

# %% [markdown]
# ## 6. Edges
#
# `edge_effects` computes Eq. 5: for every *selected* downstream node (|effect| above
# `node_threshold` at some example and position) the weight of the edge from every
# node at the sites directly upstream whose state changes. It needs gradients, so
# the node effects must come from `attrib` or `ig`. The result maps
# `(upstream_site, downstream_site)` to sparse edges whose `index` rows are
# `(example, down_position, down_node, up_position, up_node)`; a node index equal
# to the dictionary's width is the site's error node.

# %%
threshold = 0.2 * max(abs(v) for v, _ in nodes)
edges = sfc.edge_effects(model, dictionaries, clean, ig, metric, node_threshold=threshold, progress=False)
print("downstream nodes with incoming edges per site:", edges.n_selected)


def node_label(site: str, node: int, pos: int, width: int) -> str:
    return f"{site}/{'err' if node == width else f'f{node}'}@{pos}"


all_edges = []
for (up, down), pair in edges.pairs.items():
    for (ex, d_pos, d_node, u_pos, u_node), w in zip(pair.index.T.tolist(), pair.weight.tolist()):
        all_edges.append((w, ex, node_label(up, u_node, u_pos, pair.up_width),
                          node_label(down, d_node, d_pos, pair.down_width), u_node == pair.up_width))
all_edges.sort(key=lambda t: -abs(t[0]))
print(f"{len(all_edges)} edges; the strongest:")
for w, ex, u, d, _ in all_edges[:8]:
    print(f"  example {ex}: {u:18s} -> {d:18s} {w:+.4f}")

# %% [markdown]
# Error nodes are nodes like any other: they have edges out of them (and into
# them). Leaving them out would hide whatever the SAE fails to reconstruct.

# %%
from_errors = [e for e in all_edges if e[4]]
print(f"{len(from_errors)} edges out of error nodes; the strongest:")
for w, ex, u, d, _ in from_errors[:5]:
    print(f"  example {ex}: {u:18s} -> {d:18s} {w:+.4f}")

# %% [markdown]
# Edges into the metric itself are in `edges.to_metric[site]`
# (`(features [b, s, F], errors [b, s])`). They use the clean gradient with every
# other site frozen, so for the last residual site they equal its
# attribution-patching effects (not its IG effects, which average the gradient
# along the path). To aggregate edges over examples, `SiteEdges.aggregate` averages
# over examples, keeping positions (`"none"`) or summing over them (`"sum"`, index
# rows `(down_node, up_node)`).

# %%
last = sites[-1].name
feat_to_metric, err_to_metric = edges.to_metric[last]
gap = max((feat_to_metric - atp.features[last]).abs().max(), (err_to_metric - atp.errors[last]).abs().max())
print(f"{last} -> metric vs. its attribution-patching effects: largest difference {gap.item():.1e}")

(up, down), pair = max(edges.pairs.items(), key=lambda kv: kv[1].weight.abs().sum().item())
index, weight = pair.aggregate("sum", edges.n_examples)
top = weight.abs().argsort(descending=True)[:5]
print(f"strongest aggregated edges {up} -> {down}:")
for i in top.tolist():
    d_node, u_node = index[:, i].tolist()
    u = "err" if u_node == pair.up_width else f"f{u_node}"
    d = "err" if d_node == pair.down_width else f"f{d_node}"
    print(f"  {up}/{u:5s} -> {down}/{d:5s} {weight[i].item():+.4f}")

# %% [markdown]
# ## Big models: sharding, and what about NDIF?
#
# **Sharding a local model.** Load a model that does not fit on one GPU with
# `device_map="auto"`:
#
# ```python
# hf = AutoModelForCausalLM.from_pretrained("google/gemma-2-2b", dtype=torch.bfloat16,
#                                           device_map="auto", attn_implementation="eager")
# model = sfc.SFCModel(hf, AutoTokenizer.from_pretrained("google/gemma-2-2b"))
# ```
#
# Each site's activations, gradients and effects live on the device of the module
# that produced them, so put each site's dictionary on that device too, e.g.
# `dictionaries[s.name].to(get_module(model.hf, s.module).weight.device)` for a
# module with weights, or move them after reading one activation.
#
# **Remote execution (NDIF).** Every forward pass goes through nnsight's standard
# `model.trace(...)` API, but the gradients (node effects, IG, edges) are taken with
# `torch.autograd` *after* the trace returns, on tensors that must live in this
# Python process. That needs local execution: `remote=True` is not supported by
# this code path, and remote execution on NDIF is not tested here, because the
# machines this project is developed and tested on cannot reach NDIF.

# %%
print(f"tutorial ran in {time.perf_counter() - start:.1f} s")
