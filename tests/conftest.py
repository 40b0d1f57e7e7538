"""Tiny randomly initialised models of every supported family, built in code.

Nothing is downloaded. Dictionaries are random SAEs made sparse (L0 about 6)
on the model's own activations.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from attribution.dictionaries.kinds import SAE, calibrate_sparsity, random_sae
from attribution.model import tracing
from attribution.model.wrapper import SFCModel

VOCAB = 64


def tiny_config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    if family == "llama":
        return tf.LlamaConfig(**common, num_key_value_heads=2)
    if family == "qwen2":
        return tf.Qwen2Config(**common, num_key_value_heads=2)
    if family == "gemma2":
        return tf.Gemma2Config(**common, num_key_value_heads=2, head_dim=8)
    raise ValueError(family)


FAMILIES = ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2"]


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> SFCModel:
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg._attn_implementation = "eager"
    hf = tf.AutoModelForCausalLM.from_config(cfg).to(dtype)
    return SFCModel(hf)


def tiny_dictionaries(model: SFCModel, ids: torch.Tensor, sites=None, width: int = 96, l0: float = 6,
                      activation="relu") -> dict[str, SAE]:
    sites = sites or model.all_sites()
    acts = tracing.run(model, model.tokenize(ids), sites, None, torch.arange(len(ids))).acts
    dtype = next(model.hf.parameters()).dtype
    out = {}
    for i, site in enumerate(sites):
        sae = random_sae(site.d, width, activation, seed=100 + i, dtype=dtype)
        out[site.name] = calibrate_sparsity(sae, acts[site.name], l0) if activation != "topk" else sae
    return out


def prompt_pairs(n: int = 3, seq: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and patch token ids that differ at one position per example."""
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, seq), generator=gen)
    patch = clean.clone()
    patch[:, 1] = torch.randint(0, VOCAB, (n,), generator=gen)
    return clean, patch


def logit_diff_metric(n: int, seed: int = 1):
    """m = logit[good] - logit[bad] at the last position, answers per example."""
    gen = torch.Generator().manual_seed(seed)
    good = torch.randint(0, VOCAB, (n,), generator=gen)
    bad = torch.randint(0, VOCAB, (n,), generator=gen)

    def metric(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1]
        return last.gather(1, good[rows, None])[:, 0] - last.gather(1, bad[rows, None])[:, 0]

    metric.good, metric.bad = good, bad
    return metric


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run fastest on one thread (no thread start-up per op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def float64_softmax(monkeypatch):
    """Keep attention softmax in the input's dtype (see :func:`keep_float64`)."""
    keep_float64(monkeypatch)


def keep_float64(monkeypatch) -> None:
    """Keep attention softmax and RMSNorms in float64 for float64 inputs.

    transformers' eager attention computes softmax in float32 even for float64
    models; that rounding (1e-7) would swamp finite differences. With this, the
    tiny models are float64 end to end, for the toolkit and the ground truth alike.
    (Also used by ``benchmarks/attribution.py --scale`` through ``pytest.MonkeyPatch``.)
    """
    original = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        if x.dtype == torch.float64:
            dtype = None
        return original(x, dim=dim, dtype=dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)

    # RMSNorms upcast to float32 and back; keep float64 inputs in float64.
    def rms(self, x):
        eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return normed * (1.0 + self.weight) if "Gemma" in type(self).__name__ else self.weight * normed

    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen2 import modeling_qwen2

    for cls in (modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm, modeling_gemma2.Gemma2RMSNorm):
        original_forward = cls.forward
        monkeypatch.setattr(
            cls, "forward",
            lambda self, x, _f=original_forward: rms(self, x) if x.dtype == torch.float64 else _f(self, x),
        )


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
