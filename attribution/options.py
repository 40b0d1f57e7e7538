"""The option types shared along the pipeline, each defined once.

They are plain ``Literal`` types so that signatures read like the paper and a
type checker catches a misspelt option; this module imports nothing heavy, so
the graph and the viewer can use them without loading torch.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["attrib", "ig", "exact"]
"""How node effects are computed: attribution patching (Eq. 3), integrated
gradients (Eq. 4) or exact activation patching (Eq. 2)."""

Aggregation = Literal["none", "sum"]
"""``none``: one node per feature and position; ``sum``: effects summed over
positions, one node per feature (paper App. A.2)."""

EdgeMethod = Literal["attrib", "ig"]
"""How edge weights are computed: ``attrib``, the paper's Eq. 5 (Jacobian at the
clean input, downstream gradient from the node effects); ``ig``, both the
downstream gradient and the Jacobian integrated along the IG path."""

AblationKind = Literal["mean", "zero", "resample"]
"""What replaces an ablated node: ``mean``, the position-specific mean over
reference inputs (the paper's choice for evaluation); ``zero``, ``f = 0`` and
``e = 0`` so that ``x = b_dec``; ``resample``, the values of a seeded random
permutation of the reference rows."""

__all__ = ["AblationKind", "Aggregation", "EdgeMethod", "Method"]
