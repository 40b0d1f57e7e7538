"""Sites (SPEC §1.3) against the Hugging Face modules they name, for every family.

- the sites exist and come in forward order (embed, attn_0, mlp_0, resid_0, ...);
- the activation the toolkit reads at a site is what a plain torch hook on the
  expected HF module records; the ``o_proj_input`` attention site is the input
  of the output projection (concatenated heads, ``heads * head_dim`` wide);
- the residual stream decomposes: resid_L = resid_{L-1} + attn_L + mlp_L (the
  structural fact edges rely on);
- writing a replacement through the tracer changes the logits exactly as a
  plain-hook override does;
- unknown model families and site names fail with errors that say what to do.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from attribution.model import tracing
from attribution.model.sites import ARCHITECTURES, get_module, is_parallel, register_architecture
from attribution.model.wrapper import SFCModel
from tests.conftest import FAMILIES, VOCAB, tiny_model
from tests.hooks import run_hooked

# The HF modules each site must read, written out per family, independently of
# attribution.model.sites: (embed, block, attention output, MLP output) paths.
EXPECTED = {
    "gpt2": ("transformer.wte", "transformer.h.{L}", "transformer.h.{L}.attn", "transformer.h.{L}.mlp"),
    "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers.{L}", "gpt_neox.layers.{L}.attention",
                 "gpt_neox.layers.{L}.mlp"),
    "llama": ("model.embed_tokens", "model.layers.{L}", "model.layers.{L}.self_attn", "model.layers.{L}.mlp"),
    "qwen2": ("model.embed_tokens", "model.layers.{L}", "model.layers.{L}.self_attn", "model.layers.{L}.mlp"),
    "gemma2": ("model.embed_tokens", "model.layers.{L}", "model.layers.{L}.post_attention_layernorm",
               "model.layers.{L}.post_feedforward_layernorm"),
}
O_PROJ = {
    "gpt_neox": "gpt_neox.layers.{L}.attention.dense",
    "llama": "model.layers.{L}.self_attn.o_proj",
    "qwen2": "model.layers.{L}.self_attn.o_proj",
    "gemma2": "model.layers.{L}.self_attn.o_proj",
}


def ids(n: int = 2, seq: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def read(model: SFCModel, x: torch.Tensor, sites, replace=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and site activations as the toolkit's tracer sees them."""
    seen = {}

    def metric(logits, rows):
        seen["logits"] = logits.detach().clone()
        return logits[:, -1, 0]

    tr = tracing.run(model, model.tokenize(x), sites, metric, torch.arange(len(x)), replace=replace)
    return seen["logits"], tr.acts


def plain_hooks(hf: torch.nn.Module, x: torch.Tensor, paths: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``paths[name] = (module path, "output" | "input")``: what plain torch hooks record there."""
    seen, handles = {}, []
    for name, (path, where) in paths.items():
        module = get_module(hf, path)
        if where == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0])))
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: seen.__setitem__(name, out[0] if isinstance(out, tuple) else out)
            ))
    try:
        with torch.no_grad():
            hf(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def head_dim_model(family: str) -> SFCModel:
    """A tiny model whose concatenated heads (4 x 16 = 64) are wider than d_model (32)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    if family == "gpt_neox":  # GPT-NeoX has no separate head_dim: heads * head_dim = d_model
        cfg = tf.GPTNeoXConfig(**common)
    else:
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "gemma2": tf.Gemma2Config}[family]
        cfg = cls(**common, num_key_value_heads=2, head_dim=16)
    cfg._attn_implementation = "eager"
    return SFCModel(tf.AutoModelForCausalLM.from_config(cfg).to(torch.float64))


def test_sites_exist_and_come_in_forward_order(family):
    model = tiny_model(family)
    sites = model.all_sites()
    n_layers = model.config.num_hidden_layers
    expected = ["embed"] + [f"{k}_{L}" for L in range(n_layers) for k in ("attn", "mlp", "resid")]
    assert [s.name for s in sites] == expected
    assert [s.order for s in sites] == sorted(s.order for s in sites)
    embed, block, attn, mlp = EXPECTED[family]
    want = {"embed": embed}
    for L in range(n_layers):
        want.update({f"attn_{L}": attn.format(L=L), f"mlp_{L}": mlp.format(L=L), f"resid_{L}": block.format(L=L)})
    for site in sites:
        assert site.module == want[site.name]
        assert site.hook == "output"
        assert site.d == model.config.hidden_size
        assert isinstance(get_module(model.hf, site.module), torch.nn.Module)
    # A selection by name comes back in forward order too.
    assert [s.name for s in model.sites(["resid_1", "embed", "mlp_0"])] == ["embed", "mlp_0", "resid_1"]


def test_traced_activations_equal_plain_hooks_on_the_hf_modules(family):
    model = tiny_model(family, torch.float64)
    x = ids()
    sites = model.all_sites()
    _, acts = read(model, x, sites)
    truth = plain_hooks(model.hf, x, {s.name: (s.module, "output") for s in sites})
    for site in sites:
        assert acts[site.name].shape == (2, 5, site.d)
        torch.testing.assert_close(acts[site.name], truth[site.name], rtol=0, atol=0)


