"""GPT-2 as pure JAX functions (arXiv: Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners").

    h = x + c_proj(Attn(split₃(c_attn(LN₁(x)))))       x' = h + c_proj(gelu(c_fc(LN₂(h))))

Pre-norm, learned absolute positions, fused q/k/v projection ``c_attn`` [d, 3d]; the head is
tied to the token embedding unless the config unties it. GPT-2's Conv1D already stores
kernels ``[in, out]``, our layout. Params (layer axis inside each leaf):

    embed [V, d]; pos [P, d]; layers/ln_1_scale, ln_1_bias [L, d];
    layers/attn/c_attn [L, d, 3d] (+ c_attn_bias); layers/attn/c_proj (+ _bias);
    layers/ln_2_*; layers/mlp/c_fc [L, d, f], layers/mlp/c_proj [L, f, d] (+ biases);
    final_norm_scale, final_norm_bias [d]; lm_head [d, V] only when untied
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.models.zoo import ZooModel
from lorax_variants.models.layers import (KVCache, activation, cached_attention, layer_norm, project, run_layers,
                                          segment_positions, self_attention)
from lorax_variants.shared import resolve_shared
from lorax_variants.nodes.base import embed

__all__ = ["GPT2Config", "GPT2"]


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """A GPT-2 decoder's shapes and options, as transformers' ``GPT2Config`` names them."""

    model_type: str
    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int
    n_inner: int
    activation_function: str
    layer_norm_epsilon: float
    scale_attn_weights: bool
    tie_word_embeddings: bool
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, hf: Any) -> "GPT2Config":
        for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if getattr(hf, field, False):
                raise ValueError(f"gpt2 config: {field}=True is not supported")
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            n_embd=hf.n_embd,
            n_layer=hf.n_layer,
            n_head=hf.n_head,
            n_positions=hf.n_positions,
            n_inner=hf.n_inner or 4 * hf.n_embd,
            activation_function=hf.activation_function,
            layer_norm_epsilon=float(hf.layer_norm_epsilon),
            scale_attn_weights=bool(getattr(hf, "scale_attn_weights", True)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            initializer_range=float(getattr(hf, "initializer_range", 0.02)),
        )


class GPT2(ZooModel):
    """GPT-2 (``GPT2LMHeadModel``): learned positions, pre-LN blocks, Conv1D kernels already [in, out], tied (or
    untied) head."""
    causal = True

    def __init__(self, config: GPT2Config, *, remat: str = "none", scan: bool = True):
        activation(config.activation_function, "activation_function")
        self.config, self.remat, self.scan = config, remat, scan

    def shapes(self) -> dict[str, Any]:
        """Every parameter's shape and kind (stacked layers first), the tree ``init`` fills."""
        c = self.config
        L, d, f = c.n_layer, c.n_embd, c.n_inner
        shapes = {
            "embed": (c.vocab_size, d),
            "pos": (c.n_positions, d),
            "layers": {
                "ln_1_scale": (L, d), "ln_1_bias": (L, d),
                "attn": {"c_attn": (L, d, 3 * d), "c_attn_bias": (L, 3 * d), "c_proj": (L, d, d), "c_proj_bias": (L, d)},
                "ln_2_scale": (L, d), "ln_2_bias": (L, d),
                "mlp": {"c_fc": (L, d, f), "c_fc_bias": (L, f), "c_proj": (L, f, d), "c_proj_bias": (L, d)},
            },
            "final_norm_scale": (d,),
            "final_norm_bias": (d,),
        }
        if not c.tie_word_embeddings:
            shapes["lm_head"] = (d, c.vocab_size)
        return shapes


    def cache_dims(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of a ``KVCache`` for this model."""
        c = self.config
        return c.n_layer, c.n_head, c.n_embd // c.n_head

    def _layer(self, x: jax.Array, p: Any, mask: tuple, cache: KVCache | None = None) -> Any:
        c = self.config
        if cache is not None:
            p, layer_kv = p
        b, t, d = x.shape
        hd = d // c.n_head
        eps = c.layer_norm_epsilon
        h = layer_norm(x, p["ln_1_scale"], p["ln_1_bias"], eps)
        q, k, v = jnp.split(project(h, p["attn"], "c_attn"), 3, axis=-1)
        heads = lambda y: y.reshape(b, t, c.n_head, hd)  # noqa: E731
        scale = 1.0 / math.sqrt(hd) if c.scale_attn_weights else 1.0
        if cache is not None:
            out, kv = cached_attention(heads(q), heads(k), heads(v), layer_kv, cache, 2**30, scale)
        else:
            out = self_attention(heads(q), heads(k), heads(v), scale=scale, causal=True, key_valid=mask[0],
                                 impl=self.attention_impl, right_padded=self.right_padded, segment_ids=mask[1])
            kv = None
        x = x + project(out, p["attn"], "c_proj")
        h = layer_norm(x, p["ln_2_scale"], p["ln_2_bias"], eps)
        act = activation(c.activation_function)
        x = x + project(act(project(h, p["mlp"], "c_fc")), p["mlp"], "c_proj")
        return x if cache is None else (x, kv)

    def hidden(
        self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None, cache: KVCache | None = None, *,
        segment_ids: jax.Array | None = None,
    ) -> Any:
        """Final hidden states; with a ``cache``, ``(hidden, cache')``; ``segment_ids``: packed rows (see
        ``Llama.hidden``; the learned positions restart with each document)."""
        params = resolve_shared(params)
        c = self.config
        b, t = input_ids.shape
        if cache is None and t > c.n_positions:
            raise ValueError(f"sequence length {t} exceeds gpt2 config n_positions={c.n_positions}")
        if position_ids is None:
            position_ids = (jnp.broadcast_to(jnp.arange(t), (b, t)) if segment_ids is None
                            else segment_positions(segment_ids))
        x = embed(input_ids, params["embed"]) + embed(position_ids, params["pos"])
        norm = lambda y: layer_norm(y, params["final_norm_scale"], params["final_norm_bias"], c.layer_norm_epsilon)  # noqa: E731
        if cache is not None:
            layer = lambda h, p: self._layer(h, p, (None, None), cache)  # noqa: E731
            x, (k, v) = run_layers(layer, x, (params["layers"], (cache.k, cache.v)), c.n_layer, scan=self.scan,
                                   remat="none", outputs=True)
            return norm(x), dataclasses.replace(cache, k=k, v=v)
        layer = lambda h, p: self._layer(h, p, (attention_mask, segment_ids))  # noqa: E731
        return norm(run_layers(layer, x, params["layers"], c.n_layer, scan=self.scan, remat=self.remat))

    def apply(
        self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, T, vocab] for ``input_ids`` [B, T] (``attention_mask`` [B, T]: 1 real, 0 padding;
        ``segment_ids``: packed rows)."""
        params = resolve_shared(params)
        return self.head(params, self.hidden(params, input_ids, attention_mask, position_ids,
                                             segment_ids=segment_ids))


