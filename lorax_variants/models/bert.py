"""BERT (arXiv 1810.04805) and RoBERTa (arXiv 1907.11692) encoders with transformers' heads.

    x₀ = LN(E_tok[ids] + E_pos[pos] + E_type[type])
    h = LN(x + out(Attn(query(x), key(x), value(x))))      x' = LN(h + output(act(intermediate(h))))

Post-norm, bidirectional attention with a padding mask. RoBERTa differs in its positions:
``padding_idx + cumsum(ids != pad)`` for real tokens and ``padding_idx`` for padding.

Tasks (``task``): ``"base"`` returns hidden states; ``"masked_lm"`` adds transformers' MLM head
(dense → act → LN → decoder tied to the token embedding + bias); ``"sequence_classification"``
adds BERT's pooler (dense + tanh on the first token) and classifier, or RoBERTa's classifier
(dense + tanh + out_proj on the first token). Head leaves live under ``head/`` so they can be
trained (``split(tree, extra=r"head/.*")``) or adapted like any other weight.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from lorax_variants.models.zoo import ZooModel
from lorax_variants.models.layers import activation, layer_norm, project, run_layers, self_attention
from lorax_variants.shared import resolve_shared
from lorax_variants.nodes.base import dense_t, embed

__all__ = ["BertConfig", "Bert", "TASKS"]

TASKS = ("base", "masked_lm", "sequence_classification")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """A BERT encoder's shapes and options, as transformers' ``BertConfig`` names them."""

    model_type: str  # bert | roberta
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    pad_token_id: int
    num_labels: int
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, hf: Any) -> "BertConfig":
        kind = getattr(hf, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise ValueError(f"{hf.model_type} config: position_embedding_type {kind!r} is not supported (only 'absolute')")
        if getattr(hf, "is_decoder", False) or getattr(hf, "add_cross_attention", False):
            raise ValueError(f"{hf.model_type} config: decoder/cross-attention BERT is not supported")
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            intermediate_size=hf.intermediate_size,
            hidden_act=hf.hidden_act,
            max_position_embeddings=hf.max_position_embeddings,
            type_vocab_size=hf.type_vocab_size,
            layer_norm_eps=float(hf.layer_norm_eps),
            pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
            num_labels=hf.num_labels,
            initializer_range=float(getattr(hf, "initializer_range", 0.02)),
        )


class Bert(ZooModel):
    """``apply(params, input_ids, attention_mask=None, token_type_ids=None)`` -> hidden or logits."""

    causal = False

    def __init__(self, config: BertConfig, *, task: str = "base", remat: str = "none", scan: bool = True):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} for {config.model_type}; choose from {TASKS}")
        activation(config.hidden_act)
        self.config, self.task, self.remat, self.scan = config, task, remat, scan

    @property
    def roberta(self) -> bool:
        return self.config.model_type == "roberta"

    def shapes(self) -> dict[str, Any]:
        """Every parameter's shape and kind (stacked layers first), the tree ``init`` fills."""
        c = self.config
        L, d, f = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        attn = {n: (L, d, d) for n in ("query", "key", "value", "out")} | {f"{n}_bias": (L, d) for n in ("query", "key", "value", "out")}
        shapes: dict[str, Any] = {
            "embed": (c.vocab_size, d),
            "pos": (c.max_position_embeddings, d),
            "token_type": (c.type_vocab_size, d),
            "embed_norm_scale": (d,),
            "embed_norm_bias": (d,),
            "layers": {
                "attn": attn,
                "attn_norm_scale": (L, d), "attn_norm_bias": (L, d),
                "mlp": {"intermediate": (L, d, f), "intermediate_bias": (L, f), "output": (L, f, d), "output_bias": (L, d)},
                "mlp_norm_scale": (L, d), "mlp_norm_bias": (L, d),
            },
        }
        if self.task == "masked_lm":
            shapes["head"] = {
                "transform": (d, d), "transform_bias": (d,), "norm_scale": (d,), "norm_bias": (d,), "bias": (c.vocab_size,),
            }
        elif self.task == "sequence_classification":
            first = "dense" if self.roberta else "pooler"
            last = "out_proj" if self.roberta else "classifier"
            shapes["head"] = {first: (d, d), f"{first}_bias": (d,), last: (d, c.num_labels), f"{last}_bias": (c.num_labels,)}
        return shapes


    def _layer(self, x: jax.Array, p: Any, mask: jax.Array | None) -> jax.Array:
        c = self.config
        b, t, d = x.shape
        hd = d // c.num_attention_heads
        heads = lambda y: y.reshape(b, t, c.num_attention_heads, hd)  # noqa: E731
        a = p["attn"]
        o = self_attention(heads(project(x, a, "query")), heads(project(x, a, "key")), heads(project(x, a, "value")),
                           scale=1 / math.sqrt(hd), causal=False, key_valid=mask, impl=self.attention_impl,
                           right_padded=self.right_padded)
        x = layer_norm(x + project(o, a, "out"), p["attn_norm_scale"], p["attn_norm_bias"], c.layer_norm_eps)
        h = activation(c.hidden_act)(project(x, p["mlp"], "intermediate"))
        return layer_norm(x + project(h, p["mlp"], "output"), p["mlp_norm_scale"], p["mlp_norm_bias"], c.layer_norm_eps)

    def positions(self, input_ids: jax.Array) -> jax.Array:
        """Position ids: 0, 1, ... for BERT; RoBERTa's: pad_token_id plus the running count of real tokens
        (pad_token_id itself at padding)."""
        b, t = input_ids.shape
        if self.roberta:
            real = (input_ids != self.config.pad_token_id).astype(jnp.int32)
            return jnp.cumsum(real, axis=1) * real + self.config.pad_token_id
        return jnp.broadcast_to(jnp.arange(t), (b, t))

    def hidden(
        self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Last hidden states [B, T, d] of the encoder (post-LN blocks, bidirectional attention over real
        tokens)."""
        params = resolve_shared(params)
        c = self.config
        b, t = input_ids.shape
        if position_ids is None:
            position_ids = self.positions(input_ids)
        longest = t + (c.pad_token_id + 1 if self.roberta else 0)
        if longest > c.max_position_embeddings:
            raise ValueError(f"sequence length {t} too long for {c.model_type} config "
                             f"max_position_embeddings={c.max_position_embeddings}")
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        x = embed(input_ids, params["embed"]) + embed(position_ids, params["pos"]) + embed(token_type_ids, params["token_type"])
        x = layer_norm(x, params["embed_norm_scale"], params["embed_norm_bias"], c.layer_norm_eps)
        layer = lambda h, p: self._layer(h, p, attention_mask)  # noqa: E731
        return run_layers(layer, x, params["layers"], c.num_hidden_layers, scan=self.scan, remat=self.remat)

    def apply(
        self, params: dict[str, Any], input_ids: jax.Array, attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Encoder outputs for ``input_ids`` [B, T]: the task head's output (classification logits [B, labels],
        masked-LM logits) or the last hidden states."""
        params = resolve_shared(params)
        x = self.hidden(params, input_ids, attention_mask, token_type_ids, position_ids)
        c, head = self.config, params.get("head")
        if self.task == "masked_lm":
            act = activation("gelu" if self.roberta else c.hidden_act)
            h = act(project(x, head, "transform"))
            h = layer_norm(h, head["norm_scale"], head["norm_bias"], c.layer_norm_eps)
            return dense_t(h, params["embed"]) + head["bias"].astype(h.dtype)
        if self.task == "sequence_classification":
            first, last = ("dense", "out_proj") if self.roberta else ("pooler", "classifier")
            pooled = jnp.tanh(project(x[:, 0], head, first))
            return project(pooled, head, last)
        return x

