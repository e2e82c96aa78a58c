"""LoRA (arXiv 2106.09685), rsLoRA (arXiv 2312.03732) and LoRA-FA (arXiv 2308.03303).

    y = x W + s · (drop(x) A) B,      W [in, out] frozen,  A [in, r],  B [r, out]
    s = alpha / r          (LoRA)
    s = alpha / sqrt(r)    (rsLoRA: rank-stabilized scaling)

LoRA-FA freezes A at its random initialization and trains only B. Leading axes on all three
(``[L, in, out]``, ``[L, in, r]``, ``[L, r, out]``) are stacked layers, each with its own A, B;
``jax.lax.scan`` over the node slices them one layer at a time.

The factored apply never forms the d x k delta: the rank-r intermediate ``x A`` is scaled
(r values per token instead of out) and multiplied by B. ``merge`` forms ``W + s A B``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import AdapterNode, dense, dense_t, embed, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, lora_factors, register_variant
from lorax_variants.shared import Shared, value_of
from lorax_variants.tree import leaves_with_paths, map_with_paths

__all__ = ['LoraNode', 'share_adapters']


@node
class LoraNode(AdapterNode):
    """``W + s·A B`` with A [..., in, r], B [..., r, out]."""

    variant: ClassVar[str] = "lora"

    weight: Any = frozen()
    lora_a: jax.Array = param()
    lora_b: jax.Array = param()
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    reduces_to_lora: ClassVar[bool] = True

    def as_lora(self) -> "LoraNode":
        """Itself."""
        return self

    @property
    def rank(self) -> int:
        return value_of(self.lora_a).shape[-1]

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·(dropout(x) A) B (arXiv 2106.09685), never forming A B."""
        y = dense(x, self.weight)
        xa = adapter_dropout(x, self.dropout, self.dropout_key)
        return y + low_rank(xa, value_of(self.lora_a).astype(x.dtype), value_of(self.lora_b).astype(x.dtype),
                            float(self.scale))

    def lookup(self, ids: jax.Array) -> jax.Array:
        """Embedding rows of ``W + s·A B`` (W [vocab, d]): ``W[ids] + s·A[ids] B``."""
        rows = embed(ids, self.weight)
        a = jnp.take(value_of(self.lora_a), ids, axis=0).astype(rows.dtype)
        return rows + jnp.matmul(a * jnp.asarray(self.scale, rows.dtype), value_of(self.lora_b).astype(rows.dtype))

    def apply_t(self, x: jax.Array) -> jax.Array:
        """``x (W + s·A B)ᵀ = x Wᵀ + s·(x Bᵀ) Aᵀ`` (a tied head over an adapted embedding)."""
        h = jnp.matmul(x, value_of(self.lora_b).astype(x.dtype).T) * jnp.asarray(self.scale, x.dtype)
        return dense_t(x, self.weight) + jnp.matmul(h, value_of(self.lora_a).astype(x.dtype).T)

    def delta(self) -> jax.Array:
        """``s·A B`` in float32 (the d x k update; for merge and export only)."""
        a = value_of(self.lora_a).astype(jnp.float32)
        b = value_of(self.lora_b).astype(jnp.float32)
        return self.scale * jnp.matmul(a, b)

    def merge(self) -> jax.Array:
        """W + s·A B."""
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)
@register_variant("lora")
def build_lora(t: Target) -> LoraNode:
    weight, a, b = lora_factors(t)
    return LoraNode(weight=weight, lora_a=a, lora_b=b, scale=t.scale, dropout=t.spec.dropout)


def share_adapters(tree: Any, paths: list[str], name: str = "shared") -> Any:
    """Make the LoRA nodes at ``paths`` use one adapter set (A, B): the first path's, stored once.

    The others keep their own frozen weights and scales; after training, the owner's A and B hold
    gradients summed over every use (LoRA-drop shares one set among its unselected layers).
    """
    nodes = dict(leaves_with_paths(tree, nodes_are_leaves=True))
    missing = [p for p in paths if not isinstance(nodes.get(p), LoraNode)]
    if missing:
        raise ValueError(f"share_adapters: {missing} are not LoRA nodes of this tree")
    owner = nodes[paths[0]]
    a, b = value_of(owner.lora_a), value_of(owner.lora_b)
    for p in paths[1:]:
        n = nodes[p]
        if value_of(n.lora_a).shape != a.shape or value_of(n.lora_b).shape != b.shape:
            raise ValueError(f"share_adapters: {p} has A {value_of(n.lora_a).shape}, B {value_of(n.lora_b).shape}; "
                             f"{paths[0]} has A {a.shape}, B {b.shape}")
    wanted = {p: i for i, p in enumerate(paths)}

    def wrap(path: str, x: Any) -> Any:
        if path not in wanted:
            return x
        own = wanted[path] == 0
        return x.replace(lora_a=Shared(f"{name}/lora_a", a if own else None),
                         lora_b=Shared(f"{name}/lora_b", b if own else None))

    return map_with_paths(wrap, tree, nodes_are_leaves=True)


register_recipe(Recipe("lora", "lora", lora_shaped=True))
