"""The app end to end, in this process: every variant, QLoRA, GPT-2, BERT classification, bf16,
dry runs of every shipped config, outputs a person looks at."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import cls_args, lm_args, losses, main, train
from tests import hf_models as H
from tests.close import assert_close

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))

VARIANTS = {
    "lora": [], "rslora": ["adapter.rslora=true"], "pissa": ["adapter.init=pissa", "optim.lr=0.002"],
    "lora_fa": ["adapter.variant=lora_fa"], "loraplus": ["adapter.variant=loraplus", "optim.lr=0.002"],
    "dora": ["adapter.variant=dora"], "vera": ["adapter.variant=vera", "adapter.r=16", "optim.lr=0.05"],
    "adalora": ["adapter.variant=adalora", "adapter.adalora.target_r=2", "adapter.adalora.tinit=1", "adapter.adalora.tfinal=2"],
    "delta_lora": ["adapter.variant=delta_lora"], "dylora": ["adapter.variant=dylora"],
    "sora": ["adapter.variant=sora", "adapter.sora.xi=0.001"], "qlora": ["quant.kind=nf4", "quant.block_size=32"],
    "lora_drop": ["adapter.variant=lora_drop", "adapter.lora_drop.select_at=3", "adapter.lora_drop.threshold=0.5"],
    "pissa_nf4": ["adapter.init=pissa", "optim.lr=0.002", "quant.kind=nf4", "quant.block_size=32"],
    "loftq": ["adapter.init=loftq", "adapter.loftq.iters=2", "quant.kind=nf4", "quant.block_size=32"],
    "qalora": ["adapter.variant=qalora", "quant.kind=int4_asym", "quant.block_size=32", "optim.lr=0.003"],
    "hira": ["adapter.variant=hira", "optim.lr=0.05"],
    "miss": ["adapter.variant=miss", "optim.lr=0.01"], "miss_bat": ["adapter.variant=miss", "adapter.miss.mode=bat"],
    "shira": ["adapter.variant=shira", "adapter.shira.random_seed=3", "optim.lr=0.01"],
    "lora_ga": ["adapter.init=lora_ga", "adapter.lora_ga.batches=2"],
    "eva": ["adapter.init=eva", "adapter.eva.batches=2", "adapter.eva.tau=0.9"],
}


# Covered in the default run elsewhere: rsLoRA (a scale: the export tests), PiSSA (pissa_nf4 here, the export CLI),
# Delta-LoRA (test_delta_lora_changes_the_frozen_weights_and_lora_does_not).
# HiRA, MiSS, SHiRA: tests/nodes/test_<name>.py and test_all_variants.py (their app runs: slow); DoRA trains
# through the app in tests/train/test_report.py (12 steps, its figures checked), LoRA+ and SoRA there under
# `slow` (their optimizers: tests/optim). LoRA-drop: the app's resume test (tests/train/test_resume.py);
# EVA: its init against PEFT (tests/nodes/test_eva.py; its app runs under slow); LoRA-GA: its node and init against PEFT
# (tests/nodes/test_lora_ga.py), its app runs under slow. Every case here runs in CI's
# `make test-slow`.
# LoRA-FA: its node and projection in tests/nodes and tests/optim/test_lorafa.py.
# LoRA: nearly every app test trains it; AdaLoRA: test_report's run (its budget pruned, its figures); QLoRA:
# pissa_nf4 and loftq here and tests/hf/test_bnb.py (LoRA over an NF4 checkpoint through the app).
# LoftQ: tests/test_loftq.py (the algorithm against PEFT's) and the app's plan of configs; QA-LoRA: its node,
# merge and PEFT export tests (tests/nodes/test_qalora.py, tests/hf/test_export.py).
# VeRA: its node, stacked apply and PEFT codec (tests/nodes/test_vera.py, tests/hf), its app run under slow.
# DyLoRA: its node and rank sampling (tests/nodes), its app run and resume under slow.
# pissa_nf4 too (~40 s): PiSSA through the export CLI's default case, LoRA over NF4 through the app in tests/hf/test_bnb.py.
ELSEWHERE = ("pissa_nf4", "vera", "dylora", "rslora", "pissa", "delta_lora", "hira", "miss", "miss_bat", "shira", "loraplus", "sora", "dora", "lora_fa",
             "lora", "adalora", "qlora", "loftq", "qalora", "lora_drop", "lora_ga", "eva")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v in ELSEWHERE else v for v in VARIANTS])
def test_every_variant_trains(assets, tmp_path, variant):
    out = tmp_path / "run"
    result = train(lm_args(assets, out, "train.steps=8", "data.eval_fraction=0.1", *VARIANTS[variant]))
    curve = losses(out)
    assert len(curve) == 8 and all(np.isfinite(curve))
    assert np.mean(curve[-3:]) < np.mean(curve[:3]), curve  # it learns
    assert result.summary["eval"]["loss"] < curve[0]
    if variant == "adalora":
        ranks = result.summary["adalora_ranks"]
        assert sum(int(np.sum(r)) for r in ranks) < sum(int(np.size(r)) for r in ranks)  # the budget pruned
    if variant == "lora_drop":
        from lorax_variants import LoraDropNode

        nodes = [n for n in result.trainable["layers"]["attn"].values() if isinstance(n, LoraDropNode)]
        assert nodes, "the selection turned some layers' adapters into shared ones"
        import jax

        import lorax_variants as lv
        from lorax_variants.hf import from_pretrained

        _, params = from_pretrained(assets["llama"])
        lora = lv.count_params(lv.adapt(params, result.built.spec, 0)).trainable
        assert result.summary["trainable_params"] < lora  # the selection removed parameters
        adam = [s for s in jax.tree.leaves(result.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
        assert lv.count_params(adam[0].mu).trainable == result.summary["trainable_params"]  # and their moments
    if variant == "pissa_nf4":  # PiSSA on the full-precision weight, then NF4 on the residual (as the library)
        import jax

        import lorax_variants as lv
        from lorax_variants.hf import from_pretrained

        _, params = from_pretrained(assets["llama"])
        b = result.built
        want = lv.quantize(lv.adapt(params, b.spec, jax.random.key(0)), b.quant)
        got = dict(lv.leaves_with_paths(result.frozen, nodes_are_leaves=True))
        for path, node in lv.leaves_with_paths(want, nodes_are_leaves=True):
            if isinstance(node, lv.LoraNode):
                assert isinstance(node.weight, lv.QuantizedNode)
                for x, y in zip(jax.tree.leaves(node.weight), jax.tree.leaves(got[path].weight)):
                    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if variant == "loftq":  # the run's frozen bases are LoftQ's (library, same key), read at full precision
        import jax

        import lorax_variants as lv
        from lorax_variants.hf import from_pretrained

        _, params = from_pretrained(assets["llama"])
        b = result.built
        want = lv.loftq(params, b.spec, b.quant, jax.random.key(0), iters=2)
        got = dict(lv.leaves_with_paths(result.frozen, nodes_are_leaves=True))
        for path, node in lv.leaves_with_paths(want, nodes_are_leaves=True):
            if isinstance(node, lv.LoraNode):
                for x, y in zip(jax.tree.leaves(node.weight), jax.tree.leaves(got[path].weight)):
                    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    if variant == "qlora":
        from lorax_variants import QuantizedNode

        kinds = {type(n.weight).__name__ for n in result.frozen["layers"]["attn"].values() if hasattr(n, "weight")}
        assert kinds == {QuantizedNode.__name__}
    if variant == "qalora":  # trained over int4 with zero points; folded, the model is int4 with the same logits
        import jax
        import jax.numpy as jnp

        import lorax_variants as lv

        tree = lv.combine(result.trainable, result.frozen)
        merged = lv.merge_quantized(tree)
        nodes = [n for _, n in lv.leaves_with_paths(merged, nodes_are_leaves=True) if isinstance(n, lv.Node)]
        assert nodes and all(isinstance(n, lv.QuantizedNode) and n.kind == "int4_asym" for n in nodes)
        ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 12)))
        model = result.built.model
        assert_close(model.apply(merged, ids), model.apply(tree, ids), 5e-4)


@pytest.mark.slow  # CI's test-slow; the default run's Delta-LoRA run (test_export_cli.py) checks its base moved
def test_delta_lora_changes_the_frozen_weights_and_lora_does_not(assets, tmp_path):
    from lorax_variants.hf import from_pretrained

    _, base = from_pretrained(assets["llama"])
    w0 = np.asarray(base["layers"]["attn"]["q_proj"])
    delta = train(lm_args(assets, tmp_path / "d", "adapter.variant=delta_lora"))
    plain = train(lm_args(assets, tmp_path / "p"))
    assert not np.allclose(np.asarray(delta.frozen["layers"]["attn"]["q_proj"].weight), w0)
    np.testing.assert_array_equal(np.asarray(plain.frozen["layers"]["attn"]["q_proj"].weight), w0)


def test_gpt2_and_bf16_compute(assets, tmp_path):
    out = tmp_path / "run"
    train(lm_args(assets, out, "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16", "train.steps=8",
                  r"adapter.targets=layers/(attn|mlp)/(c_attn|c_proj|c_fc)", model="gpt2"))
    curve = losses(out)
    assert np.mean(curve[-3:]) < np.mean(curve[:3])
    from tests.train.conftest import adapters

    assert {a.dtype for a in adapters(out).values()} == {np.dtype(np.float32)}  # adapters stay fp32


def test_bert_classification_learns_and_reports_accuracy(assets, tmp_path):
    out = tmp_path / "run"
    result = train(cls_args(assets, out, "train.steps=40", "optim.lr=0.01", "train.eval_every=20"))
    ev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in ev] == [20, 40]
    # 24 held-out sentences whose label is set by word lists: better than chance in loss and accuracy.
    assert result.summary["eval"]["loss"] < np.log(2) and result.summary["eval"]["accuracy"] >= 0.7
    assert "head/classifier" in str(result.built.extra)  # the new head trained


def test_outputs_a_person_looks_at(assets, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = main(lm_args(assets, out, "train.progress=true", "train.samples=2", "data.eval_fraction=0.1",
                             "train.checkpoint_every=2", "train.keep=2"), capsys)
    assert code == 0
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4, 6]  # every 2 steps, last 2 kept
    assert "loss=" in err and "tok/s=" in err and "lr=" in err  # the progress bar
    assert "sample 0:" in err
    for name in ("metrics.jsonl", "summary.json", "config.json", "adapters.safetensors", "report/index.html"):
        assert (out / name).is_file(), name
    png = (out / "report" / "loss.png").read_bytes()  # (the figures themselves: test_report.py)
    w, h = struct.unpack(">II", png[16:24])  # 11 x 4 in at 110 dpi, trimmed to what is drawn
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 1100 <= w <= 1250 and 400 <= h <= 480, (w, h)
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["trainable_params"] > 0 and "perplexity" in summary["eval"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_plans(config, assets, tmp_path, capsys, monkeypatch):
    """``--dry-run`` of each file in configs/ (examples pointed at tiny local models and data)."""
    sets = [f"train.output_dir={tmp_path / 'out'}"]
    text = config.read_text()
    if "models/llama" in text or "base: llama_example.yaml" in text:
        sets += [f"model.path={assets['llama']}", f"data.source={assets['lm']}", "data.prompt_field=null",
                 "data.response_field=null", "data.seq_len=16", "mesh.data=1", "mesh.fsdp=1", "mesh.context=1", "train.batch_size=8",
                 "train.grad_accum=1", "quant.block_size=32"]
    elif "models/gpt2" in text:
        sets += [f"model.path={assets['gpt2']}", f"data.source={assets['lm']}", "data.format=auto", "data.seq_len=16"]
    elif "models/bert" in text or "base: bert_example.yaml" in text:
        sets += [f"model.path={assets['bert']}", f"data.source={assets['cls']}", "data.text_field=sentence",
                 "data.label_field=sentiment", "data.seq_len=12"]
    if "r: 32" in text:  # the tiny Llama's k/v projections are 16 wide
        sets += ["adapter.r=8"]
    if "objective: dpo" in text:  # preference pairs
        texts = H.lm_texts(120)
        rows = [{"prompt": texts[i], "chosen": " " + texts[i + 1], "rejected": " " + texts[i + 2]} for i in range(0, 120, 3)]
        (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        sets += [f"data.source={tmp_path / 'pairs.jsonl'}", "data.prompt_field=prompt"]
    if "objective: grpo" in text:  # prompts, and a reward function
        rows = [{"prompt": t[:20]} for t in H.lm_texts(40)]
        (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        sets += [f"data.source={tmp_path / 'prompts.jsonl'}", "data.prompt_field=prompt", "data.seq_len=24",
                 "objective.grpo.reward=tests.train.rewards:the_share", "objective.grpo.max_completion_length=8",
                 "objective.grpo.group_size=4"]
    if "variant: many" in text:  # rows labelled with the adapters' task labels
        rows = [{"text": t, "task": ("support", "legal", "code")[i % 3]} for i, t in enumerate(H.lm_texts(60))]
        (tmp_path / "tasks.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        sets += [f"data.source={tmp_path / 'tasks.jsonl'}"]
    import train.plan

    plans, dry_run = [], train.plan.dry_run  # the plan the CLI's dry run printed
    monkeypatch.setattr(train.plan, "dry_run", lambda cfg: plans.append(dry_run(cfg)) or plans[-1])
    code, err = main(["--config", str(config), *sets, "--dry-run"], capsys)
    assert code == 0, err
    info = plans[0]
    assert info["trainable_params"] > 0 and info["frozen_params"] > 0
    assert info["bytes_per_device"]["frozen"] > 0
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


@pytest.mark.parametrize("name", ["Qwen3-8B", "Qwen3-30B-A3B", "gemma-3-27b"])
def test_dry_run_plans_todays_models_at_real_size(name, assets, tmp_path, capsys):
    """The app plans QLoRA on a real-size config (config.json + a tokenizer, no weights): every projection and
    expert bank adapted, parameters as transformers counts them, NF4 bytes."""
    import shutil

    import torch
    import transformers as T

    from tests.hf.test_auto import REAL
    from train.config import load
    from train.plan import plan as make_plan

    config = REAL[name]()
    d = tmp_path / name
    config.save_pretrained(d)
    for f in assets["llama"].iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, d / f.name)
    with torch.device("meta"):
        total = sum(p.numel() for p in T.AutoModelForCausalLM.from_config(config).parameters())
    sets = [f"model.path={d}", f"data.source={assets['lm']}", "data.seq_len=1024", "quant.kind=nf4", "adapter.r=16",
            "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16", f"train.output_dir={tmp_path / 'out'}"]
    code, err = main([*sets, "--dry-run"], capsys)
    assert code == 0, err
    info = make_plan(load(None, sets))
    assert info["trainable_params"] + info["frozen_params"] == total + info["trainable_params"]
    # NF4 projections (0.52 bytes a weight) beside bf16 embeddings and head: well under half the bf16 bytes
    assert info["bytes_per_device"]["frozen"] < 0.45 * 2 * total


# Under slow (CI's `make test-slow`): the MoE banks' node tests and the zoo's parity run by default.
@pytest.mark.parametrize("name, extra", [pytest.param("qwen3_moe", ["quant.kind=nf4", "quant.block_size=32"],
                                                      marks=pytest.mark.slow),
                                         pytest.param("gemma3", ["adapter.variant=dora"], marks=pytest.mark.slow)])
def test_todays_families_train_through_the_app(name, extra, assets, tmp_path):
    """QLoRA on a mixture-of-experts model (attention and every expert bank adapted, the router trained through
    adapter.train_extra) and DoRA on Gemma 3: the app learns, and the expert banks' adapters moved."""
    from tests import hf_models as H

    d = tmp_path / name
    H.tiny_run_model(name, d, H.lm_texts(200))
    sets = ["adapter.train_extra=layers/moe/router"] if name == "qwen3_moe" else []
    result = train(lm_args(assets, tmp_path / "run", f"model.path={d}", "train.steps=10", "optim.lr=0.01",
                           *extra, *sets))
    curve = losses(tmp_path / "run")
    assert np.mean(curve[-3:]) < np.mean(curve[:3]), curve
    if name == "qwen3_moe":
        from lorax_variants import QuantizedNode

        moe_t, moe_f = result.trainable["layers"]["moe"], result.frozen["layers"]["moe"]
        assert isinstance(moe_f["gate_proj"].weight, QuantizedNode) and moe_t["router"] is not None
        assert float(np.abs(np.asarray(moe_t["down_proj"].lora_b)).max()) > 0  # B left zero: the experts trained
        # vLLM's per-expert layout from the app; it reads back onto the run's model
        from safetensors import safe_open

        from lorax_variants.hf import from_pretrained, load_peft
        from train.export import main as export_main

        out = export_main(["--checkpoint", str(tmp_path / "run"), "--format", "peft", "--experts", "per_expert",
                           "--out", str(tmp_path / "vllm")])
        keys = list(safe_open(str(out / "adapter_model.safetensors"), "np").keys())
        assert "base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_B.weight" in keys
        model, params = from_pretrained(d)
        back = load_peft(out, model, params)
        np.testing.assert_allclose(np.asarray(back["layers"]["moe"]["down_proj"].lora_b),
                                   np.asarray(moe_t["down_proj"].lora_b), rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # multi-task through the app by default: tests/train/test_report.py's run (per-task metrics)
def test_multitask_routes_rows_to_their_task_adapter(assets, tmp_path):
    from tests import hf_models as H

    rows = [{"text": t, "task": 0} for t in H.lm_texts(80, seed=1)]
    rows += [{"text": " ".join(reversed(t.split())), "task": 1} for t in H.lm_texts(80, seed=2)]
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    result = train(lm_args(assets, out, f"data.source={data}", "adapter.variant=multitask", "adapter.multitask.n_tasks=2",
                           "data.task_field=task", "data.packing=false", "data.eval_fraction=0.2", "train.steps=10"))
    ev = result.summary["eval"]
    assert {"task0_loss", "task1_loss", "task0_tokens", "task1_tokens"} <= set(ev)
    assert ev["task0_tokens"] > 0 and ev["task1_tokens"] > 0
    np.testing.assert_allclose(ev["task0_tokens"] + ev["task1_tokens"], ev["tokens"])
    b = np.asarray(result.trainable["layers"]["attn"]["q_proj"].lora_b)  # [L, tasks, r, out]
    assert np.abs(b[:, 0]).max() > 0 and np.abs(b[:, 1]).max() > 0 and not np.allclose(b[:, 0], b[:, 1])


@pytest.mark.parametrize("log_every", [1, 10])  # the limit is checked every step, not only when metrics are logged
def test_too_many_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(assets, tmp_path, capsys, log_every):
    out = tmp_path / "run"
    code, err = main(lm_args(assets, out, "optim.lr=1e38", "optim.clip_norm=null", "optim.name=sgd", "optim.b1=0",
                             "train.max_nonfinite=2", "train.checkpoint_every=1", "train.steps=12",
                             f"train.log_every={log_every}"), capsys)
    log = err
    assert code == 3, err
    assert "more than train.max_nonfinite=2; stopped at step 3 without saving" in err
    assert "(the last checkpoint, step 2, is intact)" in err and "Traceback" not in err
    # the log names the step and the leaves whose gradients or updated values were not finite
    assert "step 1: loss 4.5" in log and "updated values not finite (or overflowing in their norm) in" in log and "layers/attn/q_proj/lora_" in log
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]
    from train.checkpoint import Checkpointer

    assert Checkpointer(out, 3).latest() == 2
    loss_rows = losses(out)
    assert len(loss_rows) == 3  # steps 1-3 logged, nothing after the stop


