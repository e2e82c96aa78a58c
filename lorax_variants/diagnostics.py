"""What the adapters did to the model, as numbers to plot (``python -m train report`` draws them).

- ``magnitude_direction(tree)``: the DoRA paper's weight decomposition analysis (arXiv 2402.09353,
  §2.2, Figure 2). For each adapted weight W' (merged) over its base W0, per stacked layer:

      ΔM = mean_n | ‖W'_:,n‖ - ‖W0_:,n‖ |          (magnitude change, per output unit n)
      ΔD = mean_n ( 1 - cos(W'_:,n, W0_:,n) )       (direction change)

  (the paper's columns of W ∈ R^{d×k} are our [in, out] weight's output columns). LoRA's ΔM and ΔD
  rise together (positive slope); DoRA can change one without the other (negative slope).
- ``active_ranks(tree, opt_state)``: the ranks each adapter uses now, per node and layer: AdaLoRA's
  allocator pattern (from the optimizer state, else the node's ``rank_mask``), SoRA's non-zero gates,
  every other factored node its ``r``.

Both return ``{path: numpy array over stacked layers}`` (shape ``()`` for an unstacked weight).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.variants.adalora import AdaLoraNode
from lorax_variants.nodes.base import AdapterNode, Node
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.variants.sora import SoraNode
from lorax_variants.sharding import to_host
from lorax_variants.tree import leaves_with_paths
from lorax_variants.variants.adalora import AllocatorState

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
    """``{path: ranks in use}`` per adapter node (integer array over stacked layers)."""
    alloc = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AllocatorState))
             if isinstance(s, AllocatorState)] if opt_state is not None else []
    keep = iter(alloc[0].keep) if alloc else None
    out = {}
    for path, n in leaves_with_paths(tree, nodes_are_leaves=True):
        if not isinstance(n, Node):
            continue
        if isinstance(n, AdaLoraNode):
            mask = next(keep) if keep is not None else n.rank_mask
            out[path] = to_host(jnp.sum(mask, axis=-1))
        elif isinstance(n, SoraNode):
            out[path] = to_host(jnp.sum(n.gate != 0, axis=-1))
        elif hasattr(n, "lora_a") and isinstance(n, AdapterNode):
            lead = n.lora_a.shape[:-2]
            out[path] = np.full(lead, n.lora_a.shape[-1])
    return out
