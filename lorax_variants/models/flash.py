"""Blockwise attention with memory linear in sequence length (FlashAttention's algorithm, arXiv 2205.14135 and
2307.08691, in plain JAX), forward and a hand-written backward that recomputes blocks.

    for each query block i:            m = -∞, l = 0, acc = 0
      for each key block j it can see:  s = scale · q_i k_jᵀ  (c·tanh(s/c) with a soft cap c), masked
                                        m' = max(m, rowmax s);  p = exp(s - m')
                                        l = l·e^{m-m'} + rowsum p;  acc = acc·e^{m-m'} + p v_j;  m = m'
      o_i = acc / l;  lse_i = m + log l

The mask is never formed beyond one [block_q, block_k] tile: it comes from ``key_valid`` [B, S] (padding),
``segment_ids`` (packed rows: a query sees its own document only), ``causal`` and ``window`` (key s is seen
by the query at position t when s ≤ t and t - s < window), with the
queries at positions ``q_offset + 0..T-1`` (a KV cache). Key blocks a query block cannot see (after it,
causally, or before its window) are not visited. A query row with no visible key outputs 0 and passes no
gradient. GQA: each key/value head serves its group of query heads without copies.

Backward (dO given, D = rowsum(dO ∘ O)): per tile p = exp(s - lse), dp = dO vᵀ, ds = p ∘ (dp - D) (∘ (1 - t²)
under a soft cap, t = tanh(s/c)), dq += scale · ds k, dk += scale · dsᵀ q, dv += pᵀ dO. Saved between the
passes: q, k, v, O and lse, all O(T); nothing [T, S].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["flash_attention"]

_NEG = -1e30  # masked scores: finite, so that a row with nothing visible yet stays NaN-free


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool = False,
                    key_valid: jax.Array | None = None, window: Any = None, softcap: float | None = None,
                    q_offset: Any = 0, block_q: int = 512, block_k: int = 512,
                    segment_ids: jax.Array | None = None, key_segment_ids: jax.Array | None = None) -> jax.Array:
    """``q [B, T, H, D]``, ``k``/``v [B, S, Hkv, D]`` -> ``[B, T, H·D]`` (see the module docstring).
    ``segment_ids [B, T]`` (packed rows): a query sees only keys of its own segment; the keys' are
    ``key_segment_ids [B, S]`` (default: the same array, T == S; a shard of queries against all keys passes both)."""
    b, t, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    bq, bk = min(block_q, _ceil_to(t, 8)), min(block_k, _ceil_to(s_len, 8))
    tp, sp = _ceil_to(t, bq), _ceil_to(s_len, bk)
    qh = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0))).reshape(b, tp, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kh = jnp.pad(k, ((0, 0), (0, sp - s_len), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # [B, Hkv, S, D]
    vh = jnp.pad(v, ((0, 0), (0, sp - s_len), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    valid = jnp.ones((b, s_len), bool) if key_valid is None else key_valid.astype(bool)
    valid = jnp.pad(valid, ((0, 0), (0, sp - s_len)))
    win = jnp.asarray(2**30 if window is None else window, jnp.int32)
    meta = _Meta(scale=float(scale), causal=bool(causal), softcap=None if softcap is None else float(softcap),
                 block_q=bq, block_k=bk, segments=segment_ids is not None)
    if segment_ids is None:
        seg = (jnp.zeros((b, tp), jnp.int32), jnp.zeros((b, sp), jnp.int32))  # unused
    else:
        key_segment_ids = segment_ids if key_segment_ids is None else key_segment_ids
        seg = (jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, tp - t))),
               jnp.pad(key_segment_ids.astype(jnp.int32), ((0, 0), (0, sp - s_len))))
    out = _flash(meta, qh, kh, vh, valid, win, jnp.asarray(q_offset, jnp.int32), seg)  # [B, Hkv, G, Tp, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h * d)[:, :t].astype(q.dtype)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass(frozen=True)
class _Meta:
    """Static settings of one attention call (hashable: a non-differentiable argument)."""

    scale: float
    causal: bool
    softcap: float | None
    block_q: int
    block_k: int
    segments: bool = False


def _range(meta: _Meta, i: jax.Array, q_offset: jax.Array, window: jax.Array, n_k: int) -> tuple[jax.Array, jax.Array]:
    """Key blocks [lo, hi) that query block i can see."""
    first = q_offset + i * meta.block_q  # position of the block's first query
    last = first + meta.block_q - 1
    hi = jnp.minimum(n_k, last // meta.block_k + 1) if meta.causal else jnp.asarray(n_k)
    lo = jnp.maximum(0, (first - window + 1) // meta.block_k)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _tile(meta: _Meta, q: jax.Array, k: jax.Array, valid: jax.Array, i: jax.Array, j: jax.Array,
          q_offset: jax.Array, window: jax.Array,
          seg: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Scores [B, Hkv, G, bq, bk] of query block i against key block j, the mask, and tanh(s/c) (soft cap)."""
    s = jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32) * meta.scale
    t = None
    if meta.softcap is not None:
        t = jnp.tanh(s / meta.softcap)
        s = meta.softcap * t
    qpos = q_offset + i * meta.block_q + jnp.arange(meta.block_q)
    kpos = j * meta.block_k + jnp.arange(meta.block_k)
    seen = (qpos[:, None] - kpos[None, :]) < window
    if meta.causal:
        seen &= kpos[None, :] <= qpos[:, None]
    mask = seen[None, None, None] & valid[:, None, None, None, :]
    if meta.segments:  # seg: this query block's and this key block's segment ids [B, bq], [B, bk]
        mask = mask & (seg[0][:, :, None] == seg[1][:, None, :])[:, None, None]
    return s, mask, t


