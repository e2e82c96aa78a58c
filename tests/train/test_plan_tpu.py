"""``train --plan TOPOLOGY``: the app's train step compiled for a TPU slice without one (XLA's TPU compiler from the
pinned libtpu wheel, ``make libtpu``; ``make test-slow`` fetches it). Its bad input is checked in the default run
(tests/train/test_bad_input.py: unknown topology, a mesh larger than the slice, a context axis that does not
divide the sequence)."""

from __future__ import annotations

import json

import pytest
import transformers

from tests.train.conftest import cli, lm_args

pytestmark = pytest.mark.slow

GIB = 2**30


SCRIPT = """
import json, sys
from train.topology import prepare_libtpu
prepare_libtpu()
from train.config import load
from train.topology import compile_plan, format_compile_plan
out = []
for args, name in json.loads(sys.argv[1]):
    info = compile_plan(load(None, args), name)
    out.append(info | {"text": format_compile_plan(info)})
print(json.dumps(out))
"""


def _plans(*runs: tuple[list[str], str]) -> list[dict]:
    """``compile_plan`` (what ``--plan`` prints and the long-context benchmark calls) for each (args, topology)."""
    import subprocess
    import sys

    from tests.env import xla_env
    from tests.train.conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(runs)], env=xla_env(1, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plan_compiles_the_run_for_a_slice(assets, tmp_path):
    """A tiny Llama's run on v5p-8 (4 chips) fits, with the compiler's figures. One 4096-token row split over the
    chips (context 4: 1024 tokens per chip) against four rows split by fsdp 4 (4096 tokens per chip): the
    temporaries per chip are smaller (0.6x: at d=32 the per-token int arrays weigh as much as activations), and the weights per chip under fsdp 4 about a quarter of context 4's
    (replicated). The device total is arguments + unaliased outputs + temporaries; v6e-8 on a mesh with all four
    axes compiles too."""
    base = lm_args(assets, tmp_path / "o", "data.seq_len=4096", "model.remat=nested", "model.compute_dtype=bfloat16")
    c, f, m = _plans((base + ["mesh.fsdp=1", "mesh.context=4", "train.batch_size=1"], "v5p-8"),
                     (base + ["mesh.fsdp=4", "train.batch_size=4"], "v5p-8"),
                     (lm_args(assets, tmp_path / "o", "mesh.fsdp=2", "mesh.context=2", "mesh.tensor=2", "data.seq_len=64",
                              "train.batch_size=2"), "v6e-8"))
    assert c["chips"] == 4 and c["mesh"] == {"data": 1, "fsdp": 1, "context": 4, "tensor": 1}
    assert c["hbm"] == 95 * GIB and c["fits"] and f["fits"] and m["fits"]
    assert c["temporaries"] < 0.75 * f["temporaries"], (c, f)  # 0.6 here: at d=32 the [T]-sized arrays weigh too
    assert c["weights"] == pytest.approx(4 * f["weights"], rel=0.2)
    for info in (c, f, m):
        assert info["device_total"] == info["arguments"] + info["outputs_not_aliased"] + info["temporaries"]
        assert info["arguments"] >= info["weights"] + info["adapters"] + info["optimizer_state"]
    assert m["chips"] == 8 and m["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "tensor": 2} and m["hbm"] == 32 * GIB
    assert "v5p-8 (4 x TPU v5" in c["text"] and c["text"].splitlines()[-1].startswith("fits:")
    assert "step FLOPs per chip: model" in c["text"]


def test_plan_says_what_does_not_fit(tmp_path, assets):
    """Llama-3.1-8B's shape in bf16 without quantization on one v5e chip (16 GiB): its weights alone exceed it;
    the answer names the shortfall and what to try. Only config.json is read."""
    d = tmp_path / "llama8b"
    transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False,
                             max_position_embeddings=8192).save_pretrained(d)
    out = cli([f"model.path={d}", f"data.source={assets['lm']}", "data.seq_len=1024", "train.batch_size=1",
               "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16", f"train.output_dir={tmp_path / 'o'}",
               "--plan", "v5e-1"]).stdout
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("does not fit"), out
    assert "quant.kind=nf4" in last and "model.remat=nested" in last
    assert not (tmp_path / "o").exists()  # a plan writes nothing


def test_plan_refuses_context_for_models_without_it(assets, tmp_path):
    proc = cli(lm_args(assets, tmp_path / "o", "--plan", "v5p-8", "mesh.fsdp=1", "mesh.context=4", model="gpt2"),
               check=False)
    assert proc.returncode == 2
    assert "mesh.context: context parallelism is implemented for the Llama family and Gemma, not GPT2" in proc.stderr
