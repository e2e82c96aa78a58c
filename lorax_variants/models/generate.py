"""Generation for causal models with a KV cache: one prefill over the prompts, then one token per step.

    prefill:  cache ← k, v of every prompt token (prompts left-aligned: every row's last token at T-1)
    step i:   token_i ~ p(· | logits_{i-1}); its k, v written at buffer index i; logits_i from that token alone

Everything is one jitted program over static shapes: a buffer of ``T + max_new_tokens`` positions per row
and a ``lax.while_loop`` that stops when every row has emitted a stop token (or the buffer is full).
Rows of different lengths: padding is left out of attention (``KVCache.valid``) and positions follow the
real tokens (cumulative count, as transformers). After its stop token a row emits ``pad_token_id`` (as
transformers' ``generate``). Sampling: greedy (``temperature=0``) or temperature, then top-k, then top-p
(nucleus), in transformers' order. Adapters of every variant apply factored as in training; a multi-task
tree takes one adapter per row (``task_ids``, PEFT's ``adapter_names``).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax
import numpy as np
import jax.numpy as jnp

from lorax_variants.models.layers import KVCache
from lorax_variants.routing import route, sort_by_adapter

__all__ = ["generate", "sample"]


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None) -> jax.Array:
    """Next tokens [B] from logits [B, V]: argmax at temperature 0, else softmax(logits / T) sampled after
    keeping the ``top_k`` largest and the smallest set of tokens whose probability reaches ``top_p``."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None and top_p < 1.0:
        order = jnp.argsort(logits, axis=-1)  # ascending, as transformers' TopPLogitsWarper
        ascending = jnp.take_along_axis(logits, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        drop = cum <= 1.0 - top_p
        drop = drop.at[:, -1].set(False)  # always keep the most likely token
        logits = jnp.where(jnp.zeros_like(drop).at[jnp.arange(drop.shape[0])[:, None], order].set(drop), neg, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: Any,
    params: Any,
    input_ids: jax.Array,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    key: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    task_ids: Any = None,
) -> jax.Array:
    """``[B, T + max_new_tokens]`` token ids: the prompts (left-aligned: padding first) and what follows.

    ``stop_tokens``: ids that end a row (its EOS); later positions of that row hold ``pad_token_id``.
    ``task_ids``: with multi-task or many adapters, each row's adapter (``route``; −1: the base model). Rows
    are grouped by adapter for the step and returned in the order given (with sampling, a row's random
    draws depend on its place in the grouped batch)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("temperature > 0 samples: pass key=jax.random.key(...)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not getattr(model, "causal", False) or not hasattr(model, "cache_dims"):
        raise ValueError(f"{type(model).__name__} is not a causal language model")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    order = None
    if task_ids is not None:
        if not isinstance(task_ids, jax.core.Tracer):  # rows grouped by adapter (grouped matmuls need it), restored
            order = sort_by_adapter(task_ids)
            task_ids = np.asarray(task_ids)[order]
            input_ids, attention_mask = input_ids[order], jnp.asarray(attention_mask)[order]
        params = route(params, task_ids)
    stops = tuple(sorted({int(s) for s in ([stop_tokens] if isinstance(stop_tokens, int) else stop_tokens or [])}))
    key = jax.random.key(0) if key is None else key
    out = _generate(model, float(temperature), top_k, top_p, int(max_new_tokens), stops, int(pad_token_id), params,
                    input_ids, jnp.asarray(attention_mask, jnp.int32), key)
    return out if order is None else out[np.argsort(order)]


@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _generate(model, temperature, top_k, top_p, max_new_tokens, stops, pad, params, input_ids, attention_mask, key):
    b, t = input_ids.shape
    total = t + max_new_tokens
    # Left-align: padding first, each row's real tokens in order at the end (whichever side it was padded on).
    order = jnp.argsort(attention_mask, axis=1, stable=True)
    mask = jnp.take_along_axis(attention_mask, order, axis=1)
    ids = jnp.where(mask == 1, jnp.take_along_axis(input_ids, order, axis=1), pad)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    layers, kv_heads, head_dim = model.cache_dims()
    dtype = jnp.result_type(*[x.dtype for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)][:1] or [jnp.float32])
    cache = KVCache.empty(layers, b, total, kv_heads, head_dim, dtype)
    cache = KVCache(cache.k, cache.v, cache.valid.at[:, :t].set(mask == 1), jnp.zeros((), jnp.int32))
    h, cache = model.hidden(params, ids, None, positions, cache)
    logits = model.head(params, h[:, -1])
    buf = jnp.full((b, total), pad, jnp.int32).at[:, :t].set(ids)
    last = positions[:, -1]
    stop_ids = jnp.asarray(stops if stops else (-1,), jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < total) & ~jnp.all(done)

    def body(carry):
        i, buf, cache, logits, done, last, key = carry
        key, sub = jax.random.split(key)
        token = jnp.where(done, pad, sample(logits, sub, temperature, top_k, top_p))
        buf = jax.lax.dynamic_update_index_in_dim(buf, token[:, None], i, axis=1)
        done = done | jnp.isin(token, stop_ids)
        pos = last + 1
        step = KVCache(cache.k, cache.v, cache.valid.at[:, i].set(True), i.astype(jnp.int32))
        h, cache = model.hidden(params, token[:, None], None, pos[:, None], step)
        return i + 1, buf, cache, model.head(params, h[:, -1]), done, pos, key

    carry = (jnp.asarray(t, jnp.int32), buf, cache, logits, jnp.zeros((b,), bool), last, key)
    return jax.lax.while_loop(cond, body, carry)[1]
