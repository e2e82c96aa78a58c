"""The jitted train and eval steps, with explicit shardings over the mesh.

    loss = Σ_tokens CE / #tokens over the whole global batch (micro-batches accumulated as sums,
    so accumulation and the number of hosts do not change the loss or the gradient)

With a preference objective (``dpo``, ``ipo``, ``simpo``: ``lorax_variants.objectives``) a batch holds pairs
``[..., 2, T]`` (chosen, rejected) and the loss is the mean over the global batch's pairs of the pair losses;
the summed completion log-probabilities come from the same chunked cross-entropy as SFT's, and the reference
(``reference: base``) is the same tree with its adapters off, in the same jitted step.

Adapter leaves and optimizer state stay float32; the forward casts them (and the frozen
weights) to ``compute_dtype``, so gradients arrive in float32 through the cast. A step whose loss
or gradients are not finite leaves every state untouched and says so in its metrics.
Frozen weights are a jit argument (never a closure: XLA would fold them in as constants).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import lorax_variants as lv
from lorax_variants import objectives, recipes
from lorax_variants.models.loss import token_cross_entropy
from lorax_variants.nodes.base import Node
from lorax_variants.nodes.quantized import QuantizedNode
from lorax_variants.sharding import BATCH

__all__ = ["cast_tree", "task_loss", "lm_rows", "next_token_ce", "StepFns", "make_steps"]


def cast_tree(tree: Any, dtype: Any) -> Any:
    """Floating leaves as ``dtype``; quantized weights stay as stored (they dequantize to the input's dtype)."""
    dtype = jnp.dtype(dtype)

    def one(x: Any) -> Any:
        if isinstance(x, QuantizedNode):
            return x
        if isinstance(x, Node):
            return jax.tree.map(one, x, is_leaf=lambda y: isinstance(y, QuantizedNode))
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
            return x.astype(dtype)
        return x

    return jax.tree.map(one, tree, is_leaf=lambda y: isinstance(y, Node))


def task_loss(task: str, logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row: ``(sum of token/example losses, count, correct)`` in float32, each ``[batch]``."""
    logits = logits.astype(jnp.float32)
    if task == "sequence_classification":
        labels = batch["labels"]
        valid = (labels >= 0).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        correct = (jnp.argmax(logits, -1) == labels) * valid
        return ce * valid, valid, correct
    targets = batch["input_ids"][:, 1:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    return lm_rows(ce, jnp.argmax(logits[:, :-1], -1) == targets, batch)


def lm_rows(ce: jax.Array, correct: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row sums of next-token ``ce``/``correct`` [B, T-1] over the tokens the loss mask keeps."""
    mask = _lm_mask(batch)
    return jnp.sum(ce * mask, -1), jnp.sum(mask, -1), jnp.sum(correct * mask, -1)


def _lm_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """Which next-token predictions count: kept by the loss mask and not padding ([..., T-1], float32)."""
    mask = batch["loss_mask"][..., 1:] * batch["attention_mask"][..., 1:]
    if "segment_ids" in batch:  # packed rows: a target in the next document is not predicted from this one
        mask = mask * (batch["segment_ids"][..., 1:] == batch["segment_ids"][..., :-1])
    return mask.astype(jnp.float32)


def next_token_ce(model: Any, params: Any, batch: dict[str, jax.Array], chunk: int) -> tuple[jax.Array, jax.Array]:
    """Per next token ``(cross-entropy, argmax == target)`` [B, T-1] of a causal LM's rows (packed rows: their
    ``segment_ids``), through the chunked loss. With context parallelism (``model.context``) the hidden states
    stay in the devices' order and sharded: the targets are put in that order instead, and only the per-token
    results [B, T] come back to sequence order."""
    ids = batch["input_ids"]
    packed = {"segment_ids": batch["segment_ids"]} if "segment_ids" in batch else {}
    cp = getattr(model, "context", None)
    if cp is None:
        h = model.hidden(params, ids, batch["attention_mask"], **packed)
        return token_cross_entropy(model, params, h[:, :-1], ids[:, 1:], chunk=chunk)
    order = cp.order(ids.shape[1])
    h = model.hidden(params, ids, batch["attention_mask"], device_order=True, **packed)
    targets = jnp.concatenate([ids[:, 1:], ids[:, :1]], axis=1)[:, order]  # the last one predicts nothing: dropped
    ce, correct = token_cross_entropy(model, params, h, targets, chunk=chunk, splits=cp.size)
    back = np.argsort(order)[:-1]
    return ce[:, back], correct[:, back]


@dataclasses.dataclass
class StepFns:
    # (trainable, frozen, opt_state, batch, step, key) -> (trainable, frozen or None when unchanged, opt_state, metrics)
    train: Callable[..., Any]
    eval: Callable[..., Any]  # (trainable, frozen, batch) -> metrics sums
    batch_sharding: Callable[[int], NamedSharding]
    loss: Callable[..., Any] | None = None  # (adapted tree, batch [rows, ...]) -> the batch's mean loss, no dropout
    pair_logps: Callable[..., Any] | None = None  # (trainable, frozen, pairs [rows, 2, T]) -> summed logps [rows, 2]


def pair_rows(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Pairs ``[B, 2, T]`` as rows ``[2B, T]``: the chosen rows, then the rejected (``preference_loss``'s order);
    ``task_ids`` repeated, ``ref_logps`` ``[B, 2]`` laid out the same way."""
    out = {k: jnp.concatenate([batch[k][:, 0], batch[k][:, 1]], 0)
           for k in ("input_ids", "attention_mask", "loss_mask", "ref_logps") if k in batch}
    if "task_ids" in batch:
        out["task_ids"] = jnp.concatenate([batch["task_ids"], batch["task_ids"]], 0)
    return out


def make_steps(
    model: Any, task: str, optimizer: optax.GradientTransformation, *, mesh: Any, trainable_sh: Any, frozen_sh: Any,
    opt_sh: Any, compute_dtype: str = "float32", dropout: bool = False, variant: recipes.Recipe | None = None,
    settings: Any = None, n_tasks: int = 1, loss_chunk: int = 2048, objective: str = "sft",
    objective_settings: Any = None,
) -> StepFns:
    """Jitted steps. Batches come as ``[accum, micro, ...]`` arrays (micro over data x fsdp). ``variant``: the
    recipe whose hooks the step calls (its penalty, the tree a training forward sees, the frozen leaves after an
    update) with its ``settings``. ``objective``: ``sft`` or a preference objective with its settings
    (``lorax_variants.objectives.Dpo``, ...)."""
    grpo = objective == "grpo"
    pairs = objective not in ("sft", "grpo")
    variant = variant or recipes.recipe("lora")
    penalty = variant.penalty(settings)
    if variant.route_mean and penalty is not None:
        raise ValueError(f"recipe {variant.name!r}: a per-route mean loss with a penalty term is not supported")

    def forward(trainable: Any, frozen: Any, batch: dict[str, jax.Array], key: jax.Array | None, train: bool):
        tree = lv.combine(cast_tree(trainable, compute_dtype), cast_tree(frozen, compute_dtype))
        if train and dropout:
            tree = lv.with_dropout(tree, jax.random.fold_in(key, 1))
        if train and variant.train_tree is not None:
            tree = variant.train_tree(settings, tree, jax.random.fold_in(key, 2))
        if pairs:
            rows = preference_rows(tree, batch)
        elif grpo:
            rows = grpo_rows(tree, batch)
        else:
            if "task_ids" in batch:
                tree = lv.route(tree, batch["task_ids"])
            if task == "causal_lm":  # logits per chunk of tokens only (models.loss)
                rows = lm_rows(*next_token_ce(model, lv.resolve_shared(tree), batch, loss_chunk), batch)
            else:
                rows = task_loss(task, model.apply(tree, batch["input_ids"], batch["attention_mask"]), batch)
            rows = dict(zip(("loss_sum", "count", "correct"), rows))
        if not train:
            return rows
        sums = {k: jnp.sum(v) for k, v in rows.items()}
        extra = penalty(tree).astype(jnp.float32) * sums["count"] if penalty is not None else 0.0
        if "row_weight" in batch:  # each route's mean over its rows of the whole batch (already normalized)
            return jnp.sum(rows["loss_sum"] * batch["row_weight"]), sums
        return sums["loss_sum"] + extra, sums

    def logps(tree: Any, rows: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Summed log-probabilities of each row's completion (its loss mask) and its length."""
        if "task_ids" in rows:
            tree = lv.route(tree, rows["task_ids"])
        mask = _lm_mask(rows)
        return jnp.sum(token_logps(tree, rows) * mask, -1), jnp.sum(mask, -1)

    def token_logps(tree: Any, batch: dict[str, jax.Array]) -> jax.Array:
        """log π of every next token [B, T-1] (the chunked cross-entropy's negative)."""
        return -next_token_ce(model, lv.resolve_shared(tree), batch, loss_chunk)[0]

    def grpo_rows(tree: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """This micro-batch's share of GRPO's loss over the whole generation batch (``share``: its rows' part of
        the batch's; ``num_items``: the batch's completion tokens), so that the micro-batches' sum is the loss
        of the whole batch for every ``loss_type``; and its share of the KL and clip metrics."""
        s = objective_settings
        logps = token_logps(tree, batch)
        mask = _lm_mask(batch)
        ref = jax.lax.stop_gradient(token_logps(lv.without_adapters(tree), batch)) if s.beta > 0 else None
        share, total = batch["share"][0], batch["num_items"][0]
        out = objectives.grpo_loss(logps, jax.lax.stop_gradient(logps), batch["advantages"], mask, ref_logps=ref,
                                   num_items=total, **s.loss_kwargs())
        weight = {"grpo": share, "dr_grpo": share, "bnpo": jnp.sum(mask) / jnp.maximum(total, 1.0), "dapo": 1.0}
        rows = {"loss_sum": out.loss * weight[s.loss_type], "count": share, "correct": jnp.float32(0.0),
                "tokens": jnp.sum(mask), "clip_ratio": out.metrics["clip_ratio/region_mean"] * share}
        if "kl" in out.metrics:
            rows["kl"] = out.metrics["kl"] * share
        return rows

    def preference_rows(tree: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per pair: the loss, whether it counts (padding pairs of an eval batch do not), whether the chosen
        completion's reward is the higher, the rewards, and the real tokens of the pair."""
        rows = pair_rows(batch)
        out = objectives.preference_loss(logps, tree, rows, **objective_settings.kwargs())
        b = batch["input_ids"].shape[0]
        valid = (jnp.sum(rows["loss_mask"][:b], -1) > 0).astype(jnp.float32)
        return {"loss_sum": out.losses * valid, "count": valid,
                "correct": (out.chosen_rewards > out.rejected_rewards) * valid,
                "rewards_chosen": out.chosen_rewards * valid, "rewards_rejected": out.rejected_rewards * valid,
                "tokens": jnp.sum(batch["attention_mask"], (-2, -1)).astype(jnp.float32) * valid}

    grad_fn = jax.grad(forward, has_aux=True)

    def train_step(trainable, frozen, opt_state, batch, step, key):
        key = jax.random.fold_in(key, step)

        def micro(carry, xs):
            mb, i = xs
            g, sums = grad_fn(trainable, frozen, mb, jax.random.fold_in(key, i), True)
            gsum, acc = carry
            return (jax.tree.map(jnp.add, gsum, g), jax.tree.map(jnp.add, acc, sums)), None

        per_route = variant.route_mean and "task_ids" in batch
        if per_route:
            batch = dict(batch, row_weight=_route_weights(batch))
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)
        n_micro = batch["input_ids"].shape[0]
        names = ("loss_sum", "count", "correct") + (("rewards_chosen", "rewards_rejected", "tokens") if pairs else ())
        if grpo:
            names += ("tokens", "clip_ratio") + (("kl",) if objective_settings.beta > 0 else ())
        init = (zeros, {k: jnp.float32(0) for k in names})
        (gsum, acc), _ = jax.lax.scan(micro, init, (batch, jnp.arange(n_micro)))
        total, count, correct = acc["loss_sum"], acc["count"], acc["correct"]
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / (1.0 if per_route else denom)).astype(p.dtype), gsum, trainable)
        updates, new_opt = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        new_frozen = frozen
        if variant.after_update is not None:
            new_frozen = variant.after_update(settings, frozen, trainable, new_trainable, step)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(total) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_trainable))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {"loss": total / denom, "grad_norm": grad_norm, "tokens": count, "accuracy": correct / denom,
                   "finite": ok,  # and where not: one bool per trainable leaf, gradient and updated value (for the log)
                   "finite_grads": _finite_norms(grads), "finite_params": _finite_norms(new_trainable)}
        if grpo:  # the generation batch's loss (count: the micro-batches' shares, summing to 1)
            del metrics["accuracy"]
            metrics |= {"tokens": acc["tokens"], "clip_ratio": acc["clip_ratio"]}
            if "kl" in acc:
                metrics["kl"] = acc["kl"]
        if pairs:  # TRL's preference metrics, over the batch's pairs
            del metrics["accuracy"]
            metrics |= {"tokens": acc["tokens"], "pairs": count, "preference_accuracy": correct / denom,
                        "rewards_chosen": acc["rewards_chosen"] / denom,
                        "rewards_rejected": acc["rewards_rejected"] / denom,
                        "rewards_margin": (acc["rewards_chosen"] - acc["rewards_rejected"]) / denom}
        # Frozen weights that no variant hook changes are not an output: XLA would copy every one of them into a
        # new buffer each step (an undonated input cannot be an output), doubling their memory during the step.
        out_frozen = keep(new_frozen, frozen) if variant.after_update is not None else None
        return keep(new_trainable, trainable), out_frozen, keep(new_opt, opt_state), metrics

    def _route_weights(batch):
        """``[accum, micro]``: 1 / (the loss count of the row's route over the whole batch), 0 for rows routed to
        none, so that Σ rows' loss × weight is the sum over routes of each one's mean (every adapter's gradient
        is the one it would get alone on its rows)."""
        if task == "sequence_classification":
            counts = (batch["labels"] >= 0).astype(jnp.float32)
        elif pairs:
            counts = (jnp.sum(batch["loss_mask"][:, :, 0], -1) > 0).astype(jnp.float32)
        else:
            counts = jnp.sum(_lm_mask(batch), -1)
        onehot = jax.nn.one_hot(batch["task_ids"], n_tasks, dtype=jnp.float32)  # [accum, micro, n]
        per = jnp.einsum("amn,am->n", onehot, counts)
        return jnp.einsum("amn,n->am", onehot, 1.0 / jnp.maximum(per, 1.0))

    def _finite_norms(tree):
        """Per leaf: is its norm finite (no NaN/Inf, and the sum of squares does not overflow)?"""
        return jnp.stack([jnp.isfinite(optax.tree.norm(x)) for x in jax.tree.leaves(tree)])

    def eval_step(trainable, frozen, batch):
        rows = forward(trainable, frozen, batch, None, False)
        out = {k: jnp.sum(v) for k, v in rows.items()}
        if "task_ids" in batch:  # per task: [n_tasks] sums
            onehot = jax.nn.one_hot(batch["task_ids"], n_tasks, dtype=jnp.float32)
            out |= {f"task_{k}": v @ onehot for k, v in rows.items()}
        return out

    def batch_sh(ndim: int, accum: bool = True) -> NamedSharding:
        lead = (None,) if accum else ()
        return NamedSharding(mesh, P(*lead, BATCH, *([None] * (ndim - 1 - len(lead)))))

    batch_tree_sh = {k: batch_sh(3) for k in ("input_ids", "attention_mask", "loss_mask")}
    batch_tree_sh["labels"] = batch_sh(2)
    replicated = NamedSharding(mesh, P())
    train = jax.jit(
        train_step,
        in_shardings=(trainable_sh, frozen_sh, opt_sh, None, replicated, replicated),
        out_shardings=(trainable_sh, frozen_sh if variant.after_update is not None else None, opt_sh, replicated),
        donate_argnums=(0, 1, 2) if variant.after_update is not None else (0, 2),
    )
    evaluate = jax.jit(eval_step, in_shardings=(trainable_sh, frozen_sh, None), out_shardings=replicated)
    def mean_loss(tree, batch):
        rows = forward(*lv.split(tree), batch, None, False)
        return jnp.sum(rows["loss_sum"]) / jnp.maximum(jnp.sum(rows["count"]), 1.0)

    def pair_logps(trainable, frozen, batch):
        tree = lv.combine(cast_tree(trainable, compute_dtype), cast_tree(frozen, compute_dtype))
        lp, _ = logps(tree, pair_rows(batch))
        b = batch["input_ids"].shape[0]
        return jnp.stack([lp[:b], lp[b:]], -1)

    return StepFns(train, evaluate, lambda ndim, accum=True: batch_sh(ndim, accum), mean_loss,
                   jax.jit(pair_logps, in_shardings=(trainable_sh, frozen_sh, None), out_shardings=replicated))
