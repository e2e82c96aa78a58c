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

import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorax_variants.inits import gaussian_a, kaiming_a, olora_factors, pissa_factors
from lorax_variants.nodes.base import AdapterNode, Node
from lorax_variants.nodes.lora import LoraNode
from lorax_variants.spec import AdapterSpec
from lorax_variants.tree import closest_paths, compile_patterns, leaves_with_paths, map_with_paths, matches

__all__ = ["adapt", "Target", "register_variant", "variants", "path_key", "RESIDUAL_INITS"]

RESIDUAL_INITS = ("pissa", "olora")  # inits that move s·A₀B₀ out of the base weight into the adapter


@dataclasses.dataclass(frozen=True)
class Target:
    """One leaf to adapt, as a variant's builder sees it."""

    path: str
    weight: Any  # array [..., in, out] or a (quantized) weight node
    spec: AdapterSpec
    r: int
    alpha: float
    scale: float
    key: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def d_in(self) -> int:
        return self.shape[-2]

    @property
    def d_out(self) -> int:
        return self.shape[-1]

    @property
    def lead(self) -> tuple[int, ...]:
        """Leading (stacked-layer) axes."""
        return self.shape[:-2]


_VARIANTS: dict[str, Callable[..., Node]] = {}
_PREPARE: dict[str, Callable[[list[Target]], Any]] = {}


def register_variant(
    name: str, prepare: Callable[[list[Target]], Any] | None = None
) -> Callable[[Callable[..., Node]], Callable[..., Node]]:
    """Register ``builder(target) -> node``; with ``prepare``, ``builder(target, context)`` where
    ``context = prepare(all_targets)`` (e.g. VeRA sizes its shared projections to the largest layer)."""

    def deco(builder: Callable[..., Node]) -> Callable[..., Node]:
        _VARIANTS[name] = builder
        if prepare is not None:
            _PREPARE[name] = prepare
        return builder

    return deco


def variants() -> tuple[str, ...]:
    return tuple(sorted(_VARIANTS))


def path_key(key: jax.Array, path: str) -> jax.Array:
    """The key a target draws from: ``fold_in(key, crc32(path))``."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _lora_factors(t: Target) -> tuple[Any, jax.Array, jax.Array]:
    dtype = jnp.dtype(t.spec.dtype)
    a_shape, b_shape = t.lead + (t.d_in, t.r), t.lead + (t.r, t.d_out)
    if t.spec.init in RESIDUAL_INITS:
        name = {"pissa": "PiSSA", "olora": "OLoRA"}[t.spec.init]
        if isinstance(t.weight, Node):
            raise ValueError(
                f"{t.path}: {name} needs the full-precision weight; initialize {name} before "
                "quantizing the base (then quantize the residual)"
            )
        factors = pissa_factors if t.spec.init == "pissa" else olora_factors
        fn = lambda w: factors(w, t.r, t.scale)  # noqa: E731
        for _ in t.lead:
            fn = jax.vmap(fn)
        a, b, residual = fn(t.weight)
        return residual.astype(t.weight.dtype), a.astype(dtype), b.astype(dtype)
    init_a = kaiming_a if t.spec.init == "kaiming" else gaussian_a
    return t.weight, init_a(t.key, a_shape, dtype), jnp.zeros(b_shape, dtype)


@register_variant("lora")
def build_lora(t: Target) -> LoraNode:
    weight, a, b = _lora_factors(t)
    return LoraNode(weight=weight, lora_a=a, lora_b=b, scale=t.scale, dropout=t.spec.dropout)


@register_variant("lora_fa")
def build_lora_fa(t: Target) -> LoraNode:
    node = build_lora(t)
    return node.replace(freeze=("lora_a",))


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
    if spec.variant not in _VARIANTS:
        raise ValueError(f"AdapterSpec.variant {spec.variant!r} is unknown; known variants: {list(variants())}")
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
    context = _PREPARE[spec.variant](targets_list) if spec.variant in _PREPARE else None
    built = {t.path: (_VARIANTS[spec.variant](t, context) if spec.variant in _PREPARE else _VARIANTS[spec.variant](t))
             for t in targets_list}
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
    if r > min(shape[-2:]) and spec.variant != "vera":  # VeRA slices projections shared by every size
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
