"""Node masks: which features and error nodes of each site belong to a circuit.

A circuit is evaluated through its node set only (SPEC §4.3, §5.2). At each site
the circuit is a :class:`NodeMask` with two boolean tensors:

- *per-position* circuits (``aggregation="none"``, templatic data): ``features [s, F]``
  and ``errors [s]``; the same feature at two positions is two nodes;
- *summed* circuits (``aggregation="sum"``): ``features [F]`` and ``errors []``
  (a 0-dim tensor); each node covers every position.

``True`` means the node is in the circuit (kept when the circuit is evaluated).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NodeMask:
    """The nodes of one site that are in a circuit: ``features [s, F] | [F]``, ``errors [s] | []``."""

    features: Tensor
    errors: Tensor

    def __post_init__(self) -> None:
        if self.features.dtype != torch.bool or self.errors.dtype != torch.bool:
            raise ValueError(
                f"A NodeMask holds boolean tensors, got features {self.features.dtype} and "
                f"errors {self.errors.dtype}: threshold the effects first (e.g. effects.abs() > T)."
            )
        if self.features.ndim not in (1, 2) or self.errors.shape != self.features.shape[:-1]:
            raise ValueError(
                f"A NodeMask has features [s, F] with errors [s], or features [F] with errors [], "
                f"got features {tuple(self.features.shape)} and errors {tuple(self.errors.shape)}."
            )

    @property
    def per_position(self) -> bool:
        """True for ``[s, F]`` masks, False for summed ``[F]`` masks."""
        return self.features.ndim == 2

    @property
    def width(self) -> int:
        return self.features.shape[-1]

    @property
    def n_nodes(self) -> int:
        """Features in the circuit (one per position for per-position masks) plus error nodes."""
        return int(self.features.sum()) + int(self.errors.sum())

    def __invert__(self) -> NodeMask:
        """The complement: every node of this site that is not in the circuit."""
        return NodeMask(~self.features, ~self.errors)

    def to(self, device: torch.device | str) -> NodeMask:
        return NodeMask(self.features.to(device), self.errors.to(device))

    @classmethod
    def full(cls, width: int, seq_len: int | None = None) -> NodeMask:
        """Every node of a site (``seq_len=None`` gives a summed mask)."""
        shape = (width,) if seq_len is None else (seq_len, width)
        return cls(torch.ones(shape, dtype=torch.bool), torch.ones(shape[:-1], dtype=torch.bool))

    @classmethod
    def empty(cls, width: int, seq_len: int | None = None) -> NodeMask:
        """No node of a site (``seq_len=None`` gives a summed mask)."""
        return ~cls.full(width, seq_len)


def layer_of(site_name: str) -> int:
    """The layer a site name refers to: ``"mlp_3"`` gives 3 and ``"embed"`` gives -1."""
    return -1 if site_name == "embed" else int(site_name.rsplit("_", 1)[1])


def masks_from_effects(
    effects_features: Mapping[str, Tensor],
    effects_errors: Mapping[str, Tensor],
    threshold: float,
) -> dict[str, NodeMask]:
    """The circuit at node threshold ``T_N``: nodes with ``|effect| > threshold`` (SPEC §4.1, §5.2).

    ``effects_features[site]`` is ``[s, F]`` (per position) or ``[F]`` (summed) and
    ``effects_errors[site]`` is ``[s]`` or ``[]`` (a trailing singleton dimension,
    as in the reference's ``resc [s, 1]``, is accepted and dropped). Every site
    needs both.
    """
    if set(effects_features) != set(effects_errors):
        missing = sorted(set(effects_features) ^ set(effects_errors))
        raise ValueError(f"Feature and error effects must name the same sites; only one of them has {missing}.")
    masks = {}
    for name, feat in effects_features.items():
        err = effects_errors[name]
        if err.ndim == feat.ndim and err.shape[-1] == 1:
            err = err.squeeze(-1)
        masks[name] = NodeMask(feat.abs() > threshold, err.abs() > threshold)
    return masks


def n_nodes(masks: Mapping[str, NodeMask], start_layer: int = -1) -> int:
    """The number of nodes in a circuit, counting only sites whose layer is ``>= start_layer``.

    Features count once per position, error nodes once per position per site
    (SPEC §5.3: ``n_nodes = Σ act_mask + Σ resc_mask``); in summed masks each
    feature and the site's error node count once.
    """
    return sum(m.n_nodes for name, m in masks.items() if layer_of(name) >= start_layer)


def random_masks_like(masks: Mapping[str, NodeMask], *, seed: int = 0) -> dict[str, NodeMask]:
    """The random baseline of SPEC §5.3: at each site, features drawn Bernoulli at the
    density of ``masks`` there, and every error node kept."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        density = mask.features.float().mean().item()
        features = torch.rand(mask.features.shape, generator=gen) < density
        out[name] = NodeMask(features.to(mask.features.device), torch.ones_like(mask.errors))
    return out
