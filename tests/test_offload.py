"""A model dispatched by accelerate with part of it offloaded (issue 16): ``max_memory``
smaller than the model pushes its blocks to disk, and accelerate's hooks load them for
each forward. Node and edge effects must equal those of the same model in memory."""

from __future__ import annotations

import copy

import pytest
import torch

from attribution.edges import edge_effects
from attribution.effects import node_effects
from attribution.model.wrapper import SFCModel
from tests.conftest import logit_diff_metric, prompt_pairs, tiny_dictionaries, tiny_model


@pytest.mark.parametrize("family_, block", [
    ("llama", "LlamaDecoderLayer"), pytest.param("gpt2", "GPT2Block", marks=pytest.mark.slow),
])
def test_offloaded_model_gives_the_same_node_and_edge_effects(family_, block, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model(family_)
    clean, patch = prompt_pairs()
    dicts = tiny_dictionaries(model, clean)
    metric = logit_diff_metric(len(clean))
    ne = node_effects(model, dicts, clean, patch, metric, steps=4, progress=False)
    ee = edge_effects(model, dicts, clean, ne, metric, node_threshold=0.0, progress=False)

    hf = copy.deepcopy(model.hf)
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    device_map = accelerate.infer_auto_device_map(hf, max_memory={"cpu": size // 2},
                                                  no_split_module_classes=[block])
    assert "disk" in device_map.values()  # part of the model really is offloaded
    offloaded = SFCModel(accelerate.dispatch_model(hf, device_map=device_map, offload_dir=str(tmp_path),
                                                   main_device="cpu"))
    assert any(p.device.type == "meta" for p in offloaded.hf.parameters())
    ne2 = node_effects(offloaded, dicts, clean, patch, metric, steps=4, progress=False)
    ee2 = edge_effects(offloaded, dicts, clean, ne2, metric, node_threshold=0.0, progress=False)
    for site in ne.features:
        torch.testing.assert_close(ne2.features[site], ne.features[site], rtol=0, atol=1e-5)
        torch.testing.assert_close(ne2.errors[site], ne.errors[site], rtol=0, atol=1e-5)
    assert set(ee2.pairs) == set(ee.pairs) and ee.pairs
    for key, e in ee.pairs.items():
        torch.testing.assert_close(ee2.pairs[key].to_dense(*clean.shape), e.to_dense(*clean.shape), rtol=0, atol=1e-5)
