"""Layout transforms of the key table (pe_jax.checkpoints.naming): how a PyTorch tensor's layout differs from
the pe_jax parameter slot it fills, both ways."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Copy:
    """Same values in the same order; PyTorch may add `lead` unit axes ([1, 1, d] for timm's cls_token)."""

    lead: int = 0

    def torch_shape(self, shape):
        return (1,) * self.lead + tuple(shape)

    def to_jax(self, t, shape):
        return t.reshape(shape)

    def to_torch(self, a):
        return a.reshape(self.torch_shape(a.shape))


@dataclass(frozen=True)
class Flat:
    """A bias whose pe_jax form keeps structure ([3, heads, head_dim]) that PyTorch flattens."""

    def torch_shape(self, shape):
        return (math.prod(shape),)

    def to_jax(self, t, shape):
        return t.reshape(shape)

    def to_torch(self, a):
        return a.reshape(-1)


@dataclass(frozen=True)
class Linear:
    """torch.nn.Linear weight [out, in] <-> kernel [*in, *out] whose first `n_in` axes are inputs."""

    n_in: int = 1

    def torch_shape(self, shape):
        return (math.prod(shape[self.n_in:]), math.prod(shape[: self.n_in]))

    def to_jax(self, t, shape):
        return t.T.reshape(shape)

    def to_torch(self, a):
        return a.reshape(math.prod(a.shape[: self.n_in]), -1).T


@dataclass(frozen=True)
class Conv:
    """Patch-embedding conv weight [out, in, kh, kw] <-> kernel [kh, kw, in, out]."""

    def torch_shape(self, shape):
        kh, kw, i, o = shape
        return (o, i, kh, kw)

    def to_jax(self, t, shape):
        return t.transpose(2, 3, 1, 0).reshape(shape)

    def to_torch(self, a):
        return a.transpose(3, 2, 0, 1)


@dataclass(frozen=True)
class ZeroBias:
    """timm's `head.bias`: the reference projection has no bias, so it must be zero; it fills nothing."""

    def torch_shape(self, shape):
        return (shape[-1],)

    def to_torch(self, a):
        return np.zeros((a.shape[-1],), a.dtype)


COPY, FLAT, LINEAR, CONV = Copy(), Flat(), Linear(), Conv()
