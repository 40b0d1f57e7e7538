"""Sites: the named places in a model whose activations get a dictionary.

A *site* is one hooked activation, named after the paper's sublayers:

- ``embed``: the token embedding output;
- ``attn_L``: what the attention block of layer ``L`` adds to the residual stream
  (or, with ``attn="o_proj_input"``, the input of its output projection: the
  concatenated heads, which Gemma Scope's attention SAEs read);
- ``mlp_L``: what the MLP of layer ``L`` adds to the residual stream;
- ``resid_L``: the residual stream after block ``L``.

Sites are found from the Hugging Face config's ``model_type`` and an
:class:`Architecture` entry that names the modules. :func:`register_architecture`
adds a family without touching this file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

SiteKind = Literal["embed", "attn", "mlp", "resid"]
AttnHook = Literal["output", "o_proj_input"]
SITE_KINDS: tuple[SiteKind, ...] = ("embed", "attn", "mlp", "resid")


@dataclass(frozen=True)
class Site:
    """One hooked activation.

    ``module`` is the dotted path of the module whose ``hook`` ("output" or
    "input", the first positional argument) is the activation; a tuple output is
    read at index 0. ``d`` is the activation's last dimension.
    """

    name: str
    kind: SiteKind
    layer: int
    module: str
    hook: Literal["output", "input"]
    d: int

    @property
    def order(self) -> tuple[int, int]:
        """Forward execution order: layer first, then attn < mlp < resid."""
        return (self.layer, SITE_KINDS.index(self.kind))


@dataclass(frozen=True)
class Architecture:
    """Where a model family keeps its embedding, blocks, attention and MLP.

    Paths are dotted module paths; ``attn``, ``mlp`` and ``o_proj`` are relative
    to one decoder block. ``parallel_attn`` is True when attention and MLP both
    read the previous residual (GPT-NeoX), given as a config attribute name or a
    constant.
    """

    embed: str
    blocks: str
    attn: str
    mlp: str
    o_proj: str
    parallel_attn: bool | str = False


ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture("transformer.wte", "transformer.h", "attn", "mlp", "attn.c_proj"),
    "gpt_neox": Architecture(
        "gpt_neox.embed_in", "gpt_neox.layers", "attention", "mlp", "attention.dense",
        parallel_attn="use_parallel_residual",
    ),
    "llama": Architecture("model.embed_tokens", "model.layers", "self_attn", "mlp", "self_attn.o_proj"),
    "qwen2": Architecture("model.embed_tokens", "model.layers", "self_attn", "mlp", "self_attn.o_proj"),
    # Gemma-2 normalises each sublayer's output before adding it to the residual,
    # so the sites are the outputs of those post-norms (as in Gemma Scope).
    "gemma2": Architecture(
        "model.embed_tokens", "model.layers", "post_attention_layernorm",
        "post_feedforward_layernorm", "self_attn.o_proj",
    ),
}


def register_architecture(model_type: str, architecture: Architecture) -> None:
    """Teach the toolkit a new model family, keyed by the HF config's ``model_type``."""
    ARCHITECTURES[model_type] = architecture


def architecture_of(model: torch.nn.Module) -> Architecture:
    """The :class:`Architecture` of an HF model, or a clear error naming the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"Unknown architecture {model_type!r}: supported families are "
            f"{', '.join(sorted(ARCHITECTURES))}; register another with "
            "attribution.model.sites.register_architecture(model_type, Architecture(...))."
        )
    return ARCHITECTURES[model_type]


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Resolve a dotted module path such as ``model.layers.3.mlp``."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def is_parallel(model: torch.nn.Module) -> bool:
    flag = architecture_of(model).parallel_attn
    return bool(getattr(model.config, flag, False)) if isinstance(flag, str) else flag


def all_sites(model: torch.nn.Module, attn: AttnHook = "output") -> list[Site]:
    """Every site of ``model`` in forward order: embed, then attn, mlp, resid per layer."""
    arch = architecture_of(model)
    cfg = model.config
    d_model = cfg.hidden_size
    n_layers = cfg.num_hidden_layers
    sites = [Site("embed", "embed", -1, arch.embed, "output", d_model)]
    for layer in range(n_layers):
        block = f"{arch.blocks}.{layer}"
        if attn == "o_proj_input":
            o_proj = get_module(model, f"{block}.{arch.o_proj}")
            d_attn = getattr(o_proj, "in_features", None) or o_proj.weight.shape[0]
            sites.append(Site(f"attn_{layer}", "attn", layer, f"{block}.{arch.o_proj}", "input", d_attn))
        else:
            sites.append(Site(f"attn_{layer}", "attn", layer, f"{block}.{arch.attn}", "output", d_model))
        sites.append(Site(f"mlp_{layer}", "mlp", layer, f"{block}.{arch.mlp}", "output", d_model))
        sites.append(Site(f"resid_{layer}", "resid", layer, block, "output", d_model))
    return sites


_NAME = re.compile(r"^(embed|(attn|mlp|resid)_(\d+))$")


def select_sites(
    model: torch.nn.Module,
    names: list[str] | None = None,
    *,
    kinds: tuple[SiteKind, ...] = SITE_KINDS,
    layers: list[int] | None = None,
    attn: AttnHook = "output",
) -> list[Site]:
    """Sites by name (``["resid_3", "mlp_2"]``) or by kind and layer, in forward order.

    An unknown name raises one sentence listing what exists.
    """
    available = all_sites(model, attn=attn)
    by_name = {s.name: s for s in available}
    if names is not None:
        if not names:
            raise ValueError("No sites given: name at least one, e.g. ['resid_0'].")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            n_layers = model.config.num_hidden_layers
            raise ValueError(
                f"Unknown site(s) {unknown}: this model has 'embed' and "
                f"attn_L, mlp_L, resid_L for L in 0..{n_layers - 1}."
            )
        chosen = [by_name[n] for n in names]
    else:
        chosen = [
            s for s in available
            if s.kind in kinds and (layers is None or s.layer in layers or s.kind == "embed")
        ]
    return sorted(chosen, key=lambda s: s.order)


def site_name_is_valid(name: str) -> bool:
    return bool(_NAME.match(name))
