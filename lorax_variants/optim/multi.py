"""Gradient clipping per adapter when many adapters train together (``lv.adapters``), an Optax transformation.

``optax.clip_by_global_norm`` over a tree of k adapters would scale every adapter by the norm of all of them:
one adapter's large gradient would shrink the others' steps. Here each adapter (its A, B and DoRA magnitude in
every weight) is clipped by its own global norm, the leaves outside the adapters (a head, biases) by theirs:

    g_i ← g_i · min(1, max_norm / ‖g_i‖)      for each adapter i, and for the other leaves together

so, with a per-adapter mean loss (``lv.adapter_means``) and an elementwise optimizer (Adam, Lion, SGD), each
adapter's update is the one it would get trained alone on its rows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax_variants.nodes.multi import MultiAdapterNode

__all__ = ["clip_by_adapter_norm", "adapter_labels"]

OTHER = -1  # the label of leaves outside every adapter


def adapter_labels(tree: Any) -> Any:
    """``tree`` with each leaf replaced by its adapter's index (``OTHER`` = −1 outside the adapters)."""
    def label(x: Any) -> Any:
        if not isinstance(x, MultiAdapterNode):
            return OTHER
        fields = {f: tuple(None if v is None else jax.tree.map(lambda _, i=i: i, v) for i, v in enumerate(getattr(x, f)))
                  for f in ("lora_a", "lora_b", "magnitude")}
        return jax.tree.map(lambda _: OTHER, x).replace(**fields)

    return jax.tree.map(label, tree, is_leaf=lambda x: isinstance(x, MultiAdapterNode))


def clip_by_adapter_norm(max_norm: float) -> optax.GradientTransformation:
    """``clip_by_global_norm`` applied to each adapter of a many-adapter tree on its own (and to the leaves
    outside the adapters together)."""
    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        leaves, treedef = jax.tree.flatten(updates)
        labels = jax.tree.leaves(adapter_labels(updates))
        if len(labels) != len(leaves):
            raise ValueError("clip_by_adapter_norm: the labels do not match the gradient tree's leaves")
        squares: dict[int, jax.Array] = {}
        for x, k in zip(leaves, labels):
            squares[k] = squares.get(k, 0.0) + jnp.sum(jnp.square(x.astype(jnp.float32)))
        factor = {k: jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(s), 1e-30)) for k, s in squares.items()}
        clipped = [(x * factor[k]).astype(x.dtype) for x, k in zip(leaves, labels)]
        return jax.tree.unflatten(treedef, clipped), state

    return optax.GradientTransformation(init, update)
