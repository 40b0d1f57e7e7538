"""Helpers for the bad-input tests: tiny saved models, running the CLI in-process,
and making a path unwritable or unreadable even for root."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers as tf

WORDS = ("the of and to in a is that for it as was with be by on not he i this are or his from at which "
         "but have an they you were her she there one all we can their has been if more when will would "
         "who so no").split()


def save_tiny_model(folder: Path, seed: int = 0, layers: int = 2) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved with save_pretrained (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    hf = tf.LlamaForCausalLM(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``sfc`` in this process: ``(exit code, stdout, stderr)``."""
    from sfc.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to check that nothing was lost)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def unwritable(folder: Path):
    """``folder`` made unwritable: ``chmod 555`` for a normal user; for root, who ignores
    modes, the immutable attribute (``chattr +i``); skips the test where neither works."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                         capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: cannot make a folder unwritable")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextlib.contextmanager
def unreadable(path: Path, monkeypatch):
    """``path`` made unreadable: ``chmod 000`` for a normal user; for root (who reads any
    file) every ``open`` of it raises the ``PermissionError`` the kernel would give."""
    if os.geteuid() != 0:
        path.chmod(0o000)
        try:
            yield path
        finally:
            path.chmod(0o644)
        return
    import builtins
    import io
    import pathlib

    target = os.path.realpath(path)
    real_open, real_io_open = builtins.open, io.open

    def guard(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guard_io(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_io_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guard)
    monkeypatch.setattr(io, "open", guard_io)
    monkeypatch.setattr(pathlib.io, "open", guard_io)
    yield path


def tiny_circuit_file(path: Path, model: str = "smollm2-135m", task: str = "simple", *, site: str = "resid_3",
                      sites: list[str] | None = None, feature: int = 5, effect: float = 0.5, n_layers: int = 30,
                      dictionaries: dict[str, str] | None = None) -> Path:
    """A valid two-node circuit file (one feature feeding the metric), saved at ``path``.

    ``sites`` is ``metadata.sites`` (default: ``[site]``).
    """
    from circuits.graph import Circuit, CircuitMetadata, Edge, Node

    sites = sites or [site]
    n = Node.make(site, feature, None, effect)
    md = CircuitMetadata(model=model, sites=sites, n_layers=n_layers, task=task, aggregation="sum",
                         dictionaries=dictionaries or {s: f"cache:smollm2-135m/{s}" for s in sites},
                         extra={"task_source": task, "n_test": 2, "start_layer": 0})
    Circuit([n, Node.metric(n_layers, 1.0)], [Edge(n.id, "y", 0.5)], md).save(path)
    return path


def tiny_task_file(path: Path, rows: int = 6) -> Path:
    """Paired JSONL rows in :data:`WORDS` (single-token answers for :func:`save_tiny_model`'s tokenizer)."""
    import json

    lines = []
    for i in range(rows):
        a, b = WORDS[2 * i % 40], WORDS[(2 * i + 1) % 40]
        lines.append(json.dumps({"clean_prefix": f"the {a} of", "patch_prefix": f"the {b} of",
                                 "clean_answer": " is", "patch_answer": " are"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_dictionary_folder(folder: Path, model_dir: Path, width: int = 64) -> Path:
    """Random TopK SAEs (d=32, ``width`` latents, k=4) for resid_0 and resid_1 of a
    :func:`save_tiny_model` model, one sub-folder per site."""
    from attribution.dictionaries.formats import save_dictionary
    from attribution.dictionaries.kinds import random_sae

    for i, site in enumerate(("resid_0", "resid_1")):
        save_dictionary(random_sae(32, width, "topk", k=4, seed=i), folder / site,
                        {"model": str(model_dir), "site": site, "d": 32})
    return folder
