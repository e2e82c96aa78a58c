"""FSDP and tensor parallelism on 8 simulated CPU devices give the single-device run's losses and adapters."""

from __future__ import annotations

import numpy as np
import pytest

from tests.train.conftest import adapters, cli, lm_args, losses


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    cli(lm_args(assets, out, "mesh.fsdp=1", "train.grad_accum=2", "adapter.variant=dora"), devices=1)
    return out


@pytest.mark.parametrize("mesh", [("1", "8", "1"), pytest.param(("2", "2", "2"), marks=pytest.mark.slow), pytest.param(("1", "2", "4"), marks=pytest.mark.slow)],
                         ids=["fsdp8", "dp2_fsdp2_tp2", "fsdp2_tp4"])
def test_sharded_run_equals_single_device(assets, single, tmp_path, mesh):
    out = tmp_path / "run"
    data, fsdp, tensor = mesh
    cli(lm_args(assets, out, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
                       "train.grad_accum=2", "adapter.variant=dora"), devices=8)
    ref, got = losses(single), losses(out)
    assert len(ref) == len(got) == 6
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    a, b = adapters(single), adapters(out)
    assert sorted(a) == sorted(b)
    # The run changed the adapters (so equality below is not trivially of the initial values).
    assert any(np.abs(a[k]).max() > 0 for k in a if k.endswith("lora_b"))
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


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
    import os
    import subprocess
    import sys

    from tests.train.conftest import ROOT

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
    args = lm_args(assets, tmp_path / "out", "train.batch_size=8")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for q in ("none", "nf4"):
        dp, f8, f4 = got["dp8" + q]["frozen"], got["fsdp8" + q]["frozen"], got["fsdp4" + q]["frozen"]
        assert f8 < f4 < dp
        assert f8 < dp / 5 and f4 < dp / 2.5  # about 1/8 and 1/4: norms and odd-sized leaves stay whole
    assert got["fsdp8nf4"]["frozen"] < got["fsdp8none"]["frozen"] / 2  # NF4 codes are sharded too
