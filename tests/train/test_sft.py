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
