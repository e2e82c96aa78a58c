"""LoRA-FA's gradient projection (arXiv 2308.03303), as PEFT's ``LoraFAOptimizer``.

With A frozen, B's gradient is projected so the update of A B approximates full fine-tuning's:

    g_B ← (1/s²) · (AᵀA + δI)⁺ g_B        (our [in, r] A; PEFT: grad_B (A Aᵀ + δI)⁺ / s² in torch layout)

A transformation placed before the optimizer: ``optax.chain(lorafa_projection(tree), optax.adamw(...))``.
``tree`` is the adapted tree (A is frozen, so it is read once). PEFT runs this product under bf16
autocast where bf16 is available, and its AdamW adds eps before bias correction; we compute the
projection in float32 and leave the optimizer to Optax, so one step agrees with PEFT's to a small
fraction of the learning rate, not to the last bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from lorax_variants.nodes.base import Node
from lorax_variants.recipes import OptimContext, Recipe, plain_optimizer, register_recipe
from lorax_variants.registry import Target, register_variant
from lorax_variants.tree import leaves_with_paths, map_with_paths
from lorax_variants.variants.lora import LoraNode, build_lora

__all__ = ['lorafa_projection']


def lorafa_projection(tree: Any, delta: float = 1e-8) -> optax.GradientTransformation:
    """LoRA-FA (arXiv 2308.03303): with A frozen, B's gradient is projected by (AᵀA + δI)⁻¹ / s² (PEFT's
    ``LoraFAOptimizer``), so the step on the product approximates the full-rank gradient's projection onto A."""
    nodes = {p: n for p, n in leaves_with_paths(tree, nodes_are_leaves=True)
             if isinstance(n, LoraNode) and "lora_a" in n.freeze}
    if not nodes:
        raise ValueError("lorafa_projection: no LoRA-FA nodes (variant='lora_fa') in the tree")
    proj = {}
    for p, n in nodes.items():
        a = n.lora_a.astype(jnp.float32)
        gram = jnp.einsum("...ir,...is->...rs", a, a) + delta * jnp.eye(a.shape[-1])
        proj[p] = jnp.linalg.pinv(gram) / n.scale**2

    def init(params: Any) -> optax.EmptyState:
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        flat = dict(leaves_with_paths(updates, nodes_are_leaves=True))
        missing = [p for p in proj if p not in flat]
        if missing:
            raise ValueError(f"lorafa_projection: gradients lack the LoRA-FA nodes {missing[:3]}")

        def one(path: str, u: Any) -> Any:
            if path not in proj or not isinstance(u, Node):
                return u
            g = u.lora_b
            return u.replace(lora_b=jnp.matmul(proj[path], g.astype(jnp.float32)).astype(g.dtype))


        return map_with_paths(one, updates, nodes_are_leaves=True), state

    return optax.GradientTransformation(init, update)


@register_variant("lora_fa")
def build_lora_fa(t: Target) -> LoraNode:
    node = build_lora(t)
    return node.replace(freeze=("lora_a",))


def _lorafa(settings: Any, ctx: OptimContext) -> optax.GradientTransformation:
    base = plain_optimizer(settings, ctx)
    if isinstance(jax.tree.leaves(ctx.adapted)[0], jax.ShapeDtypeStruct):
        return base  # a plan over abstract trees: the (stateless) projection needs values
    return optax.chain(lorafa_projection(ctx.adapted), base)


register_recipe(Recipe("lora_fa", "lora_fa", optimizer=_lorafa, lora_shaped=True))
