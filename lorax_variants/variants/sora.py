"""SoRA, sparse low-rank adaptation (arXiv 2311.11696).

    y = x W + s · ((x_d A) ⊙ g) B,     g ∈ R^r  (the gate; initialised to 1, so SoRA starts as LoRA)

The gate's L1 penalty and proximal step are optimizer pieces (``optim.sora``); a zero gate
removes its rank. ``prune(tree)`` turns each node into a plain LoRA with the zero-gate ranks
dropped and the gates folded into B (export, serving).

SoRA's proximal step on the gates (arXiv 2311.11696), an Optax transformation.

The gates' L1 penalty ξ‖g‖₁ is handled by a proximal-gradient step after the base update:

    g ← sign(g̃) · max(|g̃| − ξ_t, 0),     g̃ = g + base update

which is the paper's soft-thresholding. (The official code applies a different rule when
|g̃| ∈ (ξ, 2ξ); we follow the paper.) ξ may be a schedule of the step count. Place it last in
the chain: ``optax.chain(base, sora_proximal(xi))``; only ``gate`` leaves of SoRA nodes change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_variants.nodes.base import AdapterNode, Node, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import OptimContext, Recipe, plain_optimizer, register_recipe
from lorax_variants.registry import Target, lora_factors, register_variant
from lorax_variants.tree import leaves_with_paths, map_with_paths
from lorax_variants.variants.lora import LoraNode

__all__ = ['SoraNode', 'prune', 'sora_proximal', 'sora_sparsity', 'gate_l1', 'Sora']


@node
class SoraNode(AdapterNode):
    """SoRA over ``weight``: ``W + s·((x A) ⊙ gate) B`` with a gate per rank that a proximal step drives to exactly
    zero (``prune`` then drops those ranks)."""

    variant: ClassVar[str] = "sora"

    weight: Any = frozen()
    lora_a: jax.Array = param()
    lora_b: jax.Array = param()
    gate: jax.Array = param()  # [..., r]
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def active_ranks(self) -> jax.Array:
        """The ranks whose gate is not zero, per stacked layer."""
        return jnp.sum(self.gate != 0, axis=-1).astype(jnp.int32)

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


class SoraState(NamedTuple):
    count: jax.Array


def sora_proximal(xi: float | optax.Schedule) -> optax.GradientTransformation:
    """SoRA's proximal step on the gates (arXiv 2311.11696), after the base update: g ← sign(g)·max(|g| − ξ, 0),
    soft thresholding that drives the gates of unneeded ranks to exactly zero; ``xi`` a number or a schedule of
    the step."""
    def init(params: Any) -> SoraState:
        return SoraState(count=jnp.zeros((), jnp.int32))

    def update(updates: Any, state: SoraState, params: Any = None) -> tuple[Any, SoraState]:
        if params is None:
            raise ValueError("sora_proximal needs params: call tx.update(updates, state, params)")
        thresh = xi(state.count) if callable(xi) else xi

        def one(u: Any, p: Any) -> Any:
            if not isinstance(p, SoraNode) or p.gate is None:
                return u
            g = p.gate + u.gate
            new = jnp.sign(g) * jnp.maximum(jnp.abs(g) - thresh, 0.0)
            return u.replace(gate=(new - p.gate).astype(u.gate.dtype))

        is_node = lambda x: isinstance(x, Node)  # noqa: E731
        return jax.tree.map(one, updates, params, is_leaf=is_node), SoraState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def gate_l1(tree: Any) -> jax.Array:
    """Σ |g| over all SoRA gates (the penalty the proximal step minimises, for logging)."""
    gates = [jnp.sum(jnp.abs(n.gate)) for n in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Node))
             if isinstance(n, SoraNode)]
    return sum(gates) if gates else jnp.zeros(())


def sora_sparsity(tree: Any) -> dict[str, np.ndarray]:
    """Per adapted path (per stacked layer): the fraction of ranks whose gate is exactly zero."""
    return {p: np.mean(np.asarray(n.gate) == 0, axis=-1) for p, n in leaves_with_paths(tree, nodes_are_leaves=True)
            if isinstance(n, SoraNode)}


@dataclasses.dataclass(frozen=True)
class Sora:
    """SoRA (arXiv 2311.11696): ``xi`` is the gates' L1 strength (the proximal step's threshold per unit rate)."""

    xi: float = 1e-4


def _sora(s: Sora, ctx: OptimContext) -> optax.GradientTransformation:
    return optax.chain(plain_optimizer(s, ctx), sora_proximal(lambda step: s.xi * ctx.lr(step) / ctx.base_lr))


register_recipe(Recipe("sora", "sora", Sora, optimizer=_sora, tracks_ranks=True, figures=("active_ranks",)))
