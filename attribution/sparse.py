"""Per-site tensors that are mostly zeros, held compressed and handed out dense.

A node-effect run keeps, for every site, ``[b, s, F]`` tensors of feature
activations, deltas and effects. Only the features that fire at the clean or the
patch input are non-zero (tens to a few hundred of ``F`` per token), but held
dense they cost ``b · s · F · 4`` bytes each: at 19 sites, 16 prompts of 7
tokens and ``F = 32768`` that is 280 MB per kind, more than the dictionary
weights leave room for. :class:`SparseTensors` keeps each site's tensor as a
sparse COO tensor and rebuilds the dense one on access, so only the site being
worked on is ever dense.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping

import torch
from torch import Tensor


class SparseTensors(MutableMapping[str, Tensor]):
    """A mapping ``site -> Tensor`` that stores each value sparse and returns it dense.

    ``self[name]`` is a fresh dense tensor: changing it in place does not change
    what is stored (assign it back to do that). :meth:`sparse` gives the stored,
    coalesced COO tensor without densifying.
    """

    def __init__(self, items: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] = ()) -> None:
        self._data: dict[str, Tensor] = {}
        self.update(items)

    def __setitem__(self, name: str, value: Tensor) -> None:
        self._data[name] = (value.to_sparse() if value.layout == torch.strided else value).coalesce()

    def __getitem__(self, name: str) -> Tensor:
        return self._data[name].to_dense()

    def __delitem__(self, name: str) -> None:
        del self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k!r}: {list(v.shape)} ({v._nnz()} non-zero)" for k, v in self._data.items())
        return f"SparseTensors({{{shapes}}})"

    def sparse(self, name: str) -> Tensor:
        """The stored coalesced sparse COO tensor of ``name``."""
        return self._data[name]

    def nbytes(self) -> int:
        """Bytes held: indices and values of every site."""
        return sum(v.indices().nbytes + v.values().nbytes for v in self._data.values())


class SparseFeaturePairs(Mapping[str, tuple[Tensor, Tensor]]):
    """``site -> (features [b, s, F], errors [b, s])`` with the features kept sparse
    (:class:`SparseTensors`) and the small error tensors kept as they are."""

    def __init__(self) -> None:
        self.features = SparseTensors()
        self.errors: dict[str, Tensor] = {}

    def __setitem__(self, name: str, value: tuple[Tensor, Tensor]) -> None:
        self.features[name], self.errors[name] = value

    def __getitem__(self, name: str) -> tuple[Tensor, Tensor]:
        return self.features[name], self.errors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.errors)

    def __len__(self) -> int:
        return len(self.errors)
