"""``dense(x, w)`` (defined with the node protocol in ``nodes.base``): the one place where a weight of
any kind meets an input.

    y = x @ W                      for a plain array W [in, out]
    y = node.apply(x)              for a node (adapter, quantized, ...), in factored form

Models call ``dense`` for every projection, so plain arrays, quantized nodes and adapter
nodes all work everywhere. Compute happens in the activation dtype: the weight (or the node's
leaves) is cast to ``x.dtype``.

``merge(tree)`` turns every node back into the dense weight it stands for, and
``merged(apply_fn)`` uses that to run any JAX model we did not write (Flax Linen/NNX,
Equinox, plain functions) on an adapted tree: exact for every variant, but it forms each
d x k delta inside the step; our own models take the factored path through ``dense``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax

from lorax_variants.nodes.base import AdapterNode, Node, dense, dense_t, embed
from lorax_variants.shared import resolve_shared
from lorax_variants.tree import leaves_with_paths, map_with_paths

__all__ = ["dense", "dense_t", "embed", "merge", "merged", "merge_quantized", "as_lora", "adapter_names_in", "one_adapter",
           "without_adapters"]  # dense, dense_t, embed: the node protocol's


def as_lora(tree: Any, **options: Any) -> Any:
    """Every node that reduces to LoRA (``node.reduces_to_lora``) as its ``LoraNode`` (``node.as_lora``),
    given the ``options`` its ``as_lora`` takes (DyLoRA's ``rank``, a multi-task node's ``task``; ``None``
    values are left out); other nodes unchanged."""
    def reduce(x: Any) -> Any:
        if not (isinstance(x, Node) and getattr(x, "reduces_to_lora", False)):
            return x
        accepted = inspect.signature(x.as_lora).parameters
        return x.as_lora(**{k: v for k, v in options.items() if k in accepted and v is not None})

    return jax.tree.map(reduce, resolve_shared(tree), is_leaf=lambda x: isinstance(x, Node))


def without_adapters(tree: Any) -> Any:
    """``tree`` with every adapter node replaced by the frozen weight it adapts (a quantized weight stays
    quantized): the model the adapters were made over, as PEFT's ``disable_adapter()`` gives it. The same arrays,
    no copy: the reference policy of preference and RL tuning costs no memory."""
    return jax.tree.map(lambda x: x.weight if isinstance(x, AdapterNode) else x, tree,
                        is_leaf=lambda x: isinstance(x, Node))


def adapter_names_in(tree: Any) -> tuple[str, ...] | None:
    """The names of the adapters a tree of many holds (from its first node that holds several, the protocol's
    ``names`` and ``as_one``), or None for a tree of one adapter."""
    for _, x in leaves_with_paths(tree, nodes_are_leaves=True):
        if isinstance(x, Node) and hasattr(x, "as_one") and getattr(x, "names", None):
            return tuple(x.names)
    return None


def one_adapter(tree: Any, name: str) -> Any:
    """Adapter ``name`` of a tree of many alone: every node that holds several as that adapter's own node
    (``node.as_one``: its plain weight where the adapter leaves it alone)."""
    names = adapter_names_in(tree)
    if names is None:
        raise ValueError("the tree has no multi-adapter weights")
    if name not in names:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(names)}")
    return map_with_paths(lambda p, x: x.as_one(name) if isinstance(x, Node) and hasattr(x, "as_one") else x, tree,
                          nodes_are_leaves=True)


def merge(tree: Any) -> Any:
    """The same tree with every node replaced by its dense weight (``node.merge()``)."""
    tree = resolve_shared(tree)
    return jax.tree.map(
        lambda x: x.merge() if isinstance(x, Node) else x,
        tree,
        is_leaf=lambda x: isinstance(x, Node),
    )


def merge_quantized(tree: Any) -> Any:
    """The tree with every adapter folded into its quantized base, which stays quantized (QA-LoRA's merge:
    ``node.merge_quantized``); quantized weights without an adapter stay as they are. An adapter that cannot
    fold (a LoRA over NF4: its update is not constant over quantization blocks) is an error naming its path;
    ``merge`` gives the dense model instead."""
    def one(path: str, x: Any) -> Any:
        if not isinstance(x, AdapterNode):
            return x
        if not hasattr(x, "merge_quantized"):
            raise ValueError(f"{path}: a {type(x).__name__} cannot merge into a quantized weight and keep it "
                             "quantized (only QA-LoRA can); use merge() for a dense merged model")
        return x.merge_quantized(path)

    return map_with_paths(one, resolve_shared(tree), nodes_are_leaves=True)


def _has_dropout_state(tree: Any) -> list[str]:
    return [
        p
        for p, x in leaves_with_paths(tree, nodes_are_leaves=True)
        if isinstance(x, Node) and getattr(x, "dropout_key", None) is not None
    ]


def merged(apply_fn: Callable[..., Any], *, argnum: int = 0) -> Callable[..., Any]:
    """Wrap ``apply_fn(params, ...)`` to accept an adapted tree in position ``argnum``.

    Inside the (jitted) call the adapted weights are materialized with ``merge`` and the
    function runs unchanged, so its gradients reach the adapter leaves through the merge.
    Adapter-input dropout cannot be expressed as a weight: a tree carrying dropout keys
    (``with_dropout``) is refused here rather than silently run without dropout.
    """

    @functools.wraps(apply_fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = list(args)
        tree = args[argnum]
        with_keys = _has_dropout_state(tree)
        if with_keys:
            raise ValueError(
                "merged(): adapter-input dropout needs the factored path (dense); these nodes "
                f"carry dropout keys: {with_keys[:5]}. Call the model without with_dropout(), "
                "or set dropout=0 for models run through merged()."
            )
        args[argnum] = merge(tree)
        return apply_fn(*args, **kwargs)

    return wrapper
