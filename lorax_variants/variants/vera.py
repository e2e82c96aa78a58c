"""VeRA, vector-based random matrix adaptation (arXiv 2310.11454).

    h = x W + ((x_d A_[:in]) ⊙ λ_d) B_[:, :out] ⊙ λ_b

One pair of frozen random matrices, A [max_in, r] and B [r, max_out], is shared by every adapted
layer (sized to the largest layer and sliced, as PEFT's vera_A (r, max_in) / vera_B (max_out, r)),
stored once (``Shared``: the first adapted path owns it). Kaiming-uniform with a = 0 as PEFT
(bound sqrt(6 / fan_in) on the torch layouts: fan_in = max_in for A, r for B). Trained per layer:
λ_d [r] (initialised to ``d_initial``, 0.1) and λ_b [out] (initialised to 0). No alpha/r scale.
Parameters per layer: r + out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.codec import PREFIX, Key, PeftCodec, Site, layers, module_tensor, register_codec, stack_layers

from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, register_variant, settings_of
from lorax_variants.shared import Shared, value_of
from lorax_variants.spec import register_settings
from lorax_variants.tree import leaves_with_paths, map_with_paths

__all__ = ['VeraNode', 'Vera', 'vera_projections']


@node
class VeraNode(AdapterNode):
    """VeRA over ``weight``: frozen random projections ``vera_a`` [max_in, r], ``vera_b`` [r, max_out] shared by
    every layer (sliced to this one's size) and trained vectors ``lambda_d`` [..., r], ``lambda_b`` [..., out]."""

    variant: ClassVar[str] = "vera"

    weight: Any = frozen()
    vera_a: Shared = frozen()  # [max_in, r]
    vera_b: Shared = frozen()  # [r, max_out]
    lambda_d: jax.Array = param()  # [..., r]
    lambda_b: jax.Array = param()  # [..., out]
    dropout_key: jax.Array | None = frozen(default=None)
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def _ab(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        d_in, d_out = self.shape[-2:]
        return value_of(self.vera_a)[:d_in].astype(dtype), value_of(self.vera_b)[:, :d_out].astype(dtype)

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + ((x A) ⊙ λ_d) B ⊙ λ_b with A, B frozen random projections shared by every layer (VeRA, arXiv
        2310.11454)."""
        a, b = self._ab(x.dtype)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + low_rank(xd, a, b, 1.0, self.lambda_d.astype(x.dtype), self.lambda_b.astype(x.dtype))

    def merge(self) -> jax.Array:
        """W + A diag(λ_d) B diag(λ_b)."""
        a, b = self._ab(jnp.float32)
        w = weight_of(self.weight)
        delta = jnp.matmul(a * self.lambda_d[..., None, :], b) * self.lambda_b[..., None, :]
        return (w.astype(jnp.float32) + delta).astype(w.dtype)


def _prepare(targets: list[Target]) -> dict[str, Any]:
    ranks = {t.r for t in targets}
    if len(ranks) != 1:
        raise ValueError(f"VeRA shares one pair of projections: all targets need one rank, got {sorted(ranks)} "
                         "(remove rank_pattern)")
    r = ranks.pop()
    spec = targets[0].spec
    max_in, max_out = max(t.d_in for t in targets), max(t.d_out for t in targets)
    ka, kb = jax.random.split(jax.random.fold_in(targets[0].key, 0x7E8A))
    dtype = jnp.dtype(spec.dtype)
    a = jax.random.uniform(ka, (max_in, r), jnp.float32, -1, 1) * jnp.sqrt(6.0 / max_in)
    b = jax.random.uniform(kb, (r, max_out), jnp.float32, -1, 1) * jnp.sqrt(6.0 / r)
    return {"owner": targets[0].path, "a": a.astype(dtype), "b": b.astype(dtype)}


@register_variant("vera", prepare=_prepare, rank_bounded=False)
def build_vera(t: Target, ctx: dict[str, Any]) -> VeraNode:
    own = t.path == ctx["owner"]
    dtype = jnp.dtype(t.spec.dtype)
    return VeraNode(
        weight=t.weight,
        vera_a=Shared("vera_a", ctx["a"] if own else None),
        vera_b=Shared("vera_b", ctx["b"] if own else None),
        lambda_d=jnp.full(t.lead + (t.r,), float(settings_of(t.spec).d_initial), dtype),
        lambda_b=jnp.zeros(t.lead + (t.d_out,), dtype),
        dropout=t.spec.dropout,
    )


@dataclasses.dataclass(frozen=True)
class Vera:
    """VeRA (arXiv 2310.11454): λ_d starts at ``d_initial``."""

    d_initial: float = 0.1


register_settings("vera", Vera)
register_recipe(Recipe("vera", "vera", Vera, spec=lambda s: {"settings": s}))


def vera_projections(r: int, d_in: int, d_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's VeRA projections in our layout ``(A [d_in, r], B [r, d_out])``, bit for bit.

    PEFT draws ``vera_A [r, d_in]`` then ``vera_B [d_out, r]`` with ``kaiming_uniform`` (gain √2, fan-in
    of the torch tensor) from ``torch.Generator().manual_seed(seed)``: MT19937 with the 32-bit seeding,
    each float32 from the low 24 bits of one 32-bit draw, ``u·(hi − lo) + lo`` in float64, then float32."""
    bits = np.random.MT19937()
    bits._legacy_seeding(seed & 0xFFFFFFFF)

    def kaiming(rows: int, cols: int) -> np.ndarray:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)
        lo, hi = np.float64(np.float32(-bound)), np.float64(np.float32(bound))
        raw = bits.random_raw(rows * cols).astype(np.uint64)
        u = (raw & np.uint64((1 << 24) - 1)).astype(np.float64) * 2.0 ** -24
        return (u * (hi - lo) + lo).astype(np.float32).reshape(rows, cols)

    a = kaiming(r, d_in)
    b = kaiming(d_out, r)
    return a.T.copy(), b.T.copy()


# PEFT's VeRA format (``VeraConfig``): per module ``vera_lambda_d`` [r] and ``vera_lambda_b`` [out]; the shared
# ``base_model.vera_A`` [r, max_in] / ``vera_B`` [max_out, r] (``save_projection``; without it PEFT regenerates
# them from ``projection_prng_key``, and so do we: ``vera_projections``).
KEYS = (Key.plain("vera_lambda_d", "lambda_d", lambda x: x), Key.plain("vera_lambda_b", "lambda_b", lambda x: x))
SHARED = ("base_model.vera_A", "base_model.vera_B")


def _peft_write(sites: list[Site], conv1d: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    first = sites[0].node
    va = np.asarray(jax.device_get(value_of(first.vera_a)), np.float32)
    vb = np.asarray(jax.device_get(value_of(first.vera_b)), np.float32)
    tensors: dict[str, np.ndarray] = {}
    for s in sites:
        for m, d, b in zip(s.modules, layers(s.node.lambda_d, s.lead), layers(s.node.lambda_b, s.lead)):
            tensors[f"{PREFIX}{m}.{KEYS[0].suffix}"] = d.astype(np.float32)
            tensors[f"{PREFIX}{m}.{KEYS[1].suffix}"] = b.astype(np.float32)
    tensors[SHARED[0]], tensors[SHARED[1]] = va.T.copy(), vb.T.copy()
    return {"r": va.shape[1], "save_projection": True, "projection_prng_key": 0, "vera_dropout": 0.0,
            "d_initial": 0.1, "bias": "none", "layers_to_transform": None, "layers_pattern": None}, tensors


def _peft_read(cfg: dict[str, Any], found: dict[str, Any], tensors: dict[str, np.ndarray], experts: dict[str, Any],
               residual: str | None) -> tuple[dict[str, Any], Any]:
    return {"variant": "vera", "r": int(cfg.get("r", 256)), "alpha": 1.0,
            "dropout": float(cfg.get("vera_dropout") or 0.0),
            "settings": Vera(d_initial=float(cfg.get("d_initial", 0.1)))}, None


def _peft_fill(n: VeraNode, site: Site, tensors: dict[str, np.ndarray], cfg: dict[str, Any], ctx: Any) -> VeraNode:
    r, d_out = n.lambda_d.shape[-1], n.shape[-1]

    def get(m: str | None, key: Key, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32) if m is None else module_tensor(tensors, site, m, key.suffix, shape)

    return n.replace(lambda_d=stack_layers(site, [get(m, KEYS[0], (r,)) for m in site.modules], n.lambda_d),
                     lambda_b=stack_layers(site, [get(m, KEYS[1], (d_out,)) for m in site.modules], n.lambda_b))


def _peft_finish(tree: Any, cfg: dict[str, Any], tensors: dict[str, np.ndarray]) -> Any:
    """The shared projections from the file, or regenerated as PEFT does without ``save_projection``."""
    nodes = [n for _, n in leaves_with_paths(tree, nodes_are_leaves=True) if isinstance(n, VeraNode)]
    d_in = max(n.shape[-2] for n in nodes)
    d_out = max(n.shape[-1] for n in nodes)
    r = nodes[0].lambda_d.shape[-1]
    if SHARED[0] in tensors:
        va, vb = tensors[SHARED[0]].T, tensors[SHARED[1]].T
        if va.shape[0] < d_in or vb.shape[1] < d_out or va.shape[1] != r or vb.shape[0] != r:
            raise ValueError(f"vera_A {va.shape[::-1]} / vera_B {vb.shape[::-1]} do not fit rank {r} and the largest "
                             f"adapted weight [{d_in}, {d_out}]")
    elif cfg.get("save_projection", True):
        raise ValueError("save_projection is true but base_model.vera_A/B are not in the file")
    else:
        va, vb = vera_projections(r, d_in, d_out, int(cfg.get("projection_prng_key", 0)))

    def put(path: str, n: Any) -> Any:
        if not isinstance(n, VeraNode):
            return n
        own = n.vera_a.value is not None  # the owner holds the projections; the others refer to it
        return n.replace(vera_a=Shared(n.vera_a.name, jnp.asarray(va) if own else None),
                         vera_b=Shared(n.vera_b.name, jnp.asarray(vb) if own else None))

    return map_with_paths(put, tree, nodes_are_leaves=True)


PEFT = register_codec(PeftCodec(
    "VERA", VeraNode, KEYS, write=_peft_write, read=_peft_read, fill=_peft_fill, finish=_peft_finish,
    shared=frozenset(SHARED), reads=frozenset({"fan_in_fan_out"})))
