"""Paths of a pytree, path patterns, and the split/combine of trainable and frozen leaves.

A leaf's path is its keys joined by ``/``: ``params/Dense_0/kernel``, ``layers/3/w``,
``blocks/attn/q_proj/lora_a`` (dict keys, sequence indices and dataclass field names alike).
Patterns are regular expressions matched against the whole path (``re.fullmatch``).

``split`` and ``combine`` follow equinox's ``partition``/``combine``: the tree is split by a
boolean mask into two trees of the same structure, each holding ``None`` where the other has a
leaf, and ``combine`` takes the non-``None`` leaf at every position, so
``combine(*split(t)) == t`` exactly.

Which leaves train is decided by the adapter nodes (field metadata, see ``nodes.base``), plus
leaves the caller names by pattern; everything else is frozen by default.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Iterable, Sequence

import jax

from lorax_variants.nodes.base import Node

PyTree = Any
Patterns = str | Sequence[str] | None

__all__ = [
    "path_str",
    "leaves_with_paths",
    "map_with_paths",
    "compile_patterns",
    "matches",
    "closest_paths",
    "trainable_mask",
    "split",
    "combine",
]


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def path_str(keypath: Iterable[Any]) -> str:
    """``(DictKey('a'), SequenceKey(0), GetAttrKey('w'))`` -> ``'a/0/w'``."""
    return "/".join(_key_str(k) for k in keypath)


def _is_node(x: Any) -> bool:
    return isinstance(x, Node)


def leaves_with_paths(tree: PyTree, *, nodes_are_leaves: bool = False) -> list[tuple[str, Any]]:
    """All leaves as ``(path, leaf)``; with ``nodes_are_leaves`` adapter/quantized nodes stay whole."""
    is_leaf = _is_node if nodes_are_leaves else None
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


def map_with_paths(
    fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree, nodes_are_leaves: bool = False
) -> PyTree:
    """``jax.tree.map`` whose function also receives the leaf's path string."""
    is_leaf = _is_node if nodes_are_leaves else None
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *xs: fn(path_str(kp), x, *xs), tree, *rest, is_leaf=is_leaf
    )


def compile_patterns(patterns: Patterns, *, what: str = "pattern") -> list[re.Pattern]:
    """A regex or a list of regexes, compiled; a bad regex is an error naming it."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{what} must be a regex string, got {p!r} ({type(p).__name__})")
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what} {p!r} is not a valid regular expression: {e}") from None
    return compiled


def matches(path: str, patterns: Sequence[re.Pattern]) -> bool:
    """Whether any pattern matches the whole path."""
    return any(p.fullmatch(path) for p in patterns)


def closest_paths(wanted: str, paths: Sequence[str], n: int = 5) -> list[str]:
    """Real paths nearest to a pattern that matched nothing (for error messages)."""
    plain = re.sub(r"[\\^$.*+?()\[\]{}|]", "", wanted)
    close = difflib.get_close_matches(plain, paths, n=n, cutoff=0.0)
    return close or list(paths[:n])


def trainable_mask(tree: PyTree, extra: Patterns = None) -> PyTree:
    """A tree of bools, same structure as ``tree``: True where a leaf trains.

    Adapter nodes mark their own trainable fields; ``extra`` patterns name further leaves
    (biases, norms, a classification head: PEFT's ``modules_to_save``). A pattern that names
    a leaf inside a node the node itself declares frozen-only (e.g. quantized codes) is an
    error naming that leaf.
    """
    extra_re = compile_patterns(extra, what="trainable pattern")

    def node_or_leaf(path: str, x: Any) -> Any:
        if _is_node(x):
            mask = x.trainable_mask()
            if not extra_re:
                return mask

            def add_extra(sub: str, m: bool) -> bool:
                full = f"{path}/{sub}" if sub else path
                if matches(full, extra_re) and not m:
                    x.check_can_train(sub, full)
                    return True
                return m

            return map_with_paths(add_extra, mask)
        return matches(path, extra_re)

    return map_with_paths(node_or_leaf, tree, nodes_are_leaves=True)


def split(tree: PyTree, mask: PyTree | None = None, *, extra: Patterns = None) -> tuple[PyTree, PyTree]:
    """``(trainable, frozen)``: two trees shaped like ``tree``, ``None`` where the other has a leaf.

    ``mask`` defaults to ``trainable_mask(tree, extra)``. Gradients, optimizer state and
    checkpoints need only the trainable tree.
    """
    if mask is None:
        mask = trainable_mask(tree, extra)
    elif extra is not None:
        raise ValueError("give either mask or extra, not both")
    trainable = jax.tree.map(lambda x, m: x if m else None, tree, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, tree, mask)
    return trainable, frozen


def combine(*trees: PyTree) -> PyTree:
    """Inverse of ``split``: at every position, the first tree's leaf that is not ``None``."""

    def first(*xs: Any) -> Any:
        for x in xs:
            if x is not None:
                return x
        return None

    return jax.tree.map(first, *trees, is_leaf=lambda x: x is None)
