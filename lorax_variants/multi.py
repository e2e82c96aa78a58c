"""Many adapters trained at once over one frozen model (``nodes.multi.MultiAdapterNode`` at each weight).

    tree = lv.adapters(params, {"legal": AdapterSpec(targets=..., r=8),
                                "med": AdapterSpec(targets=..., r=32, variant="dora")}, key)
    tree = lv.route(tree, ids)                  # per example: 0 = "legal", 1 = "med", -1 = base only
    loss = per_adapter_mean(...)                # each adapter's gradient = training it alone on its rows
    lv.pick(tree, "med")                        # one adapter as a plain DoRA tree: merge, PEFT export

Each adapter is built by ``adapt`` with its own spec (rank, alpha, variant LoRA or DoRA, targets, init)
and key ``fold_in(key, i)``, exactly the tree ``adapt`` would give it alone; ``join_trees`` joins trees
adapted (or trained) separately over the same base.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lorax_variants.adapt import adapt
from lorax_variants.nodes.base import AdapterNode
from lorax_variants.nodes.multi import MultiAdapterNode, join
from lorax_variants.spec import AdapterSpec
from lorax_variants.tree import leaves_with_paths, map_with_paths

__all__ = ["adapters", "join_trees", "pick", "adapter_names", "adapter_means"]


def adapters(params: Any, specs: Mapping[str, AdapterSpec], key: Any, *, impl: str = "auto") -> Any:
    """``params`` with every weight any spec targets replaced by a ``MultiAdapterNode`` holding each named
    adapter (``specs`` in order: adapter i is ``route`` index i). Specs may target different weights and use
    variants ``lora``/``dora`` with any rank; a spec's own errors name its adapter."""
    if not specs:
        raise ValueError("adapters() needs at least one named AdapterSpec")
    key = jax.random.PRNGKey(key) if isinstance(key, int) else key
    trees = {}
    for i, (name, spec) in enumerate(specs.items()):
        if spec.variant not in ("lora", "dora"):
            raise ValueError(f"adapter {name!r}: variant {spec.variant!r}; many adapters at once take 'lora' and "
                             "'dora'")
        if spec.init in ("pissa", "olora"):
            raise ValueError(f"adapter {name!r}: init {spec.init!r} rewrites the base weight, which the adapters "
                             "share")
        try:
            trees[name] = adapt(params, spec, jax.random.fold_in(key, i))
        except ValueError as e:
            raise ValueError(f"adapter {name!r}: {e}") from None
    return join_trees(trees, impl=impl)


def join_trees(trees: Mapping[str, Any], *, impl: str = "auto") -> Any:
    """Separately adapted (or trained) trees over the same base -> one tree of ``MultiAdapterNode``s."""
    names = list(trees)
    flat = {n: dict(leaves_with_paths(t, nodes_are_leaves=True)) for n, t in trees.items()}
    first = trees[names[0]]

    def one(path: str, x: Any) -> Any:
        at = {n: flat[n].get(path) for n in names}
        missing = [n for n, v in at.items() if v is None]
        if missing:
            raise ValueError(f"{path}: the trees of adapters {missing} have no leaf there; join trees of one model")
        if not any(isinstance(v, AdapterNode) for v in at.values()):
            return x
        return join(path, at, impl=impl)

    return map_with_paths(one, first, nodes_are_leaves=True)


def adapter_names(tree: Any) -> tuple[str, ...]:
    """The adapters' names, in route order (from the first ``MultiAdapterNode``)."""
    for _, x in leaves_with_paths(tree, nodes_are_leaves=True):
        if isinstance(x, MultiAdapterNode):
            return x.names
    raise ValueError("the tree has no multi-adapter weights")


def pick(tree: Any, name: str) -> Any:
    """Adapter ``name`` alone: every ``MultiAdapterNode`` as that adapter's ``LoraNode``/``DoraNode`` (its plain
    weight where the adapter leaves it alone). Merge, export and evaluate one adapter with it."""
    names = adapter_names(tree)
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(names)}")
    return map_with_paths(lambda p, x: x.as_one(name) if isinstance(x, MultiAdapterNode) else x, tree,
                          nodes_are_leaves=True)


def adapter_means(sums: jax.Array, counts: jax.Array, routes: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """``(means [n], counts [n])``: per adapter, the summed loss of its rows over their count (tokens or
    examples; rows routed to BASE count for none). ``jnp.sum(means)`` as the loss gives each adapter the
    gradient of training it alone on its rows with a mean loss, whatever the others' share of the batch."""
    onehot = jax.nn.one_hot(routes, n, dtype=jnp.float32)  # BASE (-1) rows: all zeros
    total = onehot.T @ sums.astype(jnp.float32)
    count = onehot.T @ counts.astype(jnp.float32)
    return total / jnp.maximum(count, 1.0), count
