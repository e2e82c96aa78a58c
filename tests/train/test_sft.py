"""Supervised fine-tuning in the app: packed rows keep examples apart, so a packed and a padded run of the same
data see the same loss tokens and, with the same weights, the same eval loss."""

from __future__ import annotations

import json

import numpy as np

from tests.close import assert_close
from tests.train.conftest import lm_args, train


def _pairs(tmp_path, n=48, seed=0):
    rng = np.random.default_rng(seed)
    words = "the cat dog sat ran on mat".split()
    rows = [{"prompt": " ".join(rng.choice(words, int(rng.integers(1, 6)))),
             "response": " ".join(rng.choice(words, int(rng.integers(1, 9))))} for _ in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_packed_and_padded_runs_give_the_same_eval_loss_over_the_same_tokens(assets, tmp_path):
    data = _pairs(tmp_path)
    common = [f"data.source={data}", "data.prompt_field=prompt", "data.response_field=response", "data.seq_len=24",
              "data.eval_fraction=0.25", "train.steps=1", "optim.lr=1e-12", "train.batch_size=4"]
    packed = train(lm_args(assets, tmp_path / "packed", *common, "data.packing=true"))
    padded = train(lm_args(assets, tmp_path / "padded", *common, "data.packing=false"))
    ep, eq = packed.summary["eval"], padded.summary["eval"]
    assert ep["tokens"] == eq["tokens"] > 0
    assert_close(ep["loss"], eq["loss"], 1e-5)
    dp, dq = packed.summary["data"], padded.summary["data"]
    assert dp["real_tokens"] == dq["real_tokens"] and dp["packing_efficiency"] > dq["packing_efficiency"]


SEEN: list[tuple[str, str, str]] = []


def record(prompt, reference, output):
    """A user's score function (train.gen_eval_score=tests.train.test_sft:record): what it was given is kept."""
    SEEN.append((prompt, reference, output))
    return float(len(output) % 3)


def test_generation_eval_answers_held_out_prompts_as_transformers_generates(assets, tmp_path):
    """With the base weights (learning rate 1e-12), each held-out prompt's greedy answer equals transformers'
    generate on the same model (KV cache, stop at EOS); the score is the user's function's mean."""
    import torch
    import transformers as T

    data = _pairs(tmp_path, n=24)
    SEEN.clear()
    result = train(lm_args(assets, tmp_path / "gen", f"data.source={data}", "data.prompt_field=prompt",
                           "data.response_field=response", "data.seq_len=24", "data.eval_fraction=0.25",
                           "train.steps=1", "optim.lr=1e-12", "train.batch_size=4", "train.gen_eval=5",
                           "train.gen_eval_tokens=6", "train.gen_eval_score=tests.train.test_sft:record"))
    ev = result.summary["eval"]
    assert ev["gen_examples"] == 5 and len(SEEN) == 5
    assert_close(ev["gen_score"], np.mean([len(o) % 3 for _, _, o in SEEN]), 1e-12)
    tok = T.AutoTokenizer.from_pretrained(str(assets["llama"]), local_files_only=True)
    model = T.AutoModelForCausalLM.from_pretrained(str(assets["llama"])).eval()
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    for prompt, reference, output in SEEN:
        assert any(r["prompt"] == prompt and r["response"] == reference for r in rows)
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 0)
        new = [t for t in ref[0, ids.shape[1]:].tolist() if t != tok.eos_token_id]
        assert output == tok.decode(new, skip_special_tokens=True)


def test_a_wrong_score_function_is_named_before_training(assets, tmp_path):
    import pytest

    from train.config import ConfigError

    data = _pairs(tmp_path, n=24)
    with pytest.raises(ConfigError, match=r"train.gen_eval_score: cannot load 'tests.nowhere:f'"):
        train(lm_args(assets, tmp_path / "bad", f"data.source={data}", "data.prompt_field=prompt",
                      "data.response_field=response", "data.eval_fraction=0.25", "train.gen_eval=2",
                      "train.gen_eval_score=tests.nowhere:f"))
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()
