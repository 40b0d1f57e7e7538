"""Language models wrapped for attribution: the HF module, its nnsight view,
its tokenizer and its sites (:class:`SFCModel`), and left-padded token batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nnsight import NNsight
from torch import Tensor

from attribution.model.sites import (
    SITE_KINDS,
    AttnHook,
    Site,
    SiteKind,
    all_sites,
    architecture_of,
    select_sites,
)


@dataclass
class Batch:
    """Token ids ``[b, s]`` and attention mask ``[b, s]`` (1 = real token), left-padded."""

    input_ids: Tensor
    attention_mask: Tensor

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape[0] == 0:
            raise ValueError("A batch needs at least one prompt: got an empty input.")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def repeat(self, n: int) -> Batch:
        """The batch stacked ``n`` times (row ``i`` of copy ``c`` is row ``c*b + i``)."""
        return Batch(self.input_ids.repeat(n, 1), self.attention_mask.repeat(n, 1))

    def rows(self, index: Tensor) -> Batch:
        return Batch(self.input_ids[index], self.attention_mask[index])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))


class SFCModel:
    """An HF causal LM plus everything attribution needs to know about it."""

    def __init__(
        self, hf_model: torch.nn.Module, tokenizer=None, name: str | None = None, *,
        fingerprint: str | None = None, cache_key: str | None = None,
    ) -> None:
        """``fingerprint`` and ``cache_key`` (see :mod:`attribution.model.identity`) are
        computed from the weights when first needed unless given."""
        architecture_of(hf_model)  # fail early, naming the supported families
        self.hf = hf_model.eval()
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.nn = NNsight(self.hf)
        self.tokenizer = tokenizer
        self.name = name or getattr(hf_model.config, "_name_or_path", None) or hf_model.config.model_type
        self._fingerprint = fingerprint
        self._cache_key = cache_key

    @property
    def fingerprint(self) -> str:
        """Hash of the config and weights: the model's identity (computed once, on first use)."""
        if self._fingerprint is None:
            from attribution.model.identity import fingerprint

            self._fingerprint = fingerprint(self.hf)
        return self._fingerprint

    @property
    def cache_key(self) -> str:
        """The model's folder name under the dictionary and activation caches."""
        if self._cache_key is None:
            from attribution.model.identity import EMBEDDED, cache_key

            self._cache_key = cache_key(self.name, None if self.name == EMBEDDED else self.fingerprint)
        return self._cache_key

    @property
    def config(self):
        return self.hf.config

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def sites(
        self,
        names: list[str] | None = None,
        *,
        kinds: tuple[SiteKind, ...] = SITE_KINDS,
        layers: list[int] | None = None,
        attn: AttnHook = "output",
    ) -> list[Site]:
        """Sites by name or by kind and layer, in forward order (see :mod:`attribution.model.sites`)."""
        return select_sites(self.hf, names, kinds=kinds, layers=layers, attn=attn)

    def all_sites(self, attn: AttnHook = "output") -> list[Site]:
        return all_sites(self.hf, attn=attn)

    def tokenize(self, prompts: list[str] | Batch | Tensor) -> Batch:
        """Left-padded token ids for a list of prompts (a Batch or id tensor passes through)."""
        if isinstance(prompts, Batch):
            return prompts.to(self.device)
        if isinstance(prompts, Tensor):
            return Batch(prompts.to(self.device), torch.ones_like(prompts, device=self.device))
        if not prompts:
            raise ValueError("The prompt list is empty: give at least one prompt.")
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer: pass token ids (a tensor or Batch) instead of strings.")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            # Padded positions are masked, so any token serves as padding.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.convert_ids_to_tokens(0)
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        return Batch(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))

    def token_strings(self, ids: Tensor) -> list[str]:
        if self.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [self.tokenizer.decode([int(i)]) for i in ids]
