"""The SHIFT classifier: a linear probe on the mean-pooled residual stream (SPEC §6.2).

``pool(h, mask) = Σ_t mask_t h_t / Σ_t mask_t`` over the non-padding tokens of
``h = resid_ℓ [b, s, d]`` (the output of block ``ℓ``); the probe is
``nn.Linear(d, 1)`` and predicts label 1 when its logit is > 0. Training follows
the paper: ``BCEWithLogitsLoss``, ``AdamW(lr=1e-2)``, one epoch, a fixed seed
(options change any of these).

Only blocks ``0..ℓ`` matter to the probe, so :func:`probe_model` builds a view of
the model cut after block ``ℓ`` whose final norm is the identity and whose
unembedding is the probe (weights shared, nothing copied): its "logits" are the
per-token probe scores ``w · h_t`` ``[b, s, 1]``, and the engine's node effects
run on it unchanged with a metric that pools them. :func:`pooled_activations`
runs the same cut model; it honours any forward hooks on the shared modules, so
activations under an :class:`ablation.shift.edit.EditedModel` are the edited ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from attribution.model.sites import architecture_of, get_module
from attribution.model.wrapper import SFCModel

FINAL_NORM = {"llama": "model.norm", "qwen2": "model.norm", "gemma2": "model.norm",
              "gpt2": "transformer.ln_f", "gpt_neox": "gpt_neox.final_layer_norm"}


def check_layer(model: SFCModel, layer: int) -> None:
    """Raise if ``layer`` is not a block of ``model``."""
    n = model.config.num_hidden_layers
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"Probe layer {layer} is beyond this model's depth: {model.name} has blocks 0..{n - 1}.")


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its parameters and children, with its own child table.

    nnsight keeps per-module state in the instance ``__dict__`` (an instance-level
    ``forward`` bound to the original module, and ``__nnsight__``); the copy drops
    both, so it runs its own forward and a new NNsight wrapper instruments it afresh.
    """
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    for attr in ("forward", "__nnsight__"):
        clone.__dict__.pop(attr, None)
    return clone


