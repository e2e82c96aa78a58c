"""LoRA-drop's node: per layer, either the layer's own adapter or one shared set (arXiv 2402.07721).

    y = x W + s (x_d A') B',   (A', B') = (A, B) if keep else (A_shared, B_shared)

``keep`` is a bool per stacked layer (a mask over the layer axis, never an unstacked copy); the
shared set is a ``Shared`` leaf stored once and broadcast over layers, so its gradient sums over
every layer that uses it. Built by ``optim.lora_drop.select``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import AdapterNode, frozen, node, param, static, weight_of
from lorax_variants.nodes.lora import adapter_dropout, low_rank
from lorax_variants.ops import dense
from lorax_variants.shared import Shared, value_of

__all__ = ["LoraDropNode"]


@node
class LoraDropNode(AdapterNode):
    variant: ClassVar[str] = "lora_drop"

    weight: Any = frozen()
    lora_a: jax.Array = param()  # own sets [..., in, r] (used where keep)
    lora_b: jax.Array = param()
    shared_a: Shared = param()  # [in, r], stored once
    shared_b: Shared = param()  # [r, out]
    keep: jax.Array = frozen()  # bool [...]
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def _factors(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        k = self.keep[..., None, None]
        a = jnp.where(k, self.lora_a, value_of(self.shared_a))
        b = jnp.where(k, self.lora_b, value_of(self.shared_b))
        return a.astype(dtype), b.astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        a, b = self._factors(x.dtype)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, a, b, float(self.scale))

    def merge(self) -> jax.Array:
        a, b = self._factors(jnp.float32)
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.scale * jnp.matmul(a, b)).astype(w.dtype)
