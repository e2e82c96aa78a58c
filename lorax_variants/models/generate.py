"""Greedy or temperature sampling for causal models (for evaluation samples).

The whole loop is one jitted program over a fixed buffer of ``prompt + max_new_tokens``
positions: every step re-runs the model on the buffer (no KV cache: O(n²) per step, fine
for eval samples) and writes the next token. Left-padded prompts work: positions follow
the attention mask (cumulative count of real tokens, as transformers' ``generate``).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["generate"]


def generate(
    model: Any,
    params: Any,
    input_ids: jax.Array,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    key: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """Return ``[B, prompt + max_new_tokens]`` token ids (prompt included)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and key is None:
        raise ValueError("temperature > 0 samples: pass key=jax.random.key(...)")
    if not getattr(model, "causal", False):
        raise ValueError(f"{type(model).__name__} is not a causal language model")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    key = jax.random.key(0) if key is None else key
    return _generate(model, float(temperature), int(max_new_tokens), params, input_ids, jnp.asarray(attention_mask, jnp.int32), key)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(model, temperature, max_new_tokens, params, input_ids, attention_mask, key):
    b, t = input_ids.shape
    total = t + max_new_tokens
    buf = jnp.zeros((b, total), jnp.int32).at[:, :t].set(input_ids)
    mask = jnp.zeros((b, total), jnp.int32).at[:, :t].set(attention_mask)

    def step(i, carry):
        buf, mask, key = carry
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        logits = model.apply(params, buf, mask, positions)
        last = jax.lax.dynamic_index_in_dim(logits, i - 1, axis=1, keepdims=False).astype(jnp.float32)
        key, sub = jax.random.split(key)
        if temperature == 0.0:
            token = jnp.argmax(last, axis=-1)
        else:
            token = jax.random.categorical(sub, last / temperature, axis=-1)
        buf = jax.lax.dynamic_update_index_in_dim(buf, token.astype(jnp.int32)[:, None], i, axis=1)
        mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones((b, 1), jnp.int32), i, axis=1)
        return buf, mask, key

    buf, _, _ = jax.lax.fori_loop(t, total, step, (buf, mask, key))
    return buf
