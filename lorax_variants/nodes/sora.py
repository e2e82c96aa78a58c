"""SoRA, sparse low-rank adaptation (arXiv 2311.11696).

    y = x W + s · ((x_d A) ⊙ g) B,     g ∈ R^r  (the gate; initialised to 1, so SoRA starts as LoRA)

The gate's L1 penalty and proximal step are optimizer pieces (``optim.sora``); a zero gate
removes its rank. ``prune(tree)`` turns each node into a plain LoRA with the zero-gate ranks
dropped and the gates folded into B (export, serving).
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.registry import Target, lora_factors, register_variant
from lorax_variants.nodes.base import AdapterNode, frozen, node, param, static, weight_of
from lorax_variants.nodes.lora import LoraNode, adapter_dropout, low_rank
from lorax_variants.nodes.base import dense
from lorax_variants.tree import map_with_paths

__all__ = ["SoraNode", "prune"]


@node
class SoraNode(AdapterNode):
    variant: ClassVar[str] = "sora"

    weight: Any = frozen()
    lora_a: jax.Array = param()
    lora_b: jax.Array = param()
    gate: jax.Array = param()  # [..., r]
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + s·((x A) ⊙ g) B: the gate g [r] masks ranks (SoRA, arXiv 2311.11696)."""
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype),
                                                float(self.scale), self.gate.astype(x.dtype))

    reduces_to_lora: ClassVar[bool] = True

    def as_lora(self) -> LoraNode:
        """A ``LoraNode`` without the zero-gate ranks, gates folded into B (concrete arrays only: the kept
        ranks decide shapes). A stacked node keeps the union of its layers' ranks; a rank whose gate is
        zero in one layer has a zero row of B there."""
        g = np.asarray(self.gate)
        keep = np.nonzero(np.any(g.reshape(-1, g.shape[-1]) != 0, axis=0))[0]
        b = self.lora_b * self.gate[..., :, None]
        return LoraNode(weight=self.weight, lora_a=self.lora_a[..., keep], lora_b=b[..., keep, :], scale=self.scale,
                        dropout=self.dropout)

    def merge(self) -> jax.Array:
        """W + s·A diag(g) B."""
        w = weight_of(self.weight)
        a = self.lora_a.astype(jnp.float32) * self.gate.astype(jnp.float32)[..., None, :]
        return (w.astype(jnp.float32) + self.scale * jnp.matmul(a, self.lora_b.astype(jnp.float32))).astype(w.dtype)


@register_variant("sora")
def build_sora(t: Target) -> SoraNode:
    weight, a, b = lora_factors(t)
    return SoraNode(weight=weight, lora_a=a, lora_b=b, gate=jnp.ones(t.lead + (t.r,), a.dtype),
                    scale=t.scale, dropout=t.spec.dropout)


def prune(tree: Any) -> Any:
    """SoRA nodes -> LoRA nodes without their zero-gate ranks (gates folded into B).

    Concrete arrays only (the kept ranks decide shapes). A stacked node keeps the union of its
    layers' ranks (a zero gate in one layer still zeroes that rank there).
    """
    return map_with_paths(lambda p, x: x.as_lora() if isinstance(x, SoraNode) else x, tree, nodes_are_leaves=True)
