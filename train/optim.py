"""The run's Optax chain: schedule, clipping, base optimizer, weight-decay mask, the variant's pieces.

    clip_by_global_norm -> [LoRA-FA projection] -> base (AdamW/Adam/SGD/Lion; LoRA+ per group)
                        -> [SoRA proximal step] ; AdaLoRA's allocator wraps the whole base

Learning-rate schedule: linear warmup to ``lr``, then constant, linear or cosine decay to
``min_lr_ratio * lr`` at ``train.steps`` (counted in optimizer steps). Weight decay never
touches biases, norm scales, DoRA magnitudes or gates (1-D leaves).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

import lorax_variants as lv
from lorax_variants.optim import adalora_allocator, lorafa_projection, loraplus, sora_proximal
from lorax_variants.optim.loraplus import loraplus_labels
from train.config import Config

__all__ = ["schedule", "build_optimizer", "lr_groups"]


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


def build_optimizer(cfg: Config, trainable: Any, adapted: Any, stacked: str | None) -> optax.GradientTransformation:
    """The chain for ``cfg.adapter.variant`` over the ``trainable`` tree (``adapted``: the whole tree)."""
    o, variant, lr = cfg.optim, cfg.adapter.variant, schedule(cfg)
    make = _base(cfg)
    parts: list[optax.GradientTransformation] = []
    if o.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(o.clip_norm))
    if variant == "lora_fa" and not isinstance(jax.tree.leaves(adapted)[0], jax.ShapeDtypeStruct):
        parts.append(lorafa_projection(adapted))  # (stateless: a plan of abstract trees leaves it out)
    if variant == "loraplus":
        base = loraplus(lambda learning_rate, **kw: make(learning_rate, **kw), lr, trainable, ratio=o.loraplus_ratio,
                        lr_embedding=o.loraplus_lr_embedding, weight_decay=o.weight_decay, stacked=stacked)
    else:
        base = make(lr, o.weight_decay, _decay_mask(trainable) if o.weight_decay else None)
    if variant == "adalora":
        base = adalora_allocator(base, target_r=o.adalora_target_r, total_step=cfg.train.steps,
                                 tinit=o.adalora_tinit, tfinal=o.adalora_tfinal, delta_t=o.adalora_delta_t,
                                 beta1=o.adalora_beta1, beta2=o.adalora_beta2)
    parts.append(base)
    if variant == "sora":
        parts.append(sora_proximal(lambda step: o.sora_xi * lr(step) / o.lr))
    return optax.chain(*parts)


def lr_groups(cfg: Config, trainable: Any, stacked: str | None) -> dict[str, Callable[[int], float]]:
    """Learning rate of each parameter group at a step (for logs and plots)."""
    lr = schedule(cfg)
    if cfg.adapter.variant != "loraplus":
        return {"lr": lr}
    labels = {x for x in jax.tree.leaves(loraplus_labels(trainable, stacked=stacked))}
    out = {"lr": lr}
    if "B" in labels or "B_no_decay" in labels:
        out["lr_B"] = lambda s: cfg.optim.loraplus_ratio * lr(s)
    if "embedding" in labels:
        out["lr_embedding"] = lambda s: cfg.optim.loraplus_lr_embedding
    return out


def penalty(cfg: Config) -> Callable[[Any], Any] | None:
    """Extra loss terms of the variant (AdaLoRA's orthogonal regularizer)."""
    if cfg.adapter.variant == "adalora" and cfg.optim.adalora_orth_reg:
        return lambda tree: cfg.optim.adalora_orth_reg * lv.orthogonal_penalty(tree)
    return None
