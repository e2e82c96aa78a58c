"""``python -m train export``: a trained run's checkpoint loads in transformers / PEFT with our logits."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as T

import lorax_variants as lv
from tests import hf_models as H
from tests.train.conftest import lm_args, main, train
from tests.close import assert_close

IDS = np.random.default_rng(1).integers(0, 96, (2, 10))


# LoRA and DoRA exports through the CLI under slow: the same writer as PiSSA's here (and tests/hf/test_export.py
# exports every variant; test_demo exports LoRA through the CLI's function)
# LoRA-GA's under slow too (its init and moved base against PEFT: tests/nodes/test_lora_ga.py; PiSSA's here
# writes the same PEFT form from the initial factors)
@pytest.mark.parametrize("variant", [pytest.param("lora", marks=pytest.mark.slow), "pissa",
                                     pytest.param("dora", marks=pytest.mark.slow),
                                     pytest.param("lora_ga", marks=pytest.mark.slow),
                                     pytest.param("eva", marks=pytest.mark.slow)])  # EVA vs PEFT: tests/nodes/test_eva.py
def test_export_both_formats_from_a_run(assets, tmp_path, capsys, variant):
    import peft

    # lora_ga: the export prepares the run again (the same gradient batches, the same moved bases) and writes it
    # converted to plain LoRA on the original base
    sets = {"lora": [], "pissa": ["adapter.init=pissa", "optim.lr=0.002"], "dora": ["adapter.variant=dora"],
            "lora_ga": ["adapter.init=lora_ga", "adapter.lora_ga.batches=2"],
            "eva": ["adapter.init=eva", "adapter.eva.batches=2", "adapter.eva.tau=0.9"]}[variant]
    run = tmp_path / "run"
    result = train(lm_args(assets, run, *sets))
    tree = lv.combine(result.trainable, result.frozen)
    ours = np.asarray(result.built.model.apply(tree, jnp.asarray(IDS)))
    for fmt in ("peft", "merged"):
        code, err = main(["export", "--checkpoint", str(run), "--format", fmt, "--out", str(tmp_path / fmt)], capsys)
        assert code == 0, err
    base = T.AutoModelForCausalLM.from_pretrained(assets["llama"])
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert_close(H.torch_out(pm, IDS), ours, 5e-4)
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(H.torch_out(merged, IDS), ours, 5e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    T.AutoTokenizer.from_pretrained(tmp_path / "merged")  # the export is a complete model directory


def test_export_refusals(assets, tmp_path, capsys):
    from lorax_variants.hf import from_pretrained

    run = tmp_path / "run"
    res = train(lm_args(assets, run, "adapter.variant=delta_lora", "train.steps=2"))
    w0 = np.asarray(from_pretrained(assets["llama"])[1]["layers"]["attn"]["q_proj"])
    assert not np.allclose(np.asarray(res.frozen["layers"]["attn"]["q_proj"].weight), w0)  # Delta-LoRA moved W
    code, err = main(["export", "--checkpoint", str(run), "--format", "peft", "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and "export the merged model instead" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
    assert main(["export", "--checkpoint", str(run), "--format", "merged", "--out", str(tmp_path / "m")], capsys)[0] == 0
    code, err = main(["export", "--checkpoint", str(run), "--format", "merged", "--out", str(tmp_path / "m")], capsys)
    assert code == 2 and "exists" in err and "--overwrite" in err
    code, err = main(["export", "--checkpoint", str(tmp_path / "nope"), "--format", "merged", "--out", str(tmp_path / "x")],
                     capsys)
    assert code == 2 and "is not a run directory" in err
    code, err = main(["export", "--checkpoint", str(run), "--format", "gguf", "--out", str(tmp_path / "g.gguf")], capsys)
    assert code == 2 and "--format gguf: tokenizer" in err and "a WordLevel tokenizer" in err, err
    assert not (tmp_path / "g.gguf").exists()


def _bpe_llama(base):
    """A tiny random Llama with the real SmolLM2 tokenizer (a BPE tokenizer llama.cpp knows)."""
    import torch

    from lorax_variants.hf.gguf import gguf_tokenizer
    from tests.hf.gguf_models import SMOLLM

    tok = gguf_tokenizer(SMOLLM)
    torch.manual_seed(0)
    T.LlamaForCausalLM(T.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(base)
    tok.save_pretrained(base)
    return tok, base


@pytest.mark.slow  # CI's `make test-slow`: the writer's own tests (tests/hf/test_gguf_export.py) run by default
def test_export_gguf_from_a_run_reads_back_in_transformers(assets, tmp_path, capsys):
    """A LoRA run on a model with a real BPE tokenizer (SmolLM2's), exported with `--format gguf`: transformers'
    GGUF loader gives the run's logits; the Q8_0 export is within Q8_0's error of them."""
    import torch

    tok, base = _bpe_llama(tmp_path / "base")
    run = tmp_path / "run"
    result = train(lm_args(assets, run, f"model.path={base}", "train.steps=3"))
    ids = np.asarray([tok("the quick brown fox jumps over the lazy dog")["input_ids"]])
    ours = np.asarray(result.built.model.apply(lv.combine(result.trainable, result.frozen), jnp.asarray(ids)))
    for kind in ("f32", "q8_0"):
        code, err = main(["export", "--checkpoint", str(run), "--format", "gguf", "--gguf-type", kind, "--out",
                          str(tmp_path / f"m.{kind}.gguf")], capsys)
        assert code == 0, err
        m = T.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=f"m.{kind}.gguf", dtype=torch.float32).eval()
        assert_close(H.torch_out(m, ids), ours, 1e-5 if kind == "f32" else 2e-2)


def test_classification_run_exports_its_head_as_modules_to_save(assets, tmp_path, capsys):
    import peft

    run = tmp_path / "run"
    result = train(__import__("tests.train.conftest", fromlist=["cls_args"]).cls_args(assets, run, "train.steps=4"))
    ids = np.random.default_rng(2).integers(6, 90, (3, 8))
    ours = np.asarray(result.built.model.apply(lv.combine(result.trainable, result.frozen), jnp.asarray(ids)))
    assert main(["export", "--checkpoint", str(run), "--format", "peft", "--out", str(tmp_path / "p")], capsys)[0] == 0
    base = T.AutoModelForSequenceClassification.from_pretrained(assets["bert"], num_labels=2)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "p").eval()
    assert_close(H.torch_out(pm, ids), ours, 5e-3)
    assert main(["export", "--checkpoint", str(run), "--format", "merged", "--out", str(tmp_path / "m")], capsys)[0] == 0
    merged = T.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert_close(H.torch_out(merged, ids), ours, 5e-3)


@pytest.mark.slow  # CI's `make test-slow`
def test_a_gguf_file_as_model_path_trains_and_exports(assets, tmp_path, capsys):
    """model.path = a .gguf file (config, weights and tokenizer from it): the run trains, its fingerprint is the
    file's, and its merged export (with the file's tokenizer written out) gives the run's logits in transformers."""
    import lorax_variants.hf as hf

    tok, base = _bpe_llama(tmp_path / "base")
    model, params = hf.from_pretrained(base)
    gguf_file = hf.save_gguf(tmp_path / "base.f32.gguf", model, params, file_type="f32", tokenizer=base)
    run = tmp_path / "run"
    result = train(lm_args(assets, run, f"model.path={gguf_file}", "train.steps=3"))
    meta = (run / "config.json").read_text()
    assert str(gguf_file) in meta
    ids = np.asarray([tok("the quick brown fox jumps over the lazy dog")["input_ids"]])
    ours = np.asarray(result.built.model.apply(lv.combine(result.trainable, result.frozen), jnp.asarray(ids)))
    code, err = main(["export", "--checkpoint", str(run), "--format", "merged", "--out", str(tmp_path / "merged")], capsys)
    assert code == 0, err
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(H.torch_out(merged, ids), ours, 1e-5)
    assert T.AutoTokenizer.from_pretrained(tmp_path / "merged")(
        "the quick brown fox")["input_ids"] == tok("the quick brown fox")["input_ids"]
    code, err = main(lm_args(assets, run, f"model.path={gguf_file}", "train.steps=4"), capsys)  # the same base
    assert code == 0 and "resumed from step 3" in err, err[-2000:]


