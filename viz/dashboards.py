"""Feature dashboards: what makes a feature fire, and what it writes.

For each feature of a circuit (a key ``"site/feature"``) a dashboard holds

- ``contexts``: the ``n_contexts`` texts of a corpus where the feature fires
  hardest (one context per text, at its strongest position), as a window of
  tokens with the feature's activation on each;
- ``promoted`` / ``suppressed``: the ``n_tokens`` vocabulary tokens whose
  logits the feature's decoder direction raises / lowers most, read directly
  as ``W_dec[f] @ W_U^T`` with ``W_U [vocab, d]`` the unembedding. This is the
  "direct logit" view: it skips the final norm and every later layer, so it
  describes what the feature writes, not everything it causes.

Logits are only defined when the decoder lives in the residual basis
(``W_dec.shape[1] == d_model``); for other sites the lists are empty.

Dashboards are computed in one pass over the corpus (a tqdm bar shows
progress) and cached as JSON under ``cache_dir``. The cache key hashes the
model name, each dictionary (its ``path`` attribute if it has one, else its
decoder weights), the corpus, the feature set and the options, so any change
recomputes. The file is written atomically.

- ``histogram``: how strongly the feature fires where it fires at all: counts
  of its non-zero activations over every corpus token, in ``HIST_BINS`` equal
  bins from 0 to its largest activation (``{"edges": [HIST_BINS + 1 floats],
  "counts": [HIST_BINS ints]}``), and ``density``: the fraction of corpus tokens
  where it is non-zero (``n_tokens`` tokens were read).

The result is the ``dashboards`` dict that :func:`viz.render_html` embeds:
``{key: {"contexts": [{"tokens": [str], "acts": [float]}], "promoted":
[{"token", "value"}], "suppressed": [...], "histogram": {...}, "density": float,
"n_tokens": int}}``.

:func:`circuit_dashboards` is the job that ``sfc discover``, ``sfc dashboards``
and ``sfc view --dashboards auto`` run: the dashboards of every feature node of
a circuit, over a bounded number of corpus tokens (:func:`corpus_texts`: the
model's own corpus by default, or a user's text file read by
:func:`read_corpus_file`), cached under :func:`dashboards_cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attribution.dictionaries.kinds import Dictionary
    from attribution.model.wrapper import SFCModel

CONTEXT_BEFORE = 12  # tokens shown before the strongest position
CONTEXT_AFTER = 4  # and after it
HIST_BINS = 20  # bins of the activation histogram
DEFAULT_CORPUS_TOKENS = 16_384  # corpus tokens read for a circuit's dashboards (sfc discover)
CHUNK_TOKENS = 64  # longest text (in tokens) a corpus document is cut into


def parse_feature_key(key: str) -> tuple[str, int]:
    """``"resid_3/1234"`` -> ``("resid_3", 1234)``."""
    site, sep, feat = key.rpartition("/")
    if not sep or not site or not feat.isdigit():
        raise ValueError(f"{key!r} is not a feature key: expected 'site/feature', e.g. 'resid_3/1234'.")
    return site, int(feat)


def _fingerprint(dictionary: Dictionary) -> str:
    path = getattr(dictionary, "path", None)
    if path is not None:
        return f"path:{path}"
    w = dictionary.W_dec.detach().float().contiguous().cpu().numpy()
    return "sha256:" + hashlib.sha256(w.tobytes()).hexdigest()


def cache_key(model_name: str, dictionaries: Mapping[str, Dictionary], feature_keys: list[str],
              texts: list[str], options: dict[str, Any]) -> str:
    """The hash that names a dashboard cache file (see the module docstring)."""
    sites = sorted({parse_feature_key(k)[0] for k in feature_keys})
    corpus = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    doc = {
        "model": model_name,
        "dictionaries": {s: _fingerprint(dictionaries[s]) for s in sites},
        "corpus": corpus,
        "n_texts": len(texts),
        "features": sorted(set(feature_keys)),
        "options": options,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode("utf-8")).hexdigest()


def compute_dashboards(
    model: SFCModel,
    dictionaries: Mapping[str, Dictionary],
    feature_keys: list[str],
    texts: list[str],
    n_contexts: int = 8,
    n_tokens: int = 10,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Dashboards for ``feature_keys`` over the corpus ``texts`` (see the module docstring).

    With ``cache_dir``, a result computed before for the same inputs is read
    back instead of running the model; ``progress`` shows a tqdm bar.
    """
    import torch
    from tqdm.auto import tqdm

    from attribution.cache import atomic_write_bytes
    from attribution.model.tracing import run

    keys = sorted(set(feature_keys))
    if not keys:
        return {}
    if not texts:
        raise ValueError("The corpus is empty: give at least one text to find top-activating contexts in.")
    by_site: dict[str, list[int]] = {}
    for key in keys:
        site, feat = parse_feature_key(key)
        if site not in dictionaries:
            raise ValueError(f"No dictionary for site {site!r} (needed by feature {key}): pass it in `dictionaries`.")
        if feat >= dictionaries[site].W_dec.shape[0]:
            raise ValueError(f"Feature {key} is out of range: the dictionary at {site} has {dictionaries[site].W_dec.shape[0]} features.")
        by_site.setdefault(site, []).append(feat)

    options = {"n_contexts": n_contexts, "n_tokens": n_tokens, "window": [CONTEXT_BEFORE, CONTEXT_AFTER],
               "hist_bins": HIST_BINS}
    path = None
    if cache_dir is not None:
        digest = cache_key(model.name, dictionaries, keys, list(texts), options)
        path = Path(cache_dir).expanduser() / f"dashboards-{digest[:24]}.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))

    sites = model.sites(list(by_site))
    vocab: dict[int, str] = {}

    def tok(i: int) -> str:
        if i not in vocab:
            vocab[i] = model.token_strings(torch.tensor([i]))[0]
        return vocab[i]

    # best[key]: list of (value, tokens, acts), at most n_contexts, strongest first.
    best: dict[str, list[tuple[float, list[int], list[float]]]] = {k: [] for k in keys}
    floor = {s: torch.full((len(f),), 0.0) for s, f in by_site.items()}  # value a context must beat
    fired: dict[str, list[list[Any]]] = {s: [[] for _ in f] for s, f in by_site.items()}  # non-zero acts
    n_read = 0

    def no_metric(logits: Any, rows: Any) -> Any:  # lets the pass skip all but the last position's logits
        return logits[:, -1, 0] * 0

    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc="dashboards", unit="batch", disable=not progress):
            batch = model.tokenize(list(texts[start:start + batch_size]))
            trace = run(model, batch, sites, no_metric, rows=torch.arange(len(batch)), mode="read",
                        positions="last")
            mask = batch.attention_mask.bool().cpu()
            ids = batch.input_ids.cpu()
            n_read += int(mask.sum())
            for site, feats in by_site.items():
                acts = dictionaries[site].encode(trace.acts[site].float())[..., feats].cpu()  # [b, s, k]
                live = acts[mask]  # [real tokens, k]
                for j in torch.nonzero((live > 0).any(0)).flatten().tolist():
                    col = live[:, j]
                    fired[site][j].append(col[col > 0])
                acts = acts.masked_fill(~mask[..., None], float("-inf"))
                top, pos = acts.max(dim=1)  # [b, k]: one context per text, at its strongest position
                rows, cols = torch.nonzero(top > floor[site][None, :], as_tuple=True)
                for r, j in zip(rows.tolist(), cols.tolist()):
                    p = int(pos[r, j])
                    first = int(mask[r].nonzero()[0])
                    lo, hi = max(first, p - CONTEXT_BEFORE), min(ids.shape[1], p + CONTEXT_AFTER + 1)
                    window = acts[r, lo:hi, j].clamp(min=0.0).tolist()
                    entry = (float(top[r, j]), ids[r, lo:hi].tolist(), window)
                    lst = best[f"{site}/{feats[j]}"]
                    lst.append(entry)
                    lst.sort(key=lambda e: -e[0])
                    del lst[n_contexts:]
                    if len(lst) == n_contexts:
                        floor[site][j] = lst[-1][0]

    out: dict[str, dict] = {}
    unembed = model.hf.get_output_embeddings().weight.detach().float()  # [vocab, d]
    for site, feats in by_site.items():
        w_dec = dictionaries[site].W_dec.detach().float()[feats]  # [k, d]
        logits = w_dec @ unembed.T if w_dec.shape[1] == unembed.shape[1] else None  # [k, vocab]
        for j, f in enumerate(feats):
            key = f"{site}/{f}"
            dash: dict[str, Any] = {
                "contexts": [{"tokens": [tok(i) for i in t], "acts": [round(a, 4) for a in a_]}
                             for _, t, a_ in best[key]],
                "promoted": [],
                "suppressed": [],
            }
            if logits is not None:
                k = min(n_tokens, logits.shape[1])
                hi_v, hi_i = logits[j].topk(k)
                lo_v, lo_i = (-logits[j]).topk(k)
                dash["promoted"] = [{"token": tok(int(i)), "value": round(float(v), 4)} for v, i in zip(hi_v, hi_i)]
                dash["suppressed"] = [{"token": tok(int(i)), "value": round(-float(v), 4)} for v, i in zip(lo_v, lo_i)]
            vals = torch.cat(fired[site][j]) if fired[site][j] else torch.zeros(0)
            top_v = float(vals.max()) if len(vals) else 0.0
            counts = torch.histc(vals, bins=HIST_BINS, min=0.0, max=top_v) if len(vals) else torch.zeros(HIST_BINS)
            dash["histogram"] = {
                "edges": [round(top_v * b / HIST_BINS, 4) for b in range(HIST_BINS + 1)],
                "counts": [int(c) for c in counts.tolist()],
            }
            dash["density"] = round(len(vals) / max(n_read, 1), 6)
            dash["n_tokens"] = n_read
            out[key] = dash
    if path is not None:
        atomic_write_bytes(path, json.dumps(out).encode("utf-8"))
    return out


