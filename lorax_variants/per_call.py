"""Per-call state as a pure tree transform (no globals): set it on the tree before the forward.

``with_dropout(tree, key)`` gives every node with a dropout rate its own key (folded from the
node's path; stacked nodes get one key per layer, which ``scan`` slices with the layer);
``without_dropout(tree)`` clears them (evaluation). Later variants add their own setters here
(DyLoRA's active rank, multi-task routing).
"""

from __future__ import annotations

from typing import Any

import jax

from lorax_variants.adapt import path_key
from lorax_variants.nodes.base import Node
from lorax_variants.tree import map_with_paths

__all__ = ["with_dropout", "without_dropout"]


def with_dropout(tree: Any, key: jax.Array) -> Any:
    """Each dropout-carrying node gets ``fold_in(key, crc32(path))`` (split per stacked layer)."""

    def set_key(path: str, x: Any) -> Any:
        if not isinstance(x, Node) or getattr(x, "dropout", 0.0) == 0.0:
            return x
        k = path_key(key, path)
        lead = x.shape[:-2]
        if lead:
            k = jax.random.split(k, lead[0]) if len(lead) == 1 else jax.random.split(k, lead)
        return x.replace(dropout_key=k)

    return map_with_paths(set_key, tree, nodes_are_leaves=True)


def without_dropout(tree: Any) -> Any:
    """The tree with every adapter's dropout key removed (evaluation: adapter-input dropout off)."""
    return map_with_paths(
        lambda _, x: x.replace(dropout_key=None) if hasattr(x, "dropout_key") else x,
        tree,
        nodes_are_leaves=True,
    )
