# %% [markdown]
# # Tutorial 3: SHIFT, removing a classifier's reliance on gender
#
# The second use of sparse feature circuits in Marks et al. (ICLR 2025, §4) is
# **SHIFT** (Spurious Human-interpretable Feature Trimming). A classifier is
# trained on data where the label (profession) and a spurious attribute (gender)
# always agree, so it learns gender. SHIFT
#
# 1. attributes the classifier's output to SAE features (IG node effects);
# 2. shows the top features to a person, who flags the ones about gender;
# 3. zero-ablates the flagged features (keeping the SAE errors) and retrains the
#    classifier on the edited model's activations.
#
# The command line does the same in two steps:
#
#     sfc shift rank --model smollm2-135m --out runs/shift     # writes runs/shift/rank.html
#     # open rank.html, tick "flag" on the gender features, click download -> flags.json
#     sfc shift run --model smollm2-135m --flags flags.json --out runs/shift/run
#
# and `sfc shift run --flags auto` replaces the person by an automatic *proxy*
# judge, for unattended runs.
#
# With `SFC_TUTORIAL_QUICK=1` (what the test suite uses) the tutorial builds two
# tiny dictionaries instead of loading the cached set, and uses a handful of
# bios and IG steps: its numbers are then only a smoke test. To use your own
# flags instead of the proxy judge, set `SFC_SHIFT_FLAGS=path/to/flags.json`.

# %%
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import sfc

QUICK = os.environ.get("SFC_TUTORIAL_QUICK") == "1"
OUT = Path(tempfile.mkdtemp(prefix="sfc-tutorial-03-"))
if QUICK:
    torch.set_num_threads(1)
start = time.perf_counter()

# %% [markdown]
# ## 1. The model and its dictionaries
#
# The probe reads the residual stream after block 6 (`resid_6`, the default for
# SmolLM2); SHIFT scores every dictionary site up to there: `resid_0`, `resid_3`
# and `resid_6`. (Why layer 6: see `docs/shift.md`.) The quick mode the tests
# run uses block 3 and two small dictionaries trained on the spot.

# %%
model = sfc.load_model("smollm2-135m")
LAYER = 3 if QUICK else 6
if QUICK:
    dict_root = OUT / "dictionaries"
    sfc.build_dictionaries(model, model.sites(["resid_0", "resid_3"]), sfc.TrainConfig(width=512, k=16, epochs=2),
                           n_tokens=4096, root=dict_root, log=lambda msg: None)
    dictionaries = sfc.load_dictionaries(model, dict_root)
else:
    dictionaries = sfc.load_dictionaries(model)
print({s: d.width for s, d in dictionaries.items()})

# %% [markdown]
# ## 2. A biased testbed
#
# Bias in Bios cannot be downloaded here, so the toolkit writes seeded synthetic
# biographies of professors (label 0) and nurses (label 1). Gender is in the
# first name and in a pronoun in every sentence; the profession is in one
# sentence about the work. Train and test bios use different names, surnames
# and sentences. The **ambiguous** split has male professors and female nurses
# only; the **balanced** split has all four groups.
#
# (Real data: `sfc.load_bias_in_bios("train.parquet")`, or any table with
# `sfc.load_table(path, text=..., label=..., spurious=...)`, then `sfc.make_splits`.)

# %%
config = sfc.ShiftConfig(
    layer=LAYER, n_train=8 if QUICK else 150, n_test=8 if QUICK else 100, n_score=4 if QUICK else 100,
    steps=2 if QUICK else 10, candidates=30 if QUICK else 1000,
)
splits = sfc.synthetic_splits(config.n_train, config.n_test, config.seed)
for name, counts in splits.counts().items():
    print(f"{name:16s} {counts}")
print(splits.ambiguous_train.texts[0])

# %% [markdown]
# ## 3. The probe, and the ranking
#
# `prepare_shift` pools the residual stream over each bio's tokens, trains the
# probe on the ambiguous split (BCE, AdamW, one epoch) and the oracle on the
# balanced split, then scores every feature up to the probe layer by its IG
# effect on the probe's metric (its logit, signed so that positive = correct).

# %%
setup = sfc.prepare_shift(config, model=model, dictionaries=dictionaries, splits=splits)
print(f"{len(setup.ranking)} features have a positive effect; the top five:")
for r in setup.ranking[:5]:
    print(f"  {r.key:14s} {r.effect:+.4f}")

# %% [markdown]
# ## 4. Flagging, by you
#
# `write_rank_page` writes the circuit viewer with the top-ranked features:
# click a node to see its dashboard (the contexts where it fires hardest and the
# tokens it promotes), read the proxy judge's statistics in its label, tick
# **flag** on the ones about gender, and press **download**. The file it saves
# is what `run_shift` (and `sfc shift run --flags`) reads.

# %%
page = sfc.write_rank_page(setup, OUT / "rank", top=20 if QUICK else 50, n_corpus=20 if QUICK else 300,
                           dashboard_cache=OUT / "dashboards")
print("open", page["page"])

# %% [markdown]
# Here nobody clicks, so unless `SFC_SHIFT_FLAGS` names your flags file the
# automatic proxy judge flags for you: a feature is flagged when its pooled
# activation separates gender on the balanced train set better than it
# separates the profession. It is a stand-in for a person, not a replacement.

# %%
human = os.environ.get("SFC_SHIFT_FLAGS")
flags = sfc.load_flags(human) if human else None
result = sfc.run_shift(setup=setup, flags=flags)
print(f"flags: {result.settings['flags_source']}, {len(result.flags)} features")
for row in result.rows:
    print(f"  {row['method']:16s} profession {row['profession_acc']:.3f}  gender {row['gender_acc']:.3f}  "
          f"worst group {row['worst_group_acc']:.3f}")
for note in result.notes:
    print("note:", note)

# %% [markdown]
# ## 5. The results, and the edited model
#
# `write_results` writes `results.json` (the rows, the flags, the settings),
# `results.html` (a plotly figure of the table), `flags.json` and `edited/`:
# the edited model with its retrained probe, which applies the ablations to any
# forward pass inside `with edited:` and loads back from disk.

# %%
paths = sfc.write_results(result, OUT / "results")
doc = json.loads(paths["results"].read_text())
assert [r["method"] for r in doc["rows"]][:4] == ["original", "random", "shift", "shift_retrain"]

edited = sfc.EditedModel.load(paths["edited"], model, dictionaries)
bio = "Olivia Parker is from Denver. She supervises doctoral students. She enjoys hiking with her family."
with edited:  # any forward pass in here runs with the flagged features ablated
    logit = edited.probe_logits([bio])
print(f"edited classifier on a female professor: logit {float(logit[0]):+.3f} -> "
      f"{'nurse' if logit[0] > 0 else 'professor'}")
print(f"files in {OUT}; {time.perf_counter() - start:.0f} s")
