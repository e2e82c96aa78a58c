"""lm-evaluation-harness: our model class scores local tasks as lm-eval's own ``hf`` model scores the same
transformers checkpoint (acc, acc_norm and exact_match identical, perplexities within 1e-4).

The tasks are lm-eval YAML files over local JSON files (no hub): a multiple-choice task (loglikelihood), a
generation task (generate_until, stopped at a newline) and a perplexity task (loglikelihood_rolling over texts
longer than the model's 256 positions, so several windows each). The model is a tiny random Llama with the
real SmolLM2 tokenizer and moved LoRA factors; lm-eval's ``hf`` model reads the merged transformers export."""

from __future__ import annotations


import jax.numpy as jnp
import numpy as np
import pytest

from lorax_variants.hf import save_merged
from tests.harness_tasks import TASKS, local_tasks

lm_eval = pytest.importorskip("lm_eval")  # a test dependency (pyproject's test extra): always there under `make`

def _evaluate(lm, task_dir):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=lm, tasks=list(TASKS),
                                  task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    return out


@pytest.mark.slow  # ~1 min (CI's `make test-slow`); the default run checks the arguments
def test_our_model_class_scores_local_tasks_as_lm_evals_hf_model(gguf_bases, smol_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM

    from lorax_variants.harness import LoraxLM

    d, model, tree = gguf_bases("llama")
    tasks = local_tasks(tmp_path)
    merged = save_merged(tmp_path / "merged", model, tree, dtype=jnp.float32, tokenizer_from=d)
    theirs = _evaluate(HFLM(pretrained=str(merged), dtype="float32", batch_size=4, device="cpu"), tasks)
    ours = _evaluate(LoraxLM(model, tree, smol_tokenizer, batch_size=4), tasks)
    r, s = ours["results"], theirs["results"]
    for task, metric in (("local_mc", "acc,none"), ("local_mc", "acc_norm,none"), ("local_gen", "exact_match,none")):
        assert r[task][metric] == s[task][metric], (task, metric, r[task][metric], s[task][metric])
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert abs(r["local_ppl"][metric] - s["local_ppl"][metric]) <= 1e-4 * abs(s["local_ppl"][metric]), metric
    # per request: the same log-likelihoods (1e-4 of their scale), greedy flags and generated text
    for task in ("local_mc", "local_gen", "local_ppl"):
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            x, y = a["resps"], b["resps"]
            if task == "local_gen":
                assert x == y, (a["arguments"], x, y)
                continue
            xs = np.asarray([v[0][0] if isinstance(v[0], (list, tuple)) else v[0] for v in x], np.float64)
            ys = np.asarray([v[0][0] if isinstance(v[0], (list, tuple)) else v[0] for v in y], np.float64)
            assert np.max(np.abs(xs - ys)) <= 1e-4 * np.max(np.abs(ys)), (task, xs, ys)
    assert ours["samples"]["local_gen"][0]["resps"], "no generation ran"


def test_bad_arguments_are_named():
    from lorax_variants.harness import LoraxLM

    with pytest.raises(ValueError, match="pass model, tree and tokenizer, or pretrained="):
        LoraxLM()
    with pytest.raises(ValueError, match=r"unknown model argument\(s\) \['temperatur'\]"):
        LoraxLM(temperatur=1)
    with pytest.raises(ValueError, match="trust_remote_code is never used"):
        LoraxLM(trust_remote_code=True)
    with pytest.raises(ValueError, match="model= needs tree="):
        LoraxLM(model=object())
