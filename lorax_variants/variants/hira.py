"""HiRA, Hadamard high-rank adaptation (ICLR 2025, openreview.net/forum?id=TwJrTz9cRS; PEFT ``HiraConfig``).

    y = x W + drop(x) (W ⊙ (A B)),      W [in, out] frozen,  A [in, r],  B [r, out]

The update W ⊙ A B is the Hadamard product of the frozen weight with a rank-r product, so its rank is up to
rank(W)·r, not r. No alpha/r scale (PEFT has none; ``AdapterSpec.alpha`` is not used). Init as PEFT's: A
Kaiming-uniform (or Gaussian with std 1/r, ``init="gaussian"``), B = 0, so the adapted layer starts as W.
Over a quantized base the product is taken with the dequantized weight, as PEFT's bitsandbytes layer does.

Not factored: x (W ⊙ A B) = Σ_k ((x ⊙ a_k) W) ⊙ b_k would cost r matmuls with W per token, so the forward
forms the W-sized product W ⊙ (A B) once per call (in·out·r multiply-adds, one [in, out] temporary per layer;
its gradient is another), as PEFT does. ``merge`` is W ⊙ (1 + A B). It does not reduce to LoRA.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.codec import Key, PeftCodec, register_codec
from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, lora_factors, register_variant, rewrites_base

__all__ = ["HiraNode"]


@node
class HiraNode(AdapterNode):
    """HiRA over ``weight``: ``W + W ⊙ (A B)`` with ``hira_a`` [..., in, r] and ``hira_b`` [..., r, out]."""

    variant: ClassVar[str] = "hira"

    weight: Any = frozen()
    hira_a: jax.Array = param()
    hira_b: jax.Array = param()
    dropout_key: jax.Array | None = frozen(default=None)
    dropout: float = static(default=0.0)
    freeze: tuple[str, ...] = static(default=())

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """``W ⊙ (A B)`` (the [in, out] update)."""
        w = weight_of(self.weight).astype(dtype)
        return w * jnp.matmul(self.hira_a.astype(dtype), self.hira_b.astype(dtype))

    def apply(self, x: jax.Array) -> jax.Array:
        """x W + drop(x) (W ⊙ A B)."""
        y = dense(x, self.weight)
        xd = adapter_dropout(x, self.dropout, self.dropout_key)
        return y + jnp.matmul(xd, self.delta(x.dtype))

    def merge(self) -> jax.Array:
        """W ⊙ (1 + A B)."""
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)


@register_variant("hira", factored=False)
def build_hira(t: Target) -> HiraNode:
    if rewrites_base(t.spec):
        raise ValueError(f"{t.path}: HiRA starts from B = 0 (init kaiming or gaussian), not {t.spec.init}")
    weight, a, b = lora_factors(t)
    return HiraNode(weight=weight, hira_a=a, hira_b=b, dropout=t.spec.dropout)


register_recipe(Recipe("hira", "hira"))


def _peft_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    if cfg.get("rank_pattern"):
        raise ValueError("rank_pattern: per-module HiRA ranks are not read (one rank per adapter)")
    init = cfg.get("init_weights", True)
    if init not in (True, False, "gaussian", None):
        raise ValueError(f"init_weights: unknown HiRA initialization {init!r}")
    return {"variant": "hira", "r": int(cfg.get("r", 32)), "dropout": float(cfg.get("hira_dropout") or 0.0),
            "init": "gaussian" if init == "gaussian" else "kaiming"}


# PEFT ``HiraConfig``: per module ``hira_A`` [r, in] and ``hira_B`` [out, r] (ours transposed).
PEFT = register_codec(PeftCodec(
    "HIRA", HiraNode, (Key.plain("hira_A", "hira_a"), Key.plain("hira_B", "hira_b")),
    config=lambda n: {"r": int(n.hira_a.shape[-1]), "hira_dropout": float(n.dropout), "init_weights": True,
                      "rank_pattern": {}, "exclude_modules": None, "layers_to_transform": None,
                      "layers_pattern": None},
    spec=_peft_spec,
    reads=frozenset({"r", "hira_dropout", "init_weights", "rank_pattern", "fan_in_fan_out", "exclude_modules",
                     "layers_to_transform", "layers_pattern"})))
