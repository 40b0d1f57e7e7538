"""The offline text corpus that dictionaries are trained and evaluated on.

``attribution/dictionaries/data/corpus.jsonl.gz`` (package data, found through
:mod:`importlib.resources`, so it ships in the wheel) holds about 13k English documents (about 550k words,
700k SmolLM2 tokens): paragraphs of *The Debian Administrator's Handbook* and
the BSD ``fortune`` cookies, both from Debian main. ``scripts/build_corpus.py``
rebuilds it reproducibly and documents sources, licences, de-duplication and
the leakage filter against the agreement task templates. Each line is
``{"source", "text", "split"}`` with split ``"train"`` or ``"heldout"``.

SAE training reads *contexts*: documents joined by the end-of-text token into
one token stream, cut into rows of ``ctx_len`` tokens (the packing used by
dictionary_learning and SAELens).
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

Split = Literal["train", "heldout"]
# Wheels install unpacked, so the package resource is a real file.
CORPUS_PATH = Path(str(files("attribution.dictionaries").joinpath("data", "corpus.jsonl.gz")))


@lru_cache(maxsize=2)
def _read(path: Path) -> tuple[dict, ...]:
    if not path.exists():
        raise FileNotFoundError(
            f"The corpus {path} is missing: rebuild it with `python scripts/build_corpus.py`."
        )
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return tuple(json.loads(line) for line in fh)
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"The corpus {path} is corrupt ({type(exc).__name__}): rebuild it with "
            "`python scripts/build_corpus.py`."
        ) from exc


def load_corpus(split: Split | None = "train", path: Path = CORPUS_PATH) -> list[str]:
    """The documents of one split (``None``: all), in the corpus's fixed shuffled order."""
    return [d["text"] for d in _read(path) if split is None or d["split"] == split]


def corpus_contexts(
    tokenizer,
    n_tokens: int,
    ctx_len: int = 128,
    split: Split = "train",
    path: Path = CORPUS_PATH,
) -> Tensor:
    """Token ids ``[n_ctx, ctx_len]`` with ``n_ctx = ceil(n_tokens / ctx_len)``.

    Documents are tokenized in order, joined by the tokenizer's end-of-text
    token and cut into rows. Raises if the split holds fewer tokens than asked.
    """
    n_ctx = -(-n_tokens // ctx_len)
    need = n_ctx * ctx_len
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    for text in load_corpus(split, path):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(
            f"The {split} corpus has {len(stream)} tokens but {need} were asked for: "
            "ask for fewer tokens or a shorter context."
        )
    return torch.tensor(stream[:need], dtype=torch.long).view(n_ctx, ctx_len)


def corpus_token_batches(
    tokenizer, n_tokens: int, batch_size: int, ctx_len: int = 128, split: Split = "train"
) -> list[Tensor]:
    """:func:`corpus_contexts` split into batches of ``batch_size`` rows, each ``[b, ctx_len]``."""
    return list(corpus_contexts(tokenizer, n_tokens, ctx_len, split).split(batch_size))
