"""``train --plan TOPOLOGY``: the app's train step compiled for a TPU slice without one (XLA's TPU compiler from the
pinned libtpu wheel, ``make libtpu``; ``make test-slow`` fetches it). Its bad input is checked in the default run
(tests/train/test_bad_input.py: unknown topology, a mesh larger than the slice, a context axis that does not
divide the sequence)."""

from __future__ import annotations

import json
import re

import pytest
import transformers

from tests.train.conftest import cli, lm_args

pytestmark = pytest.mark.slow

GIB = 2**30


def _figures(out: str) -> dict[str, float]:
    """The per-chip lines of the plan, in GiB."""
    got = {m[1].strip(): float(m[2].replace(",", "")) for m in re.finditer(r"^  ([a-z ()]+?)\s+([\d,.]+) GiB", out, re.M)}
    got["fits"] = out.rstrip().splitlines()[-1].startswith("fits:")
    return got


def test_plan_compiles_the_run_for_a_slice(assets, tmp_path):
    """A tiny Llama's run on v5p-8 (4 chips) fits with its figures; splitting a 4k-token sequence over the chips
    (context 4) holds less per chip than splitting the weights (fsdp 4), and the weights per chip are a quarter
    under fsdp 4 of what context 4 (weights replicated) holds."""
    base = lm_args(assets, tmp_path / "o", "data.seq_len=4096", "train.batch_size=4", "model.remat=nested",
                   "model.compute_dtype=bfloat16")
    ctx = cli(base + ["--plan", "v5p-8", "mesh.fsdp=1", "mesh.context=4", "train.batch_size=1"]).stdout
    fsdp = cli(base + ["--plan", "v5p-8", "mesh.fsdp=4", "train.batch_size=4", "train.grad_accum=4"]).stdout
    assert "v5p-8 (4 x TPU v5" in ctx and "mesh {'data': 1, 'fsdp': 1, 'context': 4, 'tensor': 1}" in ctx, ctx
    c, f = _figures(ctx), _figures(fsdp)
    assert c["fits"] and f["fits"], (ctx, fsdp)
    assert c["device total"] < f["device total"], (ctx, fsdp)  # one 4096-token row: its activations split 4 ways
    assert c["temporaries"] < f["temporaries"]
    assert c["weights (frozen)"] == pytest.approx(4 * f["weights (frozen)"], rel=0.2)
    assert c["device total"] >= c["weights (frozen)"] + c["adapters"]
    assert "step FLOPs per chip: model" in ctx


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


def test_plan_json_figures_are_the_compilers(assets, tmp_path):
    """``compile_plan`` (what the long-context benchmark calls) returns the compiled program's memory analysis:
    the device total is arguments + unaliased outputs + temporaries."""
    script = ("import json, sys\nfrom train.topology import prepare_libtpu\nprepare_libtpu()\n"
              "from train.config import load\nfrom train.topology import compile_plan\n"
              "print(json.dumps(compile_plan(load(None, json.loads(sys.argv[1])), 'v6e-8')))\n")
    import subprocess
    import sys

    from tests.env import xla_env
    from tests.train.conftest import ROOT

    args = lm_args(assets, tmp_path / "o", "mesh.fsdp=2", "mesh.context=2", "mesh.tensor=2", "data.seq_len=64",
                   "train.batch_size=2")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=xla_env(1, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["chips"] == 8 and info["mesh"] == {"data": 1, "fsdp": 2, "context": 2, "tensor": 2}
    assert info["device_total"] == info["arguments"] + info["outputs_not_aliased"] + info["temporaries"]
    assert info["hbm"] == 32 * GIB and info["fits"]
    assert info["arguments"] >= info["weights"] + info["adapters"] + info["optimizer_state"]
