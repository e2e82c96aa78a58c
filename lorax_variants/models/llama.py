"""The Llama family as pure JAX functions: Llama 2/3 (incl. llama3 RoPE scaling), Mistral, Qwen2,
Qwen3, and the mixture-of-experts Qwen3-MoE and Mixtral.

    h = x + W_o Attn(RoPE(n_q(W_q n(x))), RoPE(n_k(W_k n(x))), W_v n(x))     n = RMSNorm
    x' = h + W_down (act(W_gate n(h)) ⊙ W_up n(h))                           (SwiGLU)
    x' = h + MoE(n(h))                                                       (Qwen3-MoE, Mixtral)

n_q, n_k: Qwen3's per-head RMSNorm over head_dim (identity elsewhere). Grouped-query attention
(``num_key_value_heads`` < heads), optional q/k/v biases (Qwen2, ``attention_bias``), optional MLP
biases, per-layer sliding windows (Mistral, Qwen2/3's ``layer_types``), tied or untied output head.
Params (layer axis inside each leaf):

    embed [V, d]; layers/attn_norm [L, d]; layers/attn/{q,k,v,o}_proj [L, in, out]
    (+ {name}_bias [L, out]; Qwen3: layers/attn/{q,k}_norm [L, head_dim]); layers/mlp_norm;
    layers/mlp/{gate,up,down}_proj, or (MoE) layers/moe/router [L, d, E] and
    layers/moe/{gate,up,down}_proj [L, E, in, out]; final_norm [d]; lm_head [d, V] (absent when tied)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.models.zoo import ZooModel
from lorax_variants.models.layers import (KVCache, activation, apply_rope, cached_attention, project, rms_norm,
                                          rope_inv_freq, rope_tables, run_layers, segment_positions,
                                          token_chunks)
from lorax_variants.models.moe import MoeConfig, moe_mlp
from lorax_variants.shared import resolve_shared
from lorax_variants.nodes.base import embed

__all__ = ["LlamaConfig", "Llama"]

ROPE_TYPES = ("default", "linear", "llama3")
_NO_WINDOW = 2**30


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """A Llama-family decoder's shapes and options (Llama, Mistral, Qwen2/3, their MoE forms): heads, RoPE scaling,
    sliding windows, biases, tied head."""

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
    rope: tuple[tuple[str, Any], ...]
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    windows: tuple[int | None, ...]
    max_position_embeddings: int
    initializer_range: float = 0.02
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    moe: MoeConfig | None = None  # Qwen3-MoE, Mixtral: every layer's MLP is a mixture of experts

    @classmethod
    def from_hf(cls, hf: Any) -> "LlamaConfig":
        mt = hf.model_type
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        if not rope:
            rope = {"rope_type": "default", "rope_theta": getattr(hf, "rope_theta", 10000.0)}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"{mt} config: rope_parameters.rope_type {kind!r} is not supported; supported: {ROPE_TYPES}")
        rope["rope_type"] = kind
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{mt} config: rope_parameters.partial_rotary_factor != 1 is not supported")
        if kind == "llama3":
            rope.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
        heads = hf.num_attention_heads
        kv = getattr(hf, "num_key_value_heads", None) or heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        if heads % kv:
            raise ValueError(f"{mt} config: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        n = hf.num_hidden_layers
        if mt in ("qwen2", "qwen3", "qwen3_moe"):
            types = getattr(hf, "layer_types", None) or ["full_attention"] * n
            window = getattr(hf, "sliding_window", None)
            windows = tuple(window if t == "sliding_attention" else None for t in types)
        elif mt in ("mistral", "mixtral"):
            windows = (getattr(hf, "sliding_window", None),) * n
        else:
            windows = (None,) * n
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            hidden_act=hf.hidden_act,
            rope=tuple(sorted(rope.items())),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=mt == "qwen2" or attention_bias,
            o_bias=attention_bias and mt != "qwen2",
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            windows=windows,
            max_position_embeddings=hf.max_position_embeddings,
            initializer_range=float(getattr(hf, "initializer_range", 0.02)),
            qk_norm=mt in ("qwen3", "qwen3_moe"),
            moe=_moe_config(hf),
        )


def _moe_config(hf: Any) -> MoeConfig | None:
    """The MoE settings of a Qwen3-MoE / Mixtral config; options we do not implement are refused by name."""
    mt = hf.model_type
    if mt not in ("qwen3_moe", "mixtral"):
        return None
    if getattr(hf, "output_router_logits", False):
        raise ValueError(f"{mt} config: output_router_logits=True (the router's load-balancing loss) is not "
                         "implemented; set it to false")
    if float(getattr(hf, "router_jitter_noise", 0.0) or 0.0) != 0.0:
        raise ValueError(f"{mt} config: router_jitter_noise={hf.router_jitter_noise} is not implemented; set it to 0")
    if mt == "qwen3_moe":
        if list(getattr(hf, "mlp_only_layers", None) or []):
            raise ValueError(f"{mt} config: mlp_only_layers={hf.mlp_only_layers} (dense layers among MoE layers) is "
                             "not supported: every layer must be a mixture of experts")
        if int(getattr(hf, "decoder_sparse_step", 1)) != 1:
            raise ValueError(f"{mt} config: decoder_sparse_step={hf.decoder_sparse_step} is not supported (only 1: "
                             "every layer a mixture of experts)")
        return MoeConfig(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                         intermediate_size=hf.moe_intermediate_size, normalize=bool(hf.norm_topk_prob))
    return MoeConfig(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                     intermediate_size=hf.intermediate_size, normalize=True)


class Llama(ZooModel):
    """``init(key) -> params``; ``apply(params, input_ids, attention_mask=None) -> logits``."""

    causal = True
    supports_context = True

    def __init__(self, config: LlamaConfig, *, remat: str = "none", scan: bool = True):
        activation(config.hidden_act)
        self.config, self.remat, self.scan = config, remat, scan

    def shapes(self) -> dict[str, Any]:
        """Every parameter's shape and kind (stacked layers, expert banks), the tree ``init`` fills."""
        c = self.config
        L, d, f = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        attn = {"q_proj": (L, d, q), "k_proj": (L, d, kv), "v_proj": (L, d, kv), "o_proj": (L, q, d)}
        if c.qkv_bias:
            attn |= {"q_proj_bias": (L, q), "k_proj_bias": (L, kv), "v_proj_bias": (L, kv)}
        if c.o_bias:
            attn["o_proj_bias"] = (L, d)
        if c.qk_norm:
            attn |= {"q_norm": (L, c.head_dim), "k_norm": (L, c.head_dim)}
        layers = {"attn_norm": (L, d), "attn": attn, "mlp_norm": (L, d)}
        if c.moe is not None:
            E, fe = c.moe.num_experts, c.moe.intermediate_size
            layers["moe"] = {"router": (L, d, E), "gate_proj": (L, E, d, fe), "up_proj": (L, E, d, fe),
                             "down_proj": (L, E, fe, d)}
        else:
            mlp = {"gate_proj": (L, d, f), "up_proj": (L, d, f), "down_proj": (L, f, d)}
            if c.mlp_bias:
                mlp |= {"gate_proj_bias": (L, f), "up_proj_bias": (L, f), "down_proj_bias": (L, d)}
            layers["mlp"] = mlp
        shapes = {"embed": (c.vocab_size, d), "layers": layers, "final_norm": (d,)}
        if not c.tie_word_embeddings:
            shapes["lm_head"] = (d, c.vocab_size)
        return shapes


    def cache_dims(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of a ``KVCache`` for this model."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    def _layer(self, x: jax.Array, layer: tuple, key_valid: tuple, rope: tuple,
               cache: KVCache | None = None) -> Any:
        c = self.config
        p, window = layer[0], layer[1]
        if len(set(c.windows)) == 1:  # every layer alike: a static window (or none), which fused kernels can take
            window = c.windows[0]
        if self.context is not None and cache is None:
            x = self.context.constrain(x)
        b, t, _ = x.shape
        h = rms_norm(x, p["attn_norm"], c.rms_norm_eps)
        a = p["attn"]
        q = project(h, a, "q_proj").reshape(b, t, c.num_attention_heads, c.head_dim)
        k = project(h, a, "k_proj").reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = project(h, a, "v_proj").reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q, k = rms_norm(q, a["q_norm"], c.rms_norm_eps), rms_norm(k, a["k_norm"], c.rms_norm_eps)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        scale = 1.0 / math.sqrt(c.head_dim)
        if cache is not None:
            attn, kv = cached_attention(q, k, v, layer[2], cache, window, scale)
        else:
            attn = self._attend(q, k, v, scale=scale, causal=True, key_valid=key_valid[0], window=window,
                                softcap=None, segment_ids=key_valid[1])
            kv = None
        x = x + project(attn, a, "o_proj")
        h = rms_norm(x, p["mlp_norm"], c.rms_norm_eps)
        act = activation(c.hidden_act)
        if c.moe is not None:
            x = x + moe_mlp(h, p["moe"], act, c.moe)
        else:
            m = p["mlp"]
            mlp = lambda y: project(act(project(y, m, "gate_proj")) * project(y, m, "up_proj"), m, "down_proj")  # noqa: E731
            x = x + token_chunks(mlp, h, self.mlp_chunk, self._splits)
        return x if cache is None else (x, kv)

    def hidden(
        self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None, cache: KVCache | None = None, *,
        segment_ids: jax.Array | None = None, device_order: bool = False,
    ) -> Any:
        """Final hidden states [B, T, d]; with a ``cache`` (and ``position_ids``), ``(hidden, cache')``: the
        tokens are written at ``cache.index`` and attend to everything cached before them.

        ``segment_ids`` [B, T]: packed rows, the document of each token (0: padding); a token attends only to
        its own document, and positions (unless given) restart at 0 for each document. ``device_order``: with
        a ``context``, the states in its order (``ZooModel``)."""
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
        rope = rope_tables(position_ids, rope_inv_freq(c.head_dim, dict(c.rope)))
        windows = jnp.asarray([_NO_WINDOW if w is None else w for w in c.windows], jnp.int32)
        if cache is not None:
            layer = lambda h, lp: self._layer(h, lp, (None, None), rope, cache)  # noqa: E731
            x, (k, v) = run_layers(layer, x, (params["layers"], windows, (cache.k, cache.v)), c.num_hidden_layers,
                                   scan=self.scan, remat="none", outputs=True)
            return rms_norm(x, params["final_norm"], c.rms_norm_eps), dataclasses.replace(cache, k=k, v=v)
        layer = lambda h, lp: self._layer(h, lp, (attention_mask, segment_ids), rope)  # noqa: E731
        x = run_layers(layer, x, (params["layers"], windows), c.num_hidden_layers, scan=self.scan, remat=self.remat)
        return self._from_devices(rms_norm(x, params["final_norm"], c.rms_norm_eps), device_order)

    def apply(
        self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, vocab] (or a classification head's [B, labels]) for ``input_ids`` [B, T]
        (``segment_ids``: packed rows, see ``hidden``)."""
        params = resolve_shared(params)
        return self.head(params, self.hidden(params, input_ids, attention_mask, position_ids,
                                             segment_ids=segment_ids))