def _segments(meta, seg, i, j):
    """The segment ids of query block i and key block j."""
    return (jax.lax.dynamic_slice_in_dim(seg[0], i * meta.block_q, meta.block_q, axis=1),
            jax.lax.dynamic_slice_in_dim(seg[1], j * meta.block_k, meta.block_k, axis=1))


def _forward(meta, q, k, v, valid, window, q_offset, seg):
    b, hkv, g, tp, d = q.shape
    n_q, n_k = tp // meta.block_q, k.shape[2] // meta.block_k

    def one_block(_, i):
        q_i = jax.lax.dynamic_slice_in_dim(q, i * meta.block_q, meta.block_q, axis=3)  # no block-major copy of q
        lo, hi = _range(meta, i, q_offset, window, n_k)

        def body(j, carry):
            m, l, acc = carry
            k_j = jax.lax.dynamic_slice_in_dim(k, j * meta.block_k, meta.block_k, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v, j * meta.block_k, meta.block_k, axis=2)
            valid_j = jax.lax.dynamic_slice_in_dim(valid, j * meta.block_k, meta.block_k, axis=1)
            s, mask, _ = _tile(meta, q_i, k_j, valid_j, i, j, q_offset, window, _segments(meta, seg, i, j))
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _NEG), axis=-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_j,
                                                     preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, axis=-1), acc

        init = (jnp.full(q_i.shape[:-1], _NEG, jnp.float32), jnp.zeros(q_i.shape[:-1], jnp.float32),
                jnp.zeros(q_i.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)  # inf: nothing seen, p = 0 in backward
        return None, (out.astype(q.dtype), lse)

    _, (out, lse) = jax.lax.scan(one_block, None, jnp.arange(n_q))
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, tp, d)
    return out, lse.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, tp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(meta, q, k, v, valid, window, q_offset, seg):
    return _forward(meta, q, k, v, valid, window, q_offset, seg)[0]


def _flash_fwd(meta, q, k, v, valid, window, q_offset, seg):
    out, lse = _forward(meta, q, k, v, valid, window, q_offset, seg)
    return out, (q, k, v, valid, window, q_offset, seg, out, lse)


def _flash_bwd(meta, res, d_out):
    q, k, v, valid, window, q_offset, seg, out, lse = res
    b, hkv, g, tp, d = q.shape
    n_q, n_k = tp // meta.block_q, k.shape[2] // meta.block_k
    rows = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # D_i

    def one_block(carry, i):
        dk, dv = carry
        block = lambda x: jax.lax.dynamic_slice_in_dim(x, i * meta.block_q, meta.block_q, axis=3)  # noqa: E731
        q_i, do_i, lse_i, rows_i = block(q), block(d_out), block(lse), block(rows)
        lo, hi = _range(meta, i, q_offset, window, n_k)

        def body(j, inner):
            dq_i, dk, dv = inner
            start = j * meta.block_k
            k_j = jax.lax.dynamic_slice_in_dim(k, start, meta.block_k, axis=2)
            v_j = jax.lax.dynamic_slice_in_dim(v, start, meta.block_k, axis=2)
            valid_j = jax.lax.dynamic_slice_in_dim(valid, start, meta.block_k, axis=1)
            s, mask, t = _tile(meta, q_i, k_j, valid_j, i, j, q_offset, window, _segments(meta, seg, i, j))
            p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = p * (dp - rows_i[..., None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            ds = ds * meta.scale
            dq_i = dq_i + jnp.einsum("bkgqs,bksd->bkgqd", ds, k_j.astype(jnp.float32))
            dk_j = jnp.einsum("bkgqs,bkgqd->bksd", ds, q_i.astype(jnp.float32))
            dv_j = jnp.einsum("bkgqs,bkgqd->bksd", p, do_i.astype(jnp.float32))
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, start, meta.block_k, axis=2) + dk_j, start, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, start, meta.block_k, axis=2) + dv_j, start, axis=2)
            return dq_i, dk, dv

        dq_i, dk, dv = jax.lax.fori_loop(lo, hi, body, (jnp.zeros(q_i.shape, jnp.float32), dk, dv))
        return (dk, dv), dq_i

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one_block, (zeros, zeros), jnp.arange(n_q))
    dq = dq.transpose(1, 2, 3, 0, 4, 5).reshape(b, hkv, g, tp, d)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
