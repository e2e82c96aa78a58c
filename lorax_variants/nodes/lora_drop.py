"""LoRA-drop's node: per layer, either the layer's own adapter or one shared set (arXiv 2402.07721).

    y = x W + s (x_d A') B',   (A', B') = (A_k, B_k) if slot = k ≥ 0 else (A_shared, B_shared)

Only what LoRA-drop keeps is stored, so the selection removes parameters (and their optimizer state):
the kept layers' own adapters ``kept_a [K, in, r]``, ``kept_b [K, r, out]`` (K = layers of this weight
that keep theirs), and the shared set ``shared_a [in, r]``, ``shared_b [r, out]``, stored once for every
weight of its shape. ``slot`` (int per stacked layer) says which kept set a layer uses, -1 for the
shared one. Both kinds of sets are ``Shared`` leaves: stored once and broadcast to every layer of a
``scan`` (never sliced by it), each layer picking its own by ``slot``; gradients sum over uses.
Built by ``optim.lora_drop.select``; ``as_lora()`` expands it to a plain LoRA node (merge, export).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.nodes.base import AdapterNode, frozen, node, param, static, weight_of
from lorax_variants.nodes.lora import LoraNode, adapter_dropout, low_rank
from lorax_variants.nodes.base import dense
from lorax_variants.shared import Shared, value_of

__all__ = ["LoraDropNode"]


@node
class LoraDropNode(AdapterNode):
    """A weight whose layers use their own LoRA set (``slot ≥ 0``) or the shared one (``slot = -1``)."""

    variant: ClassVar[str] = "lora_drop"

    weight: Any = frozen()
    shared_a: Shared = param()  # [in, r], stored once per weight shape
    shared_b: Shared = param()  # [r, out]
    slot: jax.Array = frozen()  # int32 [...] (stacked layers): index into kept_a/kept_b, or -1
    kept_a: Shared | None = param(default=None)  # [K, in, r]: the kept layers' own A (None: K = 0)
    kept_b: Shared | None = param(default=None)  # [K, r, out]
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    @property
    def keep(self) -> jax.Array:
        """Per layer: whether it keeps its own adapter."""
        return self.slot >= 0

    def _factors(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        a, b = value_of(self.shared_a), value_of(self.shared_b)
        lead = tuple(self.slot.shape)
        if self.kept_a is not None:
            idx = jnp.maximum(self.slot, 0)
            use = (self.slot >= 0)[..., None, None]
            a = jnp.where(use, jnp.take(value_of(self.kept_a), idx, axis=0), a)
            b = jnp.where(use, jnp.take(value_of(self.kept_b), idx, axis=0), b)
        else:
            a, b = jnp.broadcast_to(a, lead + a.shape), jnp.broadcast_to(b, lead + b.shape)
        return a.astype(dtype), b.astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·(x A_l) B_l with layer l's own set if kept, else the shared set (LoRA-drop, arXiv 2402.07721)."""
        a, b = self._factors(x.dtype)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, a, b, float(self.scale))

    reduces_to_lora: ClassVar[bool] = True

    def as_lora(self) -> LoraNode:
        """The same weight as a plain ``LoraNode``: every layer with the set it uses (for merge and export)."""
        a, b = self._factors(jnp.float32)
        return LoraNode(weight=self.weight, lora_a=a, lora_b=b, scale=self.scale, dropout=self.dropout)

    def merge(self) -> jax.Array:
        """W + s·A_l B_l per layer (kept layers their own set, the others the shared one)."""
        a, b = self._factors(jnp.float32)
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.scale * jnp.matmul(a, b)).astype(w.dtype)


def slots(keep: np.ndarray) -> np.ndarray:
    """``slot`` of each layer from a keep mask: 0, 1, ... over the kept layers in order, -1 elsewhere."""
    keep = np.asarray(keep, bool)
    return np.where(keep, np.cumsum(keep.reshape(-1)).reshape(keep.shape) - 1, -1).astype(np.int32)
