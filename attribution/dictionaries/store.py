"""The cached dictionary set of a model: build it, load it, measure it.

``$SFC_CACHE/dictionaries/<model>/<site>/`` holds one dictionary_learning
``ae.pt`` + ``config.json`` per site, with ``config["sfc"]`` recording the
model id, site, ``d``, width, ``k``, tokens trained and training statistics.

- :func:`build_dictionaries` harvests all requested sites in one pass over
  the corpus, then trains one TopK SAE per site, bottom-up; each residual SAE
  starts from the one of the residual site below it (see
  :mod:`attribution.dictionaries.training`). Each site folder appears atomically when its
  SAE is done, so an interrupted build resumes: finished sites are skipped (and
  still seed the next site) and a complete harvest is reused.
- :func:`load_cached_dictionaries` loads the set and refuses files that are missing,
  corrupt, or built for another model.
- :func:`evaluate_dictionaries` measures each dictionary on held-out text:
  variance explained, L0, and the cross-entropy loss recovered when the
  dictionary's reconstruction replaces the site (without its error term).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from attribution.cache import (
    activation_cache,
    atomic_dir,
    dictionary_cache,
    remove_stale_temporaries,
)
from attribution.dictionaries.corpus import CORPUS_PATH, corpus_contexts
from attribution.dictionaries.formats import (
    DictionaryFileError,
    load_dictionary,
    read_header,
    read_metadata,
    save_dictionary,
)
from attribution.dictionaries.harvest import dtype_name, fast_dtype, harvest
from attribution.dictionaries.kinds import Dictionary
from attribution.dictionaries.training import TrainConfig, reconstruction_stats, train_topk
from attribution.model.sites import Site
from attribution.model.tracing import run
from attribution.model.wrapper import Batch, SFCModel

_log = logging.getLogger(__name__)
CTX_LEN = 128
SKIP_FIRST = 1  # the attention-sink position; see attribution.dictionaries.harvest


def _build_hint(model_name: str, sites: list[str] | None = None) -> str:
    flag = f" --sites {' '.join(sites)}" if sites else ""
    return f"`sfc dictionaries build --model {model_name}{flag}`"


def check_fingerprint(folder: Path, meta: dict, model: SFCModel, site: str) -> None:
    """Refuse a dictionary whose metadata records another model's fingerprint
    (:mod:`attribution.model.identity`); dictionaries that record none pass."""
    recorded = meta.get("model_fingerprint")
    if recorded is not None and recorded != model.fingerprint:
        raise DictionaryFileError(
            f"The dictionary in {folder} was built for another model (fingerprint {recorded[:16]}, "
            f"this model's is {model.fingerprint[:16]}): a model of the same name or path but different "
            f"weights; rebuild it with {_build_hint(model.name, [site])}."
        )


def cached_folders(
    model_name: str,
    sites: list[str] | None = None,
    *,
    model: SFCModel | None = None,
    root: Path | None = None,
) -> dict[str, Path]:
    """The cache folders of ``model_name``'s dictionaries, keyed by site name, each checked
    from its metadata and file headers only (no weights are read).

    ``sites=None`` takes every cached site (for ``smollm2-135m``: the default
    scope). With ``model`` given, the cache folder is the model's
    :attr:`~attribution.model.wrapper.SFCModel.cache_key` (its name plus a
    fingerprint of its weights), the site names are checked against it, each
    dictionary's ``d`` against the site's, and the fingerprint its metadata
    records against the model's. Raises :class:`DictionaryFileError` naming the
    fix for a missing, corrupt or foreign dictionary.
    """
    if model is not None:
        model_name = model.name
    root = root or dictionary_cache(model.cache_key if model is not None else model_name)
    if model is not None and sites is not None:
        model.sites(sites)  # unknown site names raise here, listing what exists
    if sites is None:
        if model_name == "smollm2-135m":
            from attribution.model.embedded import DEFAULT_SITES

            sites = list(DEFAULT_SITES)
        else:
            sites = sorted(p.name for p in root.iterdir() if (p / "ae.pt").exists()) if root.exists() else []
            if not sites:
                raise DictionaryFileError(
                    f"No dictionaries for {model_name} in {root}: build them with {_build_hint(model_name)}."
                )
    site_d = {s.name: s.d for s in model.sites(sites)} if model is not None else {}
    missing = [s for s in sites if not (root / s / "ae.pt").exists()]
    if missing:
        raise DictionaryFileError(
            f"No dictionary for site(s) {missing} of {model_name} in {root}: build them with "
            f"{_build_hint(model_name, missing)}."
        )
    out: dict[str, Path] = {}
    for site in sites:
        folder = root / site
        meta = read_metadata(folder)
        if model is not None and meta.get("model_fingerprint") is not None:
            check_fingerprint(folder, meta, model, site)
        elif meta.get("model") not in (None, model_name):
            raise DictionaryFileError(
                f"The dictionary in {folder} was built for model {meta['model']!r}, not {model_name!r}: "
                f"rebuild it with {_build_hint(model_name, [site])}."
            )
        header = read_header(folder)
        want = site_d.get(site, meta.get("d"))
        if want is not None and header.d != want:
            raise DictionaryFileError(
                f"The dictionary for site {site} in {folder} reads d={header.d} "
                f"(W_dec {(header.width, header.d)}) but the site has d={want} "
                f"(expected W_dec [F, {want}]): it was built for another model; rebuild it with "
                f"{_build_hint(model_name, [site])}."
            )
        out[site] = folder
    return out


def load_cached_dictionaries(
    model_name: str,
    sites: list[str] | None = None,
    *,
    model: SFCModel | None = None,
    root: Path | None = None,
) -> dict[str, Dictionary]:
    """The cached dictionaries of ``model_name``, keyed by site name, loaded after the
    checks of :func:`cached_folders` (same arguments)."""
    folders = cached_folders(model_name, sites, model=model, root=root)
    return {site: load_dictionary(folder) for site, folder in folders.items()}


def _build_settings(config: TrainConfig, n_tokens: int, corpus: str, dtype: torch.dtype, warm_start: bool) -> dict:
    """Everything a build's dictionaries depend on besides the model and site (the device aside)."""
    train = {k: v for k, v in asdict(config).items() if k != "device"}
    return {"train": train, "n_tokens": n_tokens, "corpus_sha256": corpus, "harvest_dtype": dtype_name(dtype),
            "warm_start": warm_start}


