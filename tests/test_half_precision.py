"""Half-precision models (bf16, fp16) with dictionaries in float32 or the model's dtype.

Ground truth: the float32 run of the same random model, whose effects the other
engine tests check against hooked interventions and finite differences. A bf16
model must run, return float32 effects, and rank the same nodes on top (issue 16:
top-20 overlap >= 0.9).
"""

from __future__ import annotations

import pytest
import torch

from attribution.edges import edge_effects
from attribution.effects import node_effects
from tests.conftest import logit_diff_metric, prompt_pairs, tiny_dictionaries, tiny_model


def flat(ne) -> torch.Tensor:
    return torch.cat([torch.cat([ne.features[s].flatten(), ne.errors[s].flatten()]) for s in ne.features])


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    return len(set(a.abs().topk(k).indices.tolist()) & set(b.abs().topk(k).indices.tolist())) / k


@pytest.mark.parametrize("dict_dtype", ["float32", "model"])
def test_bf16_model_runs_and_ranks_the_same_top_nodes_as_float32(family, dict_dtype):
    clean, patch = prompt_pairs()
    metric = logit_diff_metric(len(clean))
    m32 = tiny_model(family)
    d32 = tiny_dictionaries(m32, clean)
    ref = node_effects(m32, d32, clean, patch, metric, steps=4, progress=False)
    m16 = tiny_model(family, torch.bfloat16)
    assert next(m16.hf.parameters()).dtype == torch.bfloat16
    dicts = d32 if dict_dtype == "float32" else {k: v.to(torch.bfloat16) for k, v in d32.items()}
    ne = node_effects(m16, dicts, clean, patch, metric, steps=4, progress=False)
    assert all(t.dtype == torch.float32 for t in (*ne.features.values(), *ne.errors.values(), ne.metric_clean))
    a, b = flat(ref), flat(ne)
    assert torch.isfinite(b).all()
    assert overlap(a, b, 20) >= 0.9
    assert ((a - b).norm() / a.norm()).item() < 0.1
    # Edges run too, in float32, and rank the same edges on top.
    ee = edge_effects(m16, dicts, clean, ne, metric, node_threshold=0.0, progress=False)
    e32 = edge_effects(m32, d32, clean, ref, metric, node_threshold=0.0, progress=False)
    assert set(ee.pairs) == set(e32.pairs)
    w16 = torch.cat([ee.pairs[k].to_dense(*clean.shape).flatten() for k in sorted(e32.pairs)])
    w32 = torch.cat([e32.pairs[k].to_dense(*clean.shape).flatten() for k in sorted(e32.pairs)])
    assert w16.dtype == torch.float32
    assert overlap(w32, w16, 20) >= 0.8

def test_fp16_model_exact_patching_matches_float32():
    """Exact patching writes float32 patched rows back into an fp16 model (cast on write)."""
    clean, patch = prompt_pairs()
    metric = logit_diff_metric(len(clean))
    m32 = tiny_model("llama")
    d32 = tiny_dictionaries(m32, clean, sites=m32.sites(["resid_0", "resid_1"]))
    ref = node_effects(m32, d32, clean, patch, metric, method="exact", progress=False)
    m16 = tiny_model("llama", torch.float16)
    ne = node_effects(m16, d32, clean, patch, metric, method="exact", progress=False)
    a, b = flat(ref), flat(ne)
    assert overlap(a, b, 10) >= 0.9
    assert ((a - b).norm() / a.norm()).item() < 0.05
