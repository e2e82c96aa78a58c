"""Preference and reinforcement objectives over sequence log-probabilities, as pure JAX functions.

Every function takes log-probabilities (ours: ``completion_logps`` of any model's logits) and returns per-example
losses or a scalar with the metrics TRL logs, so any JAX training loop can use them. With adapters the reference
policy is the base model with the adapters switched off: the same weights, no second copy.

Sequence log-probability of a completion y given a prompt x (``completion_logps``): the sum over the completion's
tokens of log π(y_t | x, y_<t), and its length |y| (position t of the logits predicts token t + 1).

DPO (arXiv 2305.18290), with Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]:

    sigmoid:  L = −(1 − ε) log σ(βΔ) − ε log σ(−βΔ)        (ε = label smoothing: conservative DPO; ε = 0: DPO)
    robust:   L = [−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)] / (1 − 2ε)     (arXiv 2403.00409, ε the flip rate)
    ipo:      L = (Δ_w/|y_w| − Δ_l/|y_l| − 1/(2β))²        (IPO, arXiv 2310.12036; log-ratios per completion
                                                            token, as TRL and the IPO authors normalize them)

with the implicit rewards r = β (log π − log π_ref) of the chosen and the rejected completion.

SimPO (arXiv 2405.14734), the reference-free objective: no reference pass at all (DPO's second forward and its
cached log-probabilities both go), and a length-normalized reward, so long completions do not win by length:

    L = −(1 − ε) log σ(β (ℓ_w − ℓ_l) − γ) − ε log σ(−β (ℓ_w − ℓ_l) + γ),    ℓ = log π(y|x) / |y|

(chosen over ORPO, arXiv 2403.07691, because SimPO is the one that needs nothing but the policy's
log-probabilities, whereas ORPO couples the preference term to an SFT loss on the chosen completion, and
SimPO's paper reports it ahead of ORPO on AlpacaEval 2 and Arena-Hard.)

GRPO (arXiv 2402.03300): G completions per prompt, rewards r_i, group-normalized advantages
A_i = (r_i − mean_group r) / (std_group r + 1e-4) (``scale="group"``; ``"batch"``: the batch's std;
``"none"``: not divided), then per completion token, with ρ = π / π_old (``importance_sampling_level``
``"token"``: per token; ``"sequence"``: exp of the mean log-ratio over the completion):

    ℓ_t = −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A) + β KL_t,   KL_t = π_ref/π − log(π_ref/π) − 1

aggregated as TRL's ``loss_type`` names them: ``grpo`` (mean over completions of each one's token mean:
sequence-level), ``bnpo`` (mean over all completion tokens of the batch), ``dr_grpo`` (sum over tokens / (B ·
max completion length)), ``dapo`` (sum over tokens / the number of completion tokens of the whole generation
batch: token-level). Defaults are TRL's (``DPOConfig``, ``CPOConfig`` for SimPO, ``GRPOConfig``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from lorax_variants.ops import without_adapters

__all__ = ["Dpo", "Ipo", "Simpo", "Grpo", "OBJECTIVES", "token_logps", "completion_logps", "PreferenceLoss", "dpo_loss", "simpo_loss", "preference_metrics",
           "group_advantages", "GrpoLoss", "grpo_loss", "preference_loss", "reference_logps", "PREFERENCE_OBJECTIVES"]

PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo")

DPO_LOSSES = ("sigmoid", "robust", "ipo")
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo")


def _check_beta(beta: float, label_smoothing: float = 0.0) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be > 0 (the strength of the pull to the reference / the reward scale), got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")


@dataclasses.dataclass(frozen=True)
class Dpo:
    """DPO's settings (TRL's ``DPOConfig`` defaults): ``beta``, ``label_smoothing`` (ε), ``loss_type`` sigmoid or
    robust, ``reference``: ``base`` (the adapters switched off, in the step) or ``precomputed`` (the adapted model
    at initialization, once before training: needed where the initial model is not the base, e.g. an init that
    rewrites the base or a variant that moves it)."""

    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: Literal["sigmoid", "robust"] = "sigmoid"
    reference: Literal["base", "precomputed"] = "base"

    def __post_init__(self) -> None:
        _check_beta(self.beta, self.label_smoothing)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``preference_loss``."""
        return {"objective": "dpo", "reference": self.reference, "beta": self.beta,
                "label_smoothing": self.label_smoothing, "loss_type": self.loss_type}


@dataclasses.dataclass(frozen=True)
class Ipo:
    """IPO's settings: ``beta`` (the target margin is 1/(2β)), ``reference`` as ``Dpo``'s."""

    beta: float = 0.1
    reference: Literal["base", "precomputed"] = "base"

    def __post_init__(self) -> None:
        _check_beta(self.beta)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``preference_loss``."""
        return {"objective": "ipo", "reference": self.reference, "beta": self.beta}


@dataclasses.dataclass(frozen=True)
class Simpo:
    """SimPO's settings (TRL's ``CPOConfig`` defaults for ``loss_type="simpo"``): ``beta``, ``gamma`` (the target
    reward margin, TRL's ``simpo_gamma``), ``label_smoothing``. No reference."""

    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check_beta(self.beta, self.label_smoothing)

    @property
    def reference(self) -> None:
        """SimPO has no reference."""
        return None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``preference_loss``."""
        return {"objective": "simpo", "beta": self.beta, "gamma": self.gamma, "label_smoothing": self.label_smoothing}


@dataclasses.dataclass(frozen=True)
class Grpo:
    """GRPO's settings for a training loop (TRL's ``GRPOConfig`` defaults where it has them): ``reward``, the
    function ``module:function`` called as ``fn(prompt, completion, row) -> float``; ``group_size`` completions
    sampled per prompt (TRL's ``num_generations``) with ``temperature``, ``top_p``, ``top_k`` (None: all),
    ``max_completion_length`` new tokens at most; the loss's ``beta`` (KL to the reference: the adapters off;
    0: no reference pass), ``epsilon``/``epsilon_high`` (clip range), ``loss_type``,
    ``importance_sampling_level`` and ``scale_rewards`` as ``grpo_loss`` and ``group_advantages``. One update
    per generation (TRL's ``num_iterations=1``: the sampling policy is the policy, its ratio 1 with gradient)."""

    reward: str = ""
    group_size: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"

    def __post_init__(self) -> None:
        if not isinstance(self.reward, str) or (self.reward and ":" not in self.reward):
            raise ValueError(f"reward must name a function as module:function (called with prompt, completion, row; "
                             f"returning a number), got {self.reward!r}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be an integer >= 2 (a group's mean and spread need two completions "
                             f"per prompt), got {self.group_size!r}")
        if not isinstance(self.max_completion_length, int) or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be a positive integer, got {self.max_completion_length!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples its completions), got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {self.top_k!r}")
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0 (the KL weight; 0: no reference), got {self.beta!r}")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ValueError(f"epsilon and epsilon_high must be > 0, got {self.epsilon!r}, {self.epsilon_high!r}")
        if self.importance_sampling_level == "sequence" and self.loss_type != "grpo":
            raise ValueError(f"loss_type {self.loss_type!r} sums per-token losses; with importance_sampling_level "
                             "sequence use grpo")

    @property
    def reference(self) -> str | None:
        """``base`` where the loss has a KL term (the adapters off), else None."""
        return "base" if self.beta > 0 else None

    def loss_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``grpo_loss``."""
        return {"beta": self.beta, "epsilon": self.epsilon, "epsilon_high": self.epsilon_high,
                "loss_type": self.loss_type, "importance_sampling_level": self.importance_sampling_level,
                "max_completion_length": self.max_completion_length}


# The objectives' settings types by name (a training loop's ``objective`` sections).
OBJECTIVES: dict[str, type] = {"dpo": Dpo, "ipo": Ipo, "simpo": Simpo, "grpo": Grpo}


def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, float32 ([..., T, V], [..., T] -> [..., T]), without a
    [..., T, V] log-softmax array."""
    x = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def completion_logps(logits: jax.Array, ids: jax.Array, completion_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of log π over the completion [B], its length [B])`` of rows ``ids`` [B, T] (prompt then completion,
    padding anywhere the mask is 0) under ``logits`` [B, T, V]: position t predicts token t + 1, so the first
    token never counts (it has no prediction)."""
    mask = completion_mask[:, 1:].astype(jnp.float32)
    per_token = token_logps(logits[:, :-1], ids[:, 1:]) * mask
    return jnp.sum(per_token, axis=-1), jnp.sum(mask, axis=-1)


class PreferenceLoss(NamedTuple):
    """Per pair: the loss, and the implicit rewards of the chosen and the rejected completion."""

    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array

    @property
    def loss(self) -> jax.Array:
        """The mean loss over pairs."""
        return jnp.mean(self.losses)


def _smoothed(z: jax.Array, label_smoothing: float) -> jax.Array:
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(z) - label_smoothing * jax.nn.log_sigmoid(-z)


def dpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, ref_chosen_logps: jax.Array,
             ref_rejected_logps: jax.Array, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid", chosen_lengths: jax.Array | None = None,
             rejected_lengths: jax.Array | None = None) -> PreferenceLoss:
    """DPO, its label-smoothed/robust forms, or IPO (the module docstring) from summed completion log-probs [B] of
    the policy and the reference; ``chosen_lengths``/``rejected_lengths`` (completion tokens) for IPO."""
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo_loss: loss_type {loss_type!r}; expected one of {DPO_LOSSES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta must be > 0 (the KL weight; IPO's 1/(2β) margin), got {beta}")
    chosen = chosen_logps.astype(jnp.float32) - ref_chosen_logps.astype(jnp.float32)
    rejected = rejected_logps.astype(jnp.float32) - ref_rejected_logps.astype(jnp.float32)
    delta = chosen - rejected
    if loss_type == "sigmoid":
        losses = _smoothed(beta * delta, label_smoothing)
    elif loss_type == "robust":
        losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta)
                  + label_smoothing * jax.nn.log_sigmoid(-beta * delta)) / (1.0 - 2.0 * label_smoothing)
    else:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("dpo_loss: IPO normalizes the log-ratios by the completion lengths; pass chosen_lengths "
                             "and rejected_lengths")
        per_token = chosen / jnp.maximum(chosen_lengths, 1.0) - rejected / jnp.maximum(rejected_lengths, 1.0)
        losses = (per_token - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses, beta * jax.lax.stop_gradient(chosen), beta * jax.lax.stop_gradient(rejected))


def simpo_loss(chosen_logps: jax.Array, rejected_logps: jax.Array, chosen_lengths: jax.Array,
               rejected_lengths: jax.Array, *, beta: float = 0.1, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> PreferenceLoss:
    """SimPO (the module docstring) from summed completion log-probs [B] and lengths; no reference. Rewards:
    β times the length-normalized log-probabilities."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"simpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if not beta > 0:
        raise ValueError(f"simpo_loss: beta must be > 0, got {beta}")
    chosen = chosen_logps.astype(jnp.float32) / jnp.maximum(chosen_lengths, 1.0)
    rejected = rejected_logps.astype(jnp.float32) / jnp.maximum(rejected_lengths, 1.0)
    losses = _smoothed(beta * (chosen - rejected) - gamma, label_smoothing)
    return PreferenceLoss(losses, beta * jax.lax.stop_gradient(chosen), beta * jax.lax.stop_gradient(rejected))


def preference_metrics(out: PreferenceLoss) -> dict[str, jax.Array]:
    """Means over pairs of the rewards, their margin and how often the chosen one wins (TRL's names)."""
    return {"rewards/chosen": jnp.mean(out.chosen_rewards), "rewards/rejected": jnp.mean(out.rejected_rewards),
            "rewards/margins": jnp.mean(out.chosen_rewards - out.rejected_rewards),
            "rewards/accuracies": jnp.mean((out.chosen_rewards > out.rejected_rewards).astype(jnp.float32))}


LogpsFn = Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]


def reference_logps(logps_fn: LogpsFn, tree: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """The reference policy's completion log-probabilities [rows]: ``logps_fn`` on ``tree`` with its adapters off
    (``without_adapters``: the same frozen arrays), no gradient. Run it once per pair before training to cache
    them (``reference="precomputed"``), or let ``preference_loss`` run it inside the step (``"base"``)."""
    logps, _ = logps_fn(without_adapters(tree), batch)
    return jax.lax.stop_gradient(logps)


def preference_loss(logps_fn: LogpsFn, tree: Any, batch: dict[str, jax.Array], *, objective: str = "dpo",
                    reference: str = "base", **settings: Any) -> PreferenceLoss:
    """A preference objective on a batch of pairs: rows ``[chosen_0..chosen_{B-1}, rejected_0..rejected_{B-1}]``
    (prompt and completion in one row). ``logps_fn(tree, batch) -> (summed completion log-probs, lengths)`` per
    row (e.g. ``completion_logps`` of the model's logits); ``objective``: ``dpo`` (``loss_type``, ``beta``,
    ``label_smoothing`` as ``dpo_loss``), ``ipo`` or ``simpo`` (reference-free). ``reference``: ``"base"`` runs
    ``logps_fn`` again with the adapters off, in the same computation (no second weight tree), ``"precomputed"``
    reads ``batch["ref_logps"]`` [rows]."""
    if objective not in PREFERENCE_OBJECTIVES:
        raise ValueError(f"preference_loss: objective {objective!r}; expected one of {PREFERENCE_OBJECTIVES}")
    if reference not in ("base", "precomputed"):
        raise ValueError(f"preference_loss: reference {reference!r}; expected 'base' or 'precomputed'")
    logps, lengths = logps_fn(tree, batch)
    if logps.shape[0] % 2:
        raise ValueError(f"preference_loss: {logps.shape[0]} rows; expected the chosen rows then as many rejected")
    b = logps.shape[0] // 2
    if objective == "simpo":
        return simpo_loss(logps[:b], logps[b:], lengths[:b], lengths[b:], **settings)
    if reference == "base":
        ref = reference_logps(logps_fn, tree, batch)
    else:
        if "ref_logps" not in batch:
            raise ValueError("preference_loss: reference='precomputed' needs batch['ref_logps'] (reference_logps)")
        ref = batch["ref_logps"]
    if objective == "ipo":
        settings = {**settings, "loss_type": "ipo"}
    return dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
                    **settings)


