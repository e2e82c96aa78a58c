"""Leaves shared by several nodes (VeRA's projections, LoRA-drop's shared adapter set).

A ``Shared`` wrapper stands in a node's field. Exactly one occurrence of a name, the *owner*,
holds the value; every other occurrence holds ``None`` (no leaf), so the value is stored once
in memory, in the trainable/frozen trees and on disk. ``resolve_shared(tree)`` fills every
occurrence with the owner's value; done inside the differentiated function, the gradient of
the owner's leaf is the sum over all uses, so a shared trainable set trains as one.

Our models resolve at the start of ``apply`` and ``merge``/``merged`` resolve before merging.
``run_layers`` broadcasts ``Shared`` values across stacked layers instead of slicing them.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["Shared", "resolve_shared", "is_shared", "value_of"]


@jax.tree_util.register_pytree_node_class
class Shared:
    """A named value used by several nodes; ``value is None`` marks a reference to the owner."""

    def __init__(self, name: str, value: Any = None):
        self.name, self.value = name, value

    def tree_flatten(self):
        """Pytree protocol: the value is the child, the name static."""
        return (self.value,), self.name

    @classmethod
    def tree_unflatten(cls, name, children):
        return cls(name, children[0])

    def __repr__(self) -> str:
        return f"Shared({self.name!r}, {'ref' if self.value is None else getattr(self.value, 'shape', self.value)})"


def is_shared(x: Any) -> bool:
    """Whether ``x`` is a ``Shared`` reference."""
    return isinstance(x, Shared)


def value_of(x: Any) -> Any:
    """The array behind a field that may be ``Shared`` (resolved first, or this raises)."""
    if not isinstance(x, Shared):
        return x
    if x.value is None:
        raise ValueError(f"shared leaf {x.name!r} is unresolved: call resolve_shared(tree) before apply/merge")
    return x.value


def resolve_shared(tree: Any) -> Any:
    """Every ``Shared`` reference gets its owner's value (pure; gradients sum over uses)."""
    owners: dict[str, Any] = {}
    found = False
    for x in jax.tree.leaves(tree, is_leaf=is_shared):
        if is_shared(x):
            found = True
            if x.value is not None:
                owners.setdefault(x.name, x.value)  # an already-resolved tree: the first use wins
    if not found:
        return tree

    def fill(x: Any) -> Any:
        if not is_shared(x):
            return x
        if x.name not in owners:
            raise ValueError(f"shared leaf {x.name!r} has no owner in this tree (was it split off? combine first)")
        return Shared(x.name, owners[x.name])  # every use reads the owner's value

    return jax.tree.map(fill, tree, is_leaf=is_shared)
