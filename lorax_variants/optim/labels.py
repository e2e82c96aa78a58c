"""Labels of trainable leaves, from node fields and paths (for ``optax.multi_transform``).

``leaf_fields(tree)``: for every leaf, ``(path, field, per_layer_ndim)`` where ``field`` is the
node field holding it (``lora_a``, ``lora_b``, ``magnitude``, ``gate``, ...) or ``None`` for a
plain leaf, and ``per_layer_ndim`` discounts the stacked-layer axis (a stacked bias [L, d] is
1-D per layer).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from lorax_variants.nodes.base import AdapterNode, Node
from lorax_variants.tree import compile_patterns, map_with_paths, matches

__all__ = ["label_tree"]


def label_tree(tree: Any, label: Callable[[str, str | None, int], str], stacked: str | None = None) -> Any:
    """A tree shaped like ``tree`` whose leaves are ``label(path, field, per_layer_ndim)``."""
    stacked_re = compile_patterns(stacked)

    def per_layer(path: str, x: Any) -> int:
        return x.ndim - (1 if matches(path, stacked_re) else 0)

    def one(path: str, x: Any) -> Any:
        if isinstance(x, AdapterNode):
            lead = 1 if matches(path, stacked_re) else 0
            return map_with_paths(lambda sub, leaf: label(f"{path}/{sub}", sub.split("/")[0], leaf.ndim - lead), x)
        if isinstance(x, Node):
            return jax.tree.map(lambda leaf: label(path, None, leaf.ndim), x)
        return label(path, None, per_layer(path, x))

    return map_with_paths(one, tree, nodes_are_leaves=True)

