"""SoRA's proximal step on the gates (arXiv 2311.11696), an Optax transformation.

The gates' L1 penalty ξ‖g‖₁ is handled by a proximal-gradient step after the base update:

    g ← sign(g̃) · max(|g̃| − ξ_t, 0),     g̃ = g + base update

which is the paper's soft-thresholding. (The official code applies a different rule when
|g̃| ∈ (ξ, 2ξ); we follow the paper.) ξ may be a schedule of the step count. Place it last in
the chain: ``optax.chain(base, sora_proximal(xi))``; only ``gate`` leaves of SoRA nodes change.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lorax_variants.nodes.base import Node
from lorax_variants.nodes.sora import SoraNode
from lorax_variants.tree import leaves_with_paths

__all__ = ["sora_proximal", "sora_sparsity", "gate_l1"]


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
