"""Dictionaries: a sparse autoencoder, or the identity, at one site.

Every dictionary has the same contract, which is all the attribution code uses:

- ``encode(x) -> f``: features ``[..., F]`` from activations ``[..., d]``;
- ``decode(f) -> x_hat``: affine, ``f @ W_dec + b_dec``;
- the SAE *error* is ``x - decode(encode(x))``.

Because ``decode`` is affine, any change of the site's nodes is a change of the
site's activation: ``decode(f') + e' - (decode(f) + e) = (f' - f) @ W_dec + (e' - e)``.
The attribution code relies on this to take gradients at site activations and
project them onto decoder rows only where features change.

One :class:`SAE` class covers the three activation rules in use (ReLU, TopK,
JumpReLU); :class:`Identity` makes neurons the nodes (the paper's baseline).
File loaders for dictionary_learning, SAELens and Gemma Scope layouts live in
:mod:`attribution.dictionaries.formats`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

Activation = Literal["relu", "topk", "jumprelu"]


class Dictionary(nn.Module, ABC):
    """Interface: ``encode``, ``decode``, ``W_dec [F, d]`` and ``b_dec [d]``."""

    d: int
    width: int

    @abstractmethod
    def encode(self, x: Tensor) -> Tensor:  # [..., d] -> [..., F]
        """Features ``[..., F]`` of activations ``[..., d]``."""

    def decode(self, f: Tensor) -> Tensor:  # [..., F] -> [..., d]
        """``f @ W_dec + b_dec``, computed in the dictionary's dtype (``f`` is cast to it)."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def feature_grads(self, grad: Tensor) -> Tensor:  # [..., d] -> [..., F]
        """``grad @ W_dec.T``: the gradient on every feature from the gradient ``grad`` on the
        activation, in float32 (or float64) whatever the dictionary's dtype, so that effects
        are accumulated in full precision. A half-precision decoder is widened for the product."""
        grad = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()
        return grad @ self.W_dec.T.to(grad.dtype)

    def error(self, x: Tensor) -> Tensor:
        """The SAE error ``x - decode(encode(x))``, shape ``[..., d]``."""
        return x - self.decode(self.encode(x))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @property
    @abstractmethod
    def W_dec(self) -> Tensor:  # noqa: N802 - the paper's name
        """Decoder rows ``[F, d]``."""

    @property
    @abstractmethod
    def b_dec(self) -> Tensor:
        """Decoder bias ``[d]``: the reconstruction of the all-zero feature vector."""


def dictionary_shape(dictionaries: Mapping[str, Dictionary], name: str) -> tuple[int, int]:
    """``(d, width)`` of ``name``'s dictionary. A set that keeps its dictionaries on disk
    (:class:`~attribution.dictionaries.sets.LazyDictionarySet`, which has ``shape``)
    answers from the files' headers, without loading the dictionary."""
    shape = getattr(dictionaries, "shape", None)
    if shape is not None:
        return shape(name)
    dictionary = dictionaries[name]
    return dictionary.d, dictionary.width


