"""Two processes on 127.0.0.1 (gloo CPU collectives) train like one process with the same global batch."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.train.conftest import ROOT, adapters, cli, lm_args, losses
from tests.close import assert_close
from tests.env import xla_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_hosts(args: list[str]) -> list[str]:
    port = _free_port()
    procs = []
    for pid in range(2):
        env = xla_env(2, PYTHONPATH=str(ROOT), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(pid))
        cmd = [sys.executable, "-m", "train", *[a for kv in args for a in ("--set", kv)]]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"process exited {p.returncode}:\n{out[-2000:]}\n{err[-3000:]}"
    return [out + err for out, err in outs]


# Slow: the default run has two processes in test_each_host_prepares_only_its_slice (the same distributed path).
@pytest.mark.slow
@pytest.mark.parametrize("resume", [False, True], ids=["straight", "resumed"])
def test_two_processes_equal_one(assets, tmp_path, resume):
    """Every host preparing all the data (data.host_shards: false): the batches, losses and adapters of one
    process."""
    common = ["mesh.data=2", "mesh.fsdp=2", "data.eval_fraction=0.1", "train.steps=6", "data.host_shards=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    cli(lm_args(assets, one, *common), devices=4)
    if resume:  # the second invocation resumes from a checkpoint both hosts wrote
        _two_hosts(lm_args(assets, two, *common, "train.stop_at=3"))
        assert (two / "checkpoints" / "3").is_dir()
    _two_hosts(lm_args(assets, two, *common))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    np.testing.assert_allclose(losses(two, "eval"), losses(one, "eval"), rtol=1e-5)
    a, b = adapters(one), adapters(two)
    for k in a:
        assert_close(b[k], a[k], 2e-5, err_msg=k)


@pytest.mark.slow  # CI's `make test-slow`; the default run's multi-device coverage: tests/train/test_sharded.py
def test_each_host_prepares_only_its_slice(assets, tmp_path):
    """data.host_shards (the default): each host tokenizes and packs half the training examples, the run's
    figures are both halves together (what one process prepares from all of them), and the hosts train one
    model."""
    import transformers

    from train.config import DataConfig
    from train.data import load_data

    common = ["mesh.data=2", "data.eval_fraction=0.1", "train.steps=8", "train.report=false"]
    two = tmp_path / "two"
    logs = _two_hosts(lm_args(assets, two, *common))
    said = [re.search(r"host (\d) of 2: (\d+) training examples -> (\d+) rows", log) for log in logs]
    assert [int(m.group(1)) for m in said] == [0, 1]
    assert [int(m.group(2)) for m in said] == [90, 90]  # 180 training examples, half each
    tok = transformers.AutoTokenizer.from_pretrained(str(assets["llama"]), local_files_only=True)
    whole = load_data(DataConfig(source=str(assets["lm"]), seq_len=16, eval_fraction=0.1), "causal_lm", tok)[0]
    b = json.loads((two / "summary.json").read_text())["data"]
    assert b["examples"] == whole.stats["examples"] == 180 and b["real_tokens"] == whole.stats["real_tokens"]
    assert b["rows"] == sum(int(m.group(3)) for m in said) and b["shards"] == 2
    loss = losses(two)
    assert np.isfinite(loss).all() and loss[-1] < loss[0]
