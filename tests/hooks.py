"""Ground truth with plain PyTorch forward hooks: no nnsight, no toolkit code.

``run_hooked`` runs the HF model with per-site overrides and records each
site's activation as the model computed it (before any override).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from attribution.model.sites import Site, get_module


def run_hooked(
    hf: torch.nn.Module,
    ids: torch.Tensor,
    sites: list[Site],
    overrides: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and recorded activations; ``overrides[site](x) -> x'`` replaces a site's value."""
    overrides = overrides or {}
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for site in sites:
        module = get_module(hf, site.module)
        if site.hook == "input":
            def pre(mod, args, site=site):
                seen[site.name] = args[0]
                if site.name in overrides:
                    return (overrides[site.name](args[0]), *args[1:])
            handles.append(module.register_forward_pre_hook(pre))
        else:
            def post(mod, args, out, site=site):
                x = out[0] if isinstance(out, tuple) else out
                seen[site.name] = x
                if site.name in overrides:
                    new = overrides[site.name](x)
                    return (new, *out[1:]) if isinstance(out, tuple) else new
            handles.append(module.register_forward_hook(post))
    try:
        logits = hf(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen
