"""The preference and RL objectives equal TRL's own computations on the same logits, log-probabilities and rewards.

TRL's trainers compute their losses inside methods of a trainer object; the references here call those methods
(``DPOTrainer._compute_loss``, ``CPOTrainer.cpo_loss``, ``GRPOTrainer._compute_loss``) on a minimal stand-in
for the trainer that holds only the attributes they read (no model download, no accelerator process group),
with a torch "model" that returns given logits. GRPO's advantages are computed inside TRL's generation step;
their reference is the same lines of that step, with TRL's own ``nanstd``."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lorax_variants import objectives as O
from tests.close import assert_close

B, T, V = 4, 11, 23


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x,
                           num_processes=1, sync_gradients=True,
                           reduce=lambda x, reduction="sum": x)


def _pairs(seed: int):
    """[2B, T] rows (chosen first, then rejected), prompts of 3-4 tokens, completions of ragged length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (2 * B, T))
    mask = np.zeros((2 * B, T), np.int64)
    for i in range(2 * B):
        start, end = int(rng.integers(3, 5)), int(rng.integers(7, T + 1))
        mask[i, start:end] = 1
    logits = rng.standard_normal((2 * B, T, V)).astype(np.float32) * 2.0
    ref = rng.standard_normal(2 * B).astype(np.float32) * 3.0 - 20.0
    return ids, mask, logits, ref


def _trl_dpo(loss_type: str, beta: float, label_smoothing: float, ids, mask, logits, ref):
    from trl.trainer.dpo_trainer import DPOTrainer

    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    model = lambda **kw: SimpleNamespace(logits=torch.as_tensor(logits))  # noqa: E731
    inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.ones_like(torch.as_tensor(ids)),
              "completion_mask": torch.as_tensor(mask), "ref_chosen_logps": torch.as_tensor(ref[:B]),
              "ref_rejected_logps": torch.as_tensor(ref[B:])}
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


def _ours_dpo(loss_type: str, beta: float, label_smoothing: float, ids, mask, logits, ref):
    logps, lengths = O.completion_logps(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    out = O.dpo_loss(logps[:B], logps[B:], jnp.asarray(ref[:B]), jnp.asarray(ref[B:]), beta=beta,
                     label_smoothing=label_smoothing, loss_type=loss_type, chosen_lengths=lengths[:B],
                     rejected_lengths=lengths[B:])
    return out, logps


@pytest.mark.parametrize("loss_type, beta, label_smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0),
                                                              ("robust", 0.1, 0.1), ("ipo", 0.3, 0.0)])
def test_dpo_and_ipo_equal_trls_dpo_trainer(loss_type, beta, label_smoothing):
    ids, mask, logits, ref = _pairs(0)
    want, metrics = _trl_dpo(loss_type, beta, label_smoothing, ids, mask, logits, ref)
    out, logps = _ours_dpo(loss_type, beta, label_smoothing, ids, mask, logits, ref)
    assert_close(np.asarray(out.loss), np.float32(want), 1e-6)
    ours = O.preference_metrics(out)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert_close(np.asarray(ours[k]), np.float32(metrics[k]), 1e-6, err_msg=k)
    assert_close(np.asarray(jnp.mean(logps[:B])), np.float32(metrics["logps/chosen"]), 1e-6)


