"""AdaLoRA's SVD-form adapter (arXiv 2303.10512).

    W' = W + s · P Λ Q,    s = alpha / (r + 1e-5)  (PEFT: scaling / (ranknum + 1e-5))

In our [in, out] layout: ``lora_a`` = Qᵀ [in, r], ``lora_e`` = Λ [r], ``lora_b`` = Pᵀ [r, out]
(PEFT: lora_A (r, in), lora_E (r, 1), lora_B (out, r)). At init Λ = 0 and A, B ~ N(0, 0.02²).
``rank_mask`` [r] (1 = kept) multiplies Λ; the rank allocator (``optim.adalora``) sets it.
``orthogonal_penalty(tree)`` is the regulariser R = mean over matrices of ‖PᵀP − I‖_F and
‖QQᵀ − I‖_F (non-squared, as PEFT and the official code).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.registry import Target, register_variant
from lorax_variants.nodes.base import AdapterNode, Node, frozen, node, param, static, weight_of
from lorax_variants.nodes.lora import adapter_dropout, low_rank
from lorax_variants.nodes.base import dense

__all__ = ["AdaLoraNode", "orthogonal_penalty"]


@node
class AdaLoraNode(AdapterNode):
    variant: ClassVar[str] = "adalora"

    weight: Any = frozen()
    lora_a: jax.Array = param()  # Qᵀ [..., in, r]
    lora_e: jax.Array = param()  # Λ [..., r]
    lora_b: jax.Array = param()  # Pᵀ [..., r, out]
    rank_mask: jax.Array = frozen()  # bool [..., r]: True kept, False pruned
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def _e(self, dtype: Any) -> jax.Array:
        return (self.lora_e * self.rank_mask.astype(self.lora_e.dtype)).astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·((x Qᵀ) ⊙ (Λ ⊙ mask)) Pᵀ: the SVD-form adapter (arXiv 2303.10512) with pruned triplets masked."""
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype),
                                                float(self.scale), self._e(x.dtype))

    def merge(self) -> jax.Array:
        """W + s·Qᵀ diag(Λ ⊙ mask) Pᵀ."""
        w = weight_of(self.weight)
        a = self.lora_a.astype(jnp.float32) * self._e(jnp.float32)[..., None, :]
        return (w.astype(jnp.float32) + self.scale * jnp.matmul(a, self.lora_b.astype(jnp.float32))).astype(w.dtype)

    def ranks(self) -> jax.Array:
        """Ranks in use (per stacked layer)."""
        return jnp.sum(self.rank_mask, axis=-1)


@register_variant("adalora")
def build_adalora(t: Target) -> AdaLoraNode:
    dtype = jnp.dtype(t.spec.dtype)
    ka, kb = jax.random.split(t.key)
    return AdaLoraNode(
        weight=t.weight,
        lora_a=(0.02 * jax.random.normal(ka, t.lead + (t.d_in, t.r))).astype(dtype),
        lora_e=jnp.zeros(t.lead + (t.r,), dtype),
        lora_b=(0.02 * jax.random.normal(kb, t.lead + (t.r, t.d_out))).astype(dtype),
        rank_mask=jnp.ones(t.lead + (t.r,), bool),
        scale=t.alpha / (t.r + 1e-5),
        dropout=t.spec.dropout,
    )


def orthogonal_penalty(tree: Any) -> jax.Array:
    """Mean over all AdaLoRA P and Q matrices (each stacked layer counted) of ‖·ᵀ· − I‖_F."""
    total, count = jnp.zeros((), jnp.float32), 0
    for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Node)):
        if not isinstance(n, AdaLoraNode):
            continue
        for m, gram in ((n.lora_a, "...ir,...is->...rs"), (n.lora_b, "...ro,...so->...rs")):
            m = m.astype(jnp.float32)
            g = jnp.einsum(gram, m, m) - jnp.eye(m.shape[-1] if gram.startswith("...ir") else m.shape[-2])
            norms = jnp.sqrt(jnp.sum(g * g, axis=(-2, -1)))
            total, count = total + jnp.sum(norms), count + norms.size
    if count == 0:
        raise ValueError("orthogonal_penalty: the tree has no AdaLoRA nodes")
    return total / count
