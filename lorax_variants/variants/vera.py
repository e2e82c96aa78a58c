"""VeRA, vector-based random matrix adaptation (arXiv 2310.11454).

    h = x W + ((x_d A_[:in]) ⊙ λ_d) B_[:, :out] ⊙ λ_b

One pair of frozen random matrices, A [max_in, r] and B [r, max_out], is shared by every adapted
layer (sized to the largest layer and sliced, as PEFT's vera_A (r, max_in) / vera_B (max_out, r)),
stored once (``Shared``: the first adapted path owns it). Kaiming-uniform with a = 0 as PEFT
(bound sqrt(6 / fan_in) on the torch layouts: fan_in = max_in for A, r for B). Trained per layer:
λ_d [r] (initialised to ``d_initial``, 0.1) and λ_b [out] (initialised to 0). No alpha/r scale.
Parameters per layer: r + out.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, register_variant, settings_of
from lorax_variants.shared import Shared, value_of
from lorax_variants.spec import register_settings

__all__ = ['VeraNode', 'Vera']


@node
class VeraNode(AdapterNode):
    """VeRA over ``weight``: frozen random projections ``vera_a`` [max_in, r], ``vera_b`` [r, max_out] shared by
    every layer (sliced to this one's size) and trained vectors ``lambda_d`` [..., r], ``lambda_b`` [..., out]."""

    variant: ClassVar[str] = "vera"

    weight: Any = frozen()
    vera_a: Shared = frozen()  # [max_in, r]
    vera_b: Shared = frozen()  # [r, max_out]
    lambda_d: jax.Array = param()  # [..., r]
    lambda_b: jax.Array = param()  # [..., out]
    dropout_key: jax.Array | None = frozen(default=None)
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def _ab(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        d_in, d_out = self.shape[-2:]
        return value_of(self.vera_a)[:d_in].astype(dtype), value_of(self.vera_b)[:, :d_out].astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + ((x A) ⊙ λ_d) B ⊙ λ_b with A, B frozen random projections shared by every layer (VeRA, arXiv
        2310.11454)."""
        a, b = self._ab(x.dtype)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, a, b, 1.0, self.lambda_d.astype(x.dtype), self.lambda_b.astype(x.dtype))

    def merge(self) -> jax.Array:
        """W + A diag(λ_d) B diag(λ_b)."""
        a, b = self._ab(jnp.float32)
        w = weight_of(self.weight)
        delta = jnp.matmul(a * self.lambda_d[..., None, :], b) * self.lambda_b[..., None, :]
        return (w.astype(jnp.float32) + delta).astype(w.dtype)


def _prepare(targets: list[Target]) -> dict[str, Any]:
    ranks = {t.r for t in targets}
    if len(ranks) != 1:
        raise ValueError(f"VeRA shares one pair of projections: all targets need one rank, got {sorted(ranks)} "
                         "(remove rank_pattern)")
    r = ranks.pop()
    spec = targets[0].spec
    max_in, max_out = max(t.d_in for t in targets), max(t.d_out for t in targets)
    ka, kb = jax.random.split(jax.random.fold_in(targets[0].key, 0x7E8A))
    dtype = jnp.dtype(spec.dtype)
    a = jax.random.uniform(ka, (max_in, r), jnp.float32, -1, 1) * jnp.sqrt(6.0 / max_in)
    b = jax.random.uniform(kb, (r, max_out), jnp.float32, -1, 1) * jnp.sqrt(6.0 / r)
    return {"owner": targets[0].path, "a": a.astype(dtype), "b": b.astype(dtype)}


@register_variant("vera", prepare=_prepare, rank_bounded=False)
def build_vera(t: Target, ctx: dict[str, Any]) -> VeraNode:
    own = t.path == ctx["owner"]
    dtype = jnp.dtype(t.spec.dtype)
    return VeraNode(
        weight=t.weight,
        vera_a=Shared("vera_a", ctx["a"] if own else None),
        vera_b=Shared("vera_b", ctx["b"] if own else None),
        lambda_d=jnp.full(t.lead + (t.r,), float(settings_of(t.spec).d_initial), dtype),
        lambda_b=jnp.zeros(t.lead + (t.d_out,), dtype),
        dropout=t.spec.dropout,
    )


@dataclasses.dataclass(frozen=True)
class Vera:
    """VeRA (arXiv 2310.11454): λ_d starts at ``d_initial``."""

    d_initial: float = 0.1


register_settings("vera", Vera)
register_recipe(Recipe("vera", "vera", Vera, spec=lambda s: {"settings": s}))
