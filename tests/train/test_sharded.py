"""FSDP and tensor parallelism on 8 simulated CPU devices give the single-device run's losses and adapters."""

from __future__ import annotations

import numpy as np
import pytest

from tests.train.conftest import adapters, cli, lm_args, losses
from tests.close import assert_close
from tests.env import xla_env


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    cli(lm_args(assets, out, "mesh.fsdp=1", "train.grad_accum=2", "adapter.variant=dora"), devices=1)
    return out


@pytest.mark.parametrize("mesh", [("1", "2", "2", "2", "1"), pytest.param(("1", "8", "1", "1", "1"), marks=pytest.mark.slow),
                                  pytest.param(("2", "2", "1", "2", "1"), marks=pytest.mark.slow),
                                  pytest.param(("1", "2", "4", "1", "1"), marks=pytest.mark.slow)],
                         ids=["fsdp2_context2_tp2", "fsdp8", "dp2_fsdp2_tp2", "fsdp2_tp4"])
def test_sharded_run_equals_single_device(assets, single, tmp_path, mesh):
    """The default run has the mesh with every kind of split: the sequence over context (packed rows of 16 tokens
    in 4 chunks), the batch and the weights over fsdp, heads and MLP widths over tensor."""
    out = tmp_path / "run"
    data, fsdp, tensor, context, balanced = mesh
    cli(lm_args(assets, out, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"mesh.context={context}",
                f"mesh.context_balance={bool(int(balanced))}", "train.grad_accum=2", "adapter.variant=dora"), devices=8)
    ref, got = losses(single), losses(out)
    assert len(ref) == len(got) == 6
    assert_close(got, ref, 2e-5)
    a, b = adapters(single), adapters(out)
    assert sorted(a) == sorted(b)
    # The run changed the adapters (so equality below is not trivially of the initial values).
    assert any(np.abs(a[k]).max() > 0 for k in a if k.endswith("lora_b"))
    for k in a:
        assert_close(b[k], a[k], 1e-4, err_msg=k)


@pytest.mark.slow  # CI's test-slow; the default run shards frozen weights in tests/nodes/test_all_variants.py
def test_frozen_weights_are_split_over_devices(assets, tmp_path):
    """The plan's per-device bytes (from eval_shape and the shardings, nothing allocated): frozen weights
    shrink 1/devices under FSDP, also when quantized; data parallelism replicates them."""
    script = (
        "import json, sys; from train.config import load; from train.plan import plan\n"
        "args = json.loads(sys.argv[1]); out = {}\n"
        "for name, mesh in [('dp8', ['mesh.data=8', 'mesh.fsdp=1']), ('fsdp8', ['mesh.fsdp=8']), ('fsdp4', ['mesh.fsdp=4', 'mesh.data=2'])]:\n"
        "    for q in ['none', 'nf4']:\n"
        "        out[name + q] = plan(load(None, args + mesh + ['quant.kind=' + q, 'quant.block_size=32']))['bytes_per_device']\n"
        "print(json.dumps(out))\n")
    import json
    import subprocess
    import sys

    from tests.train.conftest import ROOT

    env = xla_env(8, PYTHONPATH=str(ROOT))
    args = lm_args(assets, tmp_path / "out", "train.batch_size=8")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for q in ("none", "nf4"):
        dp, f8, f4 = got["dp8" + q]["frozen"], got["fsdp8" + q]["frozen"], got["fsdp4" + q]["frozen"]
        assert f8 < f4 < dp
        assert f8 < dp / 5 and f4 < dp / 2.5  # about 1/8 and 1/4: norms and odd-sized leaves stay whole
    assert got["fsdp8nf4"]["frozen"] < got["fsdp8none"]["frozen"] / 2  # NF4 codes are sharded too


@pytest.mark.slow  # the default run checks the sharded many-adapter step in tests/nodes/test_multi.py
def test_many_adapters_sharded_equal_single_device(assets, tmp_path):
    """Many adapters (LoRA and DoRA of different ranks, rows routed by a task column) over FSDP 4 x tensor 2 give
    the single-device run's losses and adapters."""
    import json

    from tests import hf_models as H

    rows = [{"text": t, "task": ("x", "y")[i % 2]} for i, t in enumerate(H.lm_texts(96, seed=4))]
    data = tmp_path / "tasks.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    many = ["adapter.variant=many", "adapter.many.adapters=[{name: x, r: 4, task: x}, {name: y, variant: dora, r: 2, task: y}]",
            f"data.source={data}", "data.task_field=task", "data.packing=false", "train.steps=4", "train.grad_accum=2"]
    one, eight = tmp_path / "one", tmp_path / "eight"
    cli(lm_args(assets, one, "mesh.fsdp=1", *many), devices=1)
    cli(lm_args(assets, eight, "mesh.fsdp=4", "mesh.tensor=2", *many), devices=8)
    np.testing.assert_allclose(losses(eight), losses(one), rtol=1e-5, atol=1e-6)
    a, b = adapters(one), adapters(eight)
    assert sorted(a) == sorted(b) and any(k.endswith("magnitude/1") for k in a), sorted(a)[:6]
    for k in a:  # Adam's first steps divide by √v: reduction-order differences of near-zero gradients show at 1e-5
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=5e-5, err_msg=k)