@pytest.mark.slow  # ~1 min (CI's `make test-slow`): lm-eval against its own hf model on the run's merged export
def test_eval_harness_on_a_run_scores_as_lm_evals_hf_model_on_its_export(assets, tmp_path, capsys, monkeypatch):
    """``python -m train eval --harness``: local lm-eval tasks on a trained LoRA run score as lm-eval's ``hf``
    model scores the run's merged export; the results JSON is written once (refused again without --overwrite)."""
    import json

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from tests.harness_tasks import TASKS, local_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    train(lm_args(assets, run, "train.steps=6"))
    tasks = local_tasks(tmp_path)
    code, err = main(["eval", "--checkpoint", str(run), "--harness", ",".join(TASKS), "--include-path", str(tasks),
                      "--batch-size", "4"], capsys)
    assert code == 0, err
    ours = json.loads((run / "harness_step6.json").read_text())["results"]
    code, err = main(["export", "--checkpoint", str(run), "--format", "merged", "--out", str(tmp_path / "merged")],
                     capsys)
    assert code == 0, err
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=str(tmp_path / "merged"), dtype="float32", batch_size=4,
                                                device="cpu"), tasks=list(TASKS),
                                     task_manager=TaskManager(include_path=str(tasks)))["results"]
    for task, metric in (("local_mc", "acc,none"), ("local_mc", "acc_norm,none"), ("local_gen", "exact_match,none")):
        assert ours[task][metric] == theirs[task][metric], (task, metric)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert abs(ours["local_ppl"][metric] - theirs["local_ppl"][metric]) <= 1e-4 * theirs["local_ppl"][metric]
    code, err = main(["eval", "--checkpoint", str(run), "--harness", "local_mc", "--include-path", str(tasks)], capsys)
    assert code == 2 and "harness_step6.json exists; pass --overwrite" in err
    code, err = main(["eval", "--checkpoint", str(run), "--harness", "local_mcq", "--include-path", str(tasks)], capsys)
    assert code == 2 and "unknown task(s) ['local_mcq']" in err