@pytest.mark.parametrize("family_", ["gpt_neox", "llama", "qwen2", "gemma2"])
def test_o_proj_input_site_is_the_concatenated_heads(family_):
    model = head_dim_model(family_)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    sites = model.sites(["attn_0", "attn_1"], attn="o_proj_input")
    x = ids()
    _, acts = read(model, x, sites)
    truth = plain_hooks(model.hf, x, {f"attn_{L}": (O_PROJ[family_].format(L=L), "input") for L in range(2)})
    for site in sites:
        assert site.hook == "input" and site.module == O_PROJ[family_].format(L=site.layer)
        assert site.d == cfg.num_attention_heads * head_dim
        assert acts[site.name].shape == (2, 5, site.d)
        torch.testing.assert_close(acts[site.name], truth[site.name], rtol=0, atol=0)
    if family_ != "gpt_neox":
        assert sites[0].d == 64 != cfg.hidden_size


def block_input(model: SFCModel, family: str, x: torch.Tensor) -> torch.Tensor:
    """The residual stream entering block 0, from a plain hook (GPT-2: token + position embedding)."""
    seen = {}
    block = get_module(model.hf, EXPECTED[family][1].format(L=0))
    handle = block.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", a[0] if a else kw["hidden_states"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model.hf(x)
    finally:
        handle.remove()
    return seen["x"]


def test_residual_is_previous_residual_plus_attn_plus_mlp(family):
    model = tiny_model(family, torch.float64)
    x = ids()
    _, acts = read(model, x, model.all_sites())
    previous = block_input(model, family, x)
    if family == "gpt2":
        wpe = model.hf.transformer.wpe(torch.arange(x.shape[1]))
        torch.testing.assert_close(previous, acts["embed"] + wpe)
    else:  # the embedding site is the residual stream entering block 0 (Gemma-2 scales inside it)
        torch.testing.assert_close(previous, acts["embed"])
    for L in range(model.config.num_hidden_layers):
        resid = acts[f"resid_{L}"]
        torch.testing.assert_close(resid, previous + acts[f"attn_{L}"] + acts[f"mlp_{L}"], rtol=1e-10, atol=1e-10)
        previous = resid


def test_parallel_attention_is_detected_from_the_config():
    assert is_parallel(tiny_model("gpt_neox").hf)
    assert not is_parallel(tiny_model("llama").hf)
    assert not is_parallel(tiny_model("gpt2").hf)
    cfg = tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, use_parallel_residual=False)
    assert not is_parallel(tf.AutoModelForCausalLM.from_config(cfg))


def test_writing_a_replacement_changes_logits_like_a_plain_hook_override(family):
    model = tiny_model(family, torch.float64)
    x = ids()
    sites = model.all_sites()
    logits_clean, acts = read(model, x, sites)
    gen = torch.Generator().manual_seed(3)
    for name in ["embed", "attn_0", "mlp_1", "resid_0"]:
        new = acts[name] * 0.5 + torch.randn(acts[name].shape, generator=gen, dtype=torch.float64)
        logits, _ = read(model, x, sites, replace={name: new})
        truth, _ = run_hooked(model.hf, x, sites, {name: lambda _x, new=new: new})
        assert (logits - logits_clean).abs().max() > 1e-3
        torch.testing.assert_close(logits, truth, rtol=1e-12, atol=1e-12)


def test_replacing_the_o_proj_input_changes_logits_like_a_plain_pre_hook():
    model = head_dim_model("llama")
    x = ids()
    sites = model.all_sites(attn="o_proj_input")
    _, acts = read(model, x, sites)
    new = torch.randn(acts["attn_1"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logits, _ = read(model, x, sites, replace={"attn_1": new})
    truth, _ = run_hooked(model.hf, x, sites, {"attn_1": lambda _x: new})
    torch.testing.assert_close(logits, truth, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", ["renamed", "bare"])
def test_unknown_architecture_names_the_supported_families(module):
    if module == "renamed":
        hf = tiny_model("llama").hf
        hf.config.model_type = "mystery_lm"
    else:
        hf = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError) as err:
        SFCModel(hf)
    message = str(err.value)
    for name in FAMILIES:
        assert name in message
    assert "register_architecture" in message


def test_register_architecture_makes_a_new_model_type_work():
    hf = tiny_model("llama", torch.float64).hf
    hf.config.model_type = "my_llama"
    register_architecture("my_llama", ARCHITECTURES["llama"])
    try:
        model = SFCModel(hf)
        sites = model.all_sites()
        assert [s.module for s in sites[:4]] == [
            "model.embed_tokens", "model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.0",
        ]
        x = ids()
        _, acts = read(model, x, sites)
        _, truth = run_hooked(hf, x, sites)
        for site in sites:
            torch.testing.assert_close(acts[site.name], truth[site.name], rtol=0, atol=0)
    finally:
        ARCHITECTURES.pop("my_llama", None)


@pytest.mark.parametrize("names", [["resid_7"], ["mlp_0", "attention_0"], ["Resid_0"]])
def test_unknown_site_names_raise_listing_what_exists(names):
    model = tiny_model("llama")
    with pytest.raises(ValueError) as err:
        model.sites(names)
    message = str(err.value)
    assert str([n for n in names if n != "mlp_0"]) in message
    assert "embed" in message and "attn_L, mlp_L, resid_L" in message and "0..1" in message


def test_an_empty_site_list_is_refused():
    with pytest.raises(ValueError, match="No sites given"):
        tiny_model("llama").sites([])
