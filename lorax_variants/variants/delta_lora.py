"""Delta-LoRA (arXiv 2309.02411): the frozen weight follows the adapter's product.

After step K, each step also updates every adapted frozen weight with the change of A B:

    W ← W + λ · s · (A_{t+1} B_{t+1} − A_t B_t)

No gradient of W is ever formed: the update is a pure function of the trainable trees before
and after the optimizer step, applied to the frozen tree (old trees in, new tree out), so it is
part of the step and of every checkpoint of the frozen tree. Only LoRA nodes over plain
(not quantized) weights qualify.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import Node
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.tree import leaves_with_paths
from lorax_variants.variants.lora import LoraNode

__all__ = ['delta_lora_update', 'DeltaLora']


def delta_lora_update(frozen: Any, old: Any, new: Any, step: jax.Array | int, *, lam: float = 0.5,
                      start_step: int = 0) -> Any:
    """The frozen tree with W += λ·s·(A'B' − AB) where ``step >= start_step`` (K)."""
    on = jnp.asarray(step) >= start_step
    is_node = lambda x: x is None or isinstance(x, Node)  # noqa: E731  (split trees hold None)

    def one(f: Any, a: Any, b: Any) -> Any:
        if not isinstance(f, LoraNode):
            return f
        if isinstance(f.weight, Node):
            raise ValueError("Delta-LoRA updates the frozen weight: it cannot be quantized "
                             f"(found {type(f.weight).__name__})")
        prod = lambda n: jnp.matmul(n.lora_a.astype(jnp.float32), n.lora_b.astype(jnp.float32))  # noqa: E731
        delta = lam * f.scale * (prod(b) - prod(a))
        w = f.weight
        return f.replace(weight=jnp.where(on, (w.astype(jnp.float32) + delta).astype(w.dtype), w))

    return jax.tree.map(one, frozen, old, new, is_leaf=is_node)


@dataclasses.dataclass(frozen=True)
class DeltaLora:
    """Delta-LoRA (arXiv 2309.02411): from step ``start`` the frozen W moves by ``update_ratio`` times the change
    of s·A B at each step."""

    update_ratio: float = 0.5
    start: int = 0


def _delta_weights(frozen: Any) -> list[Any]:
    """The frozen weights Delta-LoRA changes (those under LoRA nodes), in path order."""
    return [n.weight for _, n in leaves_with_paths(frozen, nodes_are_leaves=True) if isinstance(n, LoraNode)]


def _with_delta_weights(frozen: Any, weights: list[Any]) -> Any:
    it = iter(weights)
    return jax.tree.map(lambda n: n.replace(weight=next(it)) if isinstance(n, LoraNode) else n, frozen,
                        is_leaf=lambda x: isinstance(x, LoraNode))


register_recipe(Recipe(
    "delta_lora", "lora", DeltaLora, weight_changes=False, extras=_delta_weights, with_extras=_with_delta_weights,
    after_update=lambda s, frozen, old, new, step: delta_lora_update(frozen, old, new, step, lam=s.update_ratio,
                                                                     start_step=s.start),
    lora_shaped=True, moves_base=True))
