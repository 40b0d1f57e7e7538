"""Reading and writing dictionaries in the layouts researchers share them in.

Supported, all without unpickling code (``weights_only=True``, safetensors, npz):

- dictionary_learning: ``ae.pt`` + ``config.json`` (``AutoEncoder`` ReLU,
  ``AutoEncoderTopK``, ``JumpReluAutoEncoder``);
- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (standard/relu, topk, jumprelu);
- Gemma Scope: ``params.npz`` (JumpReLU).

We write the dictionary_learning layout, so other tools read our dictionaries.
Writes are atomic: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from attribution.cache import atomic_save_torch, atomic_write_bytes
from attribution.dictionaries.kinds import SAE, Dictionary, Identity

Layout = Literal["dictionary_learning", "saelens", "gemma_scope"]


class DictionaryFileError(ValueError):
    """A dictionary folder is missing, corrupt or of an unknown layout."""


def save_dictionary(dictionary: SAE, folder: str | Path, metadata: dict | None = None) -> Path:
    """Save an :class:`SAE` as dictionary_learning ``ae.pt`` + ``config.json``.

    ``metadata`` (e.g. model id, site, training stats) is stored under the
    config's ``"sfc"`` key; loaders of other tools ignore it.
    """
    folder = Path(folder)
    cls = {"relu": "AutoEncoder", "topk": "AutoEncoderTopK", "jumprelu": "JumpReluAutoEncoder"}
    if dictionary.activation == "relu":
        if not dictionary.subtract_decoder_bias:
            raise ValueError("dictionary_learning's ReLU layout subtracts the decoder bias; this SAE does not.")
        state = {
            "encoder.weight": dictionary.W_enc.T, "encoder.bias": dictionary.b_enc,
            "decoder.weight": dictionary.W_dec.T, "bias": dictionary.b_dec,
        }
    elif dictionary.activation == "topk":
        state = {
            "encoder.weight": dictionary.W_enc.T, "encoder.bias": dictionary.b_enc,
            "decoder.weight": dictionary.W_dec.T, "b_dec": dictionary.b_dec,
            "k": torch.tensor(dictionary.k),
        }
    else:
        state = {
            "W_enc": dictionary.W_enc, "b_enc": dictionary.b_enc, "W_dec": dictionary.W_dec,
            "b_dec": dictionary.b_dec, "threshold": dictionary.threshold,
        }
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    trainer: dict[str, Any] = {
        "dict_class": cls[dictionary.activation],
        "activation_dim": dictionary.d,
        "dict_size": dictionary.width,
    }
    if dictionary.activation == "topk":
        trainer["k"] = dictionary.k
        if not dictionary.subtract_decoder_bias:
            raise ValueError("dictionary_learning's TopK layout subtracts the decoder bias; this SAE does not.")
    trainer["apply_b_dec_to_input"] = dictionary.subtract_decoder_bias
    config = {"trainer": trainer, "sfc": metadata or {}}
    atomic_save_torch(state, folder / "ae.pt")
    atomic_write_bytes(folder / "config.json", json.dumps(config, indent=2).encode())
    return folder


def read_metadata(folder: str | Path) -> dict:
    """The ``"sfc"`` metadata of a dictionary we wrote, or ``{}``."""
    cfg = Path(folder) / "config.json"
    if not cfg.exists():
        return {}
    try:
        return json.loads(cfg.read_text()).get("sfc", {})
    except json.JSONDecodeError:
        return {}


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DictionaryFileError(f"Cannot read {path}: {exc}; re-create or re-download it.") from exc


def _load_dictionary_learning(folder: Path) -> SAE:
    config = _load_json(folder / "config.json") if (folder / "config.json").exists() else {}
    trainer = config.get("trainer", {})
    try:
        # Memory-mapped: the weights are copied once, into the SAE, not read and then copied.
        state = torch.load(folder / "ae.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, wrong magic, pickled classes...
        raise DictionaryFileError(
            f"{folder / 'ae.pt'} is corrupt or not a plain state dict ({type(exc).__name__}); "
            "delete it and rebuild or re-download the dictionary."
        ) from exc
    dict_class = trainer.get("dict_class", "")
    known = [{"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}, {"encoder.weight", "encoder.bias", "decoder.weight"}]
    if not isinstance(state, dict) or not any(keys <= set(state) for keys in known):
        found = sorted(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise DictionaryFileError(
            f"{folder / 'ae.pt'} is not a dictionary_learning state dict (found {found}); expected "
            "encoder.weight/encoder.bias/decoder.weight or W_enc/b_enc/W_dec/b_dec/threshold."
        )
    if "W_enc" in state:  # JumpReluAutoEncoder
        return SAE(
            state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"], "jumprelu",
            threshold=state["threshold"], subtract_decoder_bias=bool(trainer.get("apply_b_dec_to_input", False)),
        )
    W_enc = state["encoder.weight"].T  # noqa: N806
    W_dec = state["decoder.weight"].T  # noqa: N806
    if "TopK" in dict_class or "k" in state:
        k = int(state["k"]) if "k" in state else int(trainer["k"])
        return SAE(W_enc, state["encoder.bias"], W_dec, state["b_dec"], "topk", k=k)
    return SAE(W_enc, state["encoder.bias"], W_dec, state["bias"], "relu")


def _load_saelens(folder: Path) -> SAE:
    from safetensors.torch import load_file

    cfg = _load_json(folder / "cfg.json")
    weights = folder / "sae_weights.safetensors"
    try:
        state = load_file(str(weights))
    except Exception as exc:  # SafetensorError: truncated header or data, not a safetensors file
        raise DictionaryFileError(
            f"{weights} is corrupt or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
            "re-download or re-export the dictionary."
        ) from None
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in state]
    if missing:
        raise DictionaryFileError(f"{weights} has no tensor {missing[0]!r}: it is not an SAELens SAE; "
                                  "re-export it with SAELens.")
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn_str") or cfg.get("activation_fn", "relu")
    for key in ("normalize_activations",):
        if cfg.get(key) not in (None, "none", False):
            raise DictionaryFileError(f"SAELens option {key}={cfg[key]!r} is not supported; export without it.")
    if cfg.get("finetuning_scaling_factor"):
        raise DictionaryFileError("SAELens finetuning_scaling_factor is not supported; fold it into W_dec.")
    sub = bool(cfg.get("apply_b_dec_to_input", arch != "jumprelu"))
    common = (state["W_enc"], state["b_enc"], state["W_dec"], state["b_dec"])
    if arch == "jumprelu":
        return SAE(*common, "jumprelu", threshold=state["threshold"], subtract_decoder_bias=sub)
    if arch == "topk" or act_fn == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        return SAE(*common, "topk", k=int(k), subtract_decoder_bias=sub)
    return SAE(*common, "relu", subtract_decoder_bias=sub)


def _load_gemma_scope(path: Path) -> SAE:
    keys = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DictionaryFileError(f"{path} has no array {missing[0]!r}: it is not a Gemma Scope "
                                          "params.npz; re-download it.")
            arrays = {k: npz[k] for k in keys}
    except DictionaryFileError:
        raise
    except ValueError as exc:  # object arrays need pickle, which we never allow
        raise DictionaryFileError(f"{path} holds object arrays, which would need unpickling ({exc}); "
                                  "it is not a Gemma Scope params.npz: re-download it.") from None
    except Exception as exc:  # BadZipFile, EOFError, OSError: truncated or not an npz file
        raise DictionaryFileError(f"{path} is corrupt or truncated ({type(exc).__name__}); "
                                  "re-download the dictionary.") from None
    bad = [k for k, a in arrays.items() if a.dtype.kind not in "fiu"]
    if bad:
        raise DictionaryFileError(f"{path}: array {bad[0]!r} has dtype {arrays[bad[0]].dtype}, not numbers; "
                                  "re-download the dictionary.")
    p = {k: torch.from_numpy(np.asarray(a)).float() for k, a in arrays.items()}
    return SAE(p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], "jumprelu",
               threshold=p["threshold"], subtract_decoder_bias=False)


def _finite(sae: SAE, path: Path) -> SAE:
    """``sae`` if every weight is finite; else one sentence naming the tensor (a NaN weight would
    otherwise surface much later as a NaN metric)."""
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        t = getattr(sae, name, None)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n_bad = int((~torch.isfinite(t)).sum())
            raise DictionaryFileError(
                f"The dictionary at {path} has {n_bad} non-finite value(s) (NaN or infinity) in {name}: "
                "it is corrupt or its training diverged; rebuild or re-download it."
            )
    return sae


class Header(NamedTuple):
    """What a dictionary file's headers say: input size ``d``, ``width`` (features), and the
    number and byte size of its stored values (the weights it will hold once loaded)."""

    d: int
    width: int
    numel: int
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _header_of(shapes: dict[str, tuple[tuple[int, ...], int]], enc: str, transposed: bool, path: Path) -> Header:
    """A :class:`Header` from ``{tensor name: (shape, itemsize)}``; ``enc`` names the encoder."""
    if enc not in shapes or len(shapes[enc][0]) != 2:
        raise DictionaryFileError(f"{path} has no 2-d encoder weight {enc!r}: it is not a dictionary; "
                                  "rebuild or re-download it.")
    d, width = shapes[enc][0][::-1] if transposed else shapes[enc][0]
    numel = sum(int(np.prod(shape)) for shape, _ in shapes.values())
    return Header(int(d), int(width), numel, max(size for _, size in shapes.values()))


def _layout(path: Path) -> tuple[Layout, Path]:
    """The layout of the dictionary at ``path`` and the file or folder its loader reads;
    one sentence for a missing path or an unknown layout."""
    if not path.exists():
        raise DictionaryFileError(f"No dictionary at {path}: build it with `sfc dictionaries build` or fix the path.")
    if path.suffix == ".npz":
        return "gemma_scope", path
    if (path / "ae.pt").exists():
        return "dictionary_learning", path
    if (path / "sae_weights.safetensors").exists():
        return "saelens", path
    if (path / "params.npz").exists():
        return "gemma_scope", path / "params.npz"
    raise DictionaryFileError(
        f"{path} holds no known dictionary layout (ae.pt + config.json, cfg.json + "
        "sae_weights.safetensors, or params.npz)."
    )


def read_header(path: str | Path) -> Header:
    """The :class:`Header` of the dictionary at ``path`` (any layout :func:`load_dictionary`
    reads), from the files' headers only: no weight is read into memory."""
    if isinstance(path, str) and path.startswith("identity:"):
        d = int(path.split(":", 1)[1])
        return Header(d, d, 0, 4)
    layout, where = _layout(Path(path))
    try:
        if layout == "dictionary_learning":
            state = torch.load(where / "ae.pt", map_location="cpu", weights_only=True, mmap=True)
            shapes = {k: (tuple(v.shape), v.element_size()) for k, v in state.items()
                      if isinstance(v, torch.Tensor) and v.is_floating_point()}
            enc = "W_enc" if "W_enc" in shapes else "encoder.weight"
            return _header_of(shapes, enc, enc == "encoder.weight", where)
        if layout == "saelens":
            from safetensors import safe_open

            with safe_open(str(where / "sae_weights.safetensors"), framework="pt") as fh:
                shapes = {}
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    shapes[k] = (tuple(sl.get_shape()), torch.empty(0, dtype=_SAFETENSORS_DTYPES.get(
                        sl.get_dtype(), torch.float32)).element_size())
            return _header_of(shapes, "W_enc", False, where)
        shapes = {}
        with zipfile.ZipFile(where) as zf:
            for name in zf.namelist():
                with zf.open(name) as fh:
                    major, _ = np.lib.format.read_magic(fh)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else \
                        np.lib.format.read_array_header_2_0
                    shape, _, _ = read(fh)
                shapes[name.removesuffix(".npy")] = (shape, 4)  # read as float32
        return _header_of(shapes, "W_enc", False, where)
    except DictionaryFileError:
        raise
    except Exception as exc:  # truncated or foreign files
        raise DictionaryFileError(f"Cannot read the dictionary headers in {where} ({type(exc).__name__}); "
                                  "it is corrupt: rebuild or re-download it.") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_dictionary(path: str | Path, *, check_finite: bool = True) -> Dictionary:
    """Load a dictionary from a folder (or a Gemma Scope ``params.npz``), detecting its layout.

    Corrupt or truncated files and non-finite weights raise :class:`DictionaryFileError`
    naming the file.

    ``check_finite=False`` skips the scan for non-finite weights (for a file already
    checked, read again).

    ``"identity:D"`` returns :class:`Identity` of width ``D``.
    """
    if isinstance(path, str) and path.startswith("identity:"):
        return Identity(int(path.split(":", 1)[1]))
    path = Path(path)
    layout, where = _layout(path)
    loader = {"dictionary_learning": _load_dictionary_learning, "saelens": _load_saelens,
              "gemma_scope": _load_gemma_scope}[layout]
    sae = loader(where)
    return _finite(sae, path) if check_finite else sae
