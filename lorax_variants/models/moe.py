"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral): a top-k router and banks of SwiGLU experts.

    p = softmax(x W_router)                      (float32, over E experts)
    (w, e) = top_k(p);  w ← w / Σw               (Mixtral always; Qwen3-MoE with ``norm_topk_prob``)
    y = Σ_j w_j · W_down[e_j] (act(W_gate[e_j] x) ⊙ W_up[e_j] x)

Experts are stored stacked, ``gate_proj``/``up_proj`` ``[E, d, f]`` and ``down_proj`` ``[E, f, d]`` (one
more leading axis per stacked layer), so every variant adapts a bank as it adapts a stacked weight: one
A, B (or magnitude, λ, NF4 codes, ...) per expert.

Never a dense pass of every expert over every token: the N·k (token, expert) assignments are sorted by
expert and laid out in tiles of ``tile`` rows, each tile holding rows of one expert only (each expert's
rows padded to a whole number of tiles, so at most N·k/tile + E tiles, a static bound). A ``scan`` over
the tiles takes each tile's expert out of every bank (``x[e]`` of each leaf: the weight, its adapter
factors, its quantized codes) and applies it with ``dense``, so every adapter variant runs factored on
the experts and its gradients reach only the experts that saw tokens; empty tiles are skipped
(``lax.cond``). FLOPs: the assigned rows plus the padding of each expert's last tile.
``jax.lax.ragged_dot`` does the same in one op, but XLA:CPU computes it as every expert over every row
(measured 8x the batched matmul for 8 experts), so it is not used.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import dense
from lorax_variants.shared import is_shared
from lorax_variants.routing import routes_rows

__all__ = ["MoeConfig", "route", "experts_mlp", "moe_mlp"]


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """``num_experts`` E, ``top_k`` experts per token, expert width ``intermediate_size``, and whether the
    top-k probabilities are renormalized to sum to 1 (``normalize``)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize: bool
    tile: int = 128


def route(x: jax.Array, router: Any, cfg: MoeConfig) -> tuple[jax.Array, jax.Array]:
    """``(weights [N, k] float32, experts [N, k] int32)`` for tokens ``x [N, d]``."""
    logits = dense(x, router)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.top_k)
    if cfg.normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def _expert(bank: Any, e: jax.Array) -> Any:
    """Expert ``e`` of a bank (plain array or node): every leaf's leading expert axis indexed."""
    return jax.tree.map(lambda leaf: leaf if is_shared(leaf) else jax.lax.dynamic_index_in_dim(leaf, e, 0, False),
                        bank, is_leaf=is_shared)


def experts_mlp(x: jax.Array, experts: jax.Array, banks: dict[str, Any], act: Any, cfg: MoeConfig) -> jax.Array:
    """Each row of ``x [M, d]`` through the SwiGLU expert ``experts [M]`` names; ``[M, d]`` out."""
    if any(routes_rows(b) for b in banks.values()):
        raise ValueError("per-example adapter routing (one adapter per example) on expert banks is not supported: the rows "
                         "of an expert's tile come from many examples; adapt the attention projections instead")
    m, d = x.shape
    e_count = cfg.num_experts
    tile = max(1, min(cfg.tile, m))
    order = jnp.argsort(experts, stable=True)
    sorted_e = experts[order]
    sizes = jnp.bincount(experts, length=e_count)
    tiles_per = (sizes + tile - 1) // tile
    first_tile = jnp.cumsum(tiles_per) - tiles_per  # exclusive
    group_start = jnp.cumsum(sizes) - sizes
    rank = jnp.arange(m) - group_start[sorted_e]  # position within its expert's rows
    slot = first_tile[sorted_e] * tile + rank  # row in the tiled layout
    n_tiles = -(-m // tile) + e_count  # static bound: Σ ceil(g_e / tile) ≤ m / tile + E
    tiled = jnp.zeros((n_tiles * tile, d), x.dtype).at[slot].set(x[order]).reshape(n_tiles, tile, d)
    used = jnp.sum(tiles_per)
    tile_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(tiles_per), jnp.arange(n_tiles), side="right"), 0,
                           e_count - 1).astype(jnp.int32)

    def one(rows: jax.Array, e: jax.Array) -> jax.Array:
        gate, up, down = (_expert(banks[n], e) for n in ("gate_proj", "up_proj", "down_proj"))
        return dense(act(dense(rows, gate)) * dense(rows, up), down)

    def step(_: Any, item: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[Any, jax.Array]:
        rows, e, valid = item
        out = jax.lax.cond(valid, one, lambda r, _e: jnp.zeros((tile, d), r.dtype), rows, e)
        return None, out

    _, out = jax.lax.scan(step, None, (tiled, tile_expert, jnp.arange(n_tiles) < used))
    y_sorted = out.reshape(n_tiles * tile, d)[slot]
    return jnp.zeros((m, d), y_sorted.dtype).at[order].set(y_sorted)


def moe_mlp(x: jax.Array, params: dict[str, Any], act: Any, cfg: MoeConfig) -> jax.Array:
    """The MoE block on ``x [B, T, d]``: route each token to its top-k experts, weight and sum."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)
    weights, experts = route(flat, params["router"], cfg)
    k = cfg.top_k
    rows = jnp.repeat(flat, k, axis=0)  # assignment j = token j // k, its (j % k)-th expert
    out = experts_mlp(rows, experts.reshape(-1), params, act, cfg)
    out = out.astype(jnp.float32) * weights.reshape(-1, 1)
    return jnp.sum(out.reshape(b * t, k, d), axis=1).astype(x.dtype).reshape(b, t, d)
