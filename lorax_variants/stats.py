"""Counting: trainable and frozen parameters, bytes of a tree.

Both work on concrete arrays and on abstract trees (``jax.ShapeDtypeStruct`` from
``jax.eval_shape``), so the adapters and memory of a model too large for the machine can be
planned without allocating it. A leaf object that appears several times in a tree (a shared
projection) is counted once.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np

from lorax_variants.tree import Patterns, trainable_mask
from lorax_variants.nodes.quantized import QuantizedNode

__all__ = ["ParamCount", "count_params", "tree_bytes", "leaf_bytes"]


class ParamCount(NamedTuple):
    """Parameter counts of a tree: ``trainable`` (adapter fields and extra leaves set to train), ``frozen`` and
    ``total``."""

    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0


def _size(x: Any) -> int:
    return math.prod(getattr(x, "shape", ()))


def leaf_bytes(x: Any) -> int:
    """Bytes of one leaf (array or ShapeDtypeStruct): size times itemsize; PRNG keys count their key data; non-
    arrays 0."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return 0
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return _size(x) * math.prod(jax.random.key_data(jax.random.key(0)).shape) * 4
    return _size(x) * np.dtype(dtype).itemsize


def _unique(leaves: list[Any]) -> list[Any]:
    seen: set[int] = set()
    out = []
    for x in leaves:
        if id(x) not in seen:
            seen.add(id(x))
            out.append(x)
    return out


def count_params(tree: Any, *, extra: Patterns = None) -> ParamCount:
    """Number of trainable and frozen parameters (floating-point array elements).

    A quantized weight counts as the weights it represents (``in x out``), not its packed bytes.
    """
    tree = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if isinstance(x, QuantizedNode) else x,
        tree,
        is_leaf=lambda x: isinstance(x, QuantizedNode),
    )
    mask = trainable_mask(tree, extra)
    pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(mask))
    counts = {True: 0, False: 0}
    seen: set[int] = set()
    for x, m in pairs:
        if id(x) in seen or getattr(x, "dtype", None) is None:
            continue
        seen.add(id(x))
        if not jax.numpy.issubdtype(x.dtype, jax.numpy.floating):
            continue  # keys, ranks, task ids, masks: state, not parameters
        counts[bool(m)] += _size(x)
    return ParamCount(trainable=counts[True], frozen=counts[False])


def tree_bytes(tree: Any) -> int:
    """Bytes held by the tree's leaves (each distinct leaf once)."""
    return sum(leaf_bytes(x) for x in _unique(jax.tree.leaves(tree)))
