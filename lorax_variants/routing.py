"""One adapter per example: setting each row's adapter index on every node that routes rows.

A node routes rows when it has ``routed(ids) -> node`` (the node with each example's adapter index set) and
``n_routes`` (how many adapters it holds); ``BASE`` (−1) sends a row through the frozen base alone. Grouped
implementations need the rows sorted by adapter: ``sort_by_adapter`` gives that permutation.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.tree import map_with_paths

__all__ = ["BASE", "route", "sort_by_adapter", "is_grouped", "routes_rows"]

BASE = -1  # a row through the base model only


def routes_rows(x: Any) -> bool:
    """Whether ``x`` is a node that takes one adapter per example."""
    return hasattr(x, "routed") and hasattr(x, "n_routes")


def sort_by_adapter(ids: Any) -> np.ndarray:
    """The stable permutation that groups examples by adapter (0, 1, ..., k−1, then BASE rows), as the
    ``ragged`` implementation needs: ``batch[perm]``, then ``route(tree, ids[perm])``."""
    return np.argsort(_route_key(ids), kind="stable")


def is_grouped(ids: Any) -> bool:
    """Whether examples are grouped by adapter as ``sort_by_adapter`` leaves them (BASE rows last)."""
    key = _route_key(ids)
    return bool(np.all(key[1:] >= key[:-1]))


def _route_key(ids: Any) -> np.ndarray:
    """Each example's adapter index as a sort key, BASE (−1) rows after every adapter."""
    ids = np.asarray(ids, np.int64)
    return np.where(ids < 0, np.iinfo(np.int64).max, ids)


def route(tree: Any, task_ids: jax.Array | Sequence[int]) -> Any:
    """Set each example's adapter index (``BASE`` = -1: base model only) on every node that routes rows
    (``routes_rows``): adapter k of each such node."""
    # Constant ids (a list, a numpy array, a concrete jax array) are checked on the host; under
    # ``jit`` jnp makes even constants into tracers, so the check must not go through jnp.
    host = None if isinstance(task_ids, jax.core.Tracer) else np.asarray(task_ids)
    ids = jnp.asarray(task_ids, jnp.int32)
    if ids.ndim != 1:
        raise ValueError(f"route() takes one task id per example (shape [batch]), got shape {ids.shape}")
    if host is not None and host.size and not np.issubdtype(host.dtype, np.integer):
        raise TypeError(f"route() takes integer task ids, got dtype {host.dtype}")

    def set_ids(n: Any) -> Any:
        if host is not None:
            bad = [int(i) for i in host.reshape(-1) if not BASE <= int(i) < n.n_routes]
            if bad:
                raise ValueError(f"task ids {bad[:5]} out of range [-1, {n.n_routes})")
            if hasattr(n, "resolved_impl") and n.resolved_impl() == "ragged" and not is_grouped(host):
                raise ValueError(f"adapter ids {host.tolist()[:16]} are not sorted by adapter (BASE rows last), as "
                                 "impl='ragged' needs: reorder the batch with sort_by_adapter(ids)")
        return n.routed(ids)

    return map_with_paths(lambda p, x: set_ids(x) if routes_rows(x) else x, tree, nodes_are_leaves=True)
