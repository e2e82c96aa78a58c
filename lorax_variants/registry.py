"""The variant registry: a variant is a builder ``builder(target) -> node`` registered under its name
beside its node class (``nodes/<variant>.py``); ``adapt`` looks builders up here. ``Target`` is what a
builder sees of one leaf; ``lora_factors`` the LoRA initialization that LoRA-shaped variants share, by the
registered factor init ``AdapterSpec.init`` names: a random A and a zero B (kaiming, gaussian: here), or A, B
from the weight with the residual as the base (``register_factor_init(FactorInit(..., factors=...))``: PiSSA,
OLoRA, in their modules).

Below every variant and above the node protocol, so that a variant's file imports only downward."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lorax_variants.inits import gaussian_a, kaiming_a
from lorax_variants.nodes.base import Node
from lorax_variants.spec import FACTOR_INITS, AdapterSpec, register_settings, settings_type

__all__ = ["Target", "register_variant", "settings_of", "variant_names", "builder_of", "rank_bounded", "is_factored", "path_key", "lora_factors", "FactorInit", "register_factor_init", "factor_init", "rewrites_base"]


@dataclasses.dataclass(frozen=True)
class FactorInit:
    """How LoRA-shaped factors start (``AdapterSpec.init``). Either ``draw_a(key, shape [..., in, r], dtype)``:
    a random A with B = 0, so the adapted layer starts equal to the base; or ``factors(w [in, out], r, scale)
    -> (A [in, r], B [r, out], W_res [in, out])`` in float32: A, B from the full-precision weight, the residual
    W - s·A B the new base (the init rewrites the base, so it cannot run on a quantized weight nor under
    adapters that share one base). ``label``: its name in messages."""

    name: str
    label: str
    draw_a: Callable[..., jax.Array] | None = None
    factors: Callable[[jax.Array, int, float], tuple[jax.Array, jax.Array, jax.Array]] | None = None

    def __post_init__(self) -> None:
        if (self.draw_a is None) == (self.factors is None):
            raise TypeError(f"FactorInit {self.name!r}: give draw_a or factors (one of them)")


def register_factor_init(f: FactorInit) -> FactorInit:
    """Make ``f.name`` a valid ``AdapterSpec.init`` (the module that defines the init does this)."""
    FACTOR_INITS[f.name] = f
    return f


def factor_init(name: str) -> FactorInit:
    """The factor init registered as ``name``."""
    if name not in FACTOR_INITS:
        raise ValueError(f"AdapterSpec.init {name!r} is unknown; known: {sorted(FACTOR_INITS)}")
    return FACTOR_INITS[name]


def rewrites_base(spec: AdapterSpec) -> bool:
    """Whether ``spec.init`` takes A, B from the weight and leaves the residual as the base (PiSSA, OLoRA)."""
    return factor_init(spec.init).factors is not None


register_factor_init(FactorInit("kaiming", "Kaiming", draw_a=kaiming_a))
register_factor_init(FactorInit("gaussian", "Gaussian", draw_a=gaussian_a))


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
    """``(base weight, A, B)`` for a LoRA-shaped adapter of ``t`` by its factor init (``spec.init``): a drawn A
    and a zero B, so the adapted layer starts equal to the base; or A, B from the weight and the residual
    W - s·A B as the base (per layer of a stacked weight)."""
    dtype = jnp.dtype(t.spec.dtype)
    how = factor_init(t.spec.init)
    if how.factors is not None:
        if isinstance(t.weight, Node):
            raise ValueError(
                f"{t.path}: {how.label} needs the full-precision weight; initialize {how.label} before "
                "quantizing the base (then quantize the residual)"
            )
        fn = lambda w: how.factors(w, t.r, t.scale)  # noqa: E731
        for _ in t.lead:
            fn = jax.vmap(fn)
        a, b, residual = fn(t.weight)
        return residual.astype(t.weight.dtype), a.astype(dtype), b.astype(dtype)
    a_shape, b_shape = t.lead + (t.d_in, t.r), t.lead + (t.r, t.d_out)
    return t.weight, how.draw_a(t.key, a_shape, dtype), jnp.zeros(b_shape, dtype)
