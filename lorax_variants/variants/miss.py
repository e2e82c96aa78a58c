"""MiSS, matrix shard sharing (arXiv 2409.15371, formerly "Bone"; PEFT ``MissConfig``).

One trainable block M shared by every shard of the weight. In our [in, out] layout, with r the block size:

    miss (default):  y = x W + fold_r(x_d) M,        M [r, out],   fold_r(x)_j = Σ_g x[g·r + j]
    mini:            M = tile(M_mini, out / mini_r)  along out,     M_mini [r, mini_r]
    bat:             y = x (W + Δ),  Δ's r x r block (a, c) of output shard g: Σ_b W_blk[a, b] M_g[b, c] + M_g[a, c]
                     with M [out/r, r, r] (one r x r matrix per output shard, "block affine")

The input is zero-padded to a multiple of r, as PEFT does. ``miss`` and ``mini`` are factored (the fold is a
reshape and a sum; no weight-sized temporary). ``bat`` multiplies each r x r block of W by its shard's M, so
its update depends on W block by block: it forms W + Δ ([in, out]) per call, as PEFT does. M starts at 0: the adapted layer starts as W. ``merge``: W + Δ. Does not reduce to LoRA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp

from lorax_variants.codec import Key, PeftCodec, register_codec, same
from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, register_variant, rewrites_base, settings_of

__all__ = ["MissNode", "Miss"]

MODES = ("miss", "mini", "bat")


@dataclasses.dataclass(frozen=True)
class Miss:
    """MiSS's form (PEFT ``init_weights``): ``miss`` (True: one [r, out] block), ``mini`` (a [r, mini_r] block
    tiled along the outputs) or ``bat`` (an r x r matrix per output shard, multiplying W's blocks)."""

    mode: Literal["miss", "mini", "bat"] = "miss"
    mini_r: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Miss.mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.mini_r, bool) or not isinstance(self.mini_r, int) or self.mini_r < 1:
            raise ValueError(f"Miss.mini_r must be a positive integer, got {self.mini_r!r}")