# ----------------------------------------------------------------------------- a circuit's dashboards


def dashboards_cache_dir(model_name: str) -> Path:
    """Where dashboards of ``model_name`` are cached: ``$SFC_DASHBOARDS_CACHE`` if set
    (a cold cache for a benchmark, say), else ``<cache_dir()>/dashboards/<model>``."""
    import os

    from attribution.cache import cache_dir

    root = os.environ.get("SFC_DASHBOARDS_CACHE")
    return Path(root).expanduser() / model_name if root else cache_dir() / "dashboards" / model_name


def read_corpus_file(path: str | Path) -> list[str]:
    """The documents of a plain-text corpus file: its paragraphs (blocks between blank lines).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a file
    that is not UTF-8 text (binary, say) or holds no text at all.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No corpus file at {path}: give a plain-text file (UTF-8), one paragraph per block.")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"The corpus file {path} is not UTF-8 text: give a plain-text file, not a binary one.") from None
    if "\x00" in text:
        raise ValueError(f"The corpus file {path} holds NUL bytes, so it is not text: give a plain-text file.")
    docs = [" ".join(block.split()) for block in text.replace("\r\n", "\n").split("\n\n")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"The corpus file {path} is empty: give a text file with at least one paragraph.")
    return docs


def corpus_texts(tokenizer: Any, n_tokens: int = DEFAULT_CORPUS_TOKENS, documents: list[str] | None = None,
                 max_tokens: int = CHUNK_TOKENS) -> list[str]:
    """About ``n_tokens`` tokens of text, as pieces of at most ``max_tokens`` tokens.

    ``documents`` default to the model's own corpus (the ``train`` split of
    :mod:`attribution.dictionaries.corpus`, in its fixed order). Each document
    is cut at token boundaries (character offsets of the tokenizer, so every
    piece is an exact substring of its document); pieces are taken in order
    until ``n_tokens`` tokens are collected, and returned shortest first, so
    that batches of similar lengths waste little padding. Each piece is one
    candidate context of a dashboard.
    """
    if n_tokens < 1:
        raise ValueError(f"The number of corpus tokens must be at least 1, got {n_tokens}.")
    if documents is None:
        from attribution.dictionaries.corpus import load_corpus

        documents = load_corpus("train")
    pieces: list[str] = []
    total = 0
    for doc in documents:
        if total >= n_tokens:
            break
        enc = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        for lo in range(0, len(offsets), max_tokens):
            part = offsets[lo:lo + max_tokens]
            piece = doc[part[0][0]:part[-1][1]].strip()
            if piece:
                pieces.append(piece)
                total += len(part)
            if total >= n_tokens:
                break
    if not pieces:
        raise ValueError("The corpus holds no text to read contexts from: give a non-empty corpus.")
    return sorted(pieces, key=lambda t: (len(t), t))


def circuit_feature_keys(circuit: Any) -> list[str]:
    """The feature keys ``"site/feature"`` of a circuit's feature nodes (no error nodes, no ``y``), sorted."""
    from viz.figure import feature_key, load_circuit

    data = load_circuit(circuit)
    return sorted({k for n in data["nodes"] if (k := feature_key(n)) is not None})


