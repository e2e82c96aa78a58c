"""DyLoRA, dynamic search-free low-rank adaptation (arXiv 2210.07558).

One node holds A [in, r_max], B [r_max, out]; each step a rank b ∈ [r_min, r_max] is sampled
and the adapter is truncated to its first b ranks with scale alpha / b:

    y = x W + (alpha / b) · (x_d A_{:, :b}) B_{:b, :}

Under jit the shapes stay static: ranks ≥ b are masked, not sliced. With ``frozen_lower``
(the paper's "frozen" mode) only the b-th column of A / row of B receives gradient. The rank is
per-call state set on the tree (``with_rank`` / ``sample_rank``); without one the node serves
r_max. After training, ``truncate(node, b)`` is a plain LoRA of rank b (export, serving).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import AdapterNode, Node, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, lora_factors, register_variant, settings_of
from lorax_variants.spec import register_settings
from lorax_variants.tree import map_with_paths
from lorax_variants.variants.lora import LoraNode

__all__ = ['DyLoraNode', 'with_rank', 'sample_rank', 'truncate', 'DyLora']


@node
class DyLoraNode(AdapterNode):
    """DyLoRA over ``weight``: A [..., in, r_max], B [..., r_max, out] of which the first ``rank`` ranks apply,
    scaled alpha / rank; ``r_min`` is the smallest rank trained."""

    variant: ClassVar[str] = "dylora"

    weight: Any = frozen()
    lora_a: jax.Array = param()
    lora_b: jax.Array = param()
    rank: jax.Array | None = frozen(default=None)  # int32 [...], per call
    dropout_key: jax.Array | None = frozen(default=None)
    alpha: float = static()
    r_min: int = static(default=1)
    frozen_lower: bool = static(default=False)
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    @property
    def r_max(self) -> int:
        return self.lora_a.shape[-1]

    def _factors(self, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        b = jnp.asarray(self.r_max if self.rank is None else self.rank, jnp.int32)
        idx = jnp.arange(self.r_max)
        keep = (idx < b[..., None]).astype(dtype)
        a, bm = self.lora_a.astype(dtype), self.lora_b.astype(dtype)
        if self.frozen_lower:
            new = idx == (b[..., None] - 1)
            a = jnp.where(new[..., None, :], a, jax.lax.stop_gradient(a))
            bm = jnp.where(new[..., :, None], bm, jax.lax.stop_gradient(bm))
        scale = (self.alpha / b.astype(jnp.float32)).astype(dtype)
        return a * keep[..., None, :], bm * keep[..., :, None], scale

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + (α/b)·(x A[:, :b]) B[:b]: the rank b in use (sampled per step in training, arXiv 2210.07558)."""
        a, b, scale = self._factors(x.dtype)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, a, b, 1.0, jnp.broadcast_to(scale[..., None], a.shape[-1:]))

    reduces_to_lora: ClassVar[bool] = True

    def as_lora(self, rank: int | None = None) -> LoraNode:
        """The plain ``LoraNode`` of rank ``rank`` (default: the full trained rank): the first ``rank``
        columns of A and rows of B, scale alpha / rank (arXiv 2210.07558)."""
        b = self.r_max if rank is None else int(rank)
        if not self.r_min <= b <= self.r_max:
            raise ValueError(f"DyLoRA rank {b} outside the trained range [{self.r_min}, {self.r_max}]")
        return LoraNode(weight=self.weight, lora_a=self.lora_a[..., :b], lora_b=self.lora_b[..., :b, :],
                        scale=self.alpha / b, dropout=self.dropout)

    def merge(self) -> jax.Array:
        """W + (α/b)·A[:, :b] B[:b] at the rank in use."""
        a, b, scale = self._factors(jnp.float32)
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + scale[..., None, None] * jnp.matmul(a, b)).astype(w.dtype)


@register_variant("dylora")
def build_dylora(t: Target) -> DyLoraNode:
    weight, a, b = lora_factors(t)
    return DyLoraNode(weight=weight, lora_a=a, lora_b=b, alpha=t.alpha, r_min=_r_min(t), dropout=t.spec.dropout)


def _set(tree: Any, fn) -> Any:
    return map_with_paths(lambda p, x: fn(x) if isinstance(x, DyLoraNode) else x, tree, nodes_are_leaves=True)


def with_rank(tree: Any, b: int | jax.Array) -> Any:
    """Every DyLoRA node serves rank ``b`` (an int or a traced scalar), broadcast over stacked layers."""
    def set_rank(n: DyLoraNode) -> DyLoraNode:
        if isinstance(b, int) and not n.r_min <= b <= n.r_max:
            raise ValueError(f"DyLoRA rank {b} outside the trained range [{n.r_min}, {n.r_max}]")
        return n.replace(rank=jnp.broadcast_to(jnp.asarray(b, jnp.int32), n.shape[:-2]))

    return _set(tree, set_rank)


def sample_rank(tree: Any, key: jax.Array) -> Any:
    """One rank b ~ U{r_min..r_max} for the whole tree this step (the paper's training rule)."""
    nodes = [x for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Node)) if isinstance(x, DyLoraNode)]
    if not nodes:
        raise ValueError("sample_rank: the tree has no DyLoRA nodes")
    lo, hi = nodes[0].r_min, nodes[0].r_max
    return with_rank(tree, jax.random.randint(key, (), lo, hi + 1))


def truncate(tree: Any, b: int) -> Any:
    """Every DyLoRA node as a plain ``LoraNode`` of rank ``b`` (scale alpha / b)."""
    return _set(tree, lambda n: n.as_lora(b))


@dataclasses.dataclass(frozen=True)
class DyLora:
    """DyLoRA (arXiv 2210.07558): each step trains a rank drawn from [``r_min``, r]."""

    r_min: int = 1


def _r_min(t: Target) -> int:
    r_min = settings_of(t.spec).r_min
    if isinstance(r_min, bool) or not isinstance(r_min, int) or not 1 <= r_min <= t.r:
        raise ValueError(f"{t.path}: DyLora.r_min={r_min!r} must be an integer in [1, r={t.r}]")
    return r_min


register_settings("dylora", DyLora)
register_recipe(Recipe("dylora", "dylora", DyLora, spec=lambda s: {"settings": s},
                       train_tree=lambda s, tree, key: sample_rank(tree, key)))