def _fold(x: jax.Array, r: int) -> jax.Array:
    """``[..., in] -> [..., r]``: Σ over g of x[g·r + j] (x zero-padded to a multiple of r)."""
    pad = (-x.shape[-1]) % r
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return jnp.sum(x.reshape(*x.shape[:-1], x.shape[-1] // r, r), axis=-2)


@node
class MissNode(AdapterNode):
    """MiSS over ``weight`` with the shared block ``miss_block`` ([..., r, out], [..., r, mini_r] or
    [..., out/r, r, r] by ``mode``)."""

    variant: ClassVar[str] = "miss"

    weight: Any = frozen()
    miss_block: jax.Array = param()
    dropout_key: jax.Array | None = frozen(default=None)
    r: int = static()
    mode: str = static(default="miss")
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def block(self, dtype: Any) -> jax.Array:
        """M as [..., r, out] (``mini`` tiled along the outputs)."""
        m = self.miss_block.astype(dtype)
        if self.mode == "mini":
            m = jnp.tile(m, (1,) * (m.ndim - 1) + (self.shape[-1] // m.shape[-1],))
        return m

    def bat_delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """``bat``'s Δ [..., in, out]: each r x r block of W (torch layout, as PEFT) times its output shard's M,
        plus M."""
        w = jnp.swapaxes(weight_of(self.weight).astype(dtype), -1, -2)  # [..., out, in]
        *lead, d_out, d_in = w.shape
        r = self.r
        blocks = w.reshape(*lead, d_out // r, r, d_in // r, r)  # [.., g, a, k, b]
        m = self.miss_block.astype(dtype)  # [.., g, r, r]
        out = jnp.einsum("...gakb,...gbc->...gakc", blocks, m) + m[..., :, :, None, :]
        return jnp.swapaxes(out.reshape(*lead, d_out, d_in), -1, -2)

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + fold_r(x_d) M (``miss``, ``mini``), or x (W + Δ) (``bat``; no dropout, as PEFT)."""
        if self.mode == "bat":
            w = weight_of(self.weight)
            return jnp.matmul(x, (w.astype(jnp.float32) + self.bat_delta()).astype(x.dtype))
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return dense(x, self.weight) + jnp.matmul(_fold(xd, self.r), self.block(x.dtype))

    def merge(self) -> jax.Array:
        """W + Δ (``miss``/``mini``: row i of Δ is row i mod r of M)."""
        w = weight_of(self.weight)
        if self.mode == "bat":
            delta = self.bat_delta()
        else:
            m = self.block(jnp.float32)
            reps = -(-self.shape[-2] // self.r)
            delta = jnp.tile(m, (1,) * (m.ndim - 2) + (reps, 1))[..., : self.shape[-2], :]
        return (w.astype(jnp.float32) + delta).astype(w.dtype)


@register_variant("miss", settings=Miss, rank_bounded=False)  # bat alone forms W + Δ (see above)
def build_miss(t: Target) -> MissNode:
    s = settings_of(t.spec)
    if rewrites_base(t.spec):
        raise ValueError(f"{t.path}: MiSS starts from M = 0, not from {t.spec.init}")
    if t.r > t.d_in:
        raise ValueError(f"{t.path}: MiSS block size r={t.r} exceeds the weight's input dimension {t.d_in}")
    dtype = jnp.dtype(t.spec.dtype)
    if s.mode == "bat":
        if t.d_in % t.r or t.d_out % t.r:
            raise ValueError(f"{t.path}: MiSS bat needs in and out divisible by r={t.r}, got {t.shape[-2:]}")
        shape = t.lead + (t.d_out // t.r, t.r, t.r)
    elif s.mode == "mini":
        if t.d_out % s.mini_r:
            raise ValueError(f"{t.path}: MiSS mini needs out={t.d_out} divisible by Miss.mini_r={s.mini_r}")
        shape = t.lead + (t.r, s.mini_r)
    else:
        shape = t.lead + (t.r, t.d_out)
    return MissNode(weight=t.weight, miss_block=jnp.zeros(shape, dtype), r=t.r, mode=s.mode, dropout=t.spec.dropout)


register_recipe(Recipe("miss", "miss", Miss, spec=lambda s: {"settings": s}))

_PEFT_INIT = {"miss": True, "mini": "mini", "bat": "bat"}  # PEFT's init_weights for each mode


def _peft_config(n: MissNode) -> dict[str, Any]:
    return {"r": int(n.r), "miss_dropout": float(n.dropout), "init_weights": _PEFT_INIT[n.mode],
            "mini_r": int(n.miss_block.shape[-1]) if n.mode == "mini" else 1, "bias": "none",
            "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}


def _peft_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    init = cfg.get("init_weights", True)
    modes = {True: "miss", False: "miss", None: "miss", "mini": "mini", "bat": "bat"}
    if not isinstance(init, (bool, str, type(None))) or init not in modes:
        raise ValueError(f"init_weights: unknown MiSS form {init!r} (expected true, 'mini' or 'bat')")
    mode = modes[init]
    return {"variant": "miss", "r": int(cfg.get("r", 64)), "dropout": float(cfg.get("miss_dropout") or 0.0),
            "settings": Miss(mode=mode, mini_r=int(cfg.get("mini_r", 1)) if mode == "mini" else 1)}


# PEFT ``MissConfig``: per module ``miss_block``, laid out as ours in every form ([r, out], [r, mini_r],
# [out/r, r, r]).
PEFT = register_codec(PeftCodec(
    "MISS", MissNode, (Key.plain("miss_block", "miss_block", same),), config=_peft_config, spec=_peft_spec,
    reads=frozenset({"r", "miss_dropout", "mini_r", "init_weights", "exclude_modules", "layers_to_transform",
                     "layers_pattern"}), conv1d=False))
