"""LoRA+ (arXiv 2402.12354): B learns ``ratio`` times faster than A.

    η_B = ratio · η_A   (ratio 16 by default, as the paper);   η_embedding = lr_embedding

Trainable leaves are grouped exactly as PEFT's ``create_loraplus_optimizer``:

- ``embedding``: A and B of an adapter on an embedding table (``embeddings`` regex) -> lr_embedding
  (an embedding's DoRA magnitude goes to ``B``, as in PEFT)
- ``B``: ``lora_b`` leaves and every other leaf that is 1-D per layer (biases, norm scales, DoRA's
  magnitude, gates, ...) -> ratio · lr, with weight decay
- ``B_no_decay``: those of them PEFT exempts from decay (biases, LayerNorm weights: ``no_decay``)
- ``A``: the rest (``lora_a``, trained 2-D heads) -> lr

Works with any Optax optimizer factory (``optax.adamw``, ...) and learning-rate schedules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from lorax_variants.optim.labels import label_tree
from lorax_variants.recipes import OptimContext, Recipe, register_recipe
from lorax_variants.tree import compile_patterns, matches

__all__ = ['loraplus', 'loraplus_labels', 'LoraPlus']


EMBEDDINGS = r"(.*/)?(embed|embed_tokens|wte|word_embeddings|token_type|pos)(/.*)?"
NO_DECAY = r".*(bias|_scale)"  # biases and LayerNorm scales (our LayerNorm leaves end in _scale)


def loraplus_labels(tree: Any, *, stacked: str | None = None, embeddings: str = EMBEDDINGS,
                    no_decay: str = NO_DECAY) -> Any:
    """Optax labels for LoRA+ (arXiv 2402.12354): ``lora_a``, ``lora_b`` (its rate λ times A's), ``embedding_b``
    for B of embedding adapters, ``no_decay`` for the paths ``no_decay`` matches, ``other`` for the rest; use
    with ``optax.multi_transform``."""
    emb, nd = compile_patterns(embeddings), compile_patterns(no_decay)

    def label(path: str, field: str | None, ndim: int) -> str:
        node_path = path.rsplit("/", 1)[0] if field else path
        if field in ("lora_a", "lora_b") and matches(node_path, emb):
            return "embedding"
        if field == "lora_b" or ndim == 1:
            return "B_no_decay" if matches(path, nd) else "B"
        return "A"

    return label_tree(tree, label, stacked)


def loraplus(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: float | optax.Schedule,
    trainable: Any,
    *,
    ratio: float = 16.0,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
    stacked: str | None = None,
    embeddings: str = EMBEDDINGS,
    no_decay: str = NO_DECAY,
    **kwargs: Any,
) -> optax.GradientTransformation:
    """``optimizer(learning_rate=..., **kwargs)`` per LoRA+ group, as one transformation.

    ``optimizer`` is an Optax factory taking ``learning_rate`` (and ``weight_decay`` when it is
    non-zero, e.g. ``optax.adamw``). ``trainable`` is the trainable tree (its labels are fixed).
    """
    if ratio <= 0:
        raise ValueError(f"LoRA+ ratio must be positive, got {ratio}")
    scaled = (lambda step: ratio * learning_rate(step)) if callable(learning_rate) else ratio * learning_rate

    def make(lr: Any, decay: float) -> optax.GradientTransformation:
        return optimizer(learning_rate=lr, **({"weight_decay": decay} if weight_decay else {}), **kwargs)

    groups = {
        "A": make(learning_rate, weight_decay),
        "embedding": make(lr_embedding, weight_decay),
        "B": make(scaled, weight_decay),
        "B_no_decay": make(scaled, 0.0),
    }
    labels = loraplus_labels(trainable, stacked=stacked, embeddings=embeddings, no_decay=no_decay)
    return optax.multi_transform(groups, labels)


@dataclasses.dataclass(frozen=True)
class LoraPlus:
    """LoRA+ (arXiv 2402.12354): B learns at ``ratio`` times A's rate; embedding adapters' B at ``lr_embedding``."""

    ratio: float = 16.0
    lr_embedding: float = 1e-6


def _loraplus(s: LoraPlus, ctx: OptimContext) -> optax.GradientTransformation:
    return loraplus(lambda learning_rate, **kw: ctx.make(learning_rate, **kw), ctx.lr, ctx.trainable, ratio=s.ratio,
                    lr_embedding=s.lr_embedding, weight_decay=ctx.weight_decay, stacked=ctx.stacked)


def _loraplus_groups(s: LoraPlus, ctx: OptimContext) -> dict[str, Callable[[int], float]]:
    labels = set(jax.tree.leaves(loraplus_labels(ctx.trainable, stacked=ctx.stacked)))
    out = {"lr": ctx.lr}
    if "B" in labels or "B_no_decay" in labels:
        out["lr_B"] = lambda step: s.ratio * ctx.lr(step)
    if "embedding" in labels:
        out["lr_embedding"] = lambda step: s.lr_embedding
    return out


register_recipe(Recipe("loraplus", "lora", LoraPlus, optimizer=_loraplus, lr_groups=_loraplus_groups, lora_shaped=True))
