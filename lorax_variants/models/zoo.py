"""``ZooModel``: what every model of the zoo shares (random init from its shapes, generation, the
attention and chunking settings). Above ``layers`` and ``generate``, below the model files."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lorax_variants.models.context import ContextParallel
from lorax_variants.models.generate import generate
from lorax_variants.models.layers import init_from_shapes, self_attention
from lorax_variants.nodes.base import dense, dense_t

__all__ = ["ZooModel"]


class ZooModel:
    """What every zoo model shares: ``init`` from its ``shapes()``, and ``generate`` if causal.

    ``attention_impl``: ``"auto"`` (the backend's fused kernel where it applies, else dense up to
    ``DENSE_MAX`` tokens and blockwise above), ``"dense"``, ``"flash"``, ``"cudnn"``, ``"splash"`` (see
    ``layers.self_attention``). ``right_padded``: the caller pads
    sequences on the right only (the app does), which lets fused kernels take key lengths. ``mlp_chunk``:
    run the MLP that many tokens at a time (long sequences: its [T, ffn] activations are the largest).
    ``context``: a ``ContextParallel`` splitting each row's tokens over a mesh axis (models that say
    ``supports_context``: the Llama family and Gemma); ``hidden(..., device_order=True)`` then returns the
    tokens in ``context.order`` (the chunked loss takes them so, without gathering them back)."""

    causal = False
    stacked = r"layers/.*"
    attention_impl = "auto"
    right_padded = False
    mlp_chunk: int | None = None  # tokens per MLP chunk (``token_chunks``) for long sequences
    context: ContextParallel | None = None
    supports_context = False

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, **kw: Any) -> jax.Array:
        """Self-attention of a layer (``layers.self_attention``'s arguments), over the context axis if split."""
        if self.context is not None:
            return self.context.attention(q, k, v, **kw)
        return self_attention(q, k, v, impl=self.attention_impl, right_padded=self.right_padded, **kw)

    @property
    def _splits(self) -> int:
        """How many devices share a row's tokens (``token_chunks``' ``splits``)."""
        return 1 if self.context is None else self.context.size

    def _to_devices(self, *arrays: Any) -> tuple[Any, ...]:
        """[B, T] inputs (positions already computed) in the context's order; as given without a context."""
        if self.context is None:
            return arrays
        if not self.supports_context:
            raise ValueError(f"{type(self).__name__}: context parallelism is implemented for the Llama family and "
                             "Gemma only")
        order = self.context.order(arrays[0].shape[1])
        return tuple(None if x is None else x[:, order] for x in arrays)

    def _from_devices(self, h: jax.Array, device_order: bool) -> jax.Array:
        """Final hidden states back in sequence order (unless ``device_order``)."""
        if self.context is None or device_order:
            return h
        return h[:, np.argsort(self.context.order(h.shape[1]))]

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, Any]:
        """Random params (N(0, initializer_range²) weights, unit norms, zero biases); pure, so
        ``jax.eval_shape(model.init, key)`` plans any size without allocating."""
        return init_from_shapes(self.shapes(), key, self.config.initializer_range, dtype)

    def head(self, params: dict[str, Any], h: jax.Array) -> jax.Array:
        """Logits of hidden states: the untied head ``lm_head`` where the params hold one (an untied config, or
        a tied one whose head PEFT's ``modules_to_save`` untied), else the tied ``embed``ᵀ (Gemma adds its
        soft-cap)."""
        if "lm_head" in params:
            return dense(h, params["lm_head"])
        return dense_t(h, params["embed"])

    def generate(self, params: dict[str, Any], input_ids: jax.Array, **kwargs: Any) -> jax.Array:
        """Tokens after ``input_ids`` with a KV cache (``models.generate.generate``: greedy or sampled,
        stop tokens, per-row adapters with ``task_ids``)."""
        return generate(self, params, input_ids, **kwargs)
