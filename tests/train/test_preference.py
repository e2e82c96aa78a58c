"""Preference tuning in the app (train.objective: dpo, ipo, simpo).

References: TRL's ``DPOTrainer`` tokenizes the same pairs (strings and conversations, with SmolLM2's tokenizer)
into the same prompt and completion tokens; and after a short DPO run, the app's held-out loss, rewards and
preference accuracy equal TRL's ``DPOTrainer._compute_loss`` on a torch model (transformers + PEFT, the run's
adapters exported with ``save_peft``) whose reference is the same model with its adapter disabled."""

from __future__ import annotations

import json
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest

from tests.close import assert_close
from tests.train.conftest import lm_args, train
from tests.train.test_chat import tok  # noqa: F401 - the SmolLM2 tokenizer fixture
from train.config import ConfigError, DataConfig
from train.data import tokenize

WORDS = "the cat dog sat ran on mat a big small red why how yes no".split()


def _say(rng, lo=1, hi=8):
    return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))


def _string_pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": _say(rng, 2, 6), "chosen": " the cat sat " + _say(rng, 0, 3),
             "rejected": " " + _say(rng, 2, 7)} for _ in range(n)]


def _chat_pairs(n, seed=0, implicit=False):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = [{"role": "system", "content": _say(rng).capitalize() + "."}] if rng.random() < 0.4 else []
        for _ in range(int(rng.integers(0, 2))):  # earlier turns, some multi-turn
            prompt += [{"role": "user", "content": _say(rng) + "?"}, {"role": "assistant", "content": _say(rng) + "."}]
        prompt += [{"role": "user", "content": _say(rng) + "?"}]
        chosen = [{"role": "assistant", "content": "Yes. " + _say(rng)}]
        rejected = [{"role": "assistant", "content": _say(rng) + "!"}]
        out.append({"chosen": prompt + chosen, "rejected": prompt + rejected} if implicit
                   else {"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _trl_tokens(tok, rows, tmp_path):  # noqa: F811
    """TRL's DPOTrainer's ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` per pair."""
    import copy

    import datasets
    import torch
    import transformers as T
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tok), hidden_size=8, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], max_length=None, use_cpu=True)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_list(rows))
    return [(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"])) for r in trainer.train_dataset]


def _ours(tok, rows, **kw):  # noqa: F811
    import datasets

    cfg = DataConfig(prompt_field="prompt" if "prompt" in rows[0] else None, chosen_field="chosen",
                     rejected_field="rejected", seq_len=256, **kw)
    data, _ = tokenize(datasets.Dataset.from_list(rows), cfg, "causal_lm", tok, "mem")
    out = []
    for ids, mask, loss in zip(data.arrays["input_ids"], data.arrays["attention_mask"], data.arrays["loss_mask"]):
        sides = [(i[: int(m.sum())].tolist(), f[: int(m.sum())].tolist()) for i, m, f in zip(ids, mask, loss)]
        n_prompt = sides[0][1].index(1)
        assert sides[1][1].index(1) == n_prompt and sides[0][0][:n_prompt] == sides[1][0][:n_prompt]
        assert all(f == [0] * n_prompt + [1] * (len(i) - n_prompt) for i, f in sides)
        out.append((sides[0][0][:n_prompt], sides[0][0][n_prompt:], sides[1][0][n_prompt:]))
    return out


@pytest.mark.parametrize("case", ["strings", "chat", "chat_implicit_prompt"])
def test_pairs_are_tokenized_as_trls_dpo_trainer_does(tok, tmp_path, case):  # noqa: F811
    rows = {"strings": lambda: _string_pairs(12), "chat": lambda: _chat_pairs(12),
            "chat_implicit_prompt": lambda: _chat_pairs(12, implicit=True)}[case]()
    assert _ours(tok, rows) == _trl_tokens(tok, rows, tmp_path)


def _write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dpo_args(assets, out, data, *extra):
    return lm_args(assets, out, f"data.source={data}", "data.prompt_field=prompt", "data.chosen_field=chosen",
                   "data.rejected_field=rejected", "data.seq_len=20", "data.eval_fraction=0.25", "train.batch_size=8",
                   "train.steps=6", "train.objective=dpo", *extra)


def _torch_logps(model, ids, mask, completion):
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(ids)[:, 1:, None])[..., 0]
    return logits, (logp * torch.as_tensor(completion)[:, 1:]).sum(-1)


@pytest.mark.parametrize("objective", ["dpo", pytest.param("ipo", marks=pytest.mark.slow)])  # IPO's loss: test_objectives
def test_the_apps_held_out_dpo_metrics_equal_trls_on_the_exported_adapters(assets, tmp_path, objective):
    """After 6 steps: the app's eval loss and reward metrics equal TRL's DPOTrainer._compute_loss on the same
    held-out pairs, computed in torch on the base model with the run's PEFT adapter (reference: the adapter
    disabled). Checks rendering, completion masks, log-probabilities, the reference and the loss together."""
    import torch
    import transformers as T
    from peft import PeftModel
    from trl.trainer.dpo_trainer import DPOTrainer

    import lorax_variants as lv
    from lorax_variants.hf.peft import save_peft

    data = _write(tmp_path, _string_pairs(40))
    args = _dpo_args(assets, tmp_path / "run", data, f"train.objective={objective}", f"objective.{objective}.beta=0.2",
                     "data.eval_fraction=0.2")
    result = train(args)
    ev = result.summary["eval"]
    held = result.prepared.eval
    pairs = held.arrays
    n = len(held)
    assert ev["pairs"] == n == 8
    save_peft(tmp_path / "peft", result.built.model, lv.combine(result.trainable, result.frozen))
    base = T.AutoModelForCausalLM.from_pretrained(str(assets["llama"]), torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    ids = np.concatenate([pairs["input_ids"][:, 0], pairs["input_ids"][:, 1]])  # TRL's order: chosen, then rejected
    mask = np.concatenate([pairs["attention_mask"][:, 0], pairs["attention_mask"][:, 1]])
    comp = np.concatenate([pairs["loss_mask"][:, 0], pairs["loss_mask"][:, 1]])
    with model.disable_adapter():
        _, ref = _torch_logps(model, ids, mask, comp)
    stub = SimpleNamespace(
        model=SimpleNamespace(training=False), accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x, num_processes=1,
            sync_gradients=True, reduce=lambda x, reduction="sum": x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid" if objective == "dpo" else "ipo"], loss_weights=[1.0], beta=0.2, label_smoothing=0.0,
        use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask),
              "completion_mask": torch.as_tensor(comp), "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    with torch.no_grad():
        loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    metrics = {k: v[-1] for k, v in stub._metrics["eval"].items()}
    assert_close(ev["loss"], float(loss), 1e-5)
    assert_close(ev["rewards_chosen"], metrics["rewards/chosen"], 1e-4)
    assert_close(ev["rewards_rejected"], metrics["rewards/rejected"], 1e-4)
    assert_close(ev["rewards_margin"], metrics["rewards/margins"], 1e-4)
    assert ev["preference_accuracy"] == metrics["rewards/accuracies"]
    assert abs(ev["rewards_margin"]) > 1e-3  # the adapters moved: the comparison is not of zeros


@pytest.mark.slow  # ~25 s (CI's test-slow); the default run compares the app's DPO metrics with TRL's
def test_dpo_learns_the_preference_and_precomputed_reference_is_the_base(assets, tmp_path):
    """Held-out preference accuracy rises to 1 on a learnable preference; the cached reference (the initial
    model) gives the same run as the in-step one (every LoRA starts equal to the base)."""
    data = _write(tmp_path, _string_pairs(48, seed=1))
    base = train(_dpo_args(assets, tmp_path / "base", data, "train.steps=10"))
    cached = train(_dpo_args(assets, tmp_path / "cached", data, "train.steps=10", "objective.dpo.reference=precomputed"))
    assert base.summary["eval"]["preference_accuracy"] == 1.0
    assert_close(cached.summary["eval"]["loss"], base.summary["eval"]["loss"], 1e-5)
    first = [json.loads(x) for x in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in first if r["kind"] == "train")
    assert_close(first["loss"], np.log(2.0), 1e-6)  # step 1: policy = reference, every pair's loss is log 2
    assert (tmp_path / "base" / "report" / "preference.png").is_file()


@pytest.mark.slow  # SimPO's loss equals TRL's by default (tests/test_objectives.py); the app path is DPO's
def test_simpo_trains_without_a_reference(assets, tmp_path):
    data = _write(tmp_path, _string_pairs(48, seed=2))
    r = train(_dpo_args(assets, tmp_path / "simpo", data, "train.objective=simpo", "train.steps=10",
                        "objective.simpo.beta=2.0"))
    rows = [json.loads(x) for x in (tmp_path / "simpo" / "metrics.jsonl").read_text().splitlines()]
    margins = [x["rewards_margin"] for x in rows if x["kind"] == "train"]
    assert margins[-1] > margins[0] and r.summary["eval"]["preference_accuracy"] >= 0.75


SLOW = pytest.mark.slow  # the forward is each variant's SFT forward (tests/train/test_app.py); CI's slow pass runs all


@pytest.mark.parametrize("variant, extra", [pytest.param("dora", (), marks=SLOW),
                                            pytest.param("vera", ("adapter.r=16",), marks=SLOW),
                                            pytest.param("lora", ("quant.kind=nf4", "quant.block_size=32"), marks=SLOW),
                                            pytest.param("adalora", (), marks=SLOW),
                                            pytest.param("multitask", (), marks=SLOW),
                                            pytest.param("lora_drop", ("adapter.lora_drop.select_at=3",), marks=SLOW)])
def test_variants_train_under_dpo(assets, tmp_path, variant, extra):
    rows = _string_pairs(48, seed=3)
    more = ()
    if variant == "multitask":
        rows = [r | {"task": i % 2} for i, r in enumerate(rows)]
        more = ("data.task_field=task", "adapter.multitask.n_tasks=2")
    data = _write(tmp_path, rows)
    r = train(_dpo_args(assets, tmp_path / variant, data, f"adapter.variant={variant}", "train.steps=8", *extra, *more))
    metrics = [json.loads(x) for x in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()]
    margins = [x["rewards_margin"] for x in metrics if x["kind"] == "train"]
    assert margins[-1] > margins[0] and np.isfinite(r.summary["eval"]["loss"])


@pytest.mark.parametrize("rows, field, match", [
    ([{"prompt": "a", "chosen": "", "rejected": "b"}], "chosen", r"data.chosen_field: row 9 of .* has an empty completion"),
    ([{"prompt": "a", "chosen": "b", "rejected": "  "}], "rejected", r"data.rejected_field: row 9 .* empty completion"),
    ([{"prompt": "a", "chosen": "b", "rejected": None}], "rejected", r"data.rejected_field: row 9 .* null"),
])
def test_bad_pairs_are_named(assets, tmp_path, rows, field, match):
    data = _write(tmp_path, _string_pairs(8) + rows)
    with pytest.raises(ConfigError, match=match):
        train(_dpo_args(assets, tmp_path / "bad", data))


@pytest.mark.parametrize("setting, match", [
    ("objective.dpo.beta=0", r"objective.dpo: beta must be > 0"),
    ("objective.dpo.beta=-1", r"objective.dpo: beta must be > 0"),
    ("objective.dpo.label_smoothing=0.5", r"objective.dpo: label_smoothing must be in \[0, 0.5\)"),
    ("adapter.init=pissa", r"objective.dpo.reference: base is the model with the adapters off.*precomputed"),
    ("data.chosen_field=null", r"data.chosen_field: preference pairs need both"),
    ("train.objective=sft", r"data.chosen_field: holds preference pairs, which train.objective sft does not read"),
    ("train.gen_eval=2", r"train.gen_eval: scores answers of SFT data"),
])
def test_bad_preference_settings_are_named(assets, tmp_path, setting, match):
    from train.config import load

    data = _write(tmp_path, _string_pairs(8))
    with pytest.raises(ConfigError, match=match):
        load(None, _dpo_args(assets, tmp_path / "bad", data, setting))


def test_a_long_prompt_loses_its_start_and_the_replies_are_kept_whole(tok):  # noqa: F811
    """data.truncation=cut on a pair: the prompt keeps its end (the turns nearest the replies), the completions
    stay whole where the row allows it."""
    import datasets

    rng = np.random.default_rng(4)
    rows = [{"prompt": _say(rng, 60, 80), "chosen": " yes the cat sat", "rejected": " no"} for _ in range(3)]
    T = 32
    cfg = DataConfig(prompt_field="prompt", chosen_field="chosen", rejected_field="rejected", seq_len=T)
    data, _ = tokenize(datasets.Dataset.from_list(rows), cfg, "causal_lm", tok, "mem")
    assert data.stats["truncated"] == 3 and data.stats["dropped_examples"] == 0
    for r, ids, mask, loss in zip(rows, data.arrays["input_ids"], data.arrays["attention_mask"], data.arrays["loss_mask"]):
        n_prompt = len(tok(r["prompt"])["input_ids"])
        full = [tok(r["prompt"] + r[k] + tok.eos_token)["input_ids"] for k in ("chosen", "rejected")]
        keep = T - max(len(f) - n_prompt for f in full)
        for side in range(2):
            n = int(mask[side].sum())
            assert ids[side, :n].tolist() == full[side][n_prompt - keep:]
            assert loss[side, :n].tolist() == [0] * keep + [1] * (len(full[side]) - n_prompt)


@pytest.mark.slow  # the step's sharding is SFT's, checked by default in tests/train/test_sharded.py
def test_dpo_sharded_over_8_devices_equals_one_device(assets, tmp_path):
    """The DPO step under FSDP x tensor parallelism on 8 simulated devices: the single device's losses and
    adapters (pairs split over the batch axis like SFT rows; the reference pass sharded the same way)."""
    from tests.train.conftest import adapters, cli, losses

    data = _write(tmp_path, _string_pairs(48, seed=5))
    common = ("train.steps=4", "train.grad_accum=2")
    cli(_dpo_args(assets, tmp_path / "one", data, *common, "mesh.fsdp=1"), devices=1)
    cli(_dpo_args(assets, tmp_path / "eight", data, *common, "mesh.fsdp=4", "mesh.tensor=2"), devices=8)
    assert_close(losses(tmp_path / "eight"), losses(tmp_path / "one"), 2e-5)
    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "eight")
    assert any(np.abs(a[k]).max() > 0 for k in a if k.endswith("lora_b"))
    for k in a:
        assert_close(b[k], a[k], 1e-4, err_msg=k)


@pytest.mark.slow  # the library's DPO step against SFT's by default (tests/test_objectives.py)
def test_the_apps_dpo_step_takes_the_sft_steps_argument_bytes(assets, tmp_path):
    """The app's jitted DPO step (reference: base, in the step) against its SFT step on the same tokens (B pairs
    as 2B rows): the compiled argument bytes are equal (no second weight tree)."""
    import jax
    import jax.numpy as jnp

    from train.config import load
    from train.run import _prepare, _steps

    data = _write(tmp_path, _string_pairs(16))
    sizes = {}
    for objective in ("sft", "dpo"):
        extra = (("data.chosen_field=null", "data.rejected_field=null", "data.response_field=chosen")
                 if objective == "sft" else ())
        cfg = load(None, _dpo_args(assets, tmp_path / objective, data, f"train.objective={objective}", *extra))
        p = _prepare(cfg, abstract=False)
        fns = _steps(p)
        rows = (1, 8, 2, 20) if objective == "dpo" else (1, 16, 20)
        batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
        compiled = fns.train.lower(p.built.trainable, p.built.frozen, jax.eval_shape(p.optimizer.init, p.built.trainable),
                                   batch, jnp.int32(0), jax.random.key(0)).compile()
        sizes[objective] = compiled.memory_analysis().argument_size_in_bytes
    assert sizes["dpo"] == sizes["sft"] > 0