def test_non_finite_updates_are_skipped_and_leave_the_adapters_as_they_were(assets, tmp_path):
    out = tmp_path / "run"
    result = train(lm_args(assets, out, "optim.lr=1e38", "optim.clip_norm=null", "optim.name=sgd", "optim.b1=0"))
    assert result.summary["skipped_steps"] == 6
    b = np.asarray(result.trainable["layers"]["attn"]["q_proj"].lora_b)
    assert np.all(b == 0) and np.all(np.isfinite(np.asarray(result.trainable["layers"]["attn"]["q_proj"].lora_a)))


@pytest.mark.slow  # CI's `make test-slow`; by default the many-adapter step's equality runs in tests/nodes/test_multi.py
def test_many_adapters_train_together_each_on_its_rows(assets, tmp_path):
    """Three adapters (LoRA r=4 and r=2 from task labels, DoRA r=8 from a file of its own) in one run: per-adapter
    eval metrics, one PEFT adapter per name that PEFT loads with our logits, a merged export of one of them."""
    import jax.numpy as jnp
    import peft
    import torch  # noqa: F401
    import transformers as T

    import lorax_variants as lv
    from tests import hf_models as H
    from train.export import export

    rows = [{"text": t, "task": "fwd"} for t in H.lm_texts(60, seed=1)]
    rows += [{"text": " ".join(sorted(t.split())), "task": "sorted"} for t in H.lm_texts(60, seed=3)]
    labelled, own = tmp_path / "tasks.jsonl", tmp_path / "reversed.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows))
    own.write_text("\n".join(json.dumps({"text": " ".join(reversed(t.split()))}) for t in H.lm_texts(60, seed=2)))
    adapters = (f"[{{name: fwd, r: 4, task: fwd}}, {{name: rev, variant: dora, r: 8, alpha: 8, source: '{own}'}}, "
                "{name: sorted, r: 2, task: sorted}]")
    out = tmp_path / "run"
    result = train(lm_args(assets, out, f"data.source={labelled}", "adapter.variant=many", f"adapter.many.adapters={adapters}",
                           "data.task_field=task", "data.packing=false", "data.eval_fraction=0.2", "train.steps=10"))
    ev = result.summary["eval"]
    assert result.summary["routes"] == ["fwd", "rev", "sorted"]  # the names of the task<i>_* metrics
    assert all(ev[f"task{t}_tokens"] > 0 for t in range(3))
    np.testing.assert_allclose(sum(ev[f"task{t}_tokens"] for t in range(3)), ev["tokens"])
    q = result.trainable["layers"]["attn"]["q_proj"]
    assert isinstance(q, lv.MultiAdapterNode) and q.names == ("fwd", "rev", "sorted") and q.kinds == ("lora", "dora", "lora")
    assert [a.shape[-1] for a in q.lora_a] == [4, 8, 2]
    assert all(float(np.abs(np.asarray(b)).max()) > 0 for b in q.lora_b)  # every adapter trained

    peft_dir = export(out, "peft", tmp_path / "peft")
    tree = lv.combine(result.trainable, result.frozen)
    model = result.built.model
    ids = np.random.default_rng(0).integers(0, 96, (2, 9))
    for name in ("fwd", "rev", "sorted"):
        ours = np.asarray(model.apply(lv.pick(tree, name), jnp.asarray(ids)))
        base = T.AutoModelForCausalLM.from_pretrained(assets["llama"])
        theirs = H.torch_out(peft.PeftModel.from_pretrained(base, peft_dir / name).eval(), ids)
        assert_close(theirs, ours, 5e-4, err_msg=name)
    routed = np.asarray(model.apply(lv.route(tree, [1, 0]), jnp.asarray(ids)))  # rows through their own adapters
    assert_close(routed[0], np.asarray(model.apply(lv.pick(tree, "rev"), jnp.asarray(ids[:1])))[0], 2e-4)
    merged = export(out, "merged", tmp_path / "merged", adapter="rev")
    m = T.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert_close(H.torch_out(m, ids), np.asarray(model.apply(lv.pick(tree, "rev"), jnp.asarray(ids))), 5e-4)