def _is_built(folder: Path, model: SFCModel, site: Site, settings: dict) -> bool:
    """Whether ``folder`` holds this site's dictionary of this model (by fingerprint where recorded,
    else by name: a copy of the model under another path is the same model) from a build with the
    same ``settings``."""
    meta = read_metadata(folder)
    recorded = meta.get("model_fingerprint")
    return (
        (folder / "ae.pt").exists()
        and (recorded == model.fingerprint if recorded is not None else meta.get("model") == model.name)
        and meta.get("d") == site.d
        and meta.get("build") == settings
    )


def corpus_sha() -> str:
    return hashlib.sha256(CORPUS_PATH.read_bytes()).hexdigest()[:12]


def build_dictionaries(
    model: SFCModel,
    sites: list[Site],
    config: TrainConfig,
    n_tokens: int,
    *,
    root: Path | None = None,
    contexts: Tensor | None = None,
    batch_size: int = 16,
    keep_activations: bool = False,
    warm_start: bool = True,
    harvest_dtype: torch.dtype | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Harvest ``sites`` over about ``n_tokens`` corpus tokens and train one TopK SAE per site.

    ``root`` defaults to the cache folder of the model's
    :attr:`~attribution.model.wrapper.SFCModel.cache_key` (its fingerprint, not
    the string that named it), so a model given by a path never writes into its
    own folder and two different models never share dictionaries; each
    dictionary records ``model_fingerprint``.
    Sites whose folder already holds a dictionary of this model and ``d`` from a
    build with the same settings (the training config, tokens, corpus and
    harvest dtype and warm start, recorded as ``build`` in its metadata) are skipped; others
    are rebuilt. Sites train in depth order; with ``warm_start`` a
    site starts from the dictionary of the previous site of the same kind and
    ``d`` (recorded as ``init_from`` in its metadata). The model runs in
    ``harvest_dtype`` for the harvest (``None``: :func:`~attribution.dictionaries.harvest.fast_dtype`
    of its device). ``contexts [n, ctx_len]`` overrides the corpus (tests use
    it). Returns ``{site: folder}``.
    """
    root = root or dictionary_cache(model.cache_key)
    remove_stale_temporaries(root)
    dtype = harvest_dtype or fast_dtype(model.device)
    sha = corpus_sha() if contexts is None else hashlib.sha256(contexts.numpy().tobytes()).hexdigest()[:12]
    settings = _build_settings(config, n_tokens if contexts is None else contexts.numel(), sha, dtype, warm_start)
    todo = [s for s in sites if not _is_built(root / s.name, model, s, settings)]
    for s in sites:
        if s not in todo:
            log(f"{s.name}: already built in {root / s.name}, skipping.")
        elif (root / s.name / "ae.pt").exists():
            log(f"{s.name}: the dictionary in {root / s.name} was built with other settings; rebuilding it.")
    if todo:
        if contexts is None:
            contexts = corpus_contexts(model.tokenizer, n_tokens, CTX_LEN, "train")
        acts_root = activation_cache(model.cache_key)
        remove_stale_temporaries(acts_root)
        # Harvest every requested site (not only those left), so a resumed build reuses it.
        t0 = time.time()
        acts = harvest(model, sites, contexts, acts_root, batch_size=batch_size,
                       skip_first=SKIP_FIRST, corpus_sha=sha, dtype=dtype)
        log(f"harvested {len(sites)} sites x {contexts.numel()} tokens in {time.time() - t0:.0f} s "
            f"(model in {dtype_name(dtype)})")
        previous: dict[tuple[str, int], tuple[str, Path]] = {}  # (kind, d) -> last site trained or built
        for site in sorted(sites, key=lambda s: s.order):
            source = previous.get((site.kind, site.d)) if warm_start else None
            previous[(site.kind, site.d)] = (site.name, root / site.name)
            if site not in todo:
                continue
            init = load_dictionary(source[1]) if source else None
            sae, stats = train_topk(acts[site.name], config, desc=f"train {site.name}", init=init)
            metadata = {
                "model": model.name, "model_fingerprint": model.fingerprint, "site": site.name, "d": site.d, "width": config.width,
                "k": config.k, "tokens_trained": stats.tokens_trained,
                "tokens_harvested": int(acts[site.name].shape[0]), "skip_first": SKIP_FIRST,
                "corpus_sha256": sha, "harvest_dtype": dtype_name(dtype),
                "init_from": source[0] if source else None, "build": settings,
                "train": {
                    "steps": stats.steps, "seconds": round(stats.seconds, 1),
                    "initial_fvu": stats.initial_fvu, "final_fvu": stats.final_fvu,
                    "dead_fraction": stats.dead_fraction, "scale": stats.scale,
                    "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr,
                    "aux_coef": config.aux_coef, "dead_after": config.dead_after, "seed": config.seed,
                    "norm_cap": config.norm_cap, "capped_rows": stats.capped_rows,
                    "refit_fvu": stats.refit_fvu, "ridge": config.ridge,
                },
            }
            with atomic_dir(root / site.name) as tmp:
                save_dictionary(sae, tmp, metadata)
            refit = "" if stats.refit_fvu is None else (
                " (decoder refit undone: no gain)" if stats.refit_fvu[1] is None
                else f" -> {stats.refit_fvu[1]:.3f} after the decoder refit")
            log(f"{site.name}: fvu {stats.final_fvu:.3f}{refit}, dead {stats.dead_fraction:.3f}, "
                f"{stats.seconds:.0f} s" + (f" (from {source[0]})" if source else ""))
        if not keep_activations:
            harvest_folder = Path(acts[sites[0].name].filename).parent
            del acts
            shutil.rmtree(harvest_folder, ignore_errors=True)
    return {s.name: root / s.name for s in sites}


def _ce_metric(ids: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Mean next-token cross-entropy per row: ``metric(logits [n, s, V], rows) -> [n]``."""

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        targets = ids[rows, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).mean(-1)

    return metric


@torch.no_grad()
def evaluate_dictionaries(
    model: SFCModel,
    dictionaries: dict[str, Dictionary],
    n_tokens: int = 2048,
    *,
    contexts: Tensor | None = None,
    batch_size: int = 8,
    metadata: dict[str, dict] | None = None,
) -> list[dict]:
    """One row per site on held-out text: variance explained, L0, CE loss recovered.

    ``ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean)``, where
    the site's activation at positions ``>= SKIP_FIRST`` is replaced by zeros
    (``CE_zero``) or by the dictionary's reconstruction with no error term
    (``CE_spliced``), one site at a time. Variance explained and L0 are over the
    same positions. ``dead_fraction`` comes from each site's training
    ``metadata`` (latents that had not fired for the trainer's ``dead_after``
    tokens at the end of training); ``never_active_heldout`` counts latents
    silent on the held-out tokens, which are too few to judge rare features.
    """
    if contexts is None:
        contexts = corpus_contexts(model.tokenizer, n_tokens + CTX_LEN, CTX_LEN, "heldout")
    contexts = contexts.to(model.device)
    sites = model.sites(list(dictionaries))
    rows = torch.arange(contexts.shape[0], device=model.device)
    metric = _ce_metric(contexts)
    batches = list(zip(contexts.split(batch_size), rows.split(batch_size)))
    clean, acts = [], {s.name: [] for s in sites}
    for ids, r in batches:
        tr = run(model, Batch(ids, torch.ones_like(ids)), sites, metric, r)
        clean.append(tr.metric)
        for s in sites:
            acts[s.name].append(tr.acts[s.name].detach())
    ce_clean = float(torch.cat(clean).mean())
    out = []
    for site in sites:
        sae = dictionaries[site.name].to(model.device)
        x = torch.cat(acts[site.name])  # [n, s, d]
        rec = reconstruction_stats(sae, x[:, SKIP_FIRST:].reshape(-1, site.d))
        x_hat = x.clone()
        x_hat[:, SKIP_FIRST:] = sae.decode(sae.encode(x[:, SKIP_FIRST:]))
        x_zero = x.clone()
        x_zero[:, SKIP_FIRST:] = 0
        ce = {}
        for label, full in (("spliced", x_hat), ("zero", x_zero)):
            vals = []
            for ids, r in batches:
                tr = run(model, Batch(ids, torch.ones_like(ids)), [site], metric, r,
                         replace={site.name: full[r]})
                vals.append(tr.metric)
            ce[label] = float(torch.cat(vals).mean())
        meta_dead = ((metadata or {}).get(site.name) or {}).get("train", {}).get("dead_fraction")
        out.append({
            "site": site.name, "width": sae.width, "l0": rec["l0"],
            "variance_explained": rec["variance_explained"],
            "dead_fraction": meta_dead,
            "never_active_heldout": rec["never_active_fraction"],
            "ce_clean": ce_clean, "ce_spliced": ce["spliced"], "ce_zero": ce["zero"],
            "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce_clean),
            "tokens": int(x[:, SKIP_FIRST:].shape[0] * x[:, SKIP_FIRST:].shape[1]),
        })
    return out
