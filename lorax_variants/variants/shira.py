"""SHiRA, sparse high-rank adapters (arXiv 2406.13175; PEFT ``ShiraConfig``).

    y = x (W + Δ),   Δ sparse: K = r·(in + out) trainable entries at fixed positions, zero elsewhere

K equals LoRA's parameter count at rank r, but Δ is not low-rank. The positions are PEFT's default random
mask, reproduced exactly from ``Shira.random_seed``: the first K entries of ``torch.randperm(in·out)`` from
``torch.Generator().manual_seed(seed)`` (MT19937 with 32-bit seeding; Fisher-Yates, one 32-bit draw per step),
computed here without torch, over the torch-layout weight [out, in], entries kept in row-major order (as
PEFT's ``torch.where(mask)``). A stacked weight uses the same mask in every layer, as PEFT gives every
module of one shape the same mask. Values start at 0.

Not factored at training sizes: for a few tokens (decoding) x Δ gathers the K input features, scales them and
scatter-adds them into the outputs (K multiply-adds per token, no weight-sized temporary), but those gathered
products are [tokens, K] and outgrow a dense Δ [in, out] once tokens·K > in·out (about 18 tokens at r = 16 on
a square weight; SmolLM2-135M at 8 x 128 tokens ran out of 24 GB that way), so beyond that the apply scatters
Δ into one [in, out] array per layer and multiplies densely, as PEFT forms W + Δ. ``merge``: W + Δ.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout
from lorax_variants.codec import Key, PeftCodec, register_codec, same
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, register_variant, settings_of

__all__ = ["ShiraNode", "Shira", "random_mask_indices"]

TORCH_DEFAULT_SEED = 67280421310721  # a fresh torch.Generator's seed (PEFT's random_seed=None)
_RANDOM32_LIMIT = 2**32 // 20  # torch's randperm takes 64-bit draws from this size on


@dataclasses.dataclass(frozen=True)
class Shira:
    """SHiRA's mask: ``random_seed`` of PEFT's random mask (``None``: a fresh torch generator's seed)."""

    random_seed: int | None = None


def random_mask_indices(d_in: int, d_out: int, k: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's random SHiRA mask for a torch weight [d_out, d_in]: ``(rows, cols)`` of its K ones in row-major
    order (rows index outputs, cols inputs), equal to ``torch.randperm(d_out·d_in, generator)[:k]`` sorted."""
    n = d_in * d_out
    if n >= _RANDOM32_LIMIT:
        raise ValueError(f"a SHiRA mask over {n:,} weights needs torch's 64-bit randperm draws, not reproduced here")
    bits = np.random.MT19937()
    bits._legacy_seeding((TORCH_DEFAULT_SEED if seed is None else seed) & 0xFFFFFFFF)
    raw = bits.random_raw(min(k, n - 1)).astype(np.uint64)
    swapped: dict[int, int] = {}
    head = np.empty(k, np.int64)
    for i in range(k):  # Fisher-Yates as torch's randperm_cpu; position i is final after step i
        if i < n - 1:
            z = int(raw[i] % np.uint64(n - i)) + i
            swapped[i], swapped[z] = swapped.get(z, z), swapped.get(i, i)
        head[i] = swapped.get(i, i)
    flat = np.sort(head)
    return (flat // d_in).astype(np.int32), (flat % d_in).astype(np.int32)


def _sparse_matmul(x: jax.Array, values: jax.Array, rows: jax.Array, cols: jax.Array, d_out: int) -> jax.Array:
    """x Δ with Δ[col, row] = value (our [in, out] layout): gather, scale, scatter-add."""
    picked = jnp.take(x, cols, axis=-1) * values.astype(x.dtype)  # [..., K]
    return jnp.zeros(x.shape[:-1] + (d_out,), x.dtype).at[..., rows].add(picked)


@node
class ShiraNode(AdapterNode):
    """SHiRA over ``weight``: ``shira_weight`` [..., K] trainable values at ``shira_rows`` (outputs) and
    ``shira_cols`` (inputs), both [..., K]."""

    variant: ClassVar[str] = "shira"

    weight: Any = frozen()
    shira_weight: jax.Array = param()
    shira_rows: jax.Array = frozen()
    shira_cols: jax.Array = frozen()
    dropout_key: jax.Array | None = frozen(default=None)
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + x_d Δ: for a few tokens (decoding) K gathered products scattered into the outputs; else Δ
        scattered into a dense [in, out] and one matmul (the gathered form's [tokens, K] products outgrow the
        weight once tokens·K > in·out, K = r(in + out): from about 18 tokens at r = 16 on a square weight)."""
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        d_in, d_out = self.shape[-2:]
        k = self.shira_weight.shape[-1]
        if (x.size // max(x.shape[-1], 1)) * k <= d_in * d_out:
            return dense(x, self.weight) + _sparse_matmul(xd, self.shira_weight, self.shira_rows, self.shira_cols,
                                                          d_out)
        delta = jnp.zeros((d_in, d_out), x.dtype).at[self.shira_cols, self.shira_rows].add(
            self.shira_weight.astype(x.dtype))
        return dense(x, self.weight) + jnp.matmul(xd, delta)

    def delta(self) -> jax.Array:
        """Δ as a dense [..., in, out] array (for merge and export only)."""
        *lead, d_in, d_out = self.shape
        fn = lambda v, r, c: jnp.zeros((d_in, d_out), jnp.float32).at[c, r].add(v.astype(jnp.float32))  # noqa: E731
        for _ in lead:
            fn = jax.vmap(fn)
        return fn(self.shira_weight, self.shira_rows, self.shira_cols)

    def merge(self) -> jax.Array:
        """W + Δ."""
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)


@register_variant("shira", settings=Shira, rank_bounded=False, factored=False)  # dense Δ at training sizes
def build_shira(t: Target) -> ShiraNode:
    k = t.r * (t.d_in + t.d_out)
    if k > t.d_in * t.d_out:
        raise ValueError(f"{t.path}: SHiRA at r={t.r} has {k} entries, more than the weight's {t.d_in * t.d_out}")
    rows, cols = random_mask_indices(t.d_in, t.d_out, k, settings_of(t.spec).random_seed)
    full = lambda a: jnp.broadcast_to(jnp.asarray(a), t.lead + (k,))  # noqa: E731 - the same mask in every layer
    return ShiraNode(weight=t.weight, shira_weight=jnp.zeros(t.lead + (k,), jnp.dtype(t.spec.dtype)),
                     shira_rows=full(rows), shira_cols=full(cols), dropout=t.spec.dropout)


register_recipe(Recipe("shira", "shira", Shira, spec=lambda s: {"settings": s}))


def _peft_config(n: ShiraNode) -> dict[str, Any]:
    k, (d_in, d_out) = int(n.shira_weight.shape[-1]), n.shape[-2:]
    if k % (d_in + d_out):
        raise ValueError(f"a SHiRA node of {k} entries over [{d_in}, {d_out}] has no PEFT rank r = K / (in + out)")
    # random_seed: the mask is in the file (shira_indices), PEFT's load replaces the one it draws
    return {"r": k // (d_in + d_out), "mask_type": "random", "random_seed": None, "init_weights": True}


def _peft_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("mask_type", "random") != "random":
        raise ValueError(f"mask_type: {cfg.get('mask_type')!r}; PEFT's SHiRA saves only random masks")
    seed = cfg.get("random_seed")
    return {"variant": "shira", "r": int(cfg.get("r", 32)), "settings": Shira(random_seed=seed)}


# PEFT ``ShiraConfig``: per module ``shira_weight`` [K] and ``shira_indices`` [2, K] (torch rows = our outputs,
# torch cols = our inputs; int64).
PEFT = register_codec(PeftCodec(
    "SHIRA", ShiraNode,
    (Key.plain("shira_weight", "shira_weight", same),
     Key("shira_indices", ("shira_rows", "shira_cols"), lambda rows, cols: np.stack([rows, cols]),
         lambda x: (x[0], x[1]), dtype="int64")),
    config=_peft_config, spec=_peft_spec,
    reads=frozenset({"r", "mask_type", "random_seed", "init_weights", "fan_in_fan_out"}), conv1d=False))
