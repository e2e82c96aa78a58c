"""Delta-LoRA (arXiv 2309.02411): the frozen weight follows the adapter's product.

After step K, each step also updates every adapted frozen weight with the change of A B:

    W ← W + λ · s · (A_{t+1} B_{t+1} − A_t B_t)

No gradient of W is ever formed: the update is a pure function of the trainable trees before
and after the optimizer step, applied to the frozen tree (old trees in, new tree out), so it is
part of the step and of every checkpoint of the frozen tree. Only LoRA nodes over plain
(not quantized) weights qualify.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import Node
from lorax_variants.nodes.lora import LoraNode

__all__ = ["delta_lora_update"]


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
