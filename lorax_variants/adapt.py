"""``adapt(params, spec, key)``: any params pytree in, the same tree out with target leaves
replaced by adapter nodes.

It is pure, so it runs under ``jit`` and under ``jax.eval_shape`` (plan a 70B model's
adapters and their memory without allocating the model). Each target's random draws use
``fold_in(key, crc32(path))``: a layer's initialization depends only on the key and its own
path, not on which other layers are adapted.

Variants register a builder with ``register_variant``; a builder gets a ``Target`` (path,
weight, rank, scale, key, spec) and returns the node.
"""

from __future__ import annotations

from typing import Any

import jax

from lorax_variants.nodes.base import AdapterNode
from lorax_variants.registry import (
    Target,
    builder_of,
    path_key,
    rank_bounded,
    register_variant,
    variant_names,
)
from lorax_variants.spec import AdapterSpec
from lorax_variants.tree import closest_paths, compile_patterns, leaves_with_paths, map_with_paths, matches

__all__ = ["adapt", "Target", "register_variant", "variant_names", "path_key"]

def _as_key(key: Any) -> jax.Array:
    if isinstance(key, int):
        return jax.random.PRNGKey(key)
    return key


def adapt(params: Any, spec: AdapterSpec, key: Any) -> Any:
    """Replace every leaf whose path matches ``spec.targets`` with an adapter node.

    Errors name the thing at fault: a pattern that matches nothing (with the closest real
    paths), an override key that matches no target, a target that is not a 2-D weight (or
    3-D under ``spec.stacked``), a rank larger than ``min(in, out)``.
    """
    build, prepare = builder_of(spec.variant)
    key = _as_key(key)
    targets = compile_patterns(spec.targets, what="AdapterSpec.targets")
    stacked = compile_patterns(spec.stacked, what="AdapterSpec.stacked")
    leaves = leaves_with_paths(params, nodes_are_leaves=True)
    paths = [p for p, _ in leaves]
    chosen = [p for p in paths if matches(p, targets)]
    if not chosen:
        shown = spec.targets if isinstance(spec.targets, str) else "|".join(spec.targets)
        raise ValueError(
            f"AdapterSpec.targets {spec.targets!r} matched no leaf (patterns match the whole "
            f"path). Closest paths: {closest_paths(shown, paths)}"
        )
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern, _ in getattr(spec, field):
            if not any(matches(p, compile_patterns(pattern)) for p in chosen):
                raise ValueError(
                    f"AdapterSpec.{field} key {pattern!r} matches none of the {len(chosen)} targets "
                    f"(e.g. {chosen[:3]})"
                )
    by_path = dict(leaves)
    targets_list = [_target(p, by_path[p], spec, stacked, key) for p in chosen]
    if prepare is None:
        built = {t.path: build(t) for t in targets_list}
    else:
        context = prepare(targets_list)
        built = {t.path: build(t, context) for t in targets_list}
    return map_with_paths(lambda p, leaf: built.get(p, leaf), params, nodes_are_leaves=True)


def _target(path: str, leaf: Any, spec: AdapterSpec, stacked: list, key: jax.Array) -> Target:
    if isinstance(leaf, AdapterNode):
        raise ValueError(f"{path} is already adapted ({type(leaf).__name__}); adapt a tree once")
    shape = getattr(leaf, "shape", None)
    if shape is None:
        raise ValueError(f"{path} matches AdapterSpec.targets but is a {type(leaf).__name__}, not a weight")
    is_stacked = matches(path, stacked)
    if len(shape) != 2 and not (is_stacked and len(shape) >= 3):
        hint = (
            "its leading axes are stacked layers (and experts) only if AdapterSpec.stacked matches it"
            if len(shape) >= 3
            else "reshape it to [in, out] or leave it out of the targets"
        )
        raise ValueError(
            f"{path}: adapter targets must be weights {'[L, (E,) in, out]' if is_stacked else '[in, out]'}, "
            f"got shape {tuple(shape)} ({hint})"
        )
    if is_stacked and len(shape) == 2:
        raise ValueError(f"{path}: AdapterSpec.stacked matches it, so its first axis is layers, but it has shape "
                         f"{tuple(shape)}: a stacked weight is [L, in, out] (or [L, E, in, out] for expert banks)")
    r = spec.rank_for(path)
    if r > min(shape[-2:]) and rank_bounded(spec.variant):
        raise ValueError(
            f"{path}: rank {r} exceeds min(in, out) = {min(shape[-2:])} of its weight {tuple(shape)}"
        )
    return Target(
        path=path,
        weight=leaf,
        spec=spec,
        r=r,
        alpha=spec.alpha_for(path),
        scale=spec.scale_for(path),
        key=path_key(key, path),
    )