class SAE(Dictionary):
    """A sparse autoencoder ``f = act(W_enc^T (x - [b_dec]) + b_enc)``, ``x_hat = f W_dec + b_dec``.

    ``activation`` chooses the rule: ``relu``; ``topk`` (keep the ``k`` largest
    ReLU pre-activations); ``jumprelu`` (keep ``pre`` where ``pre > threshold``).
    ``subtract_decoder_bias`` is True for dictionary_learning and most SAELens
    SAEs, False for Gemma Scope.
    """

    def __init__(
        self,
        W_enc: Tensor,  # noqa: N803
        b_enc: Tensor,
        W_dec: Tensor,  # noqa: N803
        b_dec: Tensor,
        activation: Activation = "relu",
        *,
        k: int | None = None,
        threshold: Tensor | None = None,
        subtract_decoder_bias: bool = True,
    ) -> None:
        super().__init__()
        d, width = W_enc.shape
        if W_dec.shape != (width, d) or b_enc.shape != (width,) or b_dec.shape != (d,):
            raise ValueError(
                f"Inconsistent SAE shapes: W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, "
                f"W_dec {tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)}; expected W_enc [d, F], "
                "b_enc [F], W_dec [F, d], b_dec [d]."
            )
        if activation == "topk" and not k:
            raise ValueError("A TopK SAE needs k, the number of active features per token.")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("A JumpReLU SAE needs a threshold tensor of shape [F].")
        self.d, self.width = d, width
        self.activation: Activation = activation
        self.k = k
        self.subtract_decoder_bias = subtract_decoder_bias
        # Own, row-major copies: a file may store the transposes (dictionary_learning's
        # decoder.weight is [d, F]), and the edges gather rows of W_dec, which a
        # transposed layout made twice as slow (F = 32,768).
        def own(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)

        self.W_enc, self.b_enc, self._W_dec, self._b_dec = own(W_enc), own(b_enc), own(W_dec), own(b_dec)
        thr = threshold if threshold is not None else torch.zeros(0)
        self.register_buffer("threshold", thr.detach().clone())

    @property
    def W_dec(self) -> Tensor:  # noqa: N802
        return self._W_dec

    @property
    def b_dec(self) -> Tensor:
        return self._b_dec

    def pre_activation(self, x: Tensor) -> Tensor:
        """Pre-activations ``[..., F]`` in the dictionary's dtype (``x`` is cast to it, so a
        float32 dictionary reads a bfloat16 model and a bfloat16 one reads float32 states)."""
        x = x.to(self.W_enc.dtype)
        if self.subtract_decoder_bias:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_activation(x)
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        values, indices = torch.relu(pre).topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    def extra_repr(self) -> str:
        extra = f", k={self.k}" if self.activation == "topk" else ""
        return f"d={self.d}, width={self.width}, activation={self.activation}{extra}"


class Identity(Dictionary):
    """The identity dictionary: features are the neurons and the error is always zero."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = self.width = d
        self.register_buffer("_eye", torch.eye(d), persistent=False)
        self.register_buffer("_zero", torch.zeros(d), persistent=False)

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, f: Tensor) -> Tensor:
        return f

    @property
    def W_dec(self) -> Tensor:  # noqa: N802
        return self._eye

    @property
    def b_dec(self) -> Tensor:
        return self._zero


def random_sae(
    d: int,
    width: int,
    activation: Activation = "relu",
    *,
    k: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """A random SAE with unit-norm decoder rows and an encoder near the decoder's
    transpose, for tests and benchmarks. Call :func:`calibrate_sparsity` on real
    activations to set its L0.
    """
    gen = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, d, generator=gen, dtype=dtype)  # noqa: N806
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    # In place, so a wide dictionary is built with one spare copy of its weights, not three.
    W_enc = torch.randn(d, width, generator=gen, dtype=dtype).div_(d**0.5).mul_(0.5).add_(W_dec.T)  # noqa: N806
    b_dec = 0.01 * torch.randn(d, generator=gen, dtype=dtype)
    threshold = torch.zeros(width, dtype=dtype) if activation == "jumprelu" else None
    if activation == "topk" and k is None:
        k = 8
    return SAE(W_enc, torch.zeros(width, dtype=dtype), W_dec, b_dec, activation, k=k, threshold=threshold)


@torch.no_grad()
def calibrate_sparsity(sae: SAE, x: Tensor, target_l0: float) -> SAE:
    """Set ``b_enc`` so that about ``target_l0`` features fire per token of ``x [n, d]``.

    Each feature's bias is minus its ``1 - target_l0 / F`` quantile of
    pre-activations over ``x``, so each fires on that fraction of tokens.
    """
    x = x.reshape(-1, sae.d)
    sae.b_enc.zero_()
    pre = sae.pre_activation(x)
    q = 1.0 - min(target_l0 / sae.width, 1.0)
    sae.b_enc.copy_(-torch.quantile(pre, q, dim=0))
    return sae