def _replace_path(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """A shallow copy of ``root`` with the module at ``path`` replaced (other modules shared)."""
    clone = _shallow(root)
    parent = clone
    parts = path.split(".")
    for part in parts[:-1]:
        child = _shallow(parent._modules[part])
        parent._modules[part] = child
        parent = child
    parent._modules[parts[-1]] = new
    return clone


class _Head(nn.Module):
    """Per-token probe score ``w · h_t`` (no bias: the pooled bias is added by the metric)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().reshape(1, -1).clone(), requires_grad=False)

    def forward(self, h: Tensor) -> Tensor:
        return h @ self.weight.to(h.dtype).T


def probe_model(model: SFCModel, layer: int, weight: Tensor | None = None) -> SFCModel:
    """``model`` cut after block ``layer``, final norm removed, unembedding ``h -> w · h``.

    ``weight [d]`` is the probe's weight (zeros when ``None``: for reading
    activations only). Blocks, embeddings and sites are the original modules, so
    site names and forward hooks carry over.
    """
    check_layer(model, layer)
    hf = model.hf
    arch = architecture_of(hf)
    mt = hf.config.model_type
    blocks = get_module(hf, arch.blocks)
    w = torch.zeros(model.config.hidden_size) if weight is None else weight
    param = next(hf.parameters())
    cut = _replace_path(hf, arch.blocks, nn.ModuleList(list(blocks)[: layer + 1]))
    cut = _replace_path(cut, FINAL_NORM[mt], nn.Identity())
    head_path = next(name for name, mod in hf.named_modules() if mod is hf.get_output_embeddings())
    cut = _replace_path(cut, head_path, _Head(w.to(param.device, param.dtype)))
    cfg = copy.deepcopy(hf.config)
    cfg.num_hidden_layers = layer + 1
    cfg.use_cache = False
    if hasattr(cfg, "final_logit_softcapping"):
        cfg.final_logit_softcapping = None
    for mod in (cut, *(m for m in cut.children())):
        if getattr(mod, "config", None) is hf.config:
            mod.config = cfg
    if hasattr(cfg, "tie_word_embeddings"):
        cut.config.tie_word_embeddings = False
    return SFCModel(cut, model.tokenizer, name=model.name)


@torch.no_grad()
def pooled_activations(
    model: SFCModel, texts: list[str], layer: int, batch_size: int = 32, progress: bool = True,
    desc: str = "pooling",
) -> Tensor:
    """Mean-pooled ``resid_layer`` over non-padding tokens, ``[n, d]`` float32.

    Runs the model cut after ``layer`` (:func:`probe_model`) with plain forward
    hooks; hooks already on the shared modules (an edited model's ablations) apply.
    """
    cut = probe_model(model, layer)
    block = get_module(cut.hf, f"{architecture_of(cut.hf).blocks}.{layer}")
    out: list[Tensor] = []
    seen: dict[str, Tensor] = {}

    def grab(mod, args, output):
        seen["h"] = output[0] if isinstance(output, tuple) else output

    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = model.tokenize(list(texts[start : start + batch_size]))
        handle = block.register_forward_hook(grab)  # after any edit hook on the block
        try:
            cut.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            handle.remove()
        out.append(pool(seen["h"].float(), batch.attention_mask).cpu())
    return torch.cat(out)


def pool(h: Tensor, mask: Tensor) -> Tensor:
    """``Σ_t mask_t h_t / Σ_t mask_t``: ``h [b, s, d]``, ``mask [b, s]`` -> ``[b, d]``.

    Padding positions are dropped, not multiplied by 0: a left-padded query that
    may attend to nothing can hold NaN there.
    """
    keep = mask.bool().to(h.device)[..., None]
    total = torch.where(keep, h, torch.zeros((), dtype=h.dtype, device=h.device)).sum(1)
    return total / keep.sum(1).clamp(min=1).to(h.dtype)


@dataclass
class ProbeConfig:
    """Probe training (SPEC §6.2): AdamW ``lr``, ``epochs``, ``batch_size``, ``seed``, ``weight_decay``.

    ``standardize``: how inputs are scaled during training; the scaling is folded
    back into the weights afterwards, so the result is always ``nn.Linear`` on the
    raw pooled residual.

    - ``"global"`` (default): centre each dimension (training-set mean) and divide
      by one scalar, the root-mean-square norm of the centred inputs over ``√d``.
      This keeps the geometry of the residual stream: only the constant offsets
      (SmolLM2's massive activations) go, and directions keep their relative
      variance, as in the paper's unscaled probe;
    - ``"dimension"``: zero mean and unit variance per dimension. It trains fastest
      on few examples but magnifies low-variance directions, such as the SAE
      error left after SHIFT's ablation, so a retrained probe finds leftover
      spurious signal there more easily (docs/shift.md, §2);
    - ``"none"``: the paper's raw inputs (with a few hundred examples, one epoch of
      AdamW on raw SmolLM2 residuals often ends at chance; the paper trained on ~22k).

    ``True`` and ``False`` are read as ``"dimension"`` and ``"none"``.
    """

    lr: float = 1e-2
    epochs: int = 1
    batch_size: int = 16
    seed: int = 42
    weight_decay: float = 0.01
    standardize: str | bool = "global"

    def scaling(self) -> str:
        mode = {True: "dimension", False: "none"}.get(self.standardize, self.standardize)
        if mode not in ("global", "dimension", "none"):
            raise ValueError(f"Unknown standardize {self.standardize!r}: choose 'global', 'dimension' or 'none'.")
        return mode


def train_probe(x: Tensor, y: list[int] | Tensor, config: ProbeConfig | None = None) -> nn.Linear:
    """A fresh ``nn.Linear(d, 1)`` trained with BCE-with-logits on pooled activations ``x [n, d]``."""
    cfg = config or ProbeConfig()
    y = torch.as_tensor(y, dtype=torch.float32)
    if len(set(y.tolist())) < 2:
        raise ValueError("The probe's training set has a single class: it needs examples of both labels.")
    x = x.float()
    mode = cfg.scaling()
    mu = torch.zeros(x.shape[1]) if mode == "none" else x.mean(0)
    if mode == "dimension" and len(x) > 1:
        sd = x.std(0).clamp(min=1e-6)
    elif mode == "global":
        sd = ((x - mu).square().sum(1).mean() / x.shape[1]).sqrt().clamp(min=1e-6).expand(x.shape[1])
    else:
        sd = torch.ones(x.shape[1])
    xs = (x - mu) / sd
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    probe = nn.Linear(x.shape[1], 1)
    opt = torch.optim.AdamW(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(probe(xs[idx])[:, 0], y[idx])
            loss.backward()
            opt.step()
    with torch.no_grad():  # fold the scaling in: w·(x - mu)/sd + b = (w/sd)·x + (b - (w/sd)·mu)
        w = probe.weight / sd
        probe.bias -= (w * mu).sum()
        probe.weight.copy_(w)
    probe.requires_grad_(False)
    return probe


MEASURES = ("profession_acc", "gender_acc", "worst_group_acc")
"""The three accuracies of each row of the results table (paper Table 2)."""


@torch.no_grad()
def predict(probe: nn.Linear, x: Tensor) -> Tensor:
    """Predicted labels ``[n]`` (logit > 0)."""
    return (probe(x.float())[:, 0] > 0).long()


def accuracies(pred: Tensor, labels: list[int], spurious: list[int]) -> dict[str, float]:
    """``profession_acc`` (vs labels), ``gender_acc`` (vs the spurious attribute),
    ``worst_group_acc`` (min over the four (label, spurious) groups of label accuracy)
    and the per-group accuracies (SPEC §6.6)."""
    y = torch.as_tensor(labels)
    z = torch.as_tensor(spurious)
    pred = pred.cpu()
    groups = {}
    for a in (0, 1):
        for b in (0, 1):
            sel = (y == a) & (z == b)
            if sel.any():
                groups[f"{a}{b}"] = float((pred[sel] == a).float().mean())
    return {
        "profession_acc": float((pred == y).float().mean()),
        "gender_acc": float((pred == z).float().mean()),
        "worst_group_acc": min(groups.values()),
        "groups": groups,
    }