def circuit_dashboards(
    model: SFCModel,
    dictionaries: Mapping[str, Dictionary],
    circuit: Any,
    *,
    n_tokens: int = DEFAULT_CORPUS_TOKENS,
    corpus: str | Path | None = None,
    cache_dir: str | Path | None | bool = True,
    n_contexts: int = 8,
    batch_size: int = 32,
    progress: bool = True,
) -> dict:
    """Dashboards for every feature node of ``circuit`` (a ``Circuit``, dict or JSON path).

    Contexts come from ``n_tokens`` tokens of ``corpus`` (a plain-text file, see
    :func:`read_corpus_file`) or, by default, of the model's own corpus.
    ``cache_dir=True`` uses :func:`dashboards_cache_dir`; ``None``/``False``
    disables the cache. Every site of the circuit's features must be in
    ``dictionaries``.
    """
    docs = read_corpus_file(corpus) if corpus is not None else None  # bad files fail before model work
    keys = circuit_feature_keys(circuit)
    if not keys:
        return {}
    texts = corpus_texts(model.tokenizer, n_tokens, docs)
    if cache_dir is True:
        cache_dir = dashboards_cache_dir(model.name)
    return compute_dashboards(model, dictionaries, keys, texts, n_contexts=n_contexts,
                              cache_dir=cache_dir or None, batch_size=batch_size, progress=progress)