def test_label_smoothed_dpo_is_trls_conservative_sigmoid():
    """DPO's label smoothing (conservative DPO) is the sigmoid form TRL's CPO trainer computes on a margin: fed the
    two log-ratios, ``cpo_loss`` with ``loss_type="sigmoid"`` gives the same per-pair losses."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    ids, mask, logits, ref = _pairs(1)
    out, logps = _ours_dpo("sigmoid", 0.2, 0.15, ids, mask, logits, ref)
    ratios = np.asarray(logps) - ref
    stub = SimpleNamespace(alpha=0.0, loss_type="sigmoid", beta=0.2, label_smoothing=0.15, simpo_gamma=0.5,
                           accelerator=_accelerator())
    want, _, _ = CPOTrainer.cpo_loss(stub, torch.as_tensor(ratios[:B]), torch.as_tensor(ratios[B:]))
    assert_close(np.asarray(out.losses), want.numpy(), 1e-6)


@pytest.mark.parametrize("beta, gamma, label_smoothing", [(None, None, 0.0), (2.0, 1.0, 0.0), (2.5, 0.8, 0.1)])
def test_simpo_equals_trls_cpo_trainer(beta, gamma, label_smoothing):
    """SimPO as TRL computes it (``CPOTrainer.cpo_loss``, ``loss_type="simpo"``, on length-averaged log-probs as
    its forward averages them for SimPO); ``None``: TRL's defaults (``CPOConfig``'s beta and simpo_gamma)."""
    from trl.experimental.cpo.cpo_config import CPOConfig
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    if beta is None:
        defaults = CPOConfig(output_dir="unused", report_to=[], use_cpu=True)
        beta, gamma = defaults.beta, defaults.simpo_gamma
        ours_default = O.simpo_loss(jnp.ones(1), jnp.ones(1), jnp.ones(1), jnp.ones(1))
        assert_close(np.asarray(ours_default.chosen_rewards), np.float32([beta]), 1e-7)  # our default beta is TRL's
    ids, mask, logits, ref = _pairs(2)
    logps, lengths = O.completion_logps(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    kw = {} if (beta, gamma) == (0.1, 0.5) else {"beta": beta, "gamma": gamma}
    out = O.simpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], label_smoothing=label_smoothing, **kw)
    avg = torch.as_tensor(np.asarray(logps / lengths))
    stub = SimpleNamespace(alpha=0.0, loss_type="simpo", beta=beta, label_smoothing=label_smoothing,
                           simpo_gamma=gamma, accelerator=_accelerator())
    want, chosen_r, rejected_r = CPOTrainer.cpo_loss(stub, avg[:B], avg[B:])
    assert_close(np.asarray(out.losses), want.numpy(), 1e-6)
    assert_close(np.asarray(out.chosen_rewards), chosen_r.numpy(), 1e-6)
    assert_close(np.asarray(out.rejected_rewards), rejected_r.numpy(), 1e-6)


def test_completion_logps_are_trls_per_token_log_softmax():
    """Our masked, summed completion log-probabilities equal TRL's ``selective_log_softmax`` over the shifted
    completion mask, summed; the lengths are the completion tokens."""
    from trl.trainer.utils import selective_log_softmax

    ids, mask, logits, _ = _pairs(3)
    per = selective_log_softmax(torch.as_tensor(logits)[:, :-1], torch.as_tensor(ids)[:, 1:])
    want = (per * torch.as_tensor(mask)[:, 1:]).sum(1).numpy()
    logps, lengths = O.completion_logps(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    assert_close(np.asarray(logps), want, 1e-6)
    np.testing.assert_array_equal(np.asarray(lengths), mask[:, 1:].sum(1))


def _trl_advantages(rewards: np.ndarray, g: int, scale: str) -> np.ndarray:
    """The lines of ``GRPOTrainer._generate_and_score_completions`` that turn summed rewards into advantages."""
    from trl.trainer.utils import nanstd

    r = torch.as_tensor(rewards)
    mean = torch.nanmean(r.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    if scale in ("group", "none"):
        std = nanstd(r.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    else:
        std = nanstd(r).expand_as(r)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0).numpy()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trls(scale):
    rng = np.random.default_rng(4)
    rewards = rng.standard_normal(12).astype(np.float32)
    rewards[4:8] = 0.5  # a group whose completions all scored the same: advantage 0
    assert_close(np.asarray(O.group_advantages(jnp.asarray(rewards), 4, scale)), _trl_advantages(rewards, 4, scale),
                 1e-6)


def _trl_grpo(loss_type, level, beta, eps, eps_high, logps, old, ref, adv, mask, num_items):
    from trl.trainer.grpo_trainer import GRPOTrainer

    per_token = torch.as_tensor(logps)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=eps, epsilon_high=eps_high, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=mask.shape[1], _entropy_bonus_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token, torch.zeros_like(per_token), None))
    inputs = {"prompt_ids": torch.zeros((mask.shape[0], 2), dtype=torch.long),
              "prompt_mask": torch.ones((mask.shape[0], 2), dtype=torch.long),
              "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": torch.as_tensor(mask),
              "advantages": torch.as_tensor(adv), "old_per_token_logps": torch.as_tensor(old),
              "ref_per_token_logps": torch.as_tensor(ref), "num_items_in_batch": torch.as_tensor(float(num_items))}
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return float(loss), {k: v[-1] for k, v in stub._metrics["train"].items()}


GRPO_CASES = [("dapo", "token", 0.0, 0.2, 0.2), ("grpo", "token", 0.04, 0.2, 0.28), ("bnpo", "token", 0.1, 0.1, 0.1),
              ("dr_grpo", "token", 0.0, 0.2, 0.2), ("grpo", "sequence", 0.04, 0.2, 0.2)]


@pytest.mark.parametrize("loss_type, level, beta, eps, eps_high", GRPO_CASES)
def test_grpo_loss_and_metrics_equal_trls(loss_type, level, beta, eps, eps_high):
    rng = np.random.default_rng(5)
    n, t = 8, 9
    mask = (np.arange(t)[None] < rng.integers(3, t + 1, n)[:, None]).astype(np.int64)
    old = -rng.uniform(0.1, 4.0, (n, t)).astype(np.float32)
    logps = (old + 0.3 * rng.standard_normal((n, t))).astype(np.float32)  # ratios around 1, some clipped
    ref = (old + 0.2 * rng.standard_normal((n, t))).astype(np.float32)
    adv = np.asarray(O.group_advantages(jnp.asarray(rng.standard_normal(n).astype(np.float32)), 4))
    num_items = int(mask.sum()) + 5  # dapo: the generation batch's completion tokens (more than this batch's)
    want, metrics = _trl_grpo(loss_type, level, beta, eps, eps_high, logps, old, ref, adv, mask, num_items)
    out = O.grpo_loss(jnp.asarray(logps), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                      ref_logps=jnp.asarray(ref), beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type,
                      importance_sampling_level=level, num_items=num_items)
    assert_close(np.asarray(out.loss), np.float32(want), 1e-6)
    for k, v in out.metrics.items():
        assert_close(np.asarray(v), np.float32(metrics[k]), 1e-6, err_msg=k)
    assert ("kl" in out.metrics) == (beta != 0.0)
    assert metrics["clip_ratio/region_mean"] > 0 or level == "sequence"  # the draws exercise the clipping


def test_grpo_defaults_are_trls():
    from trl import GRPOConfig

    cfg = GRPOConfig(output_dir="unused", report_to=[], use_cpu=True)
    import inspect

    sig = inspect.signature(O.grpo_loss).parameters
    assert (sig["beta"].default, sig["epsilon"].default, sig["loss_type"].default,
            sig["importance_sampling_level"].default) == (cfg.beta, cfg.epsilon, cfg.loss_type,
                                                          cfg.importance_sampling_level)
    assert inspect.signature(O.group_advantages).parameters["scale"].default == cfg.scale_rewards
    from trl import DPOConfig

    dpo = DPOConfig(output_dir="unused", report_to=[], use_cpu=True)
    d = inspect.signature(O.dpo_loss).parameters
    trl_type = dpo.loss_type if isinstance(dpo.loss_type, list) else [dpo.loss_type]
    assert (d["beta"].default, d["label_smoothing"].default, [d["loss_type"].default]) == (
        dpo.beta, dpo.label_smoothing, trl_type)


def test_bad_settings_are_named():
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match="loss_type 'kto'"):
        O.dpo_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="IPO normalizes"):
        O.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        O.dpo_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="not whole groups of 4"):
        O.group_advantages(jnp.zeros(6), 4)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        O.group_advantages(jnp.zeros(6), 1)
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta must be > 0"):
            O.dpo_loss(x, x, x, x, beta=beta)
        with pytest.raises(ValueError, match="beta must be > 0"):
            O.simpo_loss(x, x, x, x, beta=beta)
    m = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="beta > 0 needs"):
        O.grpo_loss(m, m, x, m, beta=0.1)
    with pytest.raises(ValueError, match="with sequence-level importance sampling use 'grpo'"):
        O.grpo_loss(m, m, x, m, importance_sampling_level="sequence")


def _tiny(quantized: bool = False):
    import jax

    import lorax_variants as lv
    from lorax_variants.models import STACKED, TinyConfig, TinyTransformer

    model = TinyTransformer(TinyConfig(vocab_size=V, d_model=32, n_heads=2, d_ff=64, n_layers=2, max_len=T))
    params = model.init(jax.random.key(0))
    targets = r"layers/(attn|mlp)/\w+_proj"
    base = lv.quantize(params, lv.QuantSpec(targets=targets, stacked=STACKED, block_size=16)) if quantized else params
    tree = lv.adapt(base, lv.AdapterSpec(targets=targets, stacked=STACKED, r=4, alpha=8), 1)
    trainable, frozen = lv.split(tree)
    trainable = jax.tree.map(lambda x: x + 0.05, trainable)  # B != 0: the adapters change the function
    return model, base, trainable, frozen


def _batch(seed: int = 6):
    ids, mask, _, _ = _pairs(seed)
    return {"input_ids": jnp.asarray(ids), "completion_mask": jnp.asarray(mask)}


@pytest.mark.slow  # ~30 s a case (CI's test-slow); the default run's DPO tests use the base-as-reference step
@pytest.mark.parametrize("quantized", [False, True])
def test_the_reference_is_the_base_with_adapters_off_and_costs_no_argument_bytes(quantized):
    """``reference="base"``: the reference log-probs are the unadapted model's (the same frozen arrays, NF4 too);
    the DPO step's compiled arguments are exactly an SFT step's on the same rows (no second weight tree); the
    precomputed reference gives the same loss and gradients."""
    import jax

    import lorax_variants as lv

    model, base, trainable, frozen = _tiny(quantized)
    batch = _batch()
    logps_fn = lambda t, b: O.completion_logps(model.apply(t, b["input_ids"]), b["input_ids"], b["completion_mask"])  # noqa: E731
    want, _ = jax.jit(logps_fn)(base, batch)
    ref = jax.jit(lambda t, f, b: O.reference_logps(logps_fn, lv.combine(t, f), b))(trainable, frozen, batch)
    assert_close(np.asarray(ref), np.asarray(want), 1e-6)
    mine, _ = jax.jit(lambda t, f, b: logps_fn(lv.combine(t, f), b))(trainable, frozen, batch)
    assert float(jnp.max(jnp.abs(mine - ref))) > 1e-3  # the adapters do change the policy

    def dpo(tr, fr, b):
        return O.preference_loss(logps_fn, lv.combine(tr, fr), b, beta=0.1).loss

    def dpo_cached(tr, fr, b):
        return O.preference_loss(logps_fn, lv.combine(tr, fr), b, reference="precomputed", beta=0.1).loss

    def sft(tr, fr, b):
        logps, lengths = logps_fn(lv.combine(tr, fr), b)
        return -jnp.sum(logps) / jnp.sum(lengths)

    def args(f, b):
        return jax.jit(jax.grad(f)).lower(trainable, frozen, b).compile().memory_analysis().argument_size_in_bytes

    assert args(dpo, batch) == args(sft, batch)
    cached = dict(batch, ref_logps=ref)
    (l1, g1), (l2, g2) = (jax.jit(jax.value_and_grad(f))(trainable, frozen, b) for f, b in ((dpo, batch),
                                                                                            (dpo_cached, cached)))
    assert_close(np.asarray(l1), np.asarray(l2), 1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert_close(np.asarray(a), np.asarray(b), 1e-5)
    assert any(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(g1))


def test_preference_loss_is_dpo_ipo_simpo_of_the_pairs():
    """At the same log-probs, ``preference_loss`` is ``dpo_loss``/``simpo_loss`` of the rows split in halves."""
    import lorax_variants as lv

    import jax

    model, _, trainable, frozen = _tiny()
    batch = _batch(7)
    tree = lv.combine(trainable, frozen)
    logps_fn = jax.jit(lambda t, b: O.completion_logps(model.apply(t, b["input_ids"]), b["input_ids"],
                                                       b["completion_mask"]))
    logps, lengths = logps_fn(tree, batch)
    ref = O.reference_logps(logps_fn, tree, batch)
    ipo = O.preference_loss(logps_fn, tree, batch, objective="ipo", beta=0.2)
    want = O.dpo_loss(logps[:B], logps[B:], ref[:B], ref[B:], beta=0.2, loss_type="ipo", chosen_lengths=lengths[:B],
                      rejected_lengths=lengths[B:])
    assert_close(np.asarray(ipo.losses), np.asarray(want.losses), 1e-6)
    simpo = O.preference_loss(logps_fn, tree, batch, objective="simpo", beta=2.0, gamma=1.0)
    want = O.simpo_loss(logps[:B], logps[B:], lengths[:B], lengths[B:], beta=2.0, gamma=1.0)
    assert_close(np.asarray(simpo.losses), np.asarray(want.losses), 1e-6)
    with pytest.raises(ValueError, match="needs batch\\['ref_logps'\\]"):
        O.preference_loss(logps_fn, tree, batch, reference="precomputed")
    with pytest.raises(ValueError, match="objective 'kto'"):
        O.preference_loss(logps_fn, tree, batch, objective="kto")