def group_advantages(rewards: jax.Array, group_size: int, scale: str = "group") -> jax.Array:
    """GRPO's advantages of rewards [N·G] (G consecutive completions per prompt): minus the group's mean,
    divided by (std + 1e-4) of the group (``"group"``), of the batch (``"batch"``) or not (``"none"``); std with
    Bessel's correction, as TRL's."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"group_advantages: scale {scale!r}; expected 'group', 'batch' or 'none'")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_advantages: group_size must be an integer >= 2 (a group's mean and spread need two "
                         f"completions per prompt), got {group_size!r}")
    r = rewards.astype(jnp.float32)
    if r.shape[0] % group_size:
        raise ValueError(f"group_advantages: {r.shape[0]} rewards are not whole groups of {group_size}")
    groups = r.reshape(-1, group_size)
    centred = (groups - jnp.mean(groups, axis=1, keepdims=True)).reshape(r.shape)
    if scale == "none":
        return centred
    if scale == "group":
        std = jnp.broadcast_to(jnp.std(groups, axis=1, ddof=1, keepdims=True), groups.shape).reshape(r.shape)
    else:
        std = jnp.std(r, ddof=1) if r.shape[0] > 1 else jnp.nan
    return jnp.nan_to_num(centred / (std + 1e-4), nan=0.0)


class GrpoLoss(NamedTuple):
    """The scalar loss and what TRL logs of it."""

    loss: jax.Array
    metrics: dict[str, jax.Array]


def grpo_loss(logps: jax.Array, old_logps: jax.Array, advantages: jax.Array, mask: jax.Array, *,
              ref_logps: jax.Array | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo", importance_sampling_level: str = "token",
              max_completion_length: int | None = None, num_items: Any = None) -> GrpoLoss:
    """GRPO's clipped policy-ratio loss (the module docstring) over completion tokens: per-token log-probs
    ``logps`` [B, T] of the policy, ``old_logps`` of the policy that sampled them, ``ref_logps`` of the
    reference (needed when ``beta`` > 0), ``advantages`` [B], ``mask`` [B, T] of the completion tokens.
    ``num_items``: ``dapo``'s normalizer, the completion tokens of the whole generation batch (default: this
    batch's); ``max_completion_length``: ``dr_grpo``'s (default: T)."""
    if loss_type not in GRPO_LOSSES:
        raise ValueError(f"grpo_loss: loss_type {loss_type!r}; expected one of {GRPO_LOSSES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"grpo_loss: importance_sampling_level {importance_sampling_level!r}; expected 'token' or "
                         "'sequence'")
    if beta < 0:
        raise ValueError(f"grpo_loss: beta must be >= 0 (the KL weight; 0: no reference), got {beta}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs the reference's ref_logps")
    if importance_sampling_level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo"):
        raise ValueError(f"grpo_loss: loss_type {loss_type!r} sums per-token losses; with sequence-level importance "
                         "sampling use 'grpo'")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    logps = logps.astype(jnp.float32)
    m = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    log_ratio = logps - old_logps.astype(jnp.float32)
    if importance_sampling_level == "sequence":
        log_ratio = (jnp.sum(log_ratio * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))[:, None]
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + eps_high)
    per_token = -jnp.minimum(ratio * adv, clipped * adv)
    metrics: dict[str, jax.Array] = {}
    if beta != 0.0:
        d = ref_logps.astype(jnp.float32) - logps
        kl = jnp.exp(d) - d - 1.0
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)
    per_token = jnp.broadcast_to(per_token, m.shape)
    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))
    elif loss_type == "bnpo":
        loss = jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m), 1.0)
    elif loss_type == "dr_grpo":
        loss = jnp.sum(per_token * m) / (m.shape[0] * (max_completion_length or m.shape[1]))
    else:
        loss = jnp.sum(per_token * m) / jnp.maximum(jnp.sum(m) if num_items is None else num_items, 1.0)

    def masked_mean(x: jax.Array) -> jax.Array:
        if x.shape[1] == 1:  # sequence-level: one value per completion
            return jnp.mean(x)
        return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)

    low = ((ratio < 1.0 - epsilon) & (adv < 0)).astype(jnp.float32)
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).astype(jnp.float32)
    metrics |= {"clip_ratio/low_mean": masked_mean(low), "clip_ratio/high_mean": masked_mean(high),
                "clip_ratio/region_mean": masked_mean(jnp.maximum(low, high))}
    return GrpoLoss(loss, metrics)
