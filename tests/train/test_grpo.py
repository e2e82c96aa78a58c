"""GRPO in the app (train.objective: grpo): prompts in, completions sampled with the KV cache and the current
adapters, scored by the user's reward function, one clipped policy-ratio update per generation.

Reference: TRL's ``GRPOTrainer._compute_loss`` on the per-token log-probabilities a torch model (transformers +
PEFT, the same adapter weights exported with ``save_peft``) gives for the app's own rollout rows, with the
reference (beta > 0) the same model with its adapter disabled: the loss and the gradients of every LoRA A and B
equal the app's step."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest

from tests.close import assert_close
from tests.train.conftest import lm_args, train
from train.config import ConfigError

WORDS = "the cat dog sat ran on mat".split()


def _prompts(tmp_path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = [{"prompt": " ".join(rng.choice(WORDS, 3)), "id": i} for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _grpo_args(assets, out, data, *extra):
    return lm_args(assets, out, f"data.source={data}", "data.prompt_field=prompt", "data.seq_len=24",
                   "data.eval_fraction=0.25", "train.batch_size=8", "train.objective=grpo",
                   "objective.grpo.reward=tests.train.rewards:the_share", "objective.grpo.group_size=4",
                   "objective.grpo.max_completion_length=12", *extra)


def _group_norms(pairs):
    """Sum of squared gradients per (projection, A or B)."""
    out: dict[tuple[str, str], float] = defaultdict(float)
    for name, g in pairs:
        proj = next(p for p in name.replace(".", "/").split("/") if p.endswith("_proj"))
        ab = "a" if ("lora_a" in name or "lora_A" in name) else "b"
        out[(proj, ab)] += float(np.sum(np.asarray(g, np.float64) ** 2))
    return dict(out)


@pytest.mark.parametrize("loss_type, beta", [pytest.param("dapo", 0.0, marks=pytest.mark.slow),  # dapo's sum: test_objectives
                                             ("grpo", 0.04)])
def test_the_apps_grpo_step_equals_trls_loss_and_gradients(assets, tmp_path, loss_type, beta):
    import jax
    import jax.numpy as jnp
    import torch
    import transformers as T
    from peft import PeftModel
    from trl.trainer.grpo_trainer import GRPOTrainer

    import lorax_variants as lv
    from lorax_variants.hf.peft import save_peft
    from tests.train.rewards import words
    from train.config import load
    from train.run import _prepare, _steps, stop_tokens
    from train.rollout import rollout

    cfg = load(None, _grpo_args(assets, tmp_path / "run", _prompts(tmp_path), f"objective.grpo.loss_type={loss_type}",
                                f"objective.grpo.beta={beta}"))
    p = _prepare(cfg, abstract=False)
    s = cfg.objective.grpo
    rng = np.random.default_rng(0)
    trainable = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                             p.built.trainable)  # B != 0: the adapters change the policy and its reference
    frozen = p.built.frozen
    tree = lv.combine(trainable, frozen)
    prompts = {k: v[:2] for k, v in p.train.arrays.items()}
    texts, rows = p.train.prompt_rows
    roll = rollout(p.built.model, tree, p.tokenizer, prompts, texts, rows, s, words, jax.random.key(3),
                   stop_tokens(p.tokenizer), cfg.data.seq_len)
    adv = np.asarray(lv.objectives.group_advantages(jnp.asarray(roll["reward"]), s.group_size))
    mask = roll["loss_mask"][:, 1:] * roll["attention_mask"][:, 1:]
    batch = {k: jnp.asarray(roll[k]) for k in ("input_ids", "attention_mask", "loss_mask")}
    batch |= {"advantages": jnp.asarray(adv, jnp.float32), "share": jnp.ones(8, jnp.float32),
              "num_items": jnp.full(8, float(mask.sum()), jnp.float32)}
    fns = _steps(p)
    loss, grads = jax.value_and_grad(lambda tr: fns.loss(lv.combine(tr, frozen), batch))(trainable)
    assert np.std(roll["reward"]) > 0  # the draws give the advantages something to say

    save_peft(tmp_path / "peft", p.built.model, tree)
    base = T.AutoModelForCausalLM.from_pretrained(str(assets["llama"]), torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft"), is_trainable=True).eval()
    ids, attn = torch.as_tensor(roll["input_ids"]).long(), torch.as_tensor(roll["attention_mask"]).long()

    def per_token(m):
        logits = m(input_ids=ids, attention_mask=attn).logits.float()
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]

    logps = per_token(model)
    with torch.no_grad(), model.disable_adapter():
        ref = per_token(model)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x, num_processes=1,
            sync_gradients=True, reduce=lambda x, reduction="sum": x),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=s.epsilon, epsilon_high=s.epsilon, use_vllm=False, vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1, max_completion_length=s.max_completion_length,
        _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    m = torch.as_tensor(mask).long()
    inputs = {"prompt_ids": torch.zeros((8, 1), dtype=torch.long), "prompt_mask": torch.ones((8, 1), dtype=torch.long),
              "completion_ids": ids[:, 1:], "completion_mask": m, "advantages": torch.as_tensor(adv),
              "old_per_token_logps": logps.detach(), "ref_per_token_logps": ref,
              "num_items_in_batch": torch.as_tensor(float(mask.sum()))}
    want = GRPOTrainer._compute_loss(stub, None, inputs)
    want.backward()
    # the loss sums advantages of both signs to near 0: compared on the scale of its terms (|A| per token)
    scale = float(np.sum(np.abs(adv)[:, None] * mask) / mask.sum())
    assert abs(float(loss) - float(want)) <= 1e-5 * scale
    ours = _group_norms(lv.leaves_with_paths(grads))
    theirs = _group_norms((n, p_.grad.numpy()) for n, p_ in model.named_parameters() if p_.grad is not None)
    assert set(ours) == set(theirs) and len(ours) >= 8
    for k in ours:
        assert_close(ours[k], theirs[k], 1e-4, err_msg=str(k))
    if beta:
        assert stub._metrics["train"]["kl"][-1] > 0


@pytest.mark.slow  # by default the step equals TRL's; learning on a real task: make demo-grpo (README)
def test_grpo_raises_the_held_out_reward(assets, tmp_path):
    """A learnable reward (the share of "the" among the completion's words): the held-out prompts' greedy
    reward rises from the base model's to all-"the" within 30 steps; the metrics and the report's figure."""
    data = _prompts(tmp_path)
    before = train(_grpo_args(assets, tmp_path / "before", data, "train.steps=1", "optim.lr=1e-12"))
    after = train(_grpo_args(assets, tmp_path / "after", data, "train.steps=30", "optim.lr=0.03"))
    assert before.summary["eval"]["reward"] < 0.2 and after.summary["eval"]["reward"] > 0.8
    assert after.summary["eval"]["prompts"] == 10
    rows = [json.loads(x) for x in (tmp_path / "after" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 30 and all(0 < r["completion_length"] <= 12 for r in train_rows)
    assert np.mean([r["reward"] for r in train_rows[-10:]]) > np.mean([r["reward"] for r in train_rows[:10]])
    assert (tmp_path / "after" / "report" / "grpo.png").is_file()


@pytest.mark.slow  # exact resume of SFT runs by default (tests/train/test_resume.py); this adds the rollout key
def test_grpo_resumes_exactly(assets, tmp_path):
    """Rollouts are a pure function of the seed and the step: a run stopped at step 3 and resumed ends where an
    uninterrupted one does."""
    from tests.train.conftest import adapters

    data = _prompts(tmp_path)
    whole = _grpo_args(assets, tmp_path / "whole", data, "train.steps=5")
    train(whole)
    cut = _grpo_args(assets, tmp_path / "cut", data, "train.steps=5")
    train(cut + ["train.stop_at=3"])
    train(cut, resume=True)
    a, b = adapters(tmp_path / "whole"), adapters(tmp_path / "cut")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting, match", [
    ("objective.grpo.reward=tests.train.nowhere:f", r"objective.grpo.reward: cannot load 'tests.train.nowhere:f'"),
    ("objective.grpo.reward=tests.train.rewards:NOT_CALLABLE", r"objective.grpo.reward: .* is not a function"),
    ("objective.grpo.reward=tests.train.rewards:not_a_number", r"objective.grpo.reward: .*not_a_number returned 'high'"),
    ("objective.grpo.reward=tests.train.rewards:raises", r"objective.grpo.reward: .*raises raised RuntimeError: cannot score"),
    ("objective.grpo.reward=rewards", r"objective.grpo: reward must name a function as module:function"),
    ("objective.grpo.reward=", r"objective.grpo.reward: name the reward function as module:function"),
    ("objective.grpo.group_size=1", r"objective.grpo: group_size must be an integer >= 2"),
    ("train.batch_size=6", r"train.batch_size: counts completions: it must be a multiple of objective.grpo.group_size=4"),
    ("objective.grpo.max_completion_length=30", r"data.seq_len: must leave room for a prompt"),
    ("adapter.variant=multitask", r"adapter.variant: routes rows to several adapters"),
])
def test_bad_grpo_input_is_named(assets, tmp_path, setting, match):
    with pytest.raises(ConfigError, match=match):
        train(_grpo_args(assets, tmp_path / "bad", _prompts(tmp_path), "train.steps=1", setting))


@pytest.mark.slow  # the update's sharding is the SFT step's (tests/train/test_sharded.py); this adds the rollout
def test_grpo_runs_sharded_over_8_devices(assets, tmp_path):
    """Rollouts through generate with the FSDP x tensor-sharded tree, and the sharded update: the run finishes
    with the rewards and losses logged (samples drawn from sharded logits need not equal one device's)."""
    from tests.train.conftest import cli

    cli(_grpo_args(assets, tmp_path / "eight", _prompts(tmp_path), "train.steps=3", "mesh.fsdp=4", "mesh.tensor=2"),
        devices=8)
    rows = [json.loads(x) for x in (tmp_path / "eight" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 3 and all(np.isfinite(r["loss"]) and "reward" in r for r in train_rows)


@pytest.mark.slow  # by default LoRA; the update is each variant's SFT forward (test_every_variant_trains)
@pytest.mark.parametrize("variant, extra", [("dora", ()), ("lora", ("quant.kind=nf4", "quant.block_size=32")),
                                            ("vera", ("adapter.r=16",))])
def test_variants_train_under_grpo(assets, tmp_path, variant, extra):
    r = train(_grpo_args(assets, tmp_path / variant, _prompts(tmp_path), f"adapter.variant={variant}", "train.steps=4",
                         *extra))
    rows = [json.loads(x) for x in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x["loss"]) for x in rows if x["kind"] == "train") and "reward" in r.summary["eval"]
