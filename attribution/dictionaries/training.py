"""Training TopK sparse autoencoders (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

A TopK SAE keeps, for each token, only the ``k`` largest encoder
pre-activations, so sparsity is set directly instead of through an L1 penalty
(which also shrinks the surviving activations):

    f = TopK(ReLU(W_enc^T (x - b_dec) + b_enc)),   x_hat = f W_dec + b_dec.

Loss = normalised MSE of the reconstruction + ``aux_coef`` × AuxK loss. The
AuxK term reconstructs the main reconstruction's residual ``x - x_hat`` with
the ``k_aux`` largest *dead* latents (those that have not fired for
``dead_after`` tokens), which gives dead latents a gradient and revives them.
Decoder rows are kept at unit norm (their gradient component along the row is
removed before each Adam step, and rows are renormalised after), so feature
magnitudes live in ``f``. ``W_enc`` starts as ``W_dec^T`` and ``b_dec`` as the
data mean, as in the paper.

Activations are divided by one scalar, so that the mean squared norm is ``d``,
while training; :func:`to_dictionary` folds it back in, so the saved
:class:`~attribution.dictionaries.SAE` reads raw activations.

Three things make the most of a small harvest (10^5 tokens on two CPU cores):

- **High-norm rows are down-weighted.** Some tokens have a residual norm far
  above the median in SmolLM2: ` the` runs 3-12x at resid_3 to resid_9 (about
  2% of all tokens), and from resid_12 up about 15 tokens per 200k (newlines,
  end-of-text: secondary attention sinks) reach 5-190x. A squared error grows
  with the squared norm, so one such row in a batch dominates that step's loss
  and gradient, and the decoder refit below.
  A row whose norm exceeds ``norm_cap`` x the median norm weighs
  ``(norm_cap x median / norm)^2`` in the loss, as much as a row of the capped
  norm would: the dictionary still learns to reconstruct it, without it
  steering everything else. (The first position, the main attention sink, is
  not harvested at all; see :mod:`attribution.dictionaries.harvest`.)
- **Warm start from a neighbouring site** (``init=``): nearby residual sites
  share many of their features, so starting from the SAE of the site below
  reaches a lower error than a random start in the same steps (layer-wise
  transfer, Ghilardi et al. 2024; resid_27 from resid_24, three layers apart:
  0.793 against 0.764 held-out variance explained).
  :func:`~attribution.dictionaries.store.build_dictionaries` chains the sites of
  each kind from the bottom up.
- **A least-squares decoder** (``refit_decoder``): with the encoder fixed, the
  best decoder for its codes is a ridge regression, solved exactly after SGD
  (one step of the "method of optimal directions"). Rows are then brought back
  to unit norm by moving each row's norm into its encoder column and bias, so a
  latent that fires still contributes its fitted ``f_j W_dec[j]``.

Everything runs unchanged on CPU or CUDA (``TrainConfig.device``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from tqdm.auto import tqdm

from attribution.dictionaries.kinds import SAE


@dataclass
class TrainConfig:
    """Hyper-parameters of one TopK SAE.

    ``lr=None`` uses Gao et al.'s ``2e-4 / sqrt(width / 2^14)``, meant for
    billions of tokens; on this project's 10^5-token harvests, lr 2e-3 at
    batch 256 reaches a lower held-out error in the same time (measured on
    SmolLM2 resid_3 and resid_27), and batch 512 at lr 2.8e-3 (the square-root
    rule) the same error in about 10% less time.
    """

    width: int = 2304
    k: int = 64
    epochs: float = 2.0
    batch_size: int = 512
    lr: float | None = 2.8e-3
    aux_coef: float = 1 / 32
    k_aux: int | None = None  # default d // 2
    dead_after: int = 50_000  # tokens without firing before a latent counts as dead (at most n / 2)
    seed: int = 0
    device: str = "cpu"
    norm_cap: float | None = 3.0  # rows above this x the median norm are down-weighted (None: never)
    refit_decoder: bool = True
    ridge: float = 3e-3  # decoder ridge, relative to the mean squared code
    refit_rows: int | None = None  # rows the decoder refit reads (None: all); its cost is linear in them


@dataclass
class TrainStats:
    """What training measured: final-epoch fraction of variance unexplained, dead fraction, cost."""

    tokens_trained: int = 0
    steps: int = 0
    seconds: float = 0.0
    initial_fvu: float = float("nan")
    final_fvu: float = float("nan")
    # FVUs here are weighted by the norm cap's row weights, like the loss.
    refit_fvu: tuple[float, float | None] | None = None  # before and after the refit (after: None if undone)
    capped_rows: int = 0  # rows down-weighted by norm_cap
    dead_fraction: float = float("nan")
    scale: float = 1.0
    history: list[float] = field(default_factory=list)


class TopKSAE(nn.Module):
    """The trainable TopK SAE on scaled activations ``[n, d]``; decoding is a sparse gather."""

    def __init__(self, d: int, width: int, k: int, generator: torch.Generator) -> None:
        super().__init__()
        w = torch.randn(width, d, generator=generator)
        w = w / w.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # [F, d]
        self.W_enc = nn.Parameter(w.T.clone())  # [d, F]
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.k = k

    def pre(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``[n, F]``: ``(x - b_dec) W_enc + b_enc``.

        Written as ``x W_enc - (b_dec W_enc - b_enc)`` so that backward never
        forms the gradient with respect to ``x - b_dec`` (an ``[n, F] x [F, d]``
        product, needed only for ``b_dec``); ``b_dec``'s gradient comes from the
        one-row product instead.
        """
        return x @ self.W_enc - (self.b_dec @ self.W_enc - self.b_enc)

    def decode_sparse(self, values: Tensor, indices: Tensor) -> Tensor:
        """``sum_j values[:, j] W_dec[indices[:, j]]``, shape ``[n, d]``, without a dense ``[n, F]``."""
        return F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_hat [n, d], values [n, k], indices [n, k], pre [n, F])``."""
        pre = self.pre(x)
        values, indices = pre.topk(self.k, dim=-1)
        values = torch.relu(values)
        return self.decode_sparse(values, indices) + self.b_dec, values, indices, pre

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (keeps rows on the sphere)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec


def _top_dead(pre: Tensor, dead: Tensor, k_aux: int) -> tuple[Tensor, Tensor]:
    """The ``min(k_aux, #dead)`` largest pre-activations ``[b, k']`` of the dead latents, and their indices.

    Reads only the dead columns of ``pre [b, F]`` (usually a handful) instead of
    ranking all ``F``; when no more than ``k_aux`` are dead, all of them are taken.
    """
    dead_idx = dead.nonzero().squeeze(1)
    values = pre[:, dead_idx]
    if len(dead_idx) <= k_aux:
        return values, dead_idx.expand(pre.shape[0], -1).contiguous()
    values, pos = values.topk(k_aux, dim=-1)
    return values, dead_idx[pos]


def _code_moments(values: Tensor, indices: Tensor, w: Tensor, x: Tensor, width: int) -> Tensor:
    """``[f 1]^T diag(w) [f 1 x]``, shape ``[width + 1, width + 1 + d]``, for codes ``f [n, width]``
    given as ``values, indices [n, k]``, row weights ``w [n]`` and rows ``x [n, d]``.

    Row ``j`` is a weighted sum over only the rows where latent ``j`` fires (about
    ``n k / width`` of them), done as one ``embedding_bag`` with one bag per latent;
    the dense product would multiply the ``1 - k / width`` zeros too (4x slower
    here at k / width = 1/36).
    """
    n = x.shape[0]
    dense = torch.zeros(n, width + 1, dtype=x.dtype, device=x.device)
    dense.scatter_(1, indices, values)
    dense[:, width] = 1.0
    table = torch.cat([dense, x], dim=1)  # [n, width + 1 + d]
    latents = torch.cat([indices, torch.full((n, 1), width, dtype=indices.dtype, device=x.device)], 1)
    weights = torch.cat([values, torch.ones_like(values[:, :1])], 1) * w[:, None]
    flat = latents.reshape(-1)
    order = flat.argsort(stable=True)  # rows in order within each bag: a deterministic float32 sum
    rows = torch.arange(n, device=x.device).repeat_interleave(latents.shape[1])[order]
    offsets = torch.zeros(width + 1, dtype=torch.long, device=x.device)
    offsets[1:] = torch.bincount(flat, minlength=width + 1).cumsum(0)[:-1]
    return F.embedding_bag(rows, table, offsets, per_sample_weights=weights.reshape(-1)[order], mode="sum")


def _chunks(n: int, chunk: int, gen: torch.Generator) -> list[tuple[int, int]]:
    starts = list(range(0, n, chunk))
    order = torch.randperm(len(starts), generator=gen).tolist()
    return [(starts[i], min(starts[i] + chunk, n)) for i in order]


def _fvu(err: Tensor, x: Tensor, w: Tensor | None = None) -> Tensor:
    """Fraction of variance unexplained of a batch, ``sum w ||err||^2 / sum w ||x - mean x||^2``
    (``w [n]`` row weights, default 1; the mean is weighted too)."""
    if w is None:
        return err.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    mean = (w[:, None] * x).sum(0) / w.sum()
    return (w * err.pow(2).sum(-1)).sum() / (w * (x - mean).pow(2).sum(-1)).sum().clamp_min(1e-12)


def _row_weights(x: Tensor, cap: float) -> Tensor:
    """``min(1, (cap / ||x_n||)^2)`` per row of ``x [n, d]``: a row above norm ``cap`` counts as one of norm ``cap``."""
    return (cap / x.norm(dim=-1).clamp_min(1e-12)).pow(2).clamp(max=1.0)


def train_topk(
    acts: np.ndarray | Tensor,
    config: TrainConfig,
    *,
    desc: str = "train",
    chunk_rows: int = 1 << 18,
    init: SAE | None = None,
) -> tuple[SAE, TrainStats]:
    """Train a TopK SAE on activations ``acts [n, d]`` (a memmap streams in chunks of ``chunk_rows``).

    ``init`` starts from a trained SAE of the same ``d`` and width (usually the
    neighbouring site's) instead of a random dictionary: its encoder and
    decoder rows as they are, read on this data's raw scale (``b_enc`` in raw
    units), with ``b_dec`` the mean of this data. Returns the trained
    :class:`SAE` (reading raw activations) and its :class:`TrainStats`.
    """
    n, d = acts.shape
    if n < config.batch_size:
        raise ValueError(f"Only {n} activations for batch size {config.batch_size}: harvest more tokens.")
    if chunk_rows < config.batch_size:
        raise ValueError(f"chunk_rows={chunk_rows} is smaller than the batch size {config.batch_size}: raise it.")
    if not (math.isfinite(config.epochs) and config.epochs > 0):
        raise ValueError(f"epochs={config.epochs} must be a positive number: an SAE trained on no data "
                         "would be saved as if built.")
    if not 0 < config.k <= config.width:
        raise ValueError(f"k={config.k} must be between 1 and the width {config.width}.")
    if config.norm_cap is not None and not config.norm_cap > 0:
        raise ValueError(f"norm_cap={config.norm_cap} must be positive (a multiple of the median norm), or None.")
    if config.ridge < 0 or (config.refit_rows is not None and config.refit_rows < 1):
        raise ValueError(f"ridge={config.ridge} must be >= 0 and refit_rows={config.refit_rows} >= 1 or None.")
    if init is not None and (init.d, init.width) != (d, config.width):
        raise ValueError(
            f"The initial SAE has d={init.d}, width={init.width} but training asks for d={d}, "
            f"width={config.width}: start from an SAE of the same shape or from none."
        )
    device = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    as_tensor = (lambda a, b: torch.from_numpy(np.array(acts[a:b], dtype=np.float32))) \
        if isinstance(acts, np.ndarray) else (lambda a, b: acts[a:b].float())
    # On a small harvest a latent silent for half an epoch counts as dead.
    dead_after = min(config.dead_after, n // 2)

    # Norm cap, scale and mean from a sample of rows under the cap: mean squared norm becomes d.
    sample = as_tensor(0, min(n, 65536)).to(device)
    norms = sample.norm(dim=-1)
    cap = config.norm_cap * float(norms.median()) if config.norm_cap else math.inf
    sample = sample[norms <= cap]
    scale = float(sample.pow(2).sum(-1).mean().sqrt() / math.sqrt(d))
    if not (math.isfinite(scale) and scale > 0):
        what = "all zero" if scale == 0 else "not finite (NaN or infinite)"
        raise ValueError(f"The activations to train on ({desc}) are {what}, so there is nothing for a "
                         "dictionary to learn: leave this site out (--sites) or check the model's weights.")
    cap /= scale
    sae = TopKSAE(d, config.width, config.k, gen).to(device)
    with torch.no_grad():
        sae.b_dec.copy_((sample / scale).mean(0))
        if init is not None:
            sae.W_dec.copy_(init.W_dec)
            sae.W_enc.copy_(init.W_enc)
            sae.b_enc.copy_(init.b_enc / scale)
            sae.normalise_decoder()
        x0 = sample[:4096] / scale
        initial_fvu = float(_fvu(sae(x0)[0] - x0, x0))
    lr = config.lr or 2e-4 / math.sqrt(config.width / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
    total_steps = max(1, int(config.epochs * n) // config.batch_size)
    # Linear decay over the last 20% of steps (Gao et al. decay the lr at the end).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (total_steps - s) / (0.2 * total_steps))
    )
    k_aux = config.k_aux or d // 2
    last_fired = torch.zeros(config.width, dtype=torch.long, device=device)  # token count at last firing
    stats = TrainStats(initial_fvu=initial_fvu, scale=scale)
    epoch = 0
    start, seen, step = time.time(), 0, 0
    fvu_sum, fvu_n = 0.0, 0
    bar = tqdm(total=total_steps, desc=desc, unit="step")
    while step < total_steps:
        for a, b in _chunks(n, chunk_rows, gen):
            data = as_tensor(a, b).to(device) / scale
            weights = _row_weights(data, cap)
            if epoch == 0:
                stats.capped_rows += int((weights < 1).sum())
            perm = torch.randperm(b - a, generator=gen).to(device)
            for i in range(0, b - a - config.batch_size + 1, config.batch_size):
                if step >= total_steps:
                    break
                rows = perm[i:i + config.batch_size]
                x, w = data[rows], weights[rows]
                x_hat, values, indices, pre = sae(x)
                err = x_hat - x
                loss = _fvu(err, x, w)
                fired = torch.zeros(config.width, dtype=torch.bool, device=device)
                fired[indices[values > 0]] = True
                dead = (seen - last_fired) >= dead_after
                if dead.any():
                    # AuxK: the dead latents' top pre-activations reconstruct the residual.
                    aux_values, aux_indices = _top_dead(pre, dead, k_aux)
                    residual = (x - x_hat).detach()
                    aux_hat = sae.decode_sparse(torch.relu(aux_values), aux_indices)
                    aux = _fvu(aux_hat - residual, residual, w)
                    loss = loss + config.aux_coef * torch.nan_to_num(aux, nan=0.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sae.project_decoder_grad()
                opt.step()
                sched.step()
                sae.normalise_decoder()
                seen += x.shape[0]
                last_fired[fired] = seen
                step += 1
                # FVU and dead fraction are reported over the last epoch's worth of tokens.
                if total_steps - step < n // config.batch_size:
                    fvu_sum += float(_fvu(err.detach(), x, w)) * x.shape[0]
                    fvu_n += x.shape[0]
                if step % 50 == 0:
                    stats.history.append(float(_fvu(err.detach(), x, w)))
                    bar.set_postfix(fvu=f"{stats.history[-1]:.3f}", dead=f"{float(dead.float().mean()):.2f}")
                bar.update(1)
            if step >= total_steps:
                break
        epoch += 1
    bar.close()
    if config.refit_decoder:
        m = n if config.refit_rows is None else min(n, config.refit_rows)
        chunks = [(a, min(a + chunk_rows, m)) for a in range(0, m, chunk_rows)]
        stats.refit_fvu = _refit_decoder(sae, chunks, as_tensor, scale, cap, config.ridge)
    stats.tokens_trained = seen
    stats.steps = step
    stats.seconds = time.time() - start
    stats.final_fvu = fvu_sum / max(fvu_n, 1)
    stats.dead_fraction = float(((seen - last_fired) >= dead_after).float().mean())
    return to_dictionary(sae, scale), stats


@torch.no_grad()
def _refit_decoder(
    sae: TopKSAE, chunks: list[tuple[int, int]], as_tensor, scale: float, cap: float, ridge: float,
    check_rows: int = 32768, rows: int = 2048,
) -> tuple[float, float]:
    """Replace ``W_dec, b_dec`` by the ridge least-squares fit to the encoder's codes; unit rows after.

    Solves ``min_{W, b} sum_n w_n ||x_n - f_n W - b||^2 + lam ||W||^2`` (``w_n``
    the training loss's row weights for the norm ``cap``, ``lam`` = ``ridge`` x
    the mean diagonal of ``F^T diag(w) F`` over latents that fire) from the
    normal equations of ``[F 1]``, accumulated over the training rows in ``chunks``.
    Then each row ``W_j`` becomes ``W_j / s_j`` with ``s_j = ||W_j||`` while the
    encoder column ``j`` and ``b_enc[j]`` are multiplied by ``s_j``, and
    ``b_enc`` absorbs the change of ``b_dec``, so a latent that fires
    contributes exactly ``f_j W_j`` as fitted. TopK now ranks latents by
    ``s_j pre_j``, so a few tokens may pick different latents; the training FVU
    before and after is therefore measured by encoding the first ``check_rows``
    rows with the old and the new weights, and the refit is undone if it did not
    help. Latents that never fire keep their rows. Returns the weighted FVU
    ``(before, after)``, with ``after = None`` when the refit was undone.

    The normal equations are summed in float32 over batches of ``rows`` rows
    (:func:`_code_moments`) and in float64 across batches, so no float32 sum runs
    over more than ``rows`` terms.
    """
    width, d = sae.W_dec.shape
    device = sae.W_dec.device

    def batches(limit: int | None = None):
        """``(x, w)`` in batches of ``rows``, over the first ``limit`` rows of ``chunks`` (None: all)."""
        taken = 0
        for a, b in chunks:
            for x in (as_tensor(a, b).to(device) / scale).split(rows):
                if limit is not None:
                    if taken >= limit:
                        return
                    x = x[: limit - taken]
                taken += len(x)
                yield x, _row_weights(x, cap)

    def fvu() -> float:
        err = var = 0.0
        for x, w in batches(check_rows):
            err += float((w * (sae(x)[0] - x).pow(2).sum(-1)).double().sum())
            var += float((w.double() * (x.double() - mean).pow(2).sum(-1)).sum())
        return err / var

    gram = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=device)
    cross = torch.zeros(width + 1, d, dtype=torch.float64, device=device)
    for x, w in batches():
        _, values, indices, _ = sae(x)
        moments = _code_moments(values, indices, w, x, width).double()
        gram += moments[:, :width + 1]
        cross += moments[:, width + 1:]
    mean = cross[width] / gram[width, width]
    before = fvu()

    fired = gram.diagonal()[:width] > 0
    reg = torch.zeros(width + 1, dtype=torch.float64, device=device)
    reg[:width] = ridge * gram.diagonal()[:width][fired].mean()
    new = torch.linalg.solve(gram + torch.diag(reg), cross)
    w_new = torch.where(fired[:, None], new[:width], sae.W_dec.double()).float()
    b_new = new[width].float()
    s = torch.where(fired, w_new.norm(dim=-1).clamp_min(1e-8), torch.ones_like(w_new[:, 0]))
    saved = [p.detach().clone() for p in sae.parameters()]
    # pre = (x - b_old) W + b_enc = (x - b_new) W + [b_enc + (b_new - b_old) W]; then column j times s_j.
    b_enc = sae.b_enc + (b_new - sae.b_dec) @ sae.W_enc
    sae.W_enc.mul_(s)
    sae.b_enc.copy_(b_enc * s)
    sae.W_dec.copy_(w_new / s[:, None])
    sae.b_dec.copy_(b_new)
    after = fvu()
    if not after < before:  # e.g. a degenerate tiny harvest: keep the SGD decoder
        for p, v in zip(sae.parameters(), saved):
            p.copy_(v)
        return before, None
    return before, after


@torch.no_grad()
def to_dictionary(sae: TopKSAE, scale: float) -> SAE:
    """The trained SAE as a :class:`SAE` on raw activations (the scale folded into ``b_enc``, ``b_dec``).

    With ``x' = x / c``: ``pre(x) = c · pre'(x')`` when ``b_enc -> c b_enc`` and ``b_dec -> c b_dec``;
    TopK and ReLU commute with a positive factor, so features are ``c f'`` and
    ``x_hat = c f' W_dec + c b_dec' = c x_hat'`` with the same unit-norm ``W_dec``.
    """
    return SAE(
        sae.W_enc.detach().cpu(), scale * sae.b_enc.detach().cpu(), sae.W_dec.detach().cpu(),
        scale * sae.b_dec.detach().cpu(), "topk", k=sae.k,
    )


@torch.no_grad()
def reconstruction_stats(sae: SAE, x: Tensor, batch_size: int = 4096) -> dict[str, float]:
    """Variance explained, mean L0 and fraction of latents never active on ``x [n, d]``."""
    err2, l0, fired = 0.0, 0.0, torch.zeros(sae.width, dtype=torch.bool)
    x = x.float()
    total = float((x - x.mean(0)).pow(2).sum())
    for chunk in x.split(batch_size):
        f = sae.encode(chunk)
        err2 += float((sae.decode(f) - chunk).pow(2).sum())
        l0 += float((f != 0).sum())
        fired |= (f != 0).any(0).cpu()
    return {
        "variance_explained": 1.0 - err2 / max(total, 1e-12),
        "l0": l0 / x.shape[0],
        "never_active_fraction": 1.0 - float(fired.float().mean()),
    }


def config_dict(config: TrainConfig) -> dict:
    return asdict(config)
