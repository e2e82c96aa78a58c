"""QA-LoRA, quantization-aware low-rank adaptation (arXiv 2309.14717).

The adapter reads the input pooled over groups of L consecutive input features, the groups of the
frozen weight's int4 quantization, so that its update is constant over each quantization group and
folds into the groups' zero points after training: the merged model stays int4.

    y = x Ŵ + s · (pool(x) A) B,      pool(x)_g = G · mean of x over group g
    (G = in / L groups; the factor G is PEFT's ``use_qalora`` convention, so adapters are interchangeable)
    A [..., G, r],  B [..., r, out]

Equivalently ΔW[i, o] = s · (G / L) · (A B)[g(i), o]: every row of a group gets the same value. With an
int4 weight stored as ŵ = q · step + zero per (group, output) block (``quant`` kind ``int4_asym``), the
merge adds that value to each block's zero point (``merge_quantized``): codes and steps are untouched,
so the merged tree is int4 with the same bytes and its forward equals the training forward.

``as_lora`` expands A to ``[in, r]`` (each group's row repeated, times G / L): a plain LoRA of the same
function, which is what a PEFT export writes (PEFT's own QA-LoRA runs only over GPTQ layers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from lorax_variants.nodes.base import AdapterNode, dense, frozen, node, param, static, weight_of
from lorax_variants.nodes.factored import adapter_dropout, low_rank
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.recipes import Recipe, register_recipe
from lorax_variants.registry import Target, factor_init, register_variant, settings_of
from lorax_variants.spec import register_settings
from lorax_variants.variants.lora import LoraNode

__all__ = ['QaLoraNode', 'group_pool', 'QaLora']


def group_pool(x: jax.Array, group: int) -> jax.Array:
    """``x [..., in] -> [..., in / group]``: each group's mean times the number of groups (PEFT's QA-LoRA)."""
    groups = x.shape[-1] // group
    return jnp.mean(x.reshape(x.shape[:-1] + (groups, group)), axis=-1) * jnp.asarray(groups, x.dtype)


@node
class QaLoraNode(AdapterNode):
    """``Ŵ + s·E A B`` where E [in, G] spreads each pooled group over its rows: A [..., G, r], B [..., r, out]."""

    variant: ClassVar[str] = "qalora"

    weight: Any = frozen()
    lora_a: jax.Array = param()
    lora_b: jax.Array = param()
    dropout_key: jax.Array | None = frozen(default=None)
    scale: float = static()
    group_size: int = static()
    dropout: float = static(default=0.0)

    reduces_to_lora: ClassVar[bool] = True

    @property
    def rank(self) -> int:
        return self.lora_a.shape[-1]

    @property
    def groups(self) -> int:
        return self.shape[-2] // self.group_size

    def apply(self, x: jax.Array) -> jax.Array:
        """x Ŵ + s·(pool(dropout(x)) A) B (arXiv 2309.14717, eq. 2 with PEFT's pooling scale)."""
        y = dense(x, self.weight)
        pooled = group_pool(adapter_dropout(x, self.dropout, self.dropout_key), self.group_size)
        return y + low_rank(pooled, self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype), float(self.scale))

    def group_delta(self) -> jax.Array:
        """``[..., G, out]`` float32: the value ΔW takes on every row of each group, s·(G/L)·A B."""
        ab = jnp.matmul(self.lora_a.astype(jnp.float32), self.lora_b.astype(jnp.float32))
        return ab * (self.scale * self.groups / self.group_size)

    def delta(self) -> jax.Array:
        """ΔW ``[..., in, out]`` float32 (each group's row repeated over its L input rows)."""
        return jnp.repeat(self.group_delta(), self.group_size, axis=-2)

    def merge(self) -> jax.Array:
        """Ŵ + ΔW as a dense weight (the dequantized base plus the repeated group rows)."""
        w = weight_of(self.weight)
        return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

    def merge_quantized(self, path: str = "weight") -> QuantizedNode:
        """The base's int4 node with ΔW folded into its zero points: same codes and steps, and
        ``apply`` equal to this node's (up to float rounding). Needs a ``int4_asym`` base whose
        quantization blocks divide the QA-LoRA groups."""
        w = self.weight
        if not isinstance(w, QuantizedNode) or w.zeros is None:
            what = f"a {w.kind} quantized weight" if isinstance(w, QuantizedNode) else "an unquantized weight"
            raise ValueError(f"{path}: QA-LoRA folds into zero points, but its base is {what}; quantize with "
                             "QuantSpec(kind='int4_asym') to keep the merged model int4, or use merge() for a dense one")
        if self.group_size % w.block_size:
            raise ValueError(f"{path}: QA-LoRA group_size {self.group_size} is not a multiple of the quantization "
                             f"block_size {w.block_size}, so its update is not constant over each block")
        per_block = jnp.repeat(self.group_delta(), self.group_size // w.block_size, axis=-2)
        return w.replace(zeros=(w.zeros.astype(jnp.float32) + per_block).astype(w.zeros.dtype))

    def as_lora(self) -> LoraNode:
        """The same function as a ``LoraNode``: A expanded to ``[..., in, r]`` (group rows repeated, times G/L)."""
        a = jnp.repeat(self.lora_a, self.group_size, axis=-2) * jnp.asarray(self.groups / self.group_size,
                                                                             self.lora_a.dtype)
        return LoraNode(weight=self.weight, lora_a=a, lora_b=self.lora_b, dropout_key=self.dropout_key,
                        scale=self.scale, dropout=self.dropout)


@register_variant("qalora")
def build_qalora(t: Target) -> QaLoraNode:
    w = t.weight
    group = settings_of(t.spec).group_size or (w.block_size if isinstance(w, QuantizedNode) else None)
    if group is None:
        raise ValueError(f"{t.path}: QA-LoRA pools the input in the quantization groups; quantize the weight "
                         "first (QuantSpec) or set settings=QaLora(group_size=...) (adapter.qalora.group_size)")
    if t.d_in % group:
        raise ValueError(f"{t.path}: input dimension {t.d_in} is not a multiple of the QA-LoRA group size {group}")
    if isinstance(w, QuantizedNode) and group % w.block_size:
        raise ValueError(f"{t.path}: QA-LoRA group_size {group} is not a multiple of the weight's quantization "
                         f"block_size {w.block_size}; QA-LoRA's update could not fold into the quantized weight")
    how = factor_init(t.spec.init)
    if how.draw_a is None:
        raise ValueError(f"{t.path}: QA-LoRA starts from a random A and a zero B (a random init: kaiming or gaussian), "
                         f"not {t.spec.init!r}")
    dtype = jnp.dtype(t.spec.dtype)
    groups = t.d_in // group
    a = how.draw_a(t.key, t.lead + (groups, t.r), dtype)
    b = jnp.zeros(t.lead + (t.r, t.d_out), dtype)
    return QaLoraNode(weight=w, lora_a=a, lora_b=b, scale=t.scale, group_size=group, dropout=t.spec.dropout)


@dataclasses.dataclass(frozen=True)
class QaLora:
    """QA-LoRA (arXiv 2309.14717): the adapter reads the input pooled over ``group_size`` features (default: the
    quantization block size, ``quant.block_size``), so it folds into an ``int4_asym`` base's zero points."""

    group_size: int | None = None

    def __post_init__(self) -> None:
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"QaLora.group_size must be a positive integer or None, got {g!r}")


register_settings("qalora", QaLora)
register_recipe(Recipe("qalora", "qalora", QaLora, spec=lambda s: {"settings": s}))
