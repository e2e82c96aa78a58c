"""The run's Optax chain: schedule, clipping, base optimizer, weight-decay mask; the variant's recipe
(``lorax_variants.recipes``) builds its chain around the base (LoRA-FA's projection, LoRA+'s groups,
AdaLoRA's allocator, SoRA's proximal step).

Learning-rate schedule: linear warmup to ``lr``, then constant, linear or cosine decay to
``min_lr_ratio * lr`` at ``train.steps`` (counted in optimizer steps). Weight decay never
touches biases, norm scales, DoRA magnitudes or gates (1-D leaves).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from lorax_variants import recipes
from train.config import Config

__all__ = ["schedule", "build_optimizer", "lr_groups", "penalty", "context"]


def schedule(cfg: Config) -> optax.Schedule:
    o, steps = cfg.optim, cfg.train.steps
    end = o.lr * o.min_lr_ratio
    decay_steps = max(1, steps - o.warmup_steps)
    if o.schedule == "cosine":
        after = optax.cosine_decay_schedule(o.lr, decay_steps, alpha=o.min_lr_ratio)
    elif o.schedule == "linear":
        after = optax.linear_schedule(o.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(o.lr)
    if o.warmup_steps == 0:
        return after
    warm = optax.linear_schedule(o.lr / max(1, o.warmup_steps), o.lr, o.warmup_steps - 1) if o.warmup_steps > 1 \
        else optax.constant_schedule(o.lr)
    return optax.join_schedules([warm, after], [o.warmup_steps])


def _decay_mask(trainable: Any) -> Any:
    return jax.tree.map(lambda x: x is not None and getattr(x, "ndim", 0) >= 2, trainable)


def _base(cfg: Config) -> Callable[..., optax.GradientTransformation]:
    o = cfg.optim
    if o.name == "adamw":
        return lambda learning_rate, weight_decay=0.0, mask=None: optax.adamw(
            learning_rate, o.b1, o.b2, o.eps, weight_decay=weight_decay, mask=mask)
    if o.name == "adam":
        return lambda learning_rate, weight_decay=0.0, mask=None: optax.adam(learning_rate, o.b1, o.b2, o.eps)
    if o.name == "lion":
        return lambda learning_rate, weight_decay=0.0, mask=None: optax.lion(
            learning_rate, o.b1, o.b2, weight_decay=weight_decay, mask=mask)
    return lambda learning_rate, weight_decay=0.0, mask=None: optax.sgd(learning_rate, momentum=o.b1 or None)


def context(cfg: Config, trainable: Any, adapted: Any, stacked: str | None) -> recipes.OptimContext:
    """What the variant's recipe builds its chain on: the base optimizer, the schedule, the trees."""
    o = cfg.optim
    return recipes.OptimContext(make=_base(cfg), lr=schedule(cfg), base_lr=o.lr, weight_decay=o.weight_decay,
                                decay_mask=_decay_mask(trainable), trainable=trainable, adapted=adapted,
                                stacked=stacked, total_steps=cfg.train.steps)


def build_optimizer(cfg: Config, trainable: Any, adapted: Any, stacked: str | None) -> optax.GradientTransformation:
    """Clipping (the recipe's: per adapter for many adapters), then the variant's chain (its recipe's ``optimizer``) over the ``trainable`` tree (``adapted``:
    the whole tree)."""
    variant = recipes.recipe(cfg.adapter.variant)
    chain = variant.optimizer(cfg.adapter.settings(), context(cfg, trainable, adapted, stacked))
    if cfg.optim.clip_norm is None:
        return chain
    return optax.chain(variant.clip(cfg.optim.clip_norm), chain)


def lr_groups(cfg: Config, trainable: Any, stacked: str | None) -> dict[str, Callable[[int], float]]:
    """Learning rate of each parameter group at a step (for logs and plots)."""
    ctx = context(cfg, trainable, trainable, stacked)
    return recipes.recipe(cfg.adapter.variant).lr_groups(cfg.adapter.settings(), ctx)


def penalty(cfg: Config) -> Callable[[Any], Any] | None:
    """Extra loss terms of the variant (its recipe's ``penalty``: AdaLoRA's orthogonal regularizer)."""
    return recipes.recipe(cfg.adapter.variant).penalty(cfg.adapter.settings())
