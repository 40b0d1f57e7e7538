"""One options type for every ablation: :class:`AblationConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from attribution.model.sites import AttnHook
from attribution.options import AblationKind

ErrorHandling = Literal["default", "remove", "keep", "resid_only"]
"""``default``: error nodes follow the mask; ``remove``: every error node is
ablated; ``keep``: every error node is kept; ``resid_only``: residual-stream
error nodes follow the mask, all other error nodes are ablated."""


@dataclass(frozen=True)
class AblationConfig:
    """How nodes outside a circuit are ablated (SPEC §5.2), for every function of :mod:`ablation`.

    - ``kind``: what replaces an ablated node (:data:`attribution.options.AblationKind`);
    - ``handle_errors``: how error nodes are treated (:data:`ErrorHandling`);
    - ``start_layer``: sites whose layer is below it are neither ablated nor counted
      (the paper evaluates the latter two thirds of the layers);
    - ``seed``: the permutation of reference rows under ``resample``;
    - ``attn``: which attention activation is the ``attn_L`` site.

    Reference inputs (the rows that mean and resample ablation draw from) are data,
    not options, so they stay a call argument.
    """

    kind: AblationKind = "mean"
    handle_errors: ErrorHandling = "default"
    start_layer: int = -1
    seed: int = 0
    attn: AttnHook = "output"

    def __post_init__(self) -> None:
        if self.kind not in get_args(AblationKind):
            raise ValueError(f"Unknown ablation kind {self.kind!r}: use one of {get_args(AblationKind)}.")
        if self.handle_errors not in get_args(ErrorHandling):
            raise ValueError(
                f"Unknown handle_errors {self.handle_errors!r}: use one of {get_args(ErrorHandling)}."
            )
        if self.attn not in get_args(AttnHook):
            raise ValueError(f"Unknown attn {self.attn!r}: use one of {get_args(AttnHook)}.")
