"""Gemma 2 and Gemma 3 (text) as pure JAX functions.

    x₀ = √d · embed(ids)                                      (√d rounded to the weights' dtype)
    h = x + n₂(W_o Attn(RoPE_ℓ(n_q(W_q n₁(x))), RoPE_ℓ(n_k(W_k n₁(x))), W_v n₁(x)))
    x' = h + n₄(W_down (gelu_tanh(W_gate n₃(h)) ⊙ W_up n₃(h)))  (GeGLU)
    logits = c_f · tanh((h_L · embedᵀ) / c_f)                  (final soft-cap, where configured)

Every norm n is Gemma's RMSNorm with scale (1 + w), computed in float32. Attention scores are
``q·k / √query_pre_attn_scalar``, soft-capped ``c_a·tanh(s/c_a)`` where ``attn_logit_softcapping`` is
set (Gemma 2). Layers interleave sliding-window and global attention (``layer_types``); Gemma 3's
layer types each have their RoPE (``rope_parameters`` per type: local base 10k, global 1M, optionally
scaled) and per-head q/k norms (n_q, n_k); Gemma 2 has one RoPE and no q/k norms. The head is tied (untied
where the config says so).

Params: as Llama's (``embed``, ``layers/attn/{q,k,v,o}_proj``, ``layers/mlp/{gate,up,down}_proj``,
``final_norm``) with ``layers/{attn_norm, post_attn_norm, mlp_norm, post_mlp_norm}`` [L, d] and, Gemma 3,
``layers/attn/{q,k}_norm`` [L, head_dim].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.models.zoo import ZooModel
from lorax_variants.models.layers import (KVCache, activation, apply_rope, cached_attention, project,
                                          rope_inv_freq, rope_tables, run_layers, segment_positions,
                                          token_chunks)
from lorax_variants.nodes.base import embed
from lorax_variants.shared import resolve_shared

__all__ = ["GemmaConfig", "Gemma", "gemma_rms_norm"]

_NO_WINDOW = 2**30
ROPE_TYPES = ("default", "linear")


def gemma_rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """``x / rms(x) · (1 + w)`` in float32, then the input's dtype (Gemma's RMSNorm)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def _rope(mt: str, params: Any, where: str) -> tuple[tuple[str, Any], ...]:
    rope = dict(params or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{mt} config: {where}.rope_type {kind!r} is not supported; supported: {ROPE_TYPES}")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{mt} config: {where}.partial_rotary_factor != 1 is not supported")
    rope["rope_type"] = kind
    return tuple(sorted(rope.items()))


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """A Gemma 2 / Gemma 3 decoder's shapes and options (soft caps, sliding windows, query scaling, norms), as
    transformers' configs name them."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    query_pre_attn_scalar: float
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]  # per layer: the sliding window, None for global attention
    rope_global: tuple[tuple[str, Any], ...]
    rope_local: tuple[tuple[str, Any], ...]
    qk_norm: bool
    max_position_embeddings: int
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    @classmethod
    def from_hf(cls, hf: Any) -> "GemmaConfig":
        mt = hf.model_type
        if getattr(hf, "use_bidirectional_attention", None):
            raise ValueError(f"{mt} config: use_bidirectional_attention=True (EmbeddingGemma) is not supported")
        if getattr(hf, "attention_bias", False):
            raise ValueError(f"{mt} config: attention_bias=True is not supported")
        n, heads = hf.num_hidden_layers, hf.num_attention_heads
        kv = getattr(hf, "num_key_value_heads", None) or heads
        if heads % kv:
            raise ValueError(f"{mt} config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        types = list(getattr(hf, "layer_types", None) or [])
        if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
            raise ValueError(f"{mt} config: layer_types {types} must name sliding_attention or full_attention for "
                             f"each of the {n} layers")
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if "full_attention" in rope or "sliding_attention" in rope:  # Gemma 3: one RoPE per layer type
            glob = _rope(mt, rope.get("full_attention"), "rope_parameters.full_attention")
            local = _rope(mt, rope.get("sliding_attention"), "rope_parameters.sliding_attention")
        else:
            glob = local = _rope(mt, rope or {"rope_theta": getattr(hf, "rope_theta", 10000.0)}, "rope_parameters")
        window = hf.sliding_window
        return cls(
            model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_hidden_layers=n, num_attention_heads=heads,
            num_key_value_heads=kv, head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=float(hf.rms_norm_eps), hidden_act=hf.hidden_activation,
            query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
            attn_softcap=getattr(hf, "attn_logit_softcapping", None), final_softcap=getattr(hf, "final_logit_softcapping", None),
            windows=tuple(window if t == "sliding_attention" else None for t in types),
            rope_global=glob, rope_local=local, qk_norm=mt == "gemma3_text",
            max_position_embeddings=hf.max_position_embeddings,
            initializer_range=float(getattr(hf, "initializer_range", 0.02)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        )


class Gemma(ZooModel):
    """``init(key) -> params``; ``apply(params, input_ids, attention_mask=None) -> logits``."""

    causal = True
    supports_context = True

    def __init__(self, config: GemmaConfig, *, remat: str = "none", scan: bool = True):
        activation(config.hidden_act, "hidden_activation")
        self.config, self.remat, self.scan = config, remat, scan

    def shapes(self) -> dict[str, Any]:
        """Every parameter's shape and kind (stacked layers first), the tree ``init`` fills."""
        c = self.config
        L, d, f = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        attn = {"q_proj": (L, d, q), "k_proj": (L, d, kv), "v_proj": (L, d, kv), "o_proj": (L, q, d)}
        if c.qk_norm:
            attn |= {"q_norm": (L, c.head_dim), "k_norm": (L, c.head_dim)}
        shapes = {
            "embed": (c.vocab_size, d),
            "layers": {"attn_norm": (L, d), "attn": attn, "post_attn_norm": (L, d), "mlp_norm": (L, d),
                       "mlp": {"gate_proj": (L, d, f), "up_proj": (L, d, f), "down_proj": (L, f, d)},
                       "post_mlp_norm": (L, d)},
            "final_norm": (d,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head"] = (d, c.vocab_size)
        return shapes

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, Any]:
        """Random params as transformers initializes Gemma (norm weights zero: RMSNorm scales by 1 + w)."""
        params = super().init(key, dtype)
        # Gemma's norms scale by (1 + w): w = 0 is the identity (transformers initializes them to 0).
        return jax.tree_util.tree_map_with_path(
            lambda kp, x: jnp.zeros_like(x) if "norm" in str(kp[-1].key) else x, params)

    def cache_dims(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of a ``KVCache`` for this model."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    def _layer(self, x: jax.Array, layer: tuple, key_valid: tuple, ropes: tuple[tuple, tuple],
               cache: KVCache | None = None) -> Any:
        c = self.config
        p, window, is_global = layer[:3]
        if self.context is not None and cache is None:
            x = self.context.constrain(x)
        b, t, _ = x.shape
        eps = c.rms_norm_eps
        h = gemma_rms_norm(x, p["attn_norm"], eps)
        a = p["attn"]
        q = project(h, a, "q_proj").reshape(b, t, c.num_attention_heads, c.head_dim)
        k = project(h, a, "k_proj").reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = project(h, a, "v_proj").reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q, k = gemma_rms_norm(q, a["q_norm"], eps), gemma_rms_norm(k, a["k_norm"], eps)
        (cos_g, sin_g), (cos_l, sin_l) = ropes
        cos, sin = jnp.where(is_global, cos_g, cos_l), jnp.where(is_global, sin_g, sin_l)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scale = 1.0 / math.sqrt(c.query_pre_attn_scalar)
        if cache is not None:
            out, kv = cached_attention(q, k, v, layer[3], cache, window, scale, c.attn_softcap)
        else:
            out = self._attend(q, k, v, scale=scale, causal=True, key_valid=key_valid[0], window=window,
                               softcap=c.attn_softcap, segment_ids=key_valid[1])
            kv = None
        x = x + gemma_rms_norm(project(out, a, "o_proj"), p["post_attn_norm"], eps)
        h = gemma_rms_norm(x, p["mlp_norm"], eps)
        m = p["mlp"]
        act = activation(c.hidden_act, "hidden_activation")
        y = token_chunks(lambda z: project(act(project(z, m, "gate_proj")) * project(z, m, "up_proj"), m, "down_proj"),
                         h, self.mlp_chunk, self._splits)
        x = x + gemma_rms_norm(y, p["post_mlp_norm"], eps)
        return x if cache is None else (x, kv)

    def hidden(self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
               position_ids: jax.Array | None = None, cache: KVCache | None = None, *,
               segment_ids: jax.Array | None = None, device_order: bool = False) -> Any:
        """Final hidden states; with a ``cache``, ``(hidden, cache')``; ``segment_ids``: packed rows,
        ``device_order``: context parallelism (see ``Llama.hidden``)."""
        params = resolve_shared(params)
        c = self.config
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = (jnp.broadcast_to(jnp.arange(t), (b, t)) if segment_ids is None
                            else segment_positions(segment_ids))
        if cache is None:
            input_ids, attention_mask, position_ids, segment_ids = self._to_devices(
                input_ids, attention_mask, position_ids, segment_ids)
        x = embed(input_ids, params["embed"])
        x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)  # as transformers: the scale in the weights' dtype
        ropes = tuple(rope_tables(position_ids, rope_inv_freq(c.head_dim, dict(r))) for r in (c.rope_global, c.rope_local))
        windows = jnp.asarray([_NO_WINDOW if w is None else w for w in c.windows], jnp.int32)
        is_global = jnp.asarray([w is None for w in c.windows])
        if cache is not None:
            layer = lambda h, lp: self._layer(h, lp, (None, None), ropes, cache)  # noqa: E731
            x, (k, v) = run_layers(layer, x, (params["layers"], windows, is_global, (cache.k, cache.v)),
                                   c.num_hidden_layers, scan=self.scan, remat="none", outputs=True)
            return gemma_rms_norm(x, params["final_norm"], c.rms_norm_eps), dataclasses.replace(cache, k=k, v=v)
        layer = lambda h, lp: self._layer(h, lp, (attention_mask, segment_ids), ropes)  # noqa: E731
        x = run_layers(layer, x, (params["layers"], windows, is_global), c.num_hidden_layers, scan=self.scan,
                       remat=self.remat)
        return self._from_devices(gemma_rms_norm(x, params["final_norm"], c.rms_norm_eps), device_order)

    def head(self, params: dict[str, Any], h: jax.Array) -> jax.Array:
        """Logits of hidden states: the head (``ZooModel.head``), then the final soft-cap where configured."""
        logits = super().head(params, h)
        cap = self.config.final_softcap
        if cap is not None:
            logits = (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(logits.dtype)
        return logits

    def apply(self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
              position_ids: jax.Array | None = None, *, segment_ids: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, vocab] (soft-capped where the config says) for ``input_ids`` [B, T]."""
        params = resolve_shared(params)
        return self.head(params, self.hidden(params, input_ids, attention_mask, position_ids,
                                             segment_ids=segment_ids))
