"""A small pre-norm causal transformer with the zoo's conventions, for demos and benchmarks.

Pure functions over a param tree; every projection goes through ``dense`` so adapter and
quantized nodes work in every layer; layers are stacked on a leading axis (paths like
``layers/attn/q_proj`` with the layer axis inside the leaf) and run with ``jax.lax.scan``
(``scan=False`` unrolls a Python loop instead, e.g. for exact XLA FLOP counts, since cost
analysis counts a scan body once).

    h = x + Attn(RMSNorm(x));   x' = h + W_down GELU(W_up RMSNorm(h))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.models.layers import run_layers
from lorax_variants.nodes.base import dense
from lorax_variants.shared import resolve_shared

__all__ = ["TinyConfig", "TinyTransformer", "STACKED"]

STACKED = r"layers/.*"  # AdapterSpec.stacked for this model's params


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    """The shapes of the tiny transformer the tests and benchmarks build (layers, width, heads, vocabulary)."""

    vocab_size: int = 256
    d_model: int = 128
    n_heads: int = 4
    d_ff: int = 512
    n_layers: int = 2
    max_len: int = 512
    remat: bool = False


def _rms_norm(x: jax.Array, g: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * g.astype(jnp.float32)).astype(x.dtype)


class TinyTransformer:
    """``init(key) -> params``; ``apply(params, ids) -> logits [batch, seq, vocab]``."""

    def __init__(self, config: TinyConfig):
        self.config = config

    def init(self, key: jax.Array, dtype: Any = jnp.float32) -> dict[str, Any]:
        """Random params (normal weights, unit norms)."""
        c = self.config
        ks = iter(jax.random.split(key, 16))

        def w(shape: tuple[int, ...], fan_in: int) -> jax.Array:
            return (jax.random.normal(next(ks), shape) / math.sqrt(fan_in)).astype(dtype)

        L, d, f = c.n_layers, c.d_model, c.d_ff
        return {
            "embed": w((c.vocab_size, d), 1),
            "pos": w((c.max_len, d), 1) * 0.1,
            "layers": {
                "attn_norm": jnp.ones((L, d), dtype),
                "attn": {
                    "q_proj": w((L, d, d), d),
                    "k_proj": w((L, d, d), d),
                    "v_proj": w((L, d, d), d),
                    "o_proj": w((L, d, d), d),
                },
                "mlp_norm": jnp.ones((L, d), dtype),
                "mlp": {"up_proj": w((L, d, f), d), "down_proj": w((L, f, d), f)},
            },
            "final_norm": jnp.ones((d,), dtype),
            "lm_head": w((d, c.vocab_size), d),
        }

    def _layer(self, x: jax.Array, p: dict[str, Any]) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        hd = d // c.n_heads
        h = _rms_norm(x, p["attn_norm"])
        split_heads = lambda y: y.reshape(b, t, c.n_heads, hd)  # noqa: E731
        q = split_heads(dense(h, p["attn"]["q_proj"]))
        k = split_heads(dense(h, p["attn"]["k_proj"]))
        v = split_heads(dense(h, p["attn"]["v_proj"]))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores.astype(jnp.float32), -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        x = x + dense(attn, p["attn"]["o_proj"])
        h = _rms_norm(x, p["mlp_norm"])
        return x + dense(jax.nn.gelu(dense(h, p["mlp"]["up_proj"])), p["mlp"]["down_proj"])

    def apply(self, params: dict[str, Any], ids: jax.Array, *, scan: bool = True) -> jax.Array:
        """Logits for ``ids`` [B, T] (causal self-attention, MLP, tied head)."""
        c = self.config
        params = resolve_shared(params)
        t = ids.shape[1]
        if t > c.max_len:
            raise ValueError(f"sequence length {t} exceeds TinyConfig.max_len={c.max_len}")
        x = jnp.take(params["embed"], ids, axis=0) + params["pos"][:t]
        x = run_layers(self._layer, x, params["layers"], c.n_layers, scan=scan, remat="full" if c.remat else "none")
        return dense(_rms_norm(x, params["final_norm"]), params["lm_head"])


def lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
