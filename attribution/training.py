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

from attribution.dictionaries import SAE


@dataclass
class TrainConfig:
    """Hyper-parameters of one TopK SAE.

    ``lr=None`` uses Gao et al.'s ``2e-4 / sqrt(width / 2^14)``, meant for
    billions of tokens; on this project's 10^4-10^5-token harvests, batch 256
    and lr 2e-3 reach a lower held-out error in the same time (measured on
    SmolLM2 resid_3 and resid_27).
    """

    width: int = 2304
    k: int = 32
    epochs: float = 2.0
    batch_size: int = 256
    lr: float | None = 2e-3
    aux_coef: float = 1 / 32
    k_aux: int | None = None  # default d // 2
    dead_after: int = 50_000  # tokens without firing before a latent counts as dead (at most n / 2)
    seed: int = 0
    device: str = "cpu"


@dataclass
class TrainStats:
    """What training measured: final-epoch fraction of variance unexplained, dead fraction, cost."""

    tokens_trained: int = 0
    steps: int = 0
    seconds: float = 0.0
    initial_fvu: float = float("nan")
    final_fvu: float = float("nan")
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
        """Encoder pre-activations ``[n, F]``."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

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


def _chunks(n: int, chunk: int, gen: torch.Generator) -> list[tuple[int, int]]:
    starts = list(range(0, n, chunk))
    order = torch.randperm(len(starts), generator=gen).tolist()
    return [(starts[i], min(starts[i] + chunk, n)) for i in order]


def _fvu(err: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained of a batch: ``sum ||err||^2 / sum ||x - mean x||^2``."""
    return err.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def train_topk(
    acts: np.ndarray | Tensor,
    config: TrainConfig,
    *,
    desc: str = "train",
    chunk_rows: int = 1 << 18,
) -> tuple[SAE, TrainStats]:
    """Train a TopK SAE on activations ``acts [n, d]`` (a memmap streams in chunks of ``chunk_rows``).

    Returns the trained :class:`SAE` (reading raw activations) and its :class:`TrainStats`.
    """
    n, d = acts.shape
    if n < config.batch_size:
        raise ValueError(f"Only {n} activations for batch size {config.batch_size}: harvest more tokens.")
    if not 0 < config.k <= config.width:
        raise ValueError(f"k={config.k} must be between 1 and the width {config.width}.")
    device = torch.device(config.device)
    gen = torch.Generator().manual_seed(config.seed)
    as_tensor = (lambda a, b: torch.from_numpy(np.array(acts[a:b], dtype=np.float32))) \
        if isinstance(acts, np.ndarray) else (lambda a, b: acts[a:b].float())
    # On a small harvest a latent silent for half an epoch counts as dead.
    dead_after = min(config.dead_after, n // 2)

    # Scale and mean from a sample: mean squared norm becomes d after scaling.
    sample = as_tensor(0, min(n, 65536)).to(device)
    scale = float(sample.pow(2).sum(-1).mean().sqrt() / math.sqrt(d))
    sae = TopKSAE(d, config.width, config.k, gen).to(device)
    with torch.no_grad():
        sae.b_dec.copy_((sample / scale).mean(0))
        x0 = sample[:4096] / scale
        initial_fvu = float(_fvu(sae(x0)[0] - x0, x0))
    lr = config.lr or 2e-4 / math.sqrt(config.width / 2**14)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    total_steps = max(1, int(config.epochs * n) // config.batch_size)
    # Linear decay over the last 20% of steps (Gao et al. decay the lr at the end).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (total_steps - s) / (0.2 * total_steps))
    )
    k_aux = config.k_aux or d // 2
    last_fired = torch.zeros(config.width, dtype=torch.long, device=device)  # token count at last firing
    stats = TrainStats(initial_fvu=initial_fvu, scale=scale)
    start, seen, step = time.time(), 0, 0
    fvu_sum, fvu_n = 0.0, 0
    bar = tqdm(total=total_steps, desc=desc, unit="step")
    while step < total_steps:
        for a, b in _chunks(n, chunk_rows, gen):
            data = as_tensor(a, b).to(device) / scale
            perm = torch.randperm(b - a, generator=gen).to(device)
            for i in range(0, b - a - config.batch_size + 1, config.batch_size):
                if step >= total_steps:
                    break
                x = data[perm[i:i + config.batch_size]]
                x_hat, values, indices, pre = sae(x)
                err = x_hat - x
                loss = _fvu(err, x)
                fired = torch.zeros(config.width, dtype=torch.bool, device=device)
                fired[indices[values > 0]] = True
                dead = (seen - last_fired) >= dead_after
                if dead.any():
                    # AuxK: the dead latents' top pre-activations reconstruct the residual.
                    k_dead = min(k_aux, int(dead.sum()))
                    aux_pre = pre.masked_fill(~dead, -torch.inf)
                    aux_values, aux_indices = aux_pre.topk(k_dead, dim=-1)
                    residual = (x - x_hat).detach()
                    aux_hat = sae.decode_sparse(torch.relu(aux_values), aux_indices)
                    aux = _fvu(aux_hat - residual, residual)
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
                    fvu_sum += float(_fvu(err.detach(), x)) * x.shape[0]
                    fvu_n += x.shape[0]
                if step % 50 == 0:
                    stats.history.append(float(_fvu(err.detach(), x)))
                    bar.set_postfix(fvu=f"{stats.history[-1]:.3f}", dead=f"{float(dead.float().mean()):.2f}")
                bar.update(1)
            if step >= total_steps:
                break
    bar.close()
    stats.tokens_trained = seen
    stats.steps = step
    stats.seconds = time.time() - start
    stats.final_fvu = fvu_sum / max(fvu_n, 1)
    stats.dead_fraction = float(((seen - last_fired) >= dead_after).float().mean())
    return to_dictionary(sae, scale), stats


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
