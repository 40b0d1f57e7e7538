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

The result is the ``dashboards`` dict that :func:`viz.render_html` embeds:
``{key: {"contexts": [{"tokens": [str], "acts": [float]}], "promoted":
[{"token", "value"}], "suppressed": [...]}}``.
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
) -> dict:
    """Dashboards for ``feature_keys`` over the corpus ``texts`` (see the module docstring)."""
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

    options = {"n_contexts": n_contexts, "n_tokens": n_tokens, "window": [CONTEXT_BEFORE, CONTEXT_AFTER]}
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
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc="dashboards", unit="batch"):
            batch = model.tokenize(list(texts[start:start + batch_size]))
            trace = run(model, batch, sites, None, rows=torch.arange(len(batch)), mode="read")
            mask = batch.attention_mask.bool().cpu()
            ids = batch.input_ids.cpu()
            for site, feats in by_site.items():
                acts = dictionaries[site].encode(trace.acts[site].float())[..., feats].cpu()  # [b, s, k]
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
            out[key] = dash
    if path is not None:
        atomic_write_bytes(path, json.dumps(out).encode("utf-8"))
    return out
