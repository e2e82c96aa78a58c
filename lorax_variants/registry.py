"""The variant registry: a variant is a builder ``builder(target) -> node`` registered under its name
beside its node class (``nodes/<variant>.py``); ``adapt`` looks builders up here. ``Target`` is what a
builder sees of one leaf; ``lora_factors`` the LoRA initialization (Gaussian or Kaiming A, zero B, or the
residual inits PiSSA/OLoRA that move s·A₀B₀ out of the weight) that LoRA-shaped variants share.

Below every variant and above the node protocol, so that a variant's file imports only downward."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorax_variants.inits import gaussian_a, kaiming_a, olora_factors, pissa_factors
from lorax_variants.nodes.base import Node
from lorax_variants.spec import AdapterSpec, register_settings, settings_type

__all__ = ["Target", "register_variant", "settings_of", "variant_names", "builder_of", "rank_bounded", "is_factored", "path_key", "lora_factors", "RESIDUAL_INITS"]

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
    name: str, prepare: Callable[[list[Target]], Any] | None = None, settings: type | None = None,
    rank_bounded: bool = True, factored: bool = True
) -> Callable[[Callable[..., Node]], Callable[..., Node]]:
    """Register ``builder(target) -> node``; with ``prepare``, ``builder(target, context)`` where
    ``context = prepare(all_targets)`` (a context shared by every target, such as projections sized to the
    largest layer); ``settings``: the frozen dataclass of the variant's own options (``AdapterSpec.settings``,
    which builders read with ``settings_of``); ``rank_bounded=False``: ranks above min(in, out) are allowed
    (adapters whose rank is not a factorization of the weight, such as projections shared by every size);
    ``factored=False``: its apply forms a weight-sized temporary (its algebra has no cheaper form; the
    variant's module says why)."""

    def deco(builder: Callable[..., Node]) -> Callable[..., Node]:
        _VARIANTS[name] = builder
        if prepare is not None:
            _PREPARE[name] = prepare
        if settings is not None:
            register_settings(name, settings)
        if not rank_bounded:
            _RANK_FREE.add(name)
        if not factored:
            _DENSE.add(name)
        return builder

    return deco


_RANK_FREE: set[str] = set()
_DENSE: set[str] = set()


def is_factored(name: str) -> bool:
    """Whether variant ``name`` applies without forming a weight-sized temporary."""
    return name not in _DENSE


def rank_bounded(name: str) -> bool:
    """Whether variant ``name``'s rank must not exceed min(in, out) of a weight."""
    return name not in _RANK_FREE


def variant_names() -> tuple[str, ...]:
    """The registered variant names (``AdapterSpec.variant`` values)."""
    return tuple(sorted(_VARIANTS))


def builder_of(name: str) -> tuple[Callable[..., Node], Callable[[list[Target]], Any] | None]:
    """``(builder, prepare)`` of a registered variant; an unknown name is an error listing the known ones."""
    if name not in _VARIANTS:
        raise ValueError(f"AdapterSpec.variant {name!r} is unknown; known variants: {list(variant_names())}")
    return _VARIANTS[name], _PREPARE.get(name)


def settings_of(spec: AdapterSpec) -> Any:
    """``spec.settings``, or the defaults of the settings type ``spec.variant`` registered (``None``: it has
    none); settings of another type are an error naming both."""
    kind = settings_type(spec.variant)
    if spec.settings is None:
        return kind() if kind is not None else None
    if kind is None or not isinstance(spec.settings, kind):
        want = kind.__name__ if kind is not None else "no settings"
        raise TypeError(f"AdapterSpec.settings for variant {spec.variant!r} takes {want}, got "
                        f"{type(spec.settings).__name__}")
    return spec.settings


def path_key(key: jax.Array, path: str) -> jax.Array:
    """The key a target draws from: ``fold_in(key, crc32(path))``."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def lora_factors(t: Target) -> tuple[Any, jax.Array, jax.Array]:
    """``(base weight, A, B)`` for a LoRA-shaped adapter of ``t``: A drawn (Gaussian or Kaiming, by
    ``spec.init``) and B zero, so the adapted layer starts equal to the base; PiSSA (arXiv 2404.02948) and
    OLoRA (arXiv 2406.01775) instead take A, B from the weight (SVD / QR) and return the residual
    W - s·A B as the base."""
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
