"""DoRA, weight-decomposed low-rank adaptation (arXiv 2402.09353).

    W' = m ⊙ (W + s·A B) / ‖W + s·A B‖_c          (‖·‖_c: norm over the input axis, per output unit)

m [out] is trained (PEFT's ``lora_magnitude_vector``), initialised to ‖W + s·A B‖_c (= ‖W‖_c
when B = 0). As in the paper (§4.3) and PEFT, the norm is a constant in the backward pass.
It is computed without forming W + s·A B (which would cost a d x k matrix per step), per output unit o:

    ‖W_o + s (AB)_o‖² = ‖W_o‖² + 2s ⟨W_o, (AB)_o⟩ + s² ‖(AB)_o‖²,
    ⟨W_o, (AB)_o⟩ = Σ_r (Wᵀ A)_{o r} B_{r o},   ‖(AB)_o‖² = B_oᵀ (AᵀA) B_o

with ‖W‖² stored at adaptation (W is frozen). Forward, exactly PEFT's ``use_dora``:

    y = x W + (m/n - 1) ⊙ (x_d W) + (m/n) ⊙ s (x_d A) B        (x_d: dropped-out x; bias outside)
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.codec import register_codec
from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, lora_factors, register_variant
from lorax_variants.variants.lora import PEFT as LORA_FORMAT

__all__ = ['DoraNode']


@node
class DoraNode(AdapterNode):
    """DoRA over ``weight``: ``magnitude ⊙ (W + s·A B) / ‖W + s·A B‖`` (column norms over the input axis, detached
    as the paper's gradient rule), with ``lora_a`` [..., in, r], ``lora_b`` [..., r, out], ``magnitude`` [...,
    out]."""

    variant: ClassVar[str] = "dora"

    weight: Any = frozen()
    lora_a: jax.Array = param()
    lora_b: jax.Array = param()
    magnitude: jax.Array = param()
    weight_sq_norm: jax.Array = frozen()  # ‖W‖² per output unit, [..., out]
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def norm(self) -> jax.Array:
        """‖W + s·A B‖ per output unit in float32, without the d x k sum (no gradient)."""
        a = self.lora_a.astype(jnp.float32)
        b = self.lora_b.astype(jnp.float32)
        w = weight_of(self.weight).astype(jnp.float32)
        cross = jnp.einsum("...io,...ir,...ro->...o", w, a, b)
        gram = jnp.einsum("...ir,...is->...rs", a, a)
        ab_sq = jnp.einsum("...ro,...rs,...so->...o", b, gram, b)
        sq = self.weight_sq_norm + 2 * self.scale * cross + self.scale**2 * ab_sq
        return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)))

    def apply(self, x: jax.Array) -> jax.Array:
        """DoRA (arXiv 2402.09353): m ⊙ (x W + s·x A B) / ‖W + s·A B‖_c, the column norm a constant of the
        backward."""
        ratio = (self.magnitude.astype(jnp.float32) / self.norm()).astype(x.dtype)
        y = dense(x, self.weight)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        low = low_rank(xd, self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype), float(self.scale), None, ratio)
        base_d = y if xd is x else dense(xd, self.weight)
        return y + (ratio - 1) * base_d + low

    def with_weight(self, weight: Any) -> "DoraNode":
        """Over a new frozen weight (its NF4 form, say): ‖W‖² is recomputed from it and m rescaled
        by ‖W_new + sAB‖/‖W + sAB‖ per output unit, so every column keeps its ratio m/‖·‖. At
        initialization (B = 0) that gives m = ‖W_new‖: the node equals DoRA adapted over W_new."""
        w = weight_of(weight).astype(jnp.float32)
        moved = self.replace(weight=weight, weight_sq_norm=jnp.sum(w * w, axis=-2))
        factor = moved.norm() / jnp.maximum(self.norm(), jnp.finfo(jnp.float32).tiny)
        return moved.replace(magnitude=(self.magnitude.astype(jnp.float32) * factor).astype(self.magnitude.dtype))

    def merge(self) -> jax.Array:
        """m ⊙ (W + s·A B) / ‖W + s·A B‖_c."""
        w = weight_of(self.weight)
        full = w.astype(jnp.float32) + self.scale * jnp.matmul(self.lora_a.astype(jnp.float32), self.lora_b.astype(jnp.float32))
        n = jnp.linalg.norm(full, axis=-2)
        return (full * (self.magnitude / n)[..., None, :]).astype(w.dtype)


@register_variant("dora")
def build_dora(t: Target) -> DoraNode:
    weight, a, b = lora_factors(t)
    w = weight_of(weight).astype(jnp.float32)
    sq = jnp.sum(w * w, axis=-2)
    full = w + t.scale * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))
    magnitude = jnp.linalg.norm(full, axis=-2).astype(a.dtype)
    return DoraNode(weight=weight, lora_a=a, lora_b=b, magnitude=magnitude, weight_sq_norm=sq,
                    scale=t.scale, dropout=t.spec.dropout)


register_recipe(Recipe("dora", "dora", figures=("magnitude_direction",)))  # ΔM/ΔD against LoRA-shaped runs

register_codec(LORA_FORMAT, node=DoraNode)  # PEFT's LoRA format with use_dora (its lora_magnitude_vector key)
