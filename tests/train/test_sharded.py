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


@pytest.mark.parametrize("mesh", [("1", "8", "1"), ("2", "2", "2"), ("1", "2", "4")], ids=["fsdp8", "dp2_fsdp2_tp2", "fsdp2_tp4"])
def test_sharded_run_equals_single_device(assets, single, tmp_path, mesh):
    out = tmp_path / "run"
    data, fsdp, tensor = mesh
    proc = cli(lm_args(assets, out, f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}",
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
    """--dry-run's per-device bytes: frozen weights shrink with FSDP (from the shardings, nothing allocated)."""
    def frozen_bytes(devices: int) -> int:
        proc = cli(lm_args(assets, tmp_path / f"d{devices}", "mesh.fsdp=-1", "--dry-run"), devices=devices)
        line = next(line for line in proc.stdout.splitlines() if line.startswith("per device:"))
        return float(line.split("frozen ")[1].split(" MiB")[0])

    one, eight = frozen_bytes(1), frozen_bytes(8)
    assert eight < one / 4  # weights split 8 ways; norms and odd-sized leaves stay whole
