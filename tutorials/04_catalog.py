# %% [markdown]
# # Tutorial 4: a catalog of behaviours, found without labels
#
# Tutorials 2 and 3 start from a task a person designed. The paper's third
# result (§5, "unsupervised circuit discovery at scale") needs no task: it
# finds contexts where the model predicts the next token in the same way,
# clusters them (the *quanta* of Michaud et al. 2023), and builds a sparse
# feature circuit for every cluster. This tutorial runs that pipeline on
# SmolLM2-135M:
#
# 1. **samples**: (context, next token) pairs from the bundled corpus that the
#    model predicts with a loss under 0.1 bits;
# 2. **representations**: the gradient of each sample's loss with respect to the
#    dictionary features, summed over positions;
# 3. **clusters**: spectral clustering of their cosine similarities;
# 4. **circuits**: one per cluster (attribution patching, zero ablation, `sum`
#    aggregation so that one node is one feature, the top nodes and their edges);
# 5. **evaluation**: each circuit's faithfulness on held-out members of its own
#    cluster and on members of other clusters;
# 6. the **catalog**: `catalog.json` and an offline `index.html`.
#
# The command line does it all in one go, resumably, optionally on Ray:
# `sfc catalog build --model smollm2-135m --samples 2000 --clusters 50 --out runs/catalog`.
#
# With `SFC_TUTORIAL_QUICK=1` (what the test suite uses) the tutorial trains two
# small dictionaries instead of loading the cached set and uses 40 samples and
# 4 clusters, so its numbers are only a smoke test.

# %%
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import sfc
from attribution.dictionaries.corpus import load_corpus
from circuits.quanta import affinity_from_blocks
from sfc.catalog import CatalogConfig, build_catalog, load_samples

QUICK = os.environ.get("SFC_TUTORIAL_QUICK") == "1"
OUT = Path(tempfile.mkdtemp(prefix="sfc-tutorial-04-"))
torch.set_num_threads(1 if QUICK else max(1, torch.get_num_threads()))
start = time.perf_counter()

# %% [markdown]
# ## 1. The model and its dictionaries
#
# As in tutorial 2: the cached TopK SAEs at every third residual site, or, in
# quick mode, two small ones trained on the spot into a folder of our own.

# %%
model = sfc.load_model("smollm2-135m")
if QUICK:
    sfc.build_dictionaries(model, model.sites(["resid_12", "resid_21"]), sfc.TrainConfig(width=512, k=16, epochs=2),
                           n_tokens=4096, root=OUT / "dictionaries")
    dictionaries = sfc.load_dictionaries(model, OUT / "dictionaries")
else:
    dictionaries = sfc.load_dictionaries(model)
print(f"{len(dictionaries)} dictionaries: {', '.join(dictionaries)}")

# %% [markdown]
# ## 2. Build the catalog
#
# `CatalogConfig` holds every option (its docstring lists them). The ones that
# matter most:
#
# - `loss_threshold` (bits): which predictions count as behaviours;
# - `max_context`: contexts are cut to this many tokens;
# - `representation`: `gradient`, `activation` or `both`;
# - `top_k`: nodes per circuit; `n_train` / `n_eval` / `n_other`: how many members
#   a circuit is built on, and evaluated on (own held-out and other clusters').
#
# `build_catalog` takes a *loader*, a function returning `(model, dictionaries)`;
# in process we hand it what we already loaded. (For Ray it must be picklable:
# `sfc.catalog.NamedLoader("smollm2-135m")` is, and each Ray worker calls it once.)
# Everything goes to `OUT/catalog` as it is made, so an interrupted call resumes.

# %%
cfg = CatalogConfig(samples=40 if QUICK else 400, clusters=4 if QUICK else 12, max_context=24,
                    top_k=16 if QUICK else 32, n_train=8, n_eval=8, n_other=8, shard_rows=64)
texts = load_corpus("heldout")
result = build_catalog(OUT / "catalog", lambda: (model, dictionaries), cfg, texts=texts,
                       settings={"model": model.name})
print(json.dumps(result.summary, indent=1))

# %% [markdown]
# ## 3. What the clusters are
#
# `catalog.json` lists each cluster's members, faithfulness and top features;
# each cluster's folder holds its circuit (`circuit.json`, loadable with
# `sfc.Circuit.load`) and its page in the viewer (`circuit.html`).

# %%
catalog = json.loads((OUT / "catalog" / "catalog.json").read_text())
for c in catalog["clusters"]:
    ex = c["examples"][0]
    own, other = c["faithfulness_own"], c["faithfulness_other"]
    print(f"cluster {c['id']}: {c['size']:3d} samples, faithfulness own "
          f"{'n/a' if own is None else f'{own:.2f}'}, other {'n/a' if other is None else f'{other:.2f}'}; "
          f"e.g. {''.join(ex['context'])!r} -> {ex['answer']!r}")
    print(f"    top features: {', '.join(f['id'] for f in c['top_features'][:4])}")

# %% [markdown]
# ## 4. Do the clusters mean something?
#
# A quick check of the clustering itself: the mean affinity between samples of
# the same cluster against that between samples of different clusters (the
# affinity is `1 - arccos(cos) / π` of the representations, `reps/*.npy`).

# %%
reps = sorted((OUT / "catalog" / "reps").glob("*.npy"))
aff = affinity_from_blocks(len(reps), lambda i: np.load(reps[i]))
labels = np.array(json.loads((OUT / "catalog" / "clusters.json").read_text())["labels"])
same = labels[:, None] == labels[None, :]
off_diagonal = ~np.eye(len(labels), dtype=bool)
print(f"mean affinity within clusters {aff[same & off_diagonal].mean():.3f}, between {aff[~same].mean():.3f}")
samples = load_samples(OUT / "catalog")
print(f"{len(samples)} samples, losses {min(s.loss_bits for s in samples):.4f} to "
      f"{max(s.loss_bits for s in samples):.4f} bits")

# %% [markdown]
# ## 5. Browse it
#
# `index.html` lists the clusters (search by token or feature, sort by size or
# faithfulness) and links to every circuit's page; `faithfulness.html` plots own
# against other-cluster faithfulness, one point per cluster. From the shell:
# `sfc catalog view OUT/catalog`.

# %%
print(f"open {OUT / 'catalog' / 'index.html'}")
print(f"done in {time.perf_counter() - start:.0f} s; everything is under {OUT}")
