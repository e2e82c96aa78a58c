"""What the adapters did to the model, as numbers to plot (``python -m train report`` draws them).

- ``magnitude_direction(tree)``: the DoRA paper's weight decomposition analysis (arXiv 2402.09353,
  §2.2, Figure 2). For each adapted weight W' (merged) over its base W0, per stacked layer:

      ΔM = mean_n | ‖W'_:,n‖ - ‖W0_:,n‖ |          (magnitude change, per output unit n)
      ΔD = mean_n ( 1 - cos(W'_:,n, W0_:,n) )       (direction change)

  (the paper's columns of W ∈ R^{d×k} are our [in, out] weight's output columns). LoRA's ΔM and ΔD
  rise together (positive slope); DoRA can change one without the other (negative slope).
- ``active_ranks(tree, opt_state)``: the ranks each adapter uses now, per node and layer: each node's
  ``active_ranks()`` (a rank allocator's pattern from the optimizer state, gates that are not zero, or
  the full ``r`` of a factored node).

Both return ``{path: numpy array over stacked layers}`` (shape ``()`` for an unstacked weight).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.nodes.base import AdapterNode
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.sharding import to_host
from lorax_variants.tree import leaves_with_paths

__all__ = ["magnitude_direction", "active_ranks"]


@jax.jit
def _delta(w0: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    w0, w = w0.astype(jnp.float32), w.astype(jnp.float32)
    n0, n = jnp.linalg.norm(w0, axis=-2), jnp.linalg.norm(w, axis=-2)
    cos = jnp.sum(w0 * w, axis=-2) / jnp.maximum(n0 * n, 1e-30)
    return jnp.mean(jnp.abs(n - n0), axis=-1), jnp.mean(1.0 - cos, axis=-1)


def magnitude_direction(tree: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{path: (ΔM, ΔD)}`` for every adapter node that merges to one weight (multi-task: ``select`` first)."""
    out = {}
    for path, n in leaves_with_paths(tree, nodes_are_leaves=True):
        if not isinstance(n, AdapterNode) or not hasattr(n, "weight"):
            continue
        try:
            merged = n.merge()
        except (NotImplementedError, ValueError):  # a node without one merged weight (multi-task)
            continue
        w0 = n.weight.dequantize(jnp.float32) if isinstance(n.weight, QuantizedNode) else n.weight
        dm, dd = _delta(w0, merged)
        out[path] = (to_host(dm), to_host(dd))
    return out


def active_ranks(tree: Any, opt_state: Any = None) -> dict[str, np.ndarray]:
    """``{path: ranks in use}`` per adapter node (integer array over stacked layers): each node's
    ``active_ranks()``, after any optimizer state that moves ranks (one with ``apply_ranks(tree)``) has set
    its current pattern on the tree."""
    movers = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "apply_ranks"))
              if hasattr(s, "apply_ranks")] if opt_state is not None else []
    for state in movers:
        tree = state.apply_ranks(tree)
    out = {}
    for path, n in leaves_with_paths(tree, nodes_are_leaves=True):
        if isinstance(n, AdapterNode) and n.active_ranks() is not None:
            out[path] = to_host(n.active_ranks())
    return out
