"""Behaviours without labels: samples the model predicts well, their representations,
and clusters of them (paper §5, after the quanta discovery of Michaud et al. 2023).

1. **Samples.** Text is packed into rows of ``max_context + 1`` tokens. Every
   position ``p`` of a row (with at least ``min_context`` tokens before the
   answer) is a candidate sample: the *context* is ``row[: p + 1]`` and the
   *answer* is ``row[p + 1]``. A candidate passes when the model's loss on the
   answer, ``-log2 p(answer | context)``, is below ``loss_threshold`` bits (the
   quanta paper used 0.1 bits). At most ``max_per_row`` samples are kept per
   row, spread evenly over the passing positions, so that one long predictable
   passage does not fill the catalog.
2. **Representations** ``[n, D]``, ``D = Σ_sites F`` (features of every site,
   concatenated in forward order):

   - ``gradient``: ``∂L/∂f_j`` summed over the context's positions, with
     ``L = -log p(answer)`` (nats). Since ``decode`` is affine,
     ``∂L/∂f_{t,j} = ∇_{x_t} L · W_dec[j]`` (the pass-through gradient), so one
     backward pass gives all sites (:func:`attribution.effects.attribution_patching`);
   - ``activation``: the feature activations ``f_j`` summed over positions;
   - ``both``: the two, each scaled to unit norm, concatenated (so the cosine of
     two samples is the mean of the two cosines).
3. **Clusters.** Cosine similarities ``C`` become the affinity
   ``A = 1 - arccos(C) / π`` (in ``[0, 1]``, as Michaud et al.), clustered by
   scikit-learn's spectral clustering with ``cluster_qr`` label assignment
   (deterministic: no k-means restarts).

The affinity is computed block by block from representation shards
(:func:`affinity_from_blocks`), so only two shards and the ``[n, n]`` matrix are
in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from attribution.dictionaries.kinds import Dictionary
from attribution.effects import attribution_patching, wide
from attribution.metrics import neg_log_prob
from attribution.model import tracing
from attribution.model.sites import Site
from attribution.model.wrapper import Batch, SFCModel

Representation = Literal["gradient", "activation", "both"]
REPRESENTATIONS: tuple[str, ...] = ("gradient", "activation", "both")
LN2 = math.log(2.0)


@dataclass(frozen=True)
class Sample:
    """One behaviour sample: a context the model continues correctly with low loss.

    ``row`` and ``position`` locate it in the packed text (the context is
    ``row[: position + 1]``, possibly cut to its last ``max_context`` tokens);
    ``tokens`` are the context's token ids, ``answer`` the next token's id and
    ``loss_bits`` the model's ``-log2 p(answer)``.
    """

    id: int
    row: int
    position: int
    tokens: tuple[int, ...]
    answer: int
    loss_bits: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> Sample:
        return cls(int(d["id"]), int(d["row"]), int(d["position"]), tuple(int(t) for t in d["tokens"]),
                   int(d["answer"]), float(d["loss_bits"]))


def pack_rows(tokenizer, texts: Iterable[str], row_len: int) -> Iterator[list[int]]:
    """Documents tokenized in order, joined by the end-of-text token, cut into rows of
    ``row_len`` tokens (the packing of :func:`attribution.dictionaries.corpus.corpus_contexts`),
    lazily: only as much text is tokenized as rows are taken."""
    sep = tokenizer.eos_token_id
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            stream.append(sep)
        while len(stream) >= row_len:
            yield stream[:row_len]
            stream = stream[row_len:]


def pad_batch(token_lists: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str = "cpu") -> Batch:
    """Left-padded :class:`Batch` of token id lists (padding masked, so any ``pad_id`` serves)."""
    if not token_lists:
        raise ValueError("No contexts given: pass at least one token list.")
    s = max(len(t) for t in token_lists)
    ids = torch.full((len(token_lists), s), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), s), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        if len(toks):
            ids[i, s - len(toks):] = torch.as_tensor(list(toks), dtype=torch.long)
            mask[i, s - len(toks):] = 1
    return Batch(ids.to(device), mask.to(device))


def answer_logit(answer_ids: Tensor) -> tracing.Metric:
    """``m = logit[answer]`` at the last position, per row (the other unpaired metric)."""
    answer_ids = torch.as_tensor(answer_ids).long()

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        last = logits[:, -1, :]
        return last.gather(1, answer_ids.to(last.device)[rows.to(last.device), None])[:, 0]

    return metric


def _spread(positions: list[int], k: int) -> list[int]:
    """Up to ``k`` of ``positions``, evenly spaced (first and last included)."""
    if len(positions) <= k:
        return positions
    if k == 1:
        return [positions[0]]
    return [positions[round(i * (len(positions) - 1) / (k - 1))] for i in range(k)]


@torch.no_grad()
def row_losses(model: SFCModel, rows: Tensor) -> Tensor:
    """``-log2 p(row[p + 1] | row[: p + 1])`` for every position, ``[n, L - 1]`` (bits)."""
    rows = rows.to(model.device)
    logits = model.hf(rows).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, rows[:, 1:, None])[..., 0]
    return (-logp / LN2).cpu()


def select_samples(
    model: SFCModel,
    rows: Tensor,
    *,
    first_row: int,
    first_id: int,
    loss_threshold: float = 0.1,
    min_context: int = 4,
    max_per_row: int = 3,
    batch_size: int = 16,
) -> list[Sample]:
    """The samples of ``rows [n, L]`` (token ids, row indices ``first_row + i``) whose loss
    is below ``loss_threshold`` bits, numbered from ``first_id`` (see the module docstring)."""
    out: list[Sample] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        bits = row_losses(model, chunk)
        for i in range(len(chunk)):
            passing = [p for p in range(min_context - 1, chunk.shape[1] - 1) if bits[i, p] < loss_threshold]
            for p in _spread(passing, max_per_row):
                out.append(Sample(first_id + len(out), first_row + start + i, p,
                                  tuple(chunk[i, : p + 1].tolist()), int(chunk[i, p + 1]), float(bits[i, p])))
    return out


def represent(
    model: SFCModel,
    dictionaries: Mapping[str, Dictionary],
    samples: Sequence[Sample],
    kind: Representation = "gradient",
    *,
    sites: list[Site] | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """Representations ``[n, Σ F]`` (float32) of ``samples`` (see the module docstring)."""
    if kind not in REPRESENTATIONS:
        raise ValueError(f"Unknown representation {kind!r}: choose one of {', '.join(REPRESENTATIONS)}.")
    if sites is None:
        sites = [s for s in model.all_sites() if s.name in dictionaries]
    sites = sorted(sites, key=lambda s: s.order)
    blocks = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        batch = pad_batch([s.tokens for s in chunk], device=model.device)
        answers = torch.tensor([s.answer for s in chunk])
        rows = torch.arange(len(chunk), device=model.device)
        mask = batch.attention_mask[..., None]
        need_grad = kind != "activation"
        with torch.set_grad_enabled(need_grad):
            run = tracing.run(model, batch, sites, neg_log_prob(answers), rows,
                              "total" if need_grad else "read", positions="last")
        grads = attribution_patching(run, sites) if need_grad else {}
        parts_g, parts_a = [], []
        for site in sites:
            dic = dictionaries[site.name]
            m = mask.to(dtype=dic.W_dec.dtype, device=dic.W_dec.device)
            if need_grad:
                parts_g.append((grads[site.name] * m).sum(1) @ dic.W_dec.T)
            if kind != "gradient":
                with torch.no_grad():
                    x = wide(run.acts[site.name].detach())
                    parts_a.append((dic.encode(x) * m).sum(1))
        if kind == "gradient":
            rep = torch.cat(parts_g, -1)
        elif kind == "activation":
            rep = torch.cat(parts_a, -1)
        else:
            g, a = torch.cat(parts_g, -1), torch.cat(parts_a, -1)
            rep = torch.cat([_unit(g), _unit(a)], -1)
        blocks.append(rep.detach().float().cpu().numpy())
    return np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def affinity_from_blocks(n_blocks: int, load_block: Callable[[int], np.ndarray]) -> np.ndarray:
    """The angular affinity ``1 - arccos(cos) / π`` ``[n, n]`` of representations stored as
    ``n_blocks`` row blocks (``load_block(i) -> [n_i, D]``), with at most two blocks loaded
    at a time. A zero representation has cosine 0 with everything (affinity ½)."""
    def unit(i: int) -> np.ndarray:
        x = load_block(i).astype(np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)

    sizes = [len(load_block(i)) for i in range(n_blocks)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    n = int(offsets[-1])
    cos = np.zeros((n, n))
    for i in range(n_blocks):
        a = unit(i)
        for j in range(i, n_blocks):
            b = a if j == i else unit(j)
            block = a @ b.T
            cos[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]] = block
            cos[offsets[j]:offsets[j + 1], offsets[i]:offsets[i + 1]] = block.T
    return 1.0 - np.arccos(np.clip(cos, -1.0, 1.0)) / np.pi


def cluster(affinity: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """Cluster labels ``[n]`` in ``0..n_clusters-1``, numbered by decreasing cluster size
    (ties: by smallest member), from spectral clustering of ``affinity [n, n]``."""
    n = affinity.shape[0]
    if n_clusters < 1:
        raise ValueError(f"The number of clusters must be at least 1, got {n_clusters}.")
    if n_clusters > n:
        raise ValueError(
            f"{n_clusters} clusters were asked for but there are only {n} samples: ask for at most {n} "
            "clusters, or for more samples."
        )
    if n_clusters == 1:
        return np.zeros(n, dtype=int)
    from sklearn.cluster import SpectralClustering

    raw = SpectralClustering(
        n_clusters=n_clusters, affinity="precomputed", assign_labels="cluster_qr", random_state=seed,
    ).fit_predict(affinity)
    order = sorted(set(raw.tolist()), key=lambda c: (-(raw == c).sum(), int(np.argmax(raw == c))))
    relabel = {c: i for i, c in enumerate(order)}
    return np.array([relabel[c] for c in raw.tolist()], dtype=int)


__all__ = ["REPRESENTATIONS", "Representation", "Sample", "affinity_from_blocks", "answer_logit", "cluster",
           "pack_rows", "pad_batch", "represent", "row_losses", "select_samples"]
