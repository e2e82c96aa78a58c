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

from lorax_variants.nodes.base import AdapterNode, frozen, node, param, static, weight_of
from lorax_variants.ops import dense, dense_t, embed
from lorax_variants.shared import value_of

__all__ = ["LoraNode", "adapter_dropout"]


def adapter_dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout on the adapter input (identity without a key: evaluation)."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


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

    @property
    def rank(self) -> int:
        return value_of(self.lora_a).shape[-1]

    def apply(self, x: jax.Array) -> jax.Array:
        y = dense(x, self.weight)
        xa = adapter_dropout(x, self.dropout, self.dropout_key)
        h = jnp.matmul(xa, value_of(self.lora_a).astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)
        return y + jnp.matmul(h, value_of(self.lora_b).astype(x.dtype))

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
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)
